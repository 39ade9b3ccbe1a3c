"""Train FlowAR on the official recipe, or evaluate a training checkpoint (``--evaluate``).

    cd FlowAR_DiSA && torchrun --nproc_per_node=8 --nnodes=4 ... main_flowar.py \\
        --img_size 256 --vae_path /path/to/MAR/vae/kl16.ckpt --vae_embed_dim 16 --vae_stride 16 --patch_size 1 \\
        --model flowar_small --diffloss_d 2 --diffloss_w 1024 \\
        --epochs 400 --warmup_epochs 100 --batch_size 64 --blr 5e-5 \\
        --output_dir ./output_dir/ --resume ./output_dir/ \\
        --data_path /path/to/imagenet/ --cached_path /path/to/imagenet_feature/
    torchrun ... -m flowar_disa.main_flowar ...               # the same, from anywhere

Every flag of the official ``main_flowar.py`` is accepted with its default, plus DiSA's
``--flow_upper_steps/--flow_lower_steps`` for the online evaluation (default: the original ``--num_step 25``).
The recipe (:mod:`flowar_disa.engine_flowar`): images from ``<data_path>/train`` (resize x1.125, random crop, flip),
VAE posterior samples x 0.2325, the multi-scale flow-matching loss in fp32, AdamW (0.9, 0.95) with lr = blr * total
batch / 256, linear warm-up then cosine (or constant), gradient clipping, EMA; ``checkpoint-last.pth`` every
``--save_last_freq`` epochs and ``checkpoint-<epoch>.pth`` every 100, in the official layout. ``--resume DIR``
continues from ``DIR/checkpoint-last.pth`` and starts from scratch when there is none (the README passes the output
folder, as upstream). The loss and lr of every epoch go to stdout and ``<output_dir>/log.txt`` (JSON lines).

Deviations: ``--evaluate`` evaluates the ``--resume`` checkpoint's EMA weights through the shared loop (upstream
crashes: no data loader); ``--online_eval`` works (upstream called an outdated ``evaluate``) and writes each
evaluation to its own folder ``<official name>-epoch<E>``; ``flowar_huge`` trains (upstream raised TypeError on
``use_checkpoint``); ``--use_cached`` is refused (upstream reads images regardless and then crashes); no TensorBoard
(log.txt instead); ``--grad_clip 0`` disables clipping.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from disa.checkpoints import exit_on_error, resolve_checkpoint_path
from disa.distributed import DistributedContext, init_distributed, is_distributed, shutdown_distributed
from disa.evaluation import ClassBalancedLabels, EvalConfig, metrics_hook
from disa.vae import load_vae_checkpoint
from flowar_disa import eval as flowar_eval
from flowar_disa.engine_flowar import (
    FlowARGenerator,
    ModelConfig,
    SamplerConfig,
    UsageError,
    build_train_dataset,
    configure_backends,
    evaluate,
)
from mar_disa.engine_mar import (
    LossScaler,
    TrainConfig,
    build_optimizer,
    effective_lr,
    ema_copy,
    ema_weights,
    resume_from_checkpoint,
    save_model,
    train_one_epoch,
)

__all__ = ["get_args_parser", "TrainRun", "resolve_training", "train", "main"]

logger = logging.getLogger("flowar_disa.main_flowar")

PRINT_FREQ = 100  # iterations between loss log lines (upstream engine)
NUMBERED_CHECKPOINT_EVERY = 100  # epochs between checkpoint-<epoch>.pth files (upstream)


def get_args_parser() -> argparse.ArgumentParser:
    return flowar_eval.get_args_parser(training=True)


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """A training run's resolved configuration; ``train.lr`` is for one process and is rescaled to the world size
    at start (lr = blr * batch_size * world_size / 256 unless --lr is given)."""

    model: ModelConfig
    sampler: SamplerConfig
    train: TrainConfig
    device: str | None
    metrics: Any | None


def resolve_training(args: argparse.Namespace) -> TrainRun:
    """Flags -> validated training configuration (ValueError naming the flag otherwise)."""
    flowar_eval.check_common(args)
    if args.compile_head or args.cuda_graphs:
        raise ValueError("--compile_head / --cuda_graphs apply to --evaluate runs only (training's online "
                         "evaluation runs the eager head)")
    if args.use_cached:
        raise ValueError("--use_cached is not supported: FlowAR trains from the images in --data_path (upstream "
                         "main_flowar.py ignores cached latents too, and crashes with this flag)")
    for name in ("batch_size", "epochs", "save_last_freq", "eval_freq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.start_epoch < 0 or args.num_workers < 0:
        raise ValueError("--start_epoch and --num_workers must be >= 0")
    if args.lr is None and not args.blr > 0:
        raise ValueError(f"--blr must be > 0, got {args.blr}")
    train = TrainConfig(
        lr=effective_lr(args.blr, args.batch_size, 1, args.lr), epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        ema_rate=args.ema_rate, use_cached=False, precision=args.train_precision, print_freq=PRINT_FREQ,
    )
    if args.online_eval:
        # the official online evaluation runs cfg 1.0, then --cfg at half the batch size
        ClassBalancedLabels(args.num_images, args.class_num)
        EvalConfig(sample_dir=Path(args.output_dir) / "online", num_images=args.num_images, batch_size=args.eval_bsz,
                   seed=args.seed)
        if args.cfg not in (0.0, 1.0) and args.eval_bsz < 2:
            raise ValueError("--online_eval with --cfg needs --eval_bsz >= 2 (the guided pass uses eval_bsz // 2)")
    return TrainRun(model=flowar_eval.model_config_from_args(args),
                    sampler=flowar_eval.sampler_from_args(args, training=True), train=train,
                    device=flowar_eval.resolve_device(args.device),
                    metrics=flowar_eval.metrics_from_args(args) if args.online_eval else None)


def _append_log(output_dir: Path, record: dict[str, Any]) -> None:
    with open(output_dir / "log.txt", "a") as f:
        f.write(json.dumps(record) + "\n")


def online_evaluation(
    args: argparse.Namespace, run: TrainRun, generator_model: torch.nn.Module, vae: Any, ema_params: list[torch.Tensor],
    epoch: int, ctx: DistributedContext,
) -> dict[str, Any]:
    """The official online evaluation with the EMA weights: cfg 1.0 at --eval_bsz, then --cfg (unless it is 0 or
    1) at --eval_bsz // 2. Returns ``{"cfg<scale>": metrics}``."""
    passes = [(1.0, args.eval_bsz)]
    if args.cfg not in (0.0, 1.0):
        passes.append((args.cfg, args.eval_bsz // 2))
    out: dict[str, Any] = {}
    with ema_weights(generator_model, ema_params):
        for cfg, bsz in passes:
            sampler = dataclasses.replace(run.sampler, cfg=cfg)
            name = sampler.folder_name(args.num_images, evaluate=False) + f"-epoch{epoch}"
            config = EvalConfig(sample_dir=Path(args.output_dir) / name, num_images=args.num_images, batch_size=bsz,
                                seed=args.seed, progress=False)
            generator = FlowARGenerator(generator_model, vae, sampler, device=ctx.device, precision=args.precision)
            fingerprint = {"model": dataclasses.asdict(run.model), "sampler": dataclasses.asdict(sampler),
                           "weights": f"EMA of {Path(args.output_dir).resolve()} after epoch {epoch}",
                           "precision": args.precision, "device_type": ctx.device.type}
            results = evaluate(generator, config, ClassBalancedLabels(args.num_images, args.class_num),
                               model_config=fingerprint, metrics=run.metrics)
            out[f"cfg{cfg}"] = {"folder": str(config.sample_dir), "metrics": results["metrics"]}
    return out


def train(args: argparse.Namespace, run: TrainRun, ctx: DistributedContext) -> Path:
    """The official training loop on this rank; returns the path of checkpoint-last.pth."""
    output_dir = Path(args.output_dir)
    device = ctx.device
    torch.manual_seed(args.seed + ctx.rank)
    np.random.seed(args.seed + ctx.rank)
    configure_backends(device)

    dataset = build_train_dataset(args.data_path, args.img_size, args.class_num)
    data_sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True)
    loader = DataLoader(dataset, sampler=data_sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise UsageError(f"{len(dataset)} training images over {ctx.world_size} process(es) make no full batch of "
                         f"--batch_size {args.batch_size}")

    vae = load_vae_checkpoint(args.vae_path, embed_dim=args.vae_embed_dim, ch=args.vae_ch, decoder_only=False)
    vae = vae.to(device)
    vae.requires_grad_(False)
    model_without_ddp = run.model.build().to(device)
    logger.info("%s: %.2fM trainable parameters", run.model.model,
                sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad) / 1e6)
    config = dataclasses.replace(run.train, lr=effective_lr(args.blr, args.batch_size, ctx.world_size, args.lr))
    logger.info("lr %.3g (effective batch size %d)", config.lr, args.batch_size * ctx.world_size)
    model: torch.nn.Module = model_without_ddp
    if is_distributed():  # DDP broadcasts rank 0's initial weights, so every rank starts from the same model
        model = torch.nn.parallel.DistributedDataParallel(
            model_without_ddp, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model_without_ddp, config.lr, args.weight_decay)
    loss_scaler = LossScaler.for_precision(device, config.precision)
    model_params = list(model_without_ddp.parameters())

    start_epoch, ema_params = args.start_epoch, None
    if args.resume:
        resume = Path(args.resume)
        if resume.is_dir() and not (resume / "checkpoint-last.pth").is_file():
            logger.info("no checkpoint-last.pth in %s: training from scratch", resume)
        else:
            file = resolve_checkpoint_path(resume)
            ema_params, start_epoch = resume_from_checkpoint(file, model_without_ddp, optimizer, loss_scaler)
            logger.info("resumed from %s at epoch %d", file, start_epoch)
    if ema_params is None:
        ema_params = ema_copy(model_without_ddp)
    if run.metrics is not None:
        metrics_hook(run.metrics)  # fail before training, not at the first online evaluation

    last = output_dir / "checkpoint-last.pth"
    start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        data_sampler.set_epoch(epoch)
        stats = train_one_epoch(model, vae, model_params, ema_params, loader, optimizer, device, epoch, loss_scaler,
                                config)
        if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs:
            save_model(output_dir, model_without_ddp, ema_params, optimizer, epoch, loss_scaler, args)
        if epoch % NUMBERED_CHECKPOINT_EVERY == 0 or epoch + 1 == args.epochs:
            save_model(output_dir, model_without_ddp, ema_params, optimizer, epoch, loss_scaler, args,
                       epoch_name=str(epoch))
        record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "train_lr": stats["lr"],
                                  "train_steps": int(stats["steps"])}
        if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs):
            record["online_eval"] = online_evaluation(args, run, model_without_ddp, vae, ema_params, epoch, ctx)
        if ctx.is_main:
            _append_log(output_dir, record)
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, lr {stats['lr']:.3g}, {int(stats['steps'])} steps",
                  flush=True)
    if ctx.is_main:
        print(f"training time {time.perf_counter() - start:.1f} s; checkpoint {last}")
    return last


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        run: flowar_eval.EvalRun | TrainRun = (
            flowar_eval.resolve(args, training=True) if args.evaluate else resolve_training(args)
        )
    except ValueError as err:
        parser.error(str(err))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    args.log_dir = args.output_dir  # upstream forces this
    with exit_on_error(*flowar_eval.CLI_ERRORS, prog=parser.prog):
        try:
            ctx = init_distributed(device=run.device)
            flowar_eval.setup_logging(ctx.rank)
            if ctx.is_main:
                flowar_eval.warn_unused(args)
            if isinstance(run, TrainRun):
                train(args, run, ctx)
            else:
                flowar_eval.evaluate_checkpoint(run)
        finally:
            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
