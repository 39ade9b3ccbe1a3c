"""Train xAR (the official recipe), or evaluate a checkpoint with ``--evaluate``.

The upstream training command (xAR_DiSA/README.md, there with the script name ``main_mar.py``) runs as written::

    torchrun --nproc_per_node=8 --nnodes=4 ... main_xar.py \\
        --img_size 256 --vae_path /path/to/kl16.ckpt --vae_embed_dim 16 --vae_stride 16 --patch_size 1 \\
        --model xar_base --epochs 800 --warmup_epochs 100 --batch_size 64 --blr 5e-5 \\
        --output_dir ./output_dir/ --resume ./output_dir/ \\
        --data_path /path/to/imagenet1k/ --use_cached --cached_path /path/to/imagenet_feature/

Recipe (:mod:`xar_disa.engine_xar`): noisy-context flow matching (``xAR.forward``), AdamW (0.9, 0.96) with weight
decay 0.02 except on 1-D parameters and biases, lr = blr * global batch / 256 with linear warm-up then constant
(or cosine), gradient clipping at 1.0, fp16 autocast with loss scaling on CUDA, EMA 0.9999 after every step,
``<output_dir>/checkpoint-last.pth`` every ``--save_last_freq`` epochs and at the end, in the official layout
``{model, model_ema, optimizer, epoch, scaler, args}``. ``--resume <folder>`` continues from the folder's
checkpoint when there is one and starts afresh otherwise (as upstream: the README passes the output folder from the
first run on). Per-epoch loss and learning rate go to ``<output_dir>/log.txt`` (JSON lines).

With ``--evaluate`` this is ``eval.py`` (same flags, same folder names) on the ``--resume`` checkpoint's EMA
weights. ``--online_eval`` evaluates the EMA weights every ``--eval_freq`` epochs into
``<output_dir>/<official folder name>-epoch<N>`` (upstream reuses one folder and deletes it after the metrics).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from disa.checkpoints import exit_on_error
from disa.distributed import DistributedContext, init_distributed, shutdown_distributed
from disa.evaluation import ClassBalancedLabels, EvalConfig
from disa.vae import load_vae_checkpoint
from mar_disa.engine_mar import (
    LossScaler,
    TrainConfig,
    effective_lr,
    ema_copy,
    ema_weights,
    resume_from_checkpoint,
    save_model,
    train_one_epoch,
)
from xar_disa.engine_xar import (
    NullLabels,
    XARGenerator,
    build_optimizer,
    build_train_dataset,
    configure_backends,
    evaluate,
)
from xar_disa.eval import (
    CLI_ERRORS,
    get_args_parser,
    metrics_config,
    parse_args,
    pick_device,
    run_evaluation_cli,
    setup_logging,
    summary,
)

__all__ = ["LOG_NAME", "train_config", "train", "main"]

logger = logging.getLogger(__name__)

LOG_NAME = "log.txt"
_RESUME_FILE = "checkpoint-last.pth"


def _resume_file(resume: str) -> Path | None:
    """The checkpoint to resume training from: None without ``--resume`` or for a folder that has none yet."""
    if not resume:
        return None
    path = Path(resume)
    if path.is_dir() and not (path / _RESUME_FILE).is_file():
        # Upstream's behaviour, which the README relies on: --resume names the output folder from the first run on.
        logger.info("no %s in %s yet: training from scratch", _RESUME_FILE, path)
        return None
    return path  # a file, or a folder with checkpoint-last.pth; a missing file raises in resume_from_checkpoint


def _saved_args(args: argparse.Namespace) -> argparse.Namespace:
    """The command line as the checkpoint stores it (plain values only, so it loads with ``weights_only``)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("model_cfg", "sampler_cfg")})


def train_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The training settings of the flags (validated); lr = blr * batch_size * world_size / 256 unless --lr."""
    return TrainConfig(
        lr=effective_lr(args.blr, args.batch_size, world_size, args.lr), epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, lr_schedule=args.lr_schedule,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, ema_rate=args.ema_rate,
        use_cached=args.use_cached, precision=args.precision,
    )


def _online_eval(args: argparse.Namespace, model: torch.nn.Module, vae: Any, epoch: int,
                 device: torch.device) -> dict[str, Any]:
    sampler = args.sampler_cfg
    folder = sampler.folder_name(args.num_images, num_iter=args.num_iter, evaluate=False) + f"-epoch{epoch}"
    config = EvalConfig(sample_dir=Path(args.output_dir) / folder, num_images=args.num_images,
                        batch_size=args.eval_bsz, seed=args.seed, progress=False)
    conditions = NullLabels() if sampler.unconditional else ClassBalancedLabels(args.num_images, args.class_num)
    generator = XARGenerator(model, vae, sampler, device=device, precision=args.precision)
    record = {"weights": f"EMA after epoch {epoch}", "output_dir": str(args.output_dir),
              "precision": args.precision, "sampler": vars(_saved_args(args))}
    return evaluate(generator, config, conditions, model_config=record, metrics=metrics_config(args))


def train(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, Any]:
    """Train as the flags say; returns the last epoch's statistics (``loss`` averaged over ranks, ``lr``)."""
    device = ctx.device
    torch.manual_seed(args.seed + ctx.rank)  # upstream seeds torch and numpy with seed + rank
    np.random.seed(args.seed + ctx.rank)
    output_dir = Path(args.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = build_train_dataset(use_cached=args.use_cached, cached_path=args.cached_path,
                                  data_path=args.data_path, img_size=args.img_size, class_num=args.class_num)
    # The encoder only for images (cached latents are already encoded), the decoder only for online evaluation.
    vae = None
    if not args.use_cached or args.online_eval:
        vae = load_vae_checkpoint(args.vae_path, embed_dim=args.vae_embed_dim, ch=args.vae_ch,
                                  decoder_only=args.use_cached)
        vae = vae.to(device).eval()
        vae.requires_grad_(False)

    model = args.model_cfg.build().to(device)
    config = train_config(args, ctx.world_size)
    lr = config.lr
    optimizer = build_optimizer(model, lr, args.weight_decay)
    loss_scaler = LossScaler.for_precision(device, args.precision)
    ema_params: list[torch.Tensor] | None = None
    start_epoch = args.start_epoch
    checkpoint = _resume_file(args.resume)
    if checkpoint is not None:
        ema_params, start_epoch = resume_from_checkpoint(checkpoint, model, optimizer, loss_scaler)
        logger.info("resumed from %s at epoch %d", checkpoint, start_epoch)
    if start_epoch >= args.epochs:
        logger.warning("start epoch %d >= --epochs %d: nothing to train", start_epoch, args.epochs)
    ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # Each rank initialised its own weights (seed + rank); wrapping broadcasts rank 0's, so the EMA is copied after.
    net = DistributedDataParallel(model, **ddp_kwargs) if ctx.backend is not None else model
    if ema_params is None:
        ema_params = ema_copy(model)

    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} training samples over {ctx.world_size} rank(s) make no full batch of --batch_size "
            f"{args.batch_size}"
        )
    logger.info("training %s (%.2fM parameters) on %d samples, %d rank(s), lr %.3g",
                args.model_cfg.describe(), sum(p.numel() for p in model.parameters()) / 1e6, len(dataset),
                ctx.world_size, lr)

    stats: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(net, vae, list(model.parameters()), ema_params, loader, optimizer, device, epoch,
                                loss_scaler, config)
        last = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last:
            save_model(output_dir, model, ema_params, optimizer, epoch, loss_scaler, _saved_args(args))
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "train_lr": stats["lr"]}
        if args.online_eval and (epoch % args.eval_freq == 0 or last):
            with ema_weights(model, ema_params):
                results = _online_eval(args, model, vae, epoch, device)
            entry["eval"] = {"metrics": results["metrics"], "sample_dir": results["images"]["sample_dir"]}
        if ctx.is_main:
            with open(output_dir / LOG_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, training=True)
    if not args.evaluate:
        try:
            train_config(args, 1)  # the same checks as at run time (the world size only scales the lr)
        except ValueError as err:
            get_args_parser(training=True).error(str(err))
    ctx = init_distributed(device=pick_device(args.device))
    setup_logging(ctx.rank)
    configure_backends(ctx.device)
    try:
        with exit_on_error(*CLI_ERRORS, prog="main_xar.py"):
            if args.evaluate:
                results = run_evaluation_cli(args, ctx.device)
                if ctx.is_main:
                    print(summary(results))
            else:
                stats = train(args, ctx)
                if ctx.is_main:
                    print(f"trained to epoch {args.epochs}: last epoch's loss {stats.get('loss', float('nan')):.4f}; "
                          f"checkpoint {Path(args.output_dir) / _RESUME_FILE}; log {Path(args.output_dir) / LOG_NAME}")
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
