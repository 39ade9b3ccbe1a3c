"""Evaluate FlowAR with DiSA (or the original sampler): the official ``eval.py`` command line on the shared loop.

    cd FlowAR_DiSA && torchrun --nproc_per_node=4 eval.py --model flowar_small --diffloss_d 2 --diffloss_w 1024 \\
        --eval_bsz 256 --num_images 50000 --flow_upper_steps 25 --flow_lower_steps 15 --cfg 4.2 --guidance 0.9 \\
        --output_dir /path/to/output_dir --resume /path/to/FlowAR-S.pth --vae_path /path/to/MAR/kl16.ckpt \\
        --data_path /path/to/imagenet1k/ --evaluate
    torchrun --nproc_per_node=4 -m flowar_disa.eval ...      # the same, from anywhere

Every flag of the official FlowAR_DiSA ``eval.py`` is accepted with its default (those it never reads are marked
"accepted, unused (as upstream)"), plus the original FlowAR's ``--num_step`` (same step count at every scale) and
the options of this project (precision, metrics, tiny-model sizes). Images go through
:func:`disa.evaluation.run_evaluation`: ``<output_dir>/steps{U}-to-{L}-cfg{cfg}-image{N}[_evaluate]/{id:05d}.png``
(original sampler: ``ariter{N}cfg{cfg}-image{N}``), then ``results.json`` with the metrics, the timing and the
flow-head calls per AR step.

Deviations from upstream (none changes the model's arithmetic): image k's noise comes from its own seed
(``seed * num_images + k``), not from a per-rank generator, so images do not depend on the GPU count or batch size;
no padding batch; PNGs are kept after the metrics (``--delete_images`` removes them as upstream); FID/IS use stock
torch-fidelity (see :mod:`disa.metrics`) and run on every rank; ``--device`` defaults to CUDA when available, else
the CPU (fp32 there); a missing or mismatched checkpoint is an error, never random weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from disa.checkpoints import CheckpointError, exit_on_error
from disa.cli import finite_float
from disa.distributed import RankFailedError, init_distributed, shutdown_distributed
from disa.evaluation import ClassBalancedLabels, EvalConfig, EvaluationError
from disa.layers import add_compile_arguments, compile_request
from disa.vae import load_vae_checkpoint
from flowar_disa.engine_flowar import (
    MODELS,
    PRECISIONS,
    FlowARGenerator,
    ModelConfig,
    SamplerConfig,
    UsageError,
    configure_backends,
    evaluate,
    load_flowar_weights,
)
from flowar_disa.models.flowar import compile_head

__all__ = ["get_args_parser", "EvalRun", "resolve", "model_config_from_args", "sampler_from_args",
           "metrics_from_args", "resolve_device", "check_common", "warn_unused", "setup_logging", "print_results",
           "evaluate_checkpoint", "main"]

logger = logging.getLogger("flowar_disa.eval")

UNUSED = "accepted, unused (as upstream)"
# What every CLI error that is the user's to fix turns into: "<prog>: error: <message>", exit status 1.
CLI_ERRORS = (CheckpointError, EvaluationError, RankFailedError, UsageError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except for None / False defaults (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def get_args_parser(*, training: bool = False) -> argparse.ArgumentParser:
    """The official ``eval.py`` flags (``training=False``) or ``main_flowar.py`` flags (``training=True``: its
    defaults min_lr 1e-5, cosine schedule, use_cached off, ``--num_step`` 25, plus ``--use_checkpoint``)."""
    prog = "main_flowar.py" if training else "eval.py"
    p = argparse.ArgumentParser(
        prog=prog,
        description=("FlowAR training with the flow-matching loss, and evaluation (--evaluate) of its checkpoints"
                     if training else "FlowAR evaluation with DiSA (annealed flow steps) or the original sampler"),
        formatter_class=_HelpFormatter,
    )
    unused_in_eval = UNUSED + "; main_flowar.py uses it" if not training else None

    def helptext(text: str, *, eval_unused: bool = False) -> str:
        return f"{text} ({unused_in_eval})" if eval_unused and unused_in_eval else text

    g = p.add_argument_group("training")
    g.add_argument("--batch_size", default=16, type=int,
                   help=helptext("batch size per GPU (effective batch size is batch_size * # gpus)", eval_unused=True))
    g.add_argument("--epochs", default=400, type=int, help=helptext("training epochs", eval_unused=True))

    g = p.add_argument_group("model")
    g.add_argument("--model", default="flowar_large", choices=list(MODELS), help="model size (the AR transformer)")
    g.add_argument("--embed_dim", type=int, default=None,
                   help="not official: AR width of encoder and decoder (default: the --model's); for tiny test "
                        "models and research variants")
    g.add_argument("--depth", type=int, default=None,
                   help="not official: blocks of the AR encoder and of the decoder (default: the --model's)")
    g.add_argument("--num_heads", type=int, default=None,
                   help="not official: attention heads of the AR transformer (default: the --model's)")

    g = p.add_argument_group("VAE")
    g.add_argument("--img_size", default=256, type=int, help="image size (the scales are 1, 2, 4, ... up to "
                   "img_size / vae_stride)")
    g.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", type=str, help="KL-16 VAE checkpoint")
    g.add_argument("--vae_embed_dim", default=16, type=int, help="VAE latent channels")
    g.add_argument("--vae_stride", default=16, type=int, help="VAE down-sampling factor (KL-16)")
    g.add_argument("--patch_size", default=1, type=int, help="tokens per patch side (FlowAR: 1)")
    g.add_argument("--vae_ch", default=128, type=int,
                   help="not official: base width of the KL-16 VAE (kl16.ckpt: 128; tiny test VAEs use less)")

    g = p.add_argument_group("generation")
    g.add_argument("--flow_upper_steps", default=None, type=int,
                   help="DiSA: flow steps at the first scale (default 50 with DiSA"
                        + ("; without --flow_* flags main_flowar.py uses --num_step 25)" if training else ")"))
    g.add_argument("--flow_lower_steps", default=None, type=int,
                   help="DiSA: flow steps at the last scale, annealed linearly in between (default 15)")
    g.add_argument("--num_step", default=None, type=int,
                   help="original FlowAR sampler: this step count at every scale, exclusive with --flow_upper_steps"
                        "/--flow_lower_steps"
                        + (" (default 25 when no --flow_* flag is given, as upstream)" if training
                           else " (not a flag of the DiSA eval.py; the original FlowAR eval.py had it)"))
    g.add_argument("--guidance", default=0.9, type=finite_float(),
                   help="classifier-free guidance applies only for t <= this")
    g.add_argument("--num_images", default=50000, type=int, help="number of images to generate")
    g.add_argument("--cfg", default=1.0, type=finite_float(), help="classifier-free guidance scale at the last scale "
                   "(ramped linearly from 1 at the first)")
    g.add_argument("--cfg_schedule", default="linear", type=str,
                   help=UNUSED + "; FlowAR always ramps cfg linearly across scales")
    g.add_argument("--label_drop_prob", default=0.1, type=float, help="training label dropout (CFG)")
    g.add_argument("--eval_freq", type=int, default=40, help=helptext("online evaluation every N epochs",
                                                                       eval_unused=True))
    g.add_argument("--save_last_freq", type=int, default=5, help=helptext("save checkpoint-last.pth every N epochs",
                                                                           eval_unused=True))
    g.add_argument("--online_eval", action="store_true", help=helptext("evaluate during training",
                                                                        eval_unused=True))
    g.add_argument("--evaluate", action="store_true",
                   help="evaluation run: appends _evaluate to the folder name"
                        + ("; evaluates the --resume checkpoint instead of training" if training else ""))
    g.add_argument("--eval_bsz", type=int, default=64, help="generation batch size per GPU")
    g.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="sampling precision: fp16 = the official fp16 autocast on CUDA (fp32 elsewhere); bf16 "
                        "autocasts on any device; fp32. The ODE state is float64 in every case")
    g.add_argument("--uniform_grid", action="store_true",
                   help="not official: N uniform Euler steps instead of the official grid (uniform only at 50 "
                        "steps; odd counts lose a step; 1 step returns the noise)")
    g.add_argument("--heun", action="store_true",
                   help="not official: Heun's method (2N-1 flow calls; the official flag was a no-op)")
    add_compile_arguments(g)  # not official flags; --evaluate only (training's online evaluation runs eager)

    g = p.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=0.02, help=helptext("AdamW weight decay", eval_unused=True))
    g.add_argument("--lr", type=float, default=None, help=helptext("absolute learning rate", eval_unused=True))
    g.add_argument("--blr", type=float, default=1e-4,
                   help=helptext("base lr: lr = blr * total batch size / 256", eval_unused=True))
    g.add_argument("--min_lr", type=float, default=1e-5 if training else 0.0,
                   help=helptext("lower lr bound of the cosine schedule", eval_unused=True))
    g.add_argument("--lr_schedule", type=str, default="cosine" if training else "constant",
                   choices=["constant", "cosine"], help=helptext("lr schedule after warm-up", eval_unused=True))
    g.add_argument("--warmup_epochs", type=int, default=100, help=helptext("linear lr warm-up epochs",
                                                                            eval_unused=True))
    g.add_argument("--ema_rate", default=0.9999, type=float, help=helptext("EMA rate", eval_unused=True))
    g.add_argument("--grad_clip", type=float, default=3.0, help=helptext("gradient-norm clipping",
                                                                          eval_unused=True))
    g.add_argument("--attn_dropout", type=float, default=0.1, help="attention dropout (training only)")
    g.add_argument("--proj_dropout", type=float, default=0.1, help="projection dropout (training only)")
    g.add_argument("--buffer_size", type=int, default=0, help="buffer tokens (FlowAR: 0)")
    if training:
        g.add_argument("--use_checkpoint", action="store_true",
                       help="activation checkpointing (flowar_huge has it on regardless, as its factory sets it)")
        g.add_argument("--train_precision", default="fp32", choices=PRECISIONS,
                       help="not official: training forward precision; fp32 = upstream (autocast off, TF32 on "
                            "CUDA); fp16 adds loss scaling on CUDA")

    g = p.add_argument_group("flow head")
    g.add_argument("--diffloss_d", type=int, default=12,
                   help="flow-head depth (12 fits FlowAR-H; FlowAR-S: 2, FlowAR-L: 12)")
    g.add_argument("--diffloss_w", type=int, default=1536,
                   help="flow-head width (1536 fits FlowAR-H; FlowAR-S and -L: 1024)")
    g.add_argument("--temperature", default=1.0, type=float, help=UNUSED + " (FlowAR's ODE has no temperature)")

    g = p.add_argument_group("data, output, run")
    g.add_argument("--data_path", default="./data/imagenet", type=str,
                   help="ImageNet root with train/<class>/<images>" + ("" if training else f" ({UNUSED})"))
    g.add_argument("--class_num", default=1000, type=int, help="number of classes")
    g.add_argument("--output_dir", default="./output_dir", help="where checkpoints and sample folders go")
    g.add_argument("--log_dir", default="./output_dir", help=UNUSED + " (forced to --output_dir)")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda when available, else cpu; upstream default cuda)")
    g.add_argument("--seed", default=1, type=int,
                   help="training: seed + rank; evaluation: image k uses seed * num_images + k")
    g.add_argument("--resume", default="",
                   help=("folder holding checkpoint-last.pth to resume from (none there: train from scratch, as "
                         "upstream); with --evaluate, the checkpoint to evaluate (its EMA weights)") if training
                   else "the FlowAR weights to evaluate: FlowAR-{S,L,H}.pth (flat state dict) or a training "
                        "checkpoint (its model_ema)")
    g.add_argument("--start_epoch", default=0, type=int, help=helptext("first epoch (resume overrides it)",
                                                                        eval_unused=True))
    g.add_argument("--num_workers", default=10, type=int, help=helptext("data-loader workers", eval_unused=True))
    g.add_argument("--pin_mem", action="store_true", help=helptext("pin data-loader memory", eval_unused=True))
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group("distributed (launch with torchrun: it sets RANK / WORLD_SIZE / LOCAL_RANK)")
    g.add_argument("--world_size", default=1, type=int, help=UNUSED + " (torchrun's WORLD_SIZE decides)")
    g.add_argument("--local_rank", default=-1, type=int, help=UNUSED + " (torchrun's LOCAL_RANK decides)")
    g.add_argument("--dist_on_itp", action="store_true", help="OpenMPI/ITP launch: not supported, use torchrun")
    g.add_argument("--dist_url", default="env://", help="process-group init URL (only env://)")

    g = p.add_argument_group("cached latents")
    g.add_argument("--use_cached", action="store_true", dest="use_cached",
                   help="train on cached VAE latents: not supported (upstream main_flowar always reads images)"
                   if training else UNUSED)
    p.set_defaults(use_cached=not training)
    g.add_argument("--cached_path", default="", help=UNUSED)

    g = p.add_argument_group("metrics and output files (not official flags)")
    g.add_argument("--no_metrics", action="store_true", help="generate images only (no FID / IS)")
    g.add_argument("--fid_stats", default="fid_stats/adm_in256_stats.npz",
                   help="FID reference statistics (mu, sigma), as upstream relative to the working directory")
    g.add_argument("--metrics_extractor", default="inception-v3-compat",
                   help="inception-v3-compat (FID/IS as published) or effnet-lite0 (offline; reports "
                        "FD_EffNet-Lite0, not FID)")
    g.add_argument("--metrics_weights", default=None, help="feature-extractor weights file (default: torch hub cache)")
    g.add_argument("--reference_images", default=None,
                   help="reference images (folder or ADM npz) for --kid / --prc, e.g. VIRTUAL_imagenet256_labeled.npz")
    g.add_argument("--kid", action="store_true", help="also KID (needs --reference_images)")
    g.add_argument("--prc", action="store_true", help="also precision / recall (needs --reference_images)")
    g.add_argument("--save_npz", action="store_true", help="also write <folder>.npz (arr_0, ADM evaluation format)")
    g.add_argument("--delete_images", action="store_true", help="delete the PNGs after the metrics, as upstream")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------------------------- flags -> configs


@dataclass(frozen=True)
class EvalRun:
    """Everything an evaluation needs, resolved and validated from the flags."""

    model: ModelConfig
    sampler: SamplerConfig
    eval: EvalConfig
    labels: ClassBalancedLabels
    checkpoint: str
    vae_path: str
    vae_ch: int
    device: str | None
    precision: str
    metrics: Any | None  # disa.metrics.MetricsConfig
    compile_head: bool = False  # speed only (not in the fingerprint): torch.compile the flow head
    cuda_graphs: bool = False

    def fingerprint(self) -> dict[str, Any]:
        """What the images depend on (recorded in the folder; a resume with other values is refused)."""
        return {
            "model": dataclasses.asdict(self.model),
            "sampler": dataclasses.asdict(self.sampler),
            "checkpoint": os.path.abspath(self.checkpoint),
            "vae_path": os.path.abspath(self.vae_path),
            "vae_ch": self.vae_ch,
            "precision": self.precision,
        }


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    use_checkpoint = True if getattr(args, "use_checkpoint", False) else None
    return ModelConfig(
        model=args.model, img_size=args.img_size, vae_stride=args.vae_stride, patch_size=args.patch_size,
        vae_embed_dim=args.vae_embed_dim, label_drop_prob=args.label_drop_prob, class_num=args.class_num,
        attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout, buffer_size=args.buffer_size,
        diffloss_d=args.diffloss_d, diffloss_w=args.diffloss_w, use_checkpoint=use_checkpoint,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
    )


def sampler_from_args(args: argparse.Namespace, *, training: bool) -> SamplerConfig:
    """DiSA from ``--flow_upper_steps/--flow_lower_steps`` (defaults 50 / 15), or the original sampler from
    ``--num_step``; giving both is an error. Without either, eval.py runs DiSA 50 -> 15 (the DiSA eval.py defaults)
    and main_flowar.py the original 25 steps (the main_flowar.py default)."""
    disa_given = args.flow_upper_steps is not None or args.flow_lower_steps is not None
    if disa_given and args.num_step is not None:
        raise ValueError("use either --num_step (original sampler: the same count at every scale) or "
                         "--flow_upper_steps/--flow_lower_steps (DiSA), not both")
    num_step = args.num_step
    if num_step is None and training and not disa_given:
        num_step = 25  # main_flowar.py's --num_step default: the original sampler
    upper = 50 if args.flow_upper_steps is None else args.flow_upper_steps
    lower = 15 if args.flow_lower_steps is None else args.flow_lower_steps
    return SamplerConfig(flow_upper_steps=upper, flow_lower_steps=lower, num_step=num_step, cfg=args.cfg,
                         guidance=args.guidance, official_grid=not args.uniform_grid, heun=args.heun)


def metrics_from_args(args: argparse.Namespace) -> Any | None:
    """A :class:`disa.metrics.MetricsConfig` from the metrics flags, or None with ``--no_metrics``."""
    if args.no_metrics:
        return None
    from disa.metrics import MetricsConfig  # torch-fidelity: imported only when metrics run

    return MetricsConfig(
        extractor=args.metrics_extractor, fid_stats=Path(args.fid_stats),
        reference_images=None if args.reference_images is None else Path(args.reference_images),
        kid=args.kid, prc=args.prc, weights_path=None if args.metrics_weights is None else Path(args.metrics_weights),
    )


def resolve_device(text: str | None) -> str | None:
    """``--device``: None (CUDA when available, else the CPU) or a torch device string; refuses MPS (FlowAR's
    ODE state is float64) and CUDA where there is none."""
    if text is None:
        return None if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; allowed: cuda, cuda:N, cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {text!r}: allowed are cuda, cuda:N and cpu (FlowAR's float64 ODE state does not "
                         "run on MPS)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r} but CUDA is not available here; use --device cpu")
    return text


def check_common(args: argparse.Namespace) -> None:
    """Checks shared by both scripts (parse-time errors)."""
    if args.dist_on_itp:
        raise ValueError("--dist_on_itp (OpenMPI/ITP launch) is not supported; launch with torchrun")
    if args.dist_url != "env://":
        raise ValueError(f"--dist_url {args.dist_url!r}: only env:// (torchrun's environment) is supported")
    if args.vae_ch < 32 or args.vae_ch % 32:
        raise ValueError(f"--vae_ch must be a positive multiple of 32 (GroupNorm with 32 groups), got {args.vae_ch}")
    for name in ("eval_bsz", "num_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")


def resolve(args: argparse.Namespace, *, training: bool = False) -> EvalRun:
    """Flags -> validated configs; raises ValueError with a message naming the flag and what is allowed."""
    check_common(args)
    if not args.resume:
        raise ValueError("--resume is required: the FlowAR weights to evaluate, e.g. "
                         "pretrained_models/flowar/FlowAR-S.pth (fetch them with `python util/download.py`)")
    model = model_config_from_args(args)
    sampler = sampler_from_args(args, training=training)
    folder = Path(args.output_dir) / sampler.folder_name(args.num_images, evaluate=args.evaluate)
    labels = ClassBalancedLabels(args.num_images, args.class_num)
    config = EvalConfig(sample_dir=folder, num_images=args.num_images, batch_size=args.eval_bsz, seed=args.seed,
                        save_npz=args.save_npz, keep_pngs=not args.delete_images, progress=not args.no_progress)
    device = resolve_device(args.device)
    compile_now, cuda_graphs = compile_request(args, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return EvalRun(model=model, sampler=sampler, eval=config, labels=labels, checkpoint=args.resume,
                   vae_path=args.vae_path, vae_ch=args.vae_ch, device=device, precision=args.precision,
                   metrics=metrics_from_args(args), compile_head=compile_now, cuda_graphs=cuda_graphs)


def warn_unused(args: argparse.Namespace) -> None:
    """Upstream silently ignores these; say so when they are set to something that would matter elsewhere."""
    if args.temperature != 1.0:
        logger.warning("--temperature %s has no effect: FlowAR's flow ODE has no temperature (as upstream)",
                       args.temperature)
    if args.cfg_schedule != "linear":
        logger.warning("--cfg_schedule %r has no effect: FlowAR ramps cfg linearly across scales (as upstream)",
                       args.cfg_schedule)


# ---------------------------------------------------------------------------------------------- running


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings elsewhere (so a 64-GPU run prints one progress stream)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def print_results(results: dict[str, Any]) -> None:
    """The CLI's result lines (rank 0)."""
    images, timing, nfe = results["images"], results["timing"], results["nfe"]
    print(f"FlowAR: {images['num_images']} images in {images['sample_dir']} "
          f"({images['generated_this_run']} generated now, {images['reused']} reused)")
    if timing["sec_per_image"] is not None:
        print(f"time: {timing['sec_per_image']:.4f} s/image per device (rank 0, after warm-up), "
              f"{timing['images_per_second']:.2f} images/s in total")
    if nfe["per_ar_step"] is not None:
        print(f"flow-head calls per AR step (scale): {nfe['per_ar_step']} = {nfe['per_image']} per image")
    if results["metrics"] is not None:
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results["metrics"].items())))
    print(f"results: {Path(images['sample_dir']) / 'results.json'}")


def evaluate_checkpoint(run: EvalRun) -> dict[str, Any]:
    """Load the model and VAE, evaluate on this rank (call after :func:`disa.distributed.init_distributed`); every
    rank returns the results, rank 0 prints them."""
    ctx = init_distributed(device=run.device)  # the process group the caller set up (or a single process)
    configure_backends(ctx.device)
    model = run.model.build()
    path = load_flowar_weights(model, run.checkpoint, run.model)
    logger.info("loaded %s (%s, %.1fM parameters)", path, run.model.model,
                sum(p.numel() for p in model.parameters()) / 1e6)
    vae = load_vae_checkpoint(run.vae_path, embed_dim=run.model.vae_embed_dim, ch=run.vae_ch)
    model.to(ctx.device).eval()
    if run.compile_head:
        compile_head(model, cuda_graphs=run.cuda_graphs)
    generator = FlowARGenerator(model, vae.to(ctx.device), run.sampler, device=ctx.device, precision=run.precision)
    logger.info("sampler %s: flow-head calls per scale %s", run.sampler, list(generator.nfe_per_ar_step))
    results = evaluate(generator, run.eval, run.labels, model_config={**run.fingerprint(), "device_type":
                                                                        ctx.device.type}, metrics=run.metrics)
    if ctx.rank == 0:
        print_results(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        run = resolve(args)
    except ValueError as err:
        parser.error(str(err))
    with exit_on_error(*CLI_ERRORS, prog=parser.prog):
        try:
            ctx = init_distributed(device=run.device)
            setup_logging(ctx.rank)
            if ctx.is_main:
                warn_unused(args)
            evaluate_checkpoint(run)
        finally:
            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
