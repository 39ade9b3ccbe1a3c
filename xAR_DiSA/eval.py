"""Evaluate xAR with DiSA (or the original sampler): generate class-balanced ImageNet samples, then FID / IS.

The official command lines run as written (``cd xAR_DiSA`` first, or use ``-m xar_disa.eval`` from anywhere)::

    torchrun --nproc_per_node=4 eval.py --model xar_base --eval_bsz 256 --num_images 50000 \\
        --flow_upper_steps 50 --flow_lower_steps 15 --cfg 2.7 --output_dir /path/to/out_sample/ \\
        --resume ../ckpt/xAR-B.pth --vae_path /path/to/vae/kl16.ckpt --data_path /path/to/imagenet1k/ --evaluate

    # the original xAR sampler (xAR_DiSA/README.md): 40 flow steps for every cell
    torchrun --nproc_per_node=8 eval.py --model xar_base ... --num_iter 256 --num_steps 40 --cfg 2.7 ...

Every flag of the official ``eval.py`` (DiSA fork) and of the original xAR's is accepted with its name and
default; those the official code never reads say so in ``--help``. Generation goes through the shared loop
(:mod:`disa.evaluation`): per-image seeds, resume, ``results.json``; :mod:`xar_disa.engine_xar` holds the model side.
Deviations from upstream are listed in the ``--help`` epilog and in ``xAR_DiSA/README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from disa.checkpoints import CheckpointError, exit_on_error
from disa.cli import finite_float, int_at_least
from disa.distributed import RankFailedError, init_distributed, shutdown_distributed
from disa.evaluation import ClassBalancedLabels, EvalConfig, EvaluationError
from disa.vae import load_vae_checkpoint
from xar_disa.engine_xar import (
    MODELS,
    PRECISIONS,
    ModelConfig,
    NullLabels,
    SamplerConfig,
    UsageError,
    XARGenerator,
    configure_backends,
    evaluate,
    load_xar_weights,
    read_xar_weights,
)

__all__ = [
    "DEVIATIONS", "TRAINING_NOTES", "CLI_ERRORS", "get_args_parser", "parse_args", "model_config", "sampler_config",
    "metrics_config", "pick_device", "setup_logging", "summary", "run_evaluation_cli", "main",
]

DEVIATIONS = """\
deviations from the official xAR_DiSA/eval.py (results of the official settings are unchanged unless noted):
  * image k's noise comes from its own seed (seed * num_images + k), so the images do not depend on the number of
    GPUs, the batch size or a resume; upstream seeds one generator per rank (seed + rank). Same distribution, other
    samples.
  * no padding batch: upstream runs num_images // (eval_bsz * world) + 1 full batches per rank and throws the
    overflow away.
  * images are kept after the metrics (upstream deletes the folder); a rerun resumes, skipping finished images.
  * results.json in the image folder: metrics, time per image (rank 0's, as upstream prints it), NFE per AR step,
    the resolved config. FID uses stock torch-fidelity with --fid_stats (the LTH14 fork's fid_statistics_file).
  * device: CUDA when available, else the CPU; --precision fp16 is the official fp16 autocast on CUDA (fp32 on the
    CPU). A missing or mismatched checkpoint is an error (never random weights).
  * --resume also takes a training checkpoint (its EMA weights) or a folder holding checkpoint-last.pth.
"""


TRAINING_NOTES = """
training (main_xar.py; upstream's training script is named main_mar.py):
  * --online_eval writes <official folder name>-epoch<N> per evaluation (upstream reuses one folder and deletes it
    after the metrics); the per-epoch loss and lr go to <output_dir>/log.txt (upstream logs to TensorBoard).
  * --grad_clip exposes the recipe's clipping at 1.0; --precision fp32 trains without mixed precision (the xAR
    README's advice against NaNs).
"""


UNUSED = "accepted, unused (as upstream)"


def get_args_parser(*, training: bool = False) -> argparse.ArgumentParser:
    """The flags of the official ``eval.py`` / training script (same names and defaults) plus the documented
    additions. ``training`` adds the training-only ``--grad_clip`` and words the help for ``main_xar.py``."""
    prog = "main_xar.py" if training else "eval.py"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="xAR (next-cell prediction with flow matching) on ImageNet 256, with DiSA: flow steps annealed "
                    "linearly over the 4 cells, --flow_upper_steps for the first down to --flow_lower_steps for the "
                    "last. --num_steps N is the original xAR (N steps for every cell)."
                    + (" Trains by default; --evaluate generates and scores instead." if training else ""),
        epilog=DEVIATIONS + (TRAINING_NOTES if training else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="xar_large", choices=sorted(MODELS), help="model size (default: xar_large)")
    g.add_argument("--img_size", type=int_at_least(1), default=256, help="image size (default: 256)")
    g.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="KL-16 VAE checkpoint")
    g.add_argument("--vae_embed_dim", type=int_at_least(1), default=16, help="VAE latent channels (default: 16)")
    g.add_argument("--vae_stride", type=int_at_least(1), default=16, help="VAE downsampling (default: 16)")
    g.add_argument("--patch_size", type=int_at_least(1), default=1, help="tokens per latent pixel side (default: 1)")
    g.add_argument("--vae_ch", type=int_at_least(1), default=128,
                   help="not official: base width of the KL-16 VAE (kl16.ckpt: 128; tiny test VAEs use less)")
    g.add_argument("--class_num", type=int_at_least(1), default=1000, help="number of classes (default: 1000)")
    g.add_argument("--label_drop_prob", type=float, default=0.1, help="training label dropout (default: 0.1)")
    g.add_argument("--attn_dropout", type=float, default=0.1, help="training attention dropout (default: 0.1)")
    g.add_argument("--proj_dropout", type=float, default=0.1, help="training projection dropout (default: 0.1)")
    g.add_argument("--embed_dim", type=int_at_least(1), default=None,
                   help="not official: override the width of --model (tiny test models); the released "
                        "checkpoints need the default")
    g.add_argument("--depth", type=int_at_least(1), default=None,
                   help="not official: override the encoder and decoder depth of --model")
    g.add_argument("--num_heads", type=int_at_least(1), default=None,
                   help="not official: override the attention heads of --model")

    g = parser.add_argument_group("sampling (DiSA and the original xAR)")
    g.add_argument("--flow_upper_steps", type=int_at_least(1), default=None,
                   help="DiSA: flow steps of the first cell (default: 50)")
    g.add_argument("--flow_lower_steps", type=int_at_least(1), default=None,
                   help="DiSA: flow steps of the last cell (default: 15; the official sample_tokens defaults to "
                        "10, its eval.py to 15)")
    g.add_argument("--num_steps", "--num_step", dest="num_steps", type=int_at_least(1), default=None,
                   help="original xAR: this many flow steps for every cell (README: 40 for xAR-B, 50 for L/H); "
                        "replaces --flow_upper_steps/--flow_lower_steps")
    g.add_argument("--num_iter", type=int_at_least(1), default=64,
                   help=f"{UNUSED}: xAR always makes 4 AR steps (cells); only named in the original sampler's "
                        "folder name (default: 64)")
    g.add_argument("--cfg", type=finite_float(0), default=1.0,
                   help="classifier-free guidance scale at the last cell, ramped from 1 at the first "
                        "(default: 1.0 = none)")
    g.add_argument("--cfg_schedule", default="linear", help=f"{UNUSED} (default: linear)")
    g.add_argument("--fixed_short_grids", action="store_true",
                   help="not official: the fixed sampler for cells with 2 flow steps (upstream re-encodes the "
                        "context on the last step and crashes in the next cell); changes nothing for >= 3 steps")
    g.add_argument("--unconditional", action="store_true",
                   help="not official: sample the null class (label=None; crashed upstream); needs --cfg 1.0")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--evaluate", action="store_true",
                   help="generate and score (eval.py always does; names the folder ..._evaluate as upstream)"
                   if not training else "generate and score the --resume checkpoint instead of training")
    g.add_argument("--num_images", type=int_at_least(1), default=50000, help="images to generate (default: 50000)")
    g.add_argument("--eval_bsz", type=int_at_least(1), default=64, help="images per batch per GPU (default: 64)")
    g.add_argument("--online_eval", action="store_true",
                   help="training: evaluate the EMA weights every --eval_freq epochs" if training else UNUSED)
    g.add_argument("--eval_freq", type=int_at_least(1), default=40,
                   help="training: epochs between online evaluations (default: 40)" if training else UNUSED)
    g.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="fp16 = the official fp16 autocast on CUDA (fp32 on the CPU); bf16 autocast on any device; "
                        "fp32 (default: fp16)")
    g.add_argument("--no_metrics", action="store_true", help="only generate: no FID / IS")
    g.add_argument("--fid_stats", default="fid_stats/adm_in256_stats.npz",
                   help="reference statistics (mu, sigma) for FID (default: fid_stats/adm_in256_stats.npz, relative "
                        "to the working directory as upstream; `python util/download.py fid-stats`)")
    g.add_argument("--metrics_extractor", default="inception-v3-compat",
                   choices=("inception-v3-compat", "effnet-lite0"),
                   help="feature extractor: inception-v3-compat = the real FID/IS (default); effnet-lite0 = offline "
                        "FD_EffNet-Lite0 (not comparable to FID)")
    g.add_argument("--metrics_weights", default=None,
                   help="feature-extractor weights file (Inception: weights-inception-2015-12-05-6726825d.pth; "
                        "default: the torch hub cache, else download)")
    g.add_argument("--reference_images", default=None,
                   help="reference images (folder or ADM npz) for --kid / --prc, e.g. VIRTUAL_imagenet256_labeled.npz")
    g.add_argument("--kid", action="store_true", help="also KID (needs --reference_images)")
    g.add_argument("--prc", action="store_true", help="also precision / recall (needs --reference_images)")
    g.add_argument("--save_npz", action="store_true", help="also write <folder>.npz (arr_0, the ADM suite's input)")

    unused_here = None if training else f"{UNUSED} by eval.py"
    g = parser.add_argument_group("training and optimiser", unused_here)
    g.add_argument("--batch_size", type=int_at_least(1), default=16, help="batch size per GPU (default: 16)")
    g.add_argument("--epochs", type=int_at_least(1), default=400, help="training epochs (default: 400)")
    g.add_argument("--weight_decay", type=float, default=0.02, help="AdamW weight decay (default: 0.02)")
    g.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: blr * batch / 256)")
    g.add_argument("--blr", type=float, default=1e-4, help="base learning rate per 256 images (default: 1e-4)")
    g.add_argument("--min_lr", type=float, default=0.0, help="cosine schedule floor (default: 0)")
    g.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"),
                   help="after warm-up (default: constant)")
    g.add_argument("--warmup_epochs", type=float, default=100, help="linear warm-up epochs (default: 100)")
    g.add_argument("--ema_rate", type=float, default=0.9999, help="EMA rate (default: 0.9999)")
    g.add_argument("--save_last_freq", type=int_at_least(1), default=5,
                   help="epochs between checkpoint-last.pth saves (default: 5)")
    g.add_argument("--start_epoch", type=int_at_least(0), default=0, help="first epoch (resume sets it)")
    if training:
        g.add_argument("--grad_clip", type=float, default=1.0,
                       help="gradient-norm clip of xAR's recipe (default: 1.0; <= 0 disables)")
    g.add_argument("--data_path", default="./data/imagenet",
                   help="ImageNet root with train/ (training without --use_cached)")
    g.add_argument("--use_cached", action="store_true", help="train on MAR's cached VAE latents (--cached_path)")
    g.add_argument("--cached_path", default="", help="cached latents folder (MAR's main_cache.py)")
    g.add_argument("--num_workers", type=int_at_least(0), default=10, help="data-loader workers (default: 10)")
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin data-loader memory on CUDA (default)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin memory")

    g = parser.add_argument_group("output and distributed")
    g.add_argument("--output_dir", default="./output_dir", help="samples / checkpoints go here")
    g.add_argument("--log_dir", default="./output_dir",
                   help=f"{UNUSED}: upstream overwrites it with --output_dir; the training log is <output_dir>/log.txt")
    resume_help = ("checkpoint: a released flat xAR-*.pth, a training checkpoint (EMA weights) or a folder with "
                   "checkpoint-last.pth")
    if training:
        resume_help += "; training resumes from the folder's checkpoint if it has one, else starts afresh"
    g.add_argument("--resume", default="", help=resume_help)
    g.add_argument("--device", default=None,
                   help="cuda, cuda:N, cpu, ... (default: cuda if available, else cpu; upstream: cuda)")
    g.add_argument("--seed", type=int_at_least(0), default=1,
                   help="base seed (default: 1); image k of an evaluation uses seed * num_images + k")
    g.add_argument("--world_size", type=int, default=1, help=f"{UNUSED}: torchrun's WORLD_SIZE is used")
    g.add_argument("--local_rank", type=int, default=-1, help=f"{UNUSED}: torchrun's LOCAL_RANK is used")
    g.add_argument("--dist_on_itp", action="store_true", help=UNUSED)
    g.add_argument("--dist_url", default="env://", help=f"{UNUSED}: torchrun's environment is used")
    return parser


# ---------------------------------------------------------------------------------------------- configs


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        model=args.model, img_size=args.img_size, vae_stride=args.vae_stride, patch_size=args.patch_size,
        vae_embed_dim=args.vae_embed_dim, label_drop_prob=args.label_drop_prob, class_num=args.class_num,
        attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads,
    )


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    if args.num_steps is not None and (args.flow_upper_steps is not None or args.flow_lower_steps is not None):
        raise ValueError(
            "--num_steps (the original xAR: the same count for every cell) and --flow_upper_steps/"
            "--flow_lower_steps (DiSA) exclude each other; pass one or the other"
        )
    return SamplerConfig(
        flow_upper_steps=50 if args.flow_upper_steps is None else args.flow_upper_steps,
        flow_lower_steps=15 if args.flow_lower_steps is None else args.flow_lower_steps,
        num_steps=args.num_steps, cfg=args.cfg, official_short_grids=not args.fixed_short_grids,
        unconditional=args.unconditional,
    )


def metrics_config(args: argparse.Namespace) -> Any | None:
    """The :class:`disa.metrics.MetricsConfig` of the flags (FID + IS, as upstream), or None with --no_metrics."""
    if args.no_metrics:
        return None
    from disa.metrics import MetricsConfig  # torch-fidelity: imported only when metrics run

    return MetricsConfig(
        extractor=args.metrics_extractor, fid_stats=Path(args.fid_stats),
        reference_images=None if args.reference_images is None else Path(args.reference_images),
        kid=args.kid, prc=args.prc,
        weights_path=None if args.metrics_weights is None else Path(args.metrics_weights),
    )


def parse_args(argv: Sequence[str] | None = None, *, training: bool = False) -> argparse.Namespace:
    """Parse and validate: every setting error (bad step counts, a sampler setting the model refuses, cfg with
    --unconditional, image counts the class-balanced labels cannot split) exits with status 2 and a message saying
    what is allowed, before anything is loaded. The configs land in ``args.model_cfg`` / ``args.sampler_cfg``."""
    parser = get_args_parser(training=training)
    args = parser.parse_args(argv)
    try:
        args.model_cfg = model_config(args)
        args.sampler_cfg = sampler_config(args)
        try:
            args.sampler_cfg.plan(args.model_cfg.probe())
        except ValueError as err:
            raise ValueError(f"{err} (on the command line: --fixed_short_grids)"
                             if "official_short_grids" in str(err) else str(err)) from None
        if args.vae_ch % 32:
            raise ValueError(f"--vae_ch must be a multiple of 32 (the VAE's GroupNorms have 32 groups), got "
                             f"{args.vae_ch}")
        if not args.unconditional and args.num_images % args.class_num:
            raise ValueError(
                f"--num_images ({args.num_images}) must be a multiple of --class_num ({args.class_num}): the "
                "official evaluation generates the same number of images for every class"
            )
        metrics = metrics_config(args)
        if metrics is not None and metrics.isc and args.num_images < metrics.isc_splits:
            raise ValueError(
                f"the Inception Score splits the images into {metrics.isc_splits} groups: --num_images must be >= "
                f"{metrics.isc_splits} (got {args.num_images}), or pass --no_metrics to only generate"
            )
    except ValueError as err:
        parser.error(str(err))
    return args


def pick_device(requested: str | None) -> torch.device:
    """``--device``, else CUDA when available, else the CPU (never MPS by default: xAR's sampler state is float64,
    which MPS lacks)."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, each line tagged with its rank."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------- evaluation


def run_evaluation_cli(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, load (strictly) and evaluate as the flags say; returns the results dict (every rank)."""
    model_cfg, sampler = args.model_cfg, args.sampler_cfg
    folder = sampler.folder_name(args.num_images, num_iter=args.num_iter, evaluate=args.evaluate)
    config = EvalConfig(sample_dir=Path(args.output_dir) / folder, num_images=args.num_images,
                        batch_size=args.eval_bsz, seed=args.seed, save_npz=args.save_npz)
    # Files first: a wrong path fails in a second, not after building a billion-parameter model.
    state = read_xar_weights(args.resume)
    vae = load_vae_checkpoint(args.vae_path, embed_dim=args.vae_embed_dim, ch=args.vae_ch)
    model = model_cfg.build()
    checkpoint = load_xar_weights(model, args.resume, model_cfg, state=state)
    del state
    model.to(device).eval()
    vae.to(device).eval()
    generator = XARGenerator(model, vae, sampler, device=device, precision=args.precision)
    conditions = NullLabels() if sampler.unconditional else ClassBalancedLabels(args.num_images, args.class_num)
    record = {
        "model": dataclasses.asdict(model_cfg),
        "sampler": dataclasses.asdict(sampler),
        "checkpoint": str(checkpoint),
        "vae_path": str(args.vae_path),
        "vae_ch": args.vae_ch,
        "precision": args.precision,
        "num_iter": args.num_iter,
    }
    return evaluate(generator, config, conditions, model_config=record, metrics=metrics_config(args))


def summary(results: dict[str, Any]) -> str:
    """What the CLI prints on rank 0 at the end of an evaluation."""
    nfe, timing = results["nfe"], results["timing"]
    sec = timing["sec_per_image"]
    lines = [
        f"generated {results['images']['num_images']} images in {results['images']['sample_dir']} "
        f"({results['images']['generated_this_run']} this run, world size {results['world_size']})",
        f"NFE per AR step: {nfe['per_ar_step']} ({nfe['per_image']} network evaluations per image)",
        "sec per image (rank 0, after warm-up): " + (f"{sec:.4f}" if sec is not None else "n/a (only warm-up batches)"),
        "metrics: " + (json.dumps(results["metrics"]) if results["metrics"] is not None else "not computed"),
        f"results: {Path(results['images']['sample_dir']) / 'results.json'}",
    ]
    return "\n".join(lines)


CLI_ERRORS = (CheckpointError, EvaluationError, RankFailedError, UsageError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init_distributed(device=pick_device(args.device))
    setup_logging(ctx.rank)
    configure_backends(ctx.device)
    try:
        with exit_on_error(*CLI_ERRORS, prog="eval.py"):
            results = run_evaluation_cli(args, ctx.device)
        if ctx.is_main:
            print(summary(results))
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
