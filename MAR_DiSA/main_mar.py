"""MAR with DiSA: train, or ``--evaluate`` a checkpoint, with the official command lines.

Every flag of upstream ``main_mar.py`` (LTH14/mar) and of MAR_DiSA's is accepted with its name and default; the
DiSA README commands run as written (from the folder, or as a module)::

    cd MAR_DiSA && torchrun --nproc_per_node=4 main_mar.py --model mar_base --diffloss_d 6 --diffloss_w 1024 \\
        --eval_bsz 256 --num_images 50000 --num_iter 64 --cfg 2.9 --cfg_schedule linear --temperature 1.0 \\
        --diff_upper_steps 50 --diff_lower_steps 5 --diff_annealing_strategy linear --diff_sampler DiSA \\
        --output_dir pretrained_models/mar/mar_base --resume pretrained_models/mar/mar_base \\
        --data_path ${IMAGENET_PATH} --evaluate
    torchrun --nproc_per_node=4 -m mar_disa.main_mar ...            # the same, from anywhere

``--evaluate`` generates ``--num_images`` class-balanced images with the EMA weights of ``--resume`` through the
shared loop (:func:`disa.evaluation.run_evaluation`: per-image seeds, resume, ``results.json``) and scores them
with :mod:`disa.metrics` (FID and IS against ``--fid_stats``). Without ``--evaluate`` it trains (cached latents
or ImageNet), saving ``checkpoint-last.pth`` in the official layout.

What differs from upstream, each on purpose and documented in ``--help`` and the README: per-image seeds (image
k is the same on any number of GPUs) instead of ``seed + rank``; no padding batch; PNGs kept after scoring unless
``--delete_images``; a missing or mismatched checkpoint is an error, never random weights; ``--data_path`` is not
read by ``--evaluate``; runs on CPU (gloo) as well as CUDA; ``--num_sampling_steps`` (original MAR) is accepted.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from disa.checkpoints import CheckpointError, exit_on_error, resolve_checkpoint_path
from disa.cli import int_at_least
from disa.distributed import (
    DistributedContext,
    RankFailedError,
    init_distributed,
    shutdown_distributed,
)
from disa.evaluation import (
    ClassBalancedLabels,
    EvalConfig,
    EvaluationError,
    metrics_hook,
    run_evaluation,
)
from disa.fashion_mnist import FashionMNIST
from disa.features import EFFNET_LITE0, INCEPTION
from disa.guidance import CFG_SCHEDULES
from disa.layers import add_compile_arguments, compile_request
from disa.metrics import MetricsConfig
from disa.schedules import DDIM_CLIP, DISA_CLIP, STRATEGIES
from disa.vae import AutoencoderKL, PixelTokenizer, load_vae_checkpoint
from mar_disa.engine_mar import (
    LR_SCHEDULES,
    PRECISIONS,
    CachedFolder,
    LossScaler,
    MARGenerator,
    TrainConfig,
    build_optimizer,
    effective_lr,
    ema_copy,
    ema_weights,
    image_transform,
    load_for_generation,
    resume_from_checkpoint,
    sample_folder_name,
    save_model,
    train_one_epoch,
)
from mar_disa.models.diffloss import SAMPLERS
from mar_disa.models.mar import _SIZES, MAR, MAR_MODELS, compile_head
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision.datasets import ImageFolder

__all__ = ["EvaluationConfig", "ModelConfig", "SamplerConfig", "build_model", "build_parser", "main", "parse_args"]

logger = logging.getLogger("mar_disa.main_mar")

UNUSED = "accepted, unused (as upstream)"
KL16_STRIDE = 16  # AutoencoderKL's default ch_mult (1, 1, 2, 2, 4) downsamples by 2^4
TOKENIZERS = ("kl16", "pixels")  # pixels: disa.vae.PixelTokenizer (stride 1), the Fashion-MNIST testbed's
DATASETS = ("imagenet", "fashion-mnist")


# ---- typed configuration -------------------------------------------------------------------------------------


def _check_int(owner: str, name: str, value: object, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{owner}.{name} must be an integer >= {lowest}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network (``--model`` and the size flags) and its training-time options.

    ``embed_dim`` / ``depth`` / ``num_heads`` override the factory's encoder and decoder width, depth and heads
    (small experiments and the tests' tiny checkpoints; the official checkpoints need the factory sizes).
    """

    model: str = "mar_large"
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    class_num: int = 1000
    buffer_size: int = 64
    diffloss_d: int = 12
    diffloss_w: int = 1536
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffusion_batch_mul: int = 1
    grad_checkpointing: bool = False
    train_clip: int | None = DISA_CLIP

    def __post_init__(self) -> None:
        if self.model not in MAR_MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MAR_MODELS)}")
        for name in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num", "buffer_size",
                     "diffloss_d", "diffloss_w", "diffusion_batch_mul"):  # fmt: skip
            _check_int("ModelConfig", name, getattr(self, name), 1)
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                _check_int("ModelConfig", name, getattr(self, name), 1)

    def architecture(self) -> dict[str, Any]:
        """What the network's weights and outputs depend on (not the training-only options)."""
        width, depth, heads = _SIZES[self.model]
        return {
            "model": self.model, "width": self.embed_dim or width, "depth": self.depth or depth,
            "num_heads": self.num_heads or heads, "img_size": self.img_size, "vae_stride": self.vae_stride,
            "patch_size": self.patch_size, "vae_embed_dim": self.vae_embed_dim, "class_num": self.class_num,
            "buffer_size": self.buffer_size, "diffloss_d": self.diffloss_d, "diffloss_w": self.diffloss_w,
        }  # fmt: skip


@dataclass(frozen=True)
class SamplerConfig:
    """How images are sampled: AR steps, guidance, temperature and the diffusion head's sampler.

    Defaults are upstream's (``diff_sampler="default"`` with 25 steps: MAR_DiSA's ``main_mar.py``). The clips are
    MAR_DiSA's hidden ``create_diffusion`` defaults, made explicit: ``disa_clip`` 950 for the DiSA sampler,
    ``ddim_clip`` 980 for DDIM; ``None`` keeps the respacing's top timestep. ``dpm_cfg`` makes DPM-Solver(++)
    honour CFG (MAR_DiSA silently ignores it there). ``num_sampling_steps`` records that the original MAR flag
    chose the ``default`` sampler (it only changes the sample folder name).
    """

    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    diff_sampler: str = "default"
    diff_upper_steps: int = 25
    diff_lower_steps: int = 5
    diff_annealing_strategy: str = "linear"
    disa_clip: int | None = DISA_CLIP
    ddim_clip: int | None = DDIM_CLIP
    dpm_cfg: bool = False
    num_sampling_steps: str | None = None

    def __post_init__(self) -> None:
        _check_int("SamplerConfig", "num_iter", self.num_iter, 1)
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0 (1.0 = no guidance), got {self.cfg}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {self.cfg_schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.diff_sampler not in SAMPLERS:
            raise ValueError(f"unknown diff_sampler {self.diff_sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if self.diff_annealing_strategy not in STRATEGIES:
            raise ValueError(
                f"unknown diff_annealing_strategy {self.diff_annealing_strategy!r}; allowed: {', '.join(STRATEGIES)}"
            )
        if not 1 <= self.diff_lower_steps <= self.diff_upper_steps:
            raise ValueError(
                "need 1 <= diff_lower_steps <= diff_upper_steps, "
                f"got lower={self.diff_lower_steps}, upper={self.diff_upper_steps}"
            )
        for name in ("disa_clip", "ddim_clip"):
            if getattr(self, name) is not None:
                _check_int("SamplerConfig", name, getattr(self, name), 1)


@dataclass(frozen=True)
class EvaluationConfig:
    """What ``--evaluate`` (and the online evaluation) generates and how it is scored.

    ``metrics``: :class:`disa.metrics.MetricsConfig` (FID/IS against ``--fid_stats`` with the real Inception network
    by default; ``effnet-lite0`` is reported as FD_EffNet-Lite0, never as FID), or ``None`` to only generate.
    ``delete_images``: delete the PNGs once scored (upstream always did; kept by default).
    """

    num_images: int = 50_000
    eval_bsz: int = 64
    seed: int = 1
    metrics: MetricsConfig | None = None
    delete_images: bool = False
    save_npz: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _check_int("EvaluationConfig", "num_images", self.num_images, 1)
        _check_int("EvaluationConfig", "eval_bsz", self.eval_bsz, 1)


def build_model(model: ModelConfig, sampler: SamplerConfig) -> MAR:
    """The MAR of ``model`` with the head sampling as ``sampler`` says (weights freshly initialised)."""
    kwargs: dict[str, Any] = dict(
        img_size=model.img_size, vae_stride=model.vae_stride, patch_size=model.patch_size,
        vae_embed_dim=model.vae_embed_dim, mask_ratio_min=model.mask_ratio_min,
        label_drop_prob=model.label_drop_prob, class_num=model.class_num, attn_dropout=model.attn_dropout,
        proj_dropout=model.proj_dropout, buffer_size=model.buffer_size, diffloss_d=model.diffloss_d,
        diffloss_w=model.diffloss_w, diff_upper_steps=sampler.diff_upper_steps,
        diff_lower_steps=sampler.diff_lower_steps, diff_annealing_strategy=sampler.diff_annealing_strategy,
        diff_sampler=sampler.diff_sampler, diffusion_batch_mul=model.diffusion_batch_mul,
        grad_checkpointing=model.grad_checkpointing, train_clip=model.train_clip, disa_clip=sampler.disa_clip,
        ddim_clip=sampler.ddim_clip, dpm_cfg=sampler.dpm_cfg,
    )  # fmt: skip
    if model.embed_dim is None and model.depth is None and model.num_heads is None:
        return MAR_MODELS[model.model](**kwargs)
    arch = model.architecture()
    return MAR(
        encoder_embed_dim=arch["width"], encoder_depth=arch["depth"], encoder_num_heads=arch["num_heads"],
        decoder_embed_dim=arch["width"], decoder_depth=arch["depth"], decoder_num_heads=arch["num_heads"],
        mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
    )  # fmt: skip


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)})


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    metrics = None
    if not args.no_metrics:
        metrics = MetricsConfig(
            extractor=args.metrics_extractor, fid_stats=Path(args.fid_stats),
            reference_images=Path(args.reference_images) if args.reference_images else None, kid=args.kid,
            prc=args.prc, weights_path=Path(args.metrics_weights) if args.metrics_weights else None,
            num_workers=args.num_workers,
        )  # fmt: skip
    return EvaluationConfig(
        num_images=args.num_images, eval_bsz=args.eval_bsz, seed=args.seed, metrics=metrics,
        delete_images=args.delete_images, save_npz=args.save_npz, progress=not args.no_progress,
    )  # fmt: skip


def train_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The training recipe with the absolute learning rate for ``world_size`` processes."""
    lr = effective_lr(args.blr, args.batch_size, world_size, args.lr)
    return TrainConfig.from_args(argparse.Namespace(**{**vars(args), "lr": lr}))


# ---- command line --------------------------------------------------------------------------------------------


def _clip(text: str) -> int | None:
    """A timestep >= 1, or ``none`` (no clip)."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a timestep >= 1 or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a timestep >= 1 or 'none', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main_mar.py",
        description="MAR training and evaluation with Diffusion Step Annealing (DiSA). Upstream flags keep their "
        "names and defaults; run under torchrun for several processes (NCCL on CUDA, gloo on the CPU).",
        epilog="Deviations from upstream (results unchanged unless a flag says otherwise): image k of an evaluation "
        "uses its own seed (seed * num_images + k), so the images do not depend on the number of GPUs or the "
        "batch size (upstream: one RNG per GPU seeded seed + rank); no padding batch is generated; an interrupted "
        "evaluation resumes where it stopped; PNGs are kept after scoring unless --delete_images; a missing or "
        "mismatched checkpoint is an error (upstream evaluated random weights); --data_path is not read by "
        "--evaluate; online evaluations write one folder per epoch (<name>_epoch<N>).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", type=int_at_least(1), default=16, help="training batch size per process")
    g.add_argument("--epochs", type=int_at_least(1), default=400, help="training epochs")
    g.add_argument("--model", default="mar_large", choices=list(MAR_MODELS), help="model factory")
    g.add_argument("--embed_dim", type=int_at_least(1), default=None,
                   help="override the --model encoder/decoder width (tiny test and experiment models only)")
    g.add_argument("--depth", type=int_at_least(1), default=None,
                   help="override the --model encoder/decoder depth (tiny test and experiment models only)")
    g.add_argument("--num_heads", type=int_at_least(1), default=None,
                   help="override the --model attention heads (tiny test and experiment models only)")
    g.add_argument("--img_size", type=int_at_least(1), default=256, help="image size")
    g.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="KL-16 VAE checkpoint")
    g.add_argument("--vae_embed_dim", type=int_at_least(1), default=16, help="VAE latent channels")
    g.add_argument("--vae_stride", type=int_at_least(1), default=16, help="VAE downsampling factor (KL-16: 16)")
    g.add_argument("--vae_ch", type=int_at_least(1), default=128,
                   help="not official: base width of the KL-16 VAE (kl16.ckpt: 128; tiny test VAEs use less)")
    g.add_argument("--patch_size", type=int_at_least(1), default=1, help="tokens are patch_size^2 latent pixels")
    g.add_argument("--tokenizer", default="kl16", choices=TOKENIZERS,
                   help="kl16: the VAE of --vae_path; pixels: tokens are raw pixel patches (no VAE; needs "
                        "--vae_stride 1 and --vae_embed_dim = image channels), the embedded Fashion-MNIST testbed")

    g = p.add_argument_group("generation")
    g.add_argument("--num_iter", type=int_at_least(1), default=64, help="autoregressive (AR) steps")
    g.add_argument("--num_images", type=int_at_least(1), default=50000, help="images to generate")
    g.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1.0 = none)")
    g.add_argument("--cfg_schedule", default="linear", choices=list(CFG_SCHEDULES),
                   help="guidance over the AR steps (linear: Muse ramp, never quite reaching --cfg, as upstream)")
    g.add_argument("--label_drop_prob", type=float, default=0.1, help="training class-drop rate (for CFG)")
    g.add_argument("--eval_freq", type=int_at_least(1), default=40, help="online evaluation every N epochs")
    g.add_argument("--save_last_freq", type=int_at_least(1), default=5, help="save checkpoint-last every N epochs")
    g.add_argument("--online_eval", action="store_true", help="evaluate (EMA weights) during training")
    g.add_argument("--evaluate", action="store_true", help="generate and score with --resume's EMA weights")
    g.add_argument("--eval_bsz", type=int_at_least(1), default=64, help="generation batch size per process")

    g = p.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=0.02, help="AdamW weight decay (not on norms, biases, head)")
    g.add_argument("--grad_checkpointing", action="store_true", help="gradient checkpointing (training)")
    g.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: blr * total batch / 256)")
    g.add_argument("--blr", type=float, default=1e-4, help="base learning rate")
    g.add_argument("--min_lr", type=float, default=0.0, help="end of the cosine schedule")
    g.add_argument("--lr_schedule", default="constant", choices=list(LR_SCHEDULES), help="after the warmup")
    g.add_argument("--warmup_epochs", type=float, default=100, help="linear learning-rate warmup")
    g.add_argument("--ema_rate", type=float, default=0.9999, help="EMA of the weights (used for generation)")

    g = p.add_argument_group("MAR")
    g.add_argument("--mask_ratio_min", type=float, default=0.7, help="lowest training mask ratio")
    g.add_argument("--grad_clip", type=float, default=3.0, help="gradient-norm clip")
    g.add_argument("--attn_dropout", type=float, default=0.1, help="attention dropout (training)")
    g.add_argument("--proj_dropout", type=float, default=0.1, help="projection dropout (training)")
    g.add_argument("--buffer_size", type=int_at_least(1), default=64, help="class-embedding rows of the encoder")

    g = p.add_argument_group("diffusion head")
    g.add_argument("--diffloss_d", type=int_at_least(1), default=12, help="MLP depth (B 6, L 8, H 12)")
    g.add_argument("--diffloss_w", type=int_at_least(1), default=1536, help="MLP width (B 1024, L 1280, H 1536)")
    g.add_argument("--diffusion_batch_mul", type=int_at_least(1), default=1,
                   help="diffusion samples per token in training")
    g.add_argument("--temperature", type=float, default=1.0, help="noise scale of the ancestral samplers")
    g.add_argument("--num_sampling_steps", default=None, metavar="STEPS",
                   help="original MAR flag (removed by MAR_DiSA): the 'default' sampler with STEPS steps, and the "
                   "original sample folder name; same as --diff_sampler default --diff_upper_steps STEPS")

    g = p.add_argument_group("DiSA")
    g.add_argument("--diff_upper_steps", type=int_at_least(1), default=25,
                   help="diffusion steps at the first AR step (the 'default' sampler: at every AR step)")
    g.add_argument("--diff_lower_steps", type=int_at_least(1), default=5, help="diffusion steps at the last AR step")
    g.add_argument("--diff_annealing_strategy", default="linear", choices=list(STRATEGIES),
                   help="step schedule over the AR steps ('constant' = the lower count everywhere, as MAR_DiSA)")
    g.add_argument("--diff_sampler", default="default", choices=list(SAMPLERS),
                   help="'default' = original MAR (upper steps everywhere, no clip); 'DiSA' = annealed ancestral "
                   "DDPM; DDIM; DPM_Solver(++) (first order)")
    g.add_argument("--disa_clip", type=_clip, default=DISA_CLIP, metavar="T|none",
                   help="DiSA sampler: respaced timesteps clipped at T (MAR_DiSA's hidden default 950: chains start "
                   "at t=950 and 50 steps run 48); 'none' keeps t=999")
    g.add_argument("--ddim_clip", type=_clip, default=DDIM_CLIP, metavar="T|none",
                   help="DDIM sampler: timesteps clipped at T (MAR_DiSA's hidden default 980); 'none' = no clip")
    g.add_argument("--train_clip", type=_clip, default=DISA_CLIP, metavar="T|none",
                   help="training diffusion over t in [0, T] (MAR_DiSA: 950, i.e. 951 timesteps; 'none' = the "
                   "original MAR's 1000)")
    g.add_argument("--dpm_cfg", action="store_true",
                   help="make DPM_Solver/DPM_Solver++ honour --cfg (MAR_DiSA ignores guidance and temperature "
                   "there: off by default for parity; DDIM and DiSA always use CFG)")

    g = p.add_argument_group("data and output")
    g.add_argument("--dataset", default="imagenet", choices=DATASETS,
                   help="training data: ImageNet class folders, or Fashion-MNIST's IDX files (Debian package "
                        "dataset-fashion-mnist; 28x28 grayscale, 10 classes; needs --tokenizer pixels)")
    g.add_argument("--data_path", default="./data/imagenet", help="ImageNet root (training reads <data_path>/train; "
                   "not read by --evaluate, unlike upstream)")
    g.add_argument("--class_num", type=int_at_least(1), default=1000, help="classes (--num_images must be a multiple)")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, logs and sample folders")
    g.add_argument("--log_dir", default="./output_dir", help=f"{UNUSED}: logs go to --output_dir")
    g.add_argument("--device", default="cuda",
                   help="cuda (falls back to the CPU with a warning when no GPU is visible), cpu, mps, cuda:N")
    g.add_argument("--seed", type=int_at_least(0), default=1,
                   help="training: torch/numpy seed + rank (upstream); evaluation: image k uses seed "
                   "seed * num_images + k (per-image seeds, whatever the number of processes)")
    g.add_argument("--resume", default="",
                   help="folder holding checkpoint-last.pth (or a .pth file). Training starts from scratch when "
                   "the folder has no checkpoint (upstream); --evaluate requires one and uses its EMA weights")
    g.add_argument("--start_epoch", type=int_at_least(0), default=0, help="first epoch (a resumed checkpoint sets it)")
    g.add_argument("--num_workers", type=int_at_least(0), default=10, help="data-loading workers (also metrics)")
    g.add_argument("--pin_mem", action="store_true", help="pin data-loader memory (CUDA)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin memory")
    p.set_defaults(pin_mem=True)

    add_distributed_arguments(p)

    g = p.add_argument_group("cached latents (main_cache.py)")
    g.add_argument("--use_cached", action="store_true", help="train on cached VAE moments instead of images")
    g.add_argument("--cached_path", default="", help="main_cache.py's output folder")

    g = p.add_argument_group("evaluation and precision (this implementation)")
    g.add_argument("--precision", default="fp16", choices=list(PRECISIONS),
                   help="fp16 = upstream's fp16 autocast on CUDA (fp32 elsewhere); bf16 autocast; fp32")
    g.add_argument("--no_metrics", action="store_true", help="generate only: skip FID/IS")
    add_compile_arguments(g)
    g.add_argument("--fid_stats", default="fid_stats/adm_in256_stats.npz",
                   help="FID reference statistics (mu, sigma); fetch with `python util/download.py fid-stats`")
    g.add_argument("--metrics_extractor", default=INCEPTION, choices=[INCEPTION, EFFNET_LITE0],
                   help=f"{INCEPTION}: real FID/IS; {EFFNET_LITE0}: offline, reported as FD_EffNet-Lite0 (not FID)")
    g.add_argument("--metrics_weights", default=None,
                   help="Inception weights file (default: torch hub cache, downloaded on first use)")
    g.add_argument("--reference_images", default=None,
                   help="reference images (folder or ADM npz) for --kid / --prc, e.g. VIRTUAL_imagenet256_labeled.npz")
    g.add_argument("--kid", action="store_true", help="also KID (needs --reference_images)")
    g.add_argument("--prc", action="store_true", help="also precision / recall (needs --reference_images)")
    g.add_argument("--delete_images", action="store_true",
                   help="delete the PNGs once scored (upstream always did; kept by default so runs can be re-scored "
                   "and resumed)")
    g.add_argument("--save_npz", action="store_true", help="also write <sample folder>.npz (ADM evaluation format)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's distributed flags (shared with ``main_cache.py``); torchrun's environment decides instead."""
    g = parser.add_argument_group("distributed (launch with torchrun)")
    g.add_argument("--world_size", type=int, default=1, help=f"{UNUSED}: torchrun's WORLD_SIZE decides")
    g.add_argument("--local_rank", type=int, default=-1, help=f"{UNUSED}: torchrun's LOCAL_RANK decides")
    g.add_argument("--dist_on_itp", action="store_true", help="ITP/OpenMPI launch: not supported, use torchrun")
    g.add_argument("--dist_url", default="env://", help="only env:// (torchrun's rendezvous) is supported")


def check_distributed_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the launch modes this implementation does not support (exit status 2)."""
    if args.dist_on_itp:
        parser.error("--dist_on_itp (OpenMPI on ITP) is not supported: launch with torchrun")
    if args.dist_url != "env://":
        parser.error(f"--dist_url {args.dist_url!r} is not supported: only env:// (launch with torchrun)")


def _explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option given on the command line (abbreviations included): re-parse with every
    default suppressed, so that only what was typed lands in the namespace."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return {k for k, v in vars(probe.parse_args(argv)).items() if v is not argparse.SUPPRESS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; any bad value exits with status 2 and a message naming what is allowed."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.num_sampling_steps is not None:
        try:
            steps = int(args.num_sampling_steps)
        except ValueError:
            parser.error(f"--num_sampling_steps must be an integer step count, got {args.num_sampling_steps!r}")
        given = _explicit_options(parser, argv)
        if "diff_sampler" in given and args.diff_sampler != "default":
            parser.error("--num_sampling_steps selects the original sampler; it cannot be combined with "
                         f"--diff_sampler {args.diff_sampler}")
        if "diff_upper_steps" in given and args.diff_upper_steps != steps:
            parser.error(f"--num_sampling_steps {steps} conflicts with --diff_upper_steps {args.diff_upper_steps}")
        args.diff_sampler, args.diff_upper_steps = "default", steps
        args.diff_lower_steps = min(args.diff_lower_steps, steps)
    check_distributed_arguments(parser, args)
    if args.tokenizer == "kl16" and args.vae_stride != KL16_STRIDE:
        parser.error(f"--vae_stride {args.vae_stride}: the KL-16 VAE downsamples by {KL16_STRIDE} (use --tokenizer "
                     "pixels for stride 1)")
    if args.tokenizer == "pixels" and (args.vae_stride != 1 or args.vae_embed_dim not in (1, 3)):
        parser.error(f"--tokenizer pixels needs --vae_stride 1 and --vae_embed_dim 1 (grayscale) or 3 (RGB), got "
                     f"--vae_stride {args.vae_stride} --vae_embed_dim {args.vae_embed_dim}")
    if args.dataset == "fashion-mnist" and not (args.tokenizer == "pixels" and args.vae_embed_dim == 1
                                                and args.img_size == 28 and args.class_num == 10):  # fmt: skip
        parser.error("--dataset fashion-mnist needs --tokenizer pixels --vae_stride 1 --vae_embed_dim 1 --img_size 28 "
                     f"--class_num 10 (28x28 grayscale, 10 classes), got --tokenizer {args.tokenizer} --vae_embed_dim "
                     f"{args.vae_embed_dim} --img_size {args.img_size} --class_num {args.class_num}")
    if args.dataset == "fashion-mnist" and "data_path" not in _explicit_options(parser, argv):
        args.data_path = None  # the Debian package's folder, or $DISA_FASHION_MNIST_DIR
    try:
        compile_request(args, args.device)
    except (RuntimeError, ValueError) as err:  # RuntimeError: torch.device() refuses the string
        parser.error(str(err))
    if args.evaluate and not args.resume:
        parser.error("--evaluate needs --resume: a folder holding checkpoint-last.pth, or a .pth file "
                     "(fetch the official ones with `python util/download.py`)")
    if args.use_cached and not args.evaluate and not args.cached_path:
        parser.error("--use_cached needs --cached_path (the folder written by main_cache.py)")
    try:
        model, sampler = model_config(args), sampler_config(args)
        evaluation_config(args)
        ClassBalancedLabels(args.num_images, args.class_num)
        EvalConfig(sample_dir=Path("check"), num_images=args.num_images, batch_size=args.eval_bsz, seed=args.seed)
        train_config(args, world_size=1)
        with torch.device("meta"):  # the constructor's own checks (sizes, probabilities), at no cost
            build_model(model, sampler)
    except ValueError as err:
        parser.error(str(err))
    return args


# ---- shared pieces -------------------------------------------------------------------------------------------


class DataError(RuntimeError):
    """Training data that cannot be used (missing folder, fewer items than one batch)."""


def resolve_device(requested: str) -> str:
    """``requested``, or ``cpu`` (with a warning) when CUDA is requested but not available."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("--device %s requested but CUDA is not available: running on the CPU", requested)
        return "cpu"
    return requested


def load_tokenizer(
    args: argparse.Namespace, device: torch.device, *, decoder_only: bool = True
) -> AutoencoderKL | PixelTokenizer:
    """What ``--tokenizer`` names: the KL-16 VAE (:func:`load_vae_from_args`) or the parameter-free
    :class:`disa.vae.PixelTokenizer` (``--vae_path`` unused)."""
    if args.tokenizer == "pixels":
        return PixelTokenizer(args.vae_embed_dim).to(device)
    return load_vae_from_args(args, device, decoder_only=decoder_only)


def load_vae_from_args(args: argparse.Namespace, device: torch.device, *, decoder_only: bool = True) -> AutoencoderKL:
    """The KL-16 VAE of ``--vae_path`` (``--vae_embed_dim`` channels, base width ``--vae_ch``), frozen, in eval
    mode on ``device``; any problem with the file is a :class:`CheckpointError` naming it."""
    vae = load_vae_checkpoint(args.vae_path, decoder_only=decoder_only, embed_dim=args.vae_embed_dim, ch=args.vae_ch)
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.to(device).eval()


def _generate(
    model: MAR,
    vae: AutoencoderKL,
    args: argparse.Namespace,
    *,
    cfg: float,
    batch_size: int,
    folder: Path,
    fingerprint: Mapping[str, Any],
    metrics_fn: Callable[[Path], Mapping[str, Any]] | None,
    device: torch.device,
) -> dict[str, Any]:
    sampler, evaluation = sampler_config(args), evaluation_config(args)
    model.eval()
    generator = MARGenerator(model, vae, num_iter=sampler.num_iter, cfg=cfg, cfg_schedule=sampler.cfg_schedule,
                             temperature=sampler.temperature, precision=args.precision)  # fmt: skip
    config = EvalConfig(sample_dir=folder, num_images=evaluation.num_images, batch_size=batch_size,
                        seed=evaluation.seed, save_npz=evaluation.save_npz, keep_pngs=not evaluation.delete_images,
                        progress=evaluation.progress)  # fmt: skip
    return run_evaluation(
        generator, config, conditions=ClassBalancedLabels(evaluation.num_images, args.class_num),
        model_config={**fingerprint, "sampler": {**dataclasses.asdict(sampler), "cfg": cfg},
                      "precision": args.precision},
        metrics_fn=metrics_fn, device=device,
    )  # fmt: skip


def _folder(args: argparse.Namespace, cfg: float, *, evaluate: bool) -> Path:
    s = sampler_config(args)
    return Path(args.output_dir) / sample_folder_name(
        num_iter=s.num_iter, temperature=s.temperature, cfg_schedule=s.cfg_schedule, cfg=cfg,
        num_images=args.num_images, diff_upper_steps=s.diff_upper_steps, diff_lower_steps=s.diff_lower_steps,
        diff_annealing_strategy=s.diff_annealing_strategy, num_sampling_steps=s.num_sampling_steps,
        evaluate=evaluate,
    )  # fmt: skip


def _report(results: Mapping[str, Any]) -> None:
    """Print what one evaluation produced (rank 0)."""
    images, timing, nfe = results["images"], results["timing"], results["nfe"]
    print(f"samples: {images['sample_dir']} ({images['num_images']} images, {images['generated_this_run']} "
          f"generated now, {images['reused']} reused)")
    for name, value in (results["metrics"] or {}).items():
        print(f"{name}: {value:.4f}")
    if timing["sec_per_image"] is not None:
        print(f"time: {timing['sec_per_image']:.4f} s/image on rank 0 (first batch excluded, sampling + VAE decode); "
              f"{timing['images_per_second']:.3f} images/s over {results['world_size']} process(es)")
    if nfe.get("per_image") is not None:
        print(f"NFE: {nfe['per_image']:g} sequential diffusion-head evaluations per image over "
              f"{nfe['ar_steps'] or '?'} AR steps")
    print(f"results: {Path(images['sample_dir']) / 'results.json'}")


class ScalarLog:
    """Rank 0's scalars: JSON lines in ``<output_dir>/log.jsonl`` and, when the ``tensorboard`` package is
    installed, upstream's TensorBoard event files in the same folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "log.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; log.jsonl holds the same numbers
            self._board = None
        else:
            self._board = SummaryWriter(log_dir=str(folder))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")
        if self._board is not None:
            self._board.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


# ---- evaluation ----------------------------------------------------------------------------------------------


def evaluate_checkpoint(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, Any]:
    """``--evaluate``: the EMA weights of ``--resume`` (strictly), the VAE decoder, the shared generation loop."""
    checkpoint = resolve_checkpoint_path(args.resume)
    model = build_model(model_config(args), sampler_config(args))
    load_for_generation(model, checkpoint)
    model.to(ctx.device)
    compile_now, cuda_graphs = compile_request(args, ctx.device)
    if compile_now:
        compile_head(model, cuda_graphs=cuda_graphs)
    vae = load_tokenizer(args, ctx.device)
    metrics_fn = metrics_hook(evaluation_config(args).metrics)
    tokenizer = "pixels" if args.tokenizer == "pixels" else str(Path(args.vae_path).resolve())
    fingerprint = {"checkpoint": str(checkpoint.resolve()), "weights": "model_ema", "vae_path": tokenizer,
                   "architecture": model_config(args).architecture()}
    results = _generate(model, vae, args, cfg=args.cfg, batch_size=args.eval_bsz,
                        folder=_folder(args, args.cfg, evaluate=True), fingerprint=fingerprint,
                        metrics_fn=metrics_fn, device=ctx.device)  # fmt: skip
    if ctx.is_main:
        _report(results)
    return results


# ---- training ------------------------------------------------------------------------------------------------


def _train_dataset(args: argparse.Namespace) -> Dataset:
    if args.dataset == "fashion-mnist":
        try:
            return FashionMNIST("train", args.data_path, random_flip=True)
        except (OSError, ValueError) as err:
            raise DataError(f"--dataset fashion-mnist: {err}") from err
    if args.use_cached:
        if not Path(args.cached_path).is_dir():
            raise DataError(f"--cached_path {args.cached_path!r} is not a folder (write it with main_cache.py)")
        return CachedFolder(args.cached_path)
    root = Path(args.data_path) / "train"
    if not root.is_dir():
        raise DataError(
            f"training images not found: {str(root)!r} is not a folder (--data_path must hold ImageNet's train/ "
            "class folders; or train on cached latents with --use_cached --cached_path)"
        )
    return ImageFolder(str(root), transform=image_transform(args.img_size, random_flip=True))


def _online_evaluation(
    model: MAR, vae: AutoencoderKL, ema_params: Sequence[torch.Tensor], args: argparse.Namespace, epoch: int,
    ctx: DistributedContext, log: ScalarLog | None,
) -> None:  # fmt: skip
    """Upstream's online evaluation with the EMA weights: cfg 1.0 with ``eval_bsz``, then ``--cfg`` with half the
    batch. Deviation: each evaluation gets its own ``_epoch{N}`` folder (upstream reused one and deleted it)."""
    metrics_fn = metrics_hook(evaluation_config(args).metrics)
    runs = [(1.0, args.eval_bsz)]
    if args.cfg not in (1.0, 0.0):
        runs.append((args.cfg, max(1, args.eval_bsz // 2)))
    fingerprint = {"epoch": epoch, "weights": "ema", "architecture": model_config(args).architecture()}
    with ema_weights(model, ema_params):
        for cfg, bsz in runs:
            folder = _folder(args, cfg, evaluate=False)
            folder = folder.with_name(f"{folder.name}_epoch{epoch}")
            results = _generate(model, vae, args, cfg=cfg, batch_size=bsz, folder=folder, fingerprint=fingerprint,
                                metrics_fn=metrics_fn, device=ctx.device)  # fmt: skip
            if ctx.is_main:
                _report(results)
            if log is not None:  # upstream's TensorBoard tags: fid_ema, is_ema_cfg2.9, ...
                postfix = "_ema" + ("" if cfg == 1.0 else f"_cfg{cfg}")
                for name, value in (results["metrics"] or {}).items():
                    log.add_scalar(f"{name.lower()}{postfix}", value, epoch)


def train(args: argparse.Namespace, ctx: DistributedContext) -> None:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = args.seed + ctx.rank  # upstream: one stream per process
    torch.manual_seed(seed)
    np.random.seed(seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    dataset = _train_dataset(args)
    if ctx.world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True)
    else:
        sampler = RandomSampler(dataset)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and ctx.device.type == "cuda", drop_last=True)  # fmt: skip
    if len(loader) == 0:
        raise DataError(
            f"the training set ({len(dataset)} items over {ctx.world_size} process(es)) is smaller than one batch "
            f"of --batch_size {args.batch_size}"
        )

    vae = None if args.use_cached else load_tokenizer(args, ctx.device, decoder_only=False)
    model = build_model(model_config(args), sampler_config(args)).to(ctx.device)
    config = train_config(args, ctx.world_size)
    if ctx.is_main:
        how = "--lr" if args.lr is not None else f"blr {args.blr:.3g} x {args.batch_size} x {ctx.world_size} / 256"
        logger.info("%s: %.2fM parameters; lr %.3g (%s)", args.model,
                    sum(p.numel() for p in model.parameters()) / 1e6, config.lr, how)  # fmt: skip
    optimizer = build_optimizer(model, config.lr, args.weight_decay)
    scaler = LossScaler.for_precision(ctx.device, args.precision)
    model_params = list(model.parameters())
    ema_params, start_epoch = ema_copy(model), args.start_epoch
    if args.resume:
        resume = Path(args.resume)
        if not resume.exists():
            raise CheckpointError(f"--resume {args.resume!r} does not exist")
        if resume.is_dir() and not (resume / "checkpoint-last.pth").is_file():
            logger.warning("no checkpoint-last.pth in %s: training from scratch (as upstream)", resume)
        else:
            ema_params, start_epoch = resume_from_checkpoint(resume, model, optimizer, scaler)
            logger.info("resumed from %s at epoch %d", resume, start_epoch)
    trained = model
    if ctx.world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    log = ScalarLog(output_dir) if ctx.is_main else None
    vae_for_eval = None
    if args.online_eval:
        vae_for_eval = vae if vae is not None else load_tokenizer(args, ctx.device)
    started = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            stats = train_one_epoch(trained, vae, model_params, ema_params, loader, optimizer, ctx.device, epoch,
                                    scaler, config, log_writer=log)  # fmt: skip
            if ctx.is_main:
                print(f"epoch {epoch}: loss {stats['loss']:.4f} lr {stats['lr']:.3g} ({int(stats['steps'])} steps)")
            if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs:
                save_model(output_dir, model, ema_params, optimizer, epoch, scaler, args)
            if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs):
                _online_evaluation(model, vae_for_eval, ema_params, args, epoch, ctx, log)
    finally:
        if log is not None:
            log.close()
    if ctx.is_main:
        print(f"training time {datetime.timedelta(seconds=int(time.time() - started))}; "
              f"checkpoint: {output_dir / 'checkpoint-last.pth'}")


# ---- entry point ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun's; logging is configured before the process group
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    ctx = init_distributed(device=resolve_device(args.device))
    try:
        with exit_on_error(CheckpointError, EvaluationError, RankFailedError, DataError, prog="main_mar.py"):
            if args.evaluate:
                evaluate_checkpoint(args, ctx)
            else:
                train(args, ctx)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
