"""MAR training: one epoch of the official recipe, its pieces, and checkpoints in the official layout.

The recipe (``specs/mar.md`` §6.2): per-iteration learning rate with linear warmup then constant or half-cosine
(:func:`lr_at`); VAE posterior sample x 0.2325 as the target, from images or from cached posterior moments
(:func:`latents_from_batch`); the model's diffusion loss (``MAR.forward``, with ``diffusion_batch_mul`` and the
optional gradient checkpointing of the model); fp16 autocast with loss scaling on CUDA (:func:`autocast`,
:class:`LossScaler`); gradient-norm clipping at 3.0; AdamW (0.9, 0.95) without weight decay on 1-D parameters,
biases and the diffusion head (:func:`param_groups`); an EMA of the parameters after every step (rate 0.9999).

Checkpoints (:func:`save_model`, :func:`load_for_generation`, :func:`resume_from_checkpoint`) use the official
layout ``{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}``, so official files resume and evaluate
here and ours load in the official code. Reading and strict, loud loading are :mod:`disa.checkpoints`': a missing
file, or a state dict that does not match the model key for key and shape for shape, raises with the offending keys
(upstream silently starts from random weights when ``--resume`` points nowhere). Generation uses ``model_ema``
(upstream ``evaluate(use_ema=True)``).

Data (:func:`center_crop_arr`, :func:`image_transform`, :class:`ImageFolderWithFilename`, :class:`CachedFolder`,
:func:`cache_latents`): ImageNet through the ADM center crop, and the latent cache of ``main_cache.py`` in the official
layout (``<cached_path>/<class>/<file>.npz`` holding ``moments`` and ``moments_flip``, the raw encoder moments of the
image and of its mirror image).

Generation (:class:`MARGenerator`, :func:`sample_folder_name`, :func:`ema_weights`): the adapter through which
``main_mar.py --evaluate`` runs MAR in :func:`disa.evaluation.run_evaluation` (per-image seeds, so image k is the
same on any number of GPUs), the official sample-folder names, and the EMA swap of the online evaluation.

Device-agnostic: nothing here assumes CUDA; fp16 autocast and loss scaling switch on only on CUDA, as upstream's
``torch.cuda.amp`` did, and ``precision="bf16"`` autocasts on any device.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torchvision import datasets, transforms

from disa.checkpoints import (
    CheckpointError,
    compare_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    read_checkpoint,
    resolve_checkpoint_path,
    select_state_dict,
)
from disa.evaluation import GeneratedBatch
from disa.noise import NoiseSource, PerImageNoise, TorchNoise
from disa.vae import AutoencoderKL, DiagonalGaussian, latent_to_tokens, to_uint8, tokens_to_latent

from .models.mar import MAR, orders_from_seeds

__all__ = [
    "LR_SCHEDULES",
    "PRECISIONS",
    "TrainConfig",
    "lr_at",
    "adjust_learning_rate",
    "effective_lr",
    "param_groups",
    "build_optimizer",
    "autocast",
    "LossScaler",
    "ema_copy",
    "update_ema",
    "ema_state_dict",
    "latents_from_batch",
    "train_one_epoch",
    "CHECKPOINT_KEYS",
    "save_model",
    "load_for_generation",
    "resume_from_checkpoint",
    "center_crop_arr",
    "image_transform",
    "ImageFolderWithFilename",
    "CachedFolder",
    "cache_file",
    "cache_latents",
    "order_seed",
    "MARGenerator",
    "sample_folder_name",
    "ema_weights",
]

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass
class TrainConfig:
    """What one training epoch needs (the official ``main_mar.py`` flags of the same names).

    ``lr`` is absolute: resolve ``--blr`` with :func:`effective_lr` first. ``epochs`` and ``warmup_epochs`` shape
    the schedule (fractional epochs: the learning rate changes every iteration). ``grad_clip=None`` disables
    clipping. ``precision``: ``fp16`` = upstream (fp16 autocast and loss scaling on CUDA, fp32 elsewhere),
    ``bf16`` (autocast on any device, no scaling), ``fp32``.
    """

    lr: float
    epochs: int = 400
    warmup_epochs: float = 100
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    grad_clip: float | None = 3.0
    ema_rate: float = 0.9999
    use_cached: bool = False
    precision: str = "fp16"
    print_freq: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise ValueError(f"lr must be a number (resolve --blr with effective_lr first), got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr):
            raise ValueError(f"min_lr must be a finite number >= 0, got {self.min_lr}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"the cosine schedule needs warmup_epochs < epochs, got {self.warmup_epochs} >= {self.epochs}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip}")
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in [0, 1], got {self.ema_rate}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, got {self.print_freq}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The fields of this config that ``args`` carries (``main_mar.py`` flags; ``args.lr`` must be resolved)."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names})


# ---- learning rate -------------------------------------------------------------------------------------------


def effective_lr(blr: float, batch_size: int, world_size: int = 1, lr: float | None = None) -> float:
    """Absolute learning rate: ``lr`` when given, else ``blr * batch_size * world_size / 256`` (upstream rule)."""
    if lr is not None:
        return lr
    return blr * batch_size * world_size / 256


def lr_at(epoch: float, config: TrainConfig) -> float:
    """Learning rate at fractional ``epoch``: linear warmup from 0 over ``warmup_epochs``, then ``lr`` (constant)
    or a half-cosine from ``lr`` to ``min_lr`` at ``epochs``."""
    if epoch < config.warmup_epochs:
        return config.lr * epoch / config.warmup_epochs
    if config.lr_schedule == "constant":
        return config.lr
    progress = (epoch - config.warmup_epochs) / (config.epochs - config.warmup_epochs)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, config: TrainConfig) -> float:
    """Set every param group's lr to :func:`lr_at` (times the group's ``lr_scale`` if it has one); returns it."""
    lr = lr_at(epoch, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


# ---- optimiser, precision, loss scaling ----------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups (upstream ``add_weight_decay``): no weight decay for 1-D parameters (norm weights), biases
    and the whole diffusion head; ``weight_decay`` for the rest (Linear weights, embeddings, pos embeds, tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.02) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95) over :func:`param_groups` (upstream)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context: ``fp16`` autocasts on CUDA only (upstream's ``torch.cuda.amp.autocast`` did
    nothing elsewhere), ``bf16`` on any device, ``fp32`` never."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16" and device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class LossScaler:
    """Backward, optional gradient-norm clipping, optimiser step (upstream ``NativeScalerWithGradNormCount``).

    Loss scaling (a CUDA ``GradScaler``) is active only when ``enabled`` (fp16 on CUDA); otherwise this is a plain
    backward/clip/step and :meth:`state_dict` is empty, which is what upstream saves when scaling is off.
    """

    def __init__(self, enabled: bool = False) -> None:
        self._scaler = torch.amp.GradScaler("cuda", enabled=enabled)

    @classmethod
    def for_precision(cls, device: torch.device | str, precision: str) -> "LossScaler":
        return cls(enabled=precision == "fp16" and torch.device(device).type == "cuda")

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.Tensor],
        clip_grad: float | None = None,
    ) -> torch.Tensor:
        """Backpropagate ``loss`` and step; returns the total gradient norm before clipping."""
        self._scaler.scale(loss).backward()
        self._scaler.unscale_(optimizer)  # clip (and report) the true gradients, not the scaled ones
        max_norm = clip_grad if clip_grad is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scaler.load_state_dict(dict(state))


# ---- EMA -----------------------------------------------------------------------------------------------------


def ema_copy(model: nn.Module) -> list[torch.Tensor]:
    """Fresh EMA parameters: detached copies of ``model.parameters()``, in order."""
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def update_ema(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], rate: float) -> None:
    """``ema <- rate * ema + (1 - rate) * param`` in place, pairwise."""
    if len(ema_params) != len(params):
        raise ValueError(f"{len(ema_params)} EMA tensors for {len(params)} parameters")
    for ema, p in zip(ema_params, params):
        ema.mul_(rate).add_(p.detach(), alpha=1 - rate)


def ema_state_dict(model: nn.Module, ema_params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every parameter replaced by its EMA value (upstream's ``model_ema``)."""
    state = dict(model.state_dict())
    named = list(model.named_parameters())
    if len(named) != len(ema_params):
        raise ValueError(f"{len(ema_params)} EMA tensors for {len(named)} parameters")
    for (name, _), ema in zip(named, ema_params):
        state[name] = ema.detach().clone()
    return state


# ---- one epoch -----------------------------------------------------------------------------------------------


def latents_from_batch(
    samples: torch.Tensor,
    vae: AutoencoderKL | None,
    *,
    use_cached: bool,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Training target: a posterior sample x 0.2325, ``(B, E, h, w)``.

    ``samples`` are images ``(B, 3, H, W)`` in [-1, 1] encoded by ``vae``, or with ``use_cached`` the cached
    posterior moments ``(B, 2E, h, w)`` (``main_cache.py``; ``vae`` unused). ``noise`` defaults to the global RNG.
    """
    noise = TorchNoise() if noise is None else noise
    with torch.no_grad():
        if use_cached:
            posterior = DiagonalGaussian(samples)
        elif vae is None:
            raise ValueError("a VAE is needed to encode images (or pass cached moments with use_cached=True)")
        else:
            posterior = vae.encode(samples)
        return latent_to_tokens(posterior.sample(noise))


class _ScalarWriter(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...


def train_one_epoch(
    model: nn.Module,
    vae: AutoencoderKL | None,
    model_params: Sequence[torch.Tensor],
    ema_params: Sequence[torch.Tensor],
    data_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    epoch: int,
    loss_scaler: LossScaler,
    config: TrainConfig,
    log_writer: _ScalarWriter | None = None,
) -> dict[str, float]:
    """One pass over ``data_loader`` of ``(samples, labels)``; returns ``{"loss": mean, "lr": last, "steps": n}``.

    ``model`` may be DDP-wrapped (it is called as ``model(latents, labels)`` and returns the loss);
    ``model_params`` are the unwrapped model's parameters, ``ema_params`` their EMA (updated after every step).
    A non-finite loss raises ``FloatingPointError`` (upstream exits) before any update is applied.
    """
    model.train(True)
    optimizer.zero_grad()
    num_steps = len(data_loader)  # type: ignore[arg-type]
    total, steps, lr = 0.0, 0, lr_at(epoch, config)
    for i, (samples, labels) in enumerate(data_loader):
        lr = adjust_learning_rate(optimizer, epoch + i / num_steps, config)
        samples, labels = samples.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        latents = latents_from_batch(samples, vae, use_cached=config.use_cached)  # (B, E, h, w)
        with autocast(device, config.precision):
            loss = model(latents, labels)
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, iteration {i}; stopping training")
        grad_norm = loss_scaler(loss, optimizer, parameters=model_params, clip_grad=config.grad_clip)
        optimizer.zero_grad()
        update_ema(ema_params, model_params, config.ema_rate)

        loss_value = _mean_over_ranks(loss_value, device)
        total, steps = total + loss_value, steps + 1
        if log_writer is not None:
            epoch_1000x = int((i / num_steps + epoch) * 1000)  # x-axis comparable across batch sizes
            log_writer.add_scalar("train_loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)
        if i % config.print_freq == 0 or i == num_steps - 1:
            logger.info(
                "epoch %d [%d/%d] loss %.4f lr %.3g grad_norm %.3g", epoch, i, num_steps, loss_value, lr, grad_norm
            )
    return {"loss": total / max(steps, 1), "lr": lr, "steps": float(steps)}


def _mean_over_ranks(value: float, device: torch.device | str) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


# ---- checkpoints ---------------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "model_ema", "optimizer", "epoch", "scaler", "args")


def save_model(
    output_dir: str | os.PathLike[str],
    model: nn.Module,
    ema_params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    loss_scaler: LossScaler,
    args: argparse.Namespace | None,
    *,
    epoch_name: str = "last",
) -> Path | None:
    """Write ``output_dir/checkpoint-{epoch_name}.pth`` in the official layout (:data:`CHECKPOINT_KEYS`).

    Only the main process writes (returns ``None`` elsewhere). The file is written next to its final name and then
    renamed, so an interrupted save never leaves a truncated checkpoint in place of the previous one.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    path = Path(output_dir) / f"checkpoint-{epoch_name}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "model_ema": ema_state_dict(model, ema_params),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": loss_scaler.state_dict(),
        "args": args,
    }
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_for_generation(model: nn.Module, path: str | os.PathLike[str], *, weights_only: bool = True) -> None:
    """Load the EMA weights (``model_ema``) of a checkpoint file or ``--resume`` folder into ``model``, strictly.

    The official evaluation always generates with the EMA weights. Raises :class:`disa.checkpoints.CheckpointError`
    (a missing file, an unreadable one, no ``model_ema``, or any missing / unexpected / mis-shaped key).
    """
    file = resolve_checkpoint_path(path)
    state = load_checkpoint(file, key="model_ema", weights_only=weights_only)
    load_state_dict_strict(model, state, what=f"checkpoint {os.fspath(file)!r} ['model_ema']")


def resume_from_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    loss_scaler: LossScaler | None = None,
    *,
    weights_only: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Resume training (upstream ``--resume``): ``model`` strictly from ``model``, the EMA from ``model_ema`` (in
    ``named_parameters`` order, on each parameter's device), and the optimiser and loss-scaler states when the file
    has them. Returns ``(ema_params, start_epoch)`` with ``start_epoch = epoch + 1`` (0 without an epoch)."""
    file = resolve_checkpoint_path(path)
    ckpt = read_checkpoint(file, weights_only=weights_only)
    source = f"checkpoint {os.fspath(file)!r}"
    load_state_dict_strict(model, select_state_dict(ckpt, "model", source=source), what=f"{source} ['model']")
    ema = select_state_dict(ckpt, "model_ema", source=source)
    mismatch = compare_state_dict(model, ema)
    if mismatch:
        raise CheckpointError(f"{source} ['model_ema'] does not match its 'model' entry:{mismatch.report()}")
    ema_params = [ema[name].detach().clone().to(p.device) for name, p in model.named_parameters()]
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if loss_scaler is not None and "scaler" in ckpt:
        loss_scaler.load_state_dict(ckpt["scaler"])
    return ema_params, int(ckpt["epoch"]) + 1 if "epoch" in ckpt else 0


# ---- data ----------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is >= 2x ``image_size``, resize (bicubic) so
    the short side is ``image_size``, then crop the central ``image_size`` square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)  # (H, W, 3)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def image_transform(img_size: int, *, random_flip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> ``(3, img_size, img_size)`` in [-1, 1]: ADM center crop, optional random horizontal flip
    (training; the cache encodes both orientations instead), ``ToTensor``, normalise with mean = std = 0.5."""
    steps: list[Callable[..., Any]] = [partial(center_crop_arr, image_size=img_size)]  # picklable for workers
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]
    return transforms.Compose(steps)


class ImageFolderWithFilename(datasets.ImageFolder):
    """``ImageFolder`` whose items are ``(image, label, "<class folder>/<file name>")`` (what the cache is keyed by)."""

    def relative_name(self, index: int) -> str:
        """``<class folder>/<file name>`` of item ``index``."""
        return os.path.join(*Path(self.samples[index][0]).parts[-2:])

    def __getitem__(self, index: int) -> tuple[Any, int, str]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target, self.relative_name(index)


def cache_file(cached_path: str | os.PathLike[str], relative_name: str) -> Path:
    """Where the latents of ``<class>/<file>`` live: ``<cached_path>/<class>/<file>.npz`` (upstream appends
    ``.npz`` to the full file name, extension included: ``n01440764/n01440764_10026.JPEG.npz``)."""
    return Path(cached_path) / f"{relative_name}.npz"


class CachedFolder(datasets.DatasetFolder):
    """The latent cache as a dataset: items ``(moments (2E, h, w) float32, label)``, labels from the class folders
    (sorted, as ``ImageFolder`` numbers them). Each access picks the image's or its mirror's moments with
    probability 1/2 (upstream's random flip for cached training), from the global torch RNG."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(os.fspath(root), loader=np.load, extensions=(".npz",))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with np.load(path) as data:
            key = "moments" if torch.rand(1).item() < 0.5 else "moments_flip"
            return torch.from_numpy(data[key]), target


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL,
    data_loader: Iterable[tuple[torch.Tensor, Any, Sequence[str]]],
    cached_path: str | os.PathLike[str],
    device: torch.device | str,
) -> int:
    """Encode every batch of ``(images (B, 3, H, W), labels, names)`` and its horizontal mirror; write each image's
    raw encoder moments ``(2E, h, w)`` as ``moments`` / ``moments_flip`` to :func:`cache_file`. Returns the number
    of files written.

    The moments are the encoder output before the log-variance clamp (upstream stores ``posterior.parameters``).
    Each file is written to a temporary name and renamed, so a file present in the cache is always complete.
    """
    if vae.encoder is None or vae.quant_conv is None:
        raise ValueError("caching latents needs the VAE's encoder (load it without decoder_only)")
    written = 0
    for images, _, names in data_loader:
        images = images.to(device, non_blocking=True)
        moments = vae.quant_conv(vae.encoder(images)).float().cpu().numpy()  # (B, 2E, h, w)
        mirrored = vae.quant_conv(vae.encoder(images.flip(dims=[3]))).float().cpu().numpy()  # (B, 2E, h, w)
        for name, m, mf in zip(names, moments, mirrored):
            target = cache_file(cached_path, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial_file = target.with_name(target.name + ".partial")
            try:
                with open(partial_file, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                    np.savez(f, moments=m, moments_flip=mf)
                os.replace(partial_file, target)
            finally:
                partial_file.unlink(missing_ok=True)
            written += 1
    return written


# ---- generation ----------------------------------------------------------------------------------------------

# Stream tag that separates an image's generation order from its diffusion noise (see order_seed).
_ORDER_STREAM = 0x0D0E


def order_seed(seed: int) -> int:
    """The seed of an image's generation order, derived from its image seed.

    Why not the image seed itself: numpy's ``RandomState`` and torch's CPU generator are both MT19937 seeded the
    same way, so one seed would hand the order shuffle and the diffusion noise the same raw bits. Mixing the seed
    through ``numpy.random.SeedSequence`` gives the order its own stream; it still depends on the seed alone.
    """
    return int(np.random.SeedSequence([int(seed), _ORDER_STREAM]).generate_state(1)[0])


@dataclass
class MARGenerator:
    """MAR as a :class:`disa.evaluation.ImageGenerator`: class labels and per-image seeds in, uint8 images out.

    Image ``b`` gets its generation order from ``order_seed(seeds[b])`` (:func:`orders_from_seeds`) and every
    diffusion draw from ``PerImageNoise(seeds)``, so it is the same whatever batch, rank or resume point produces it
    (upstream seeds one global RNG per rank with ``seed + rank``). Sampling and decoding run under
    :func:`autocast` (``precision``: ``fp16`` = upstream's fp16 autocast on CUDA, fp32 elsewhere). The reported NFE
    per AR step are the head evaluations that actually ran (``model.last_sample_stats``). The model must be in eval
    mode (dropout off); the caller sets it.
    """

    model: MAR
    vae: AutoencoderKL
    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    precision: str = "fp16"

    def generate(self, conditions: torch.Tensor, seeds: Sequence[int]) -> GeneratedBatch:
        device = self.model.fake_latent.device
        labels = torch.as_tensor(conditions, device=device)  # (B,) int64
        orders = orders_from_seeds([order_seed(s) for s in seeds], self.model.seq_len, device)  # (B, N)
        with torch.no_grad(), autocast(device, self.precision):
            tokens = self.model.sample_tokens(
                len(seeds), self.num_iter, self.cfg, self.cfg_schedule, labels, self.temperature,
                noise=PerImageNoise(seeds), orders=orders,
            )  # (B, C, h, w), scaled latents  # fmt: skip
            images = self.vae.decode(tokens_to_latent(tokens))  # (B, 3, H, W) in [-1, 1]
        stats = self.model.last_sample_stats
        return GeneratedBatch(to_uint8(images), stats.head_calls_per_step if stats is not None else ())


def sample_folder_name(
    *,
    num_iter: int,
    temperature: float,
    cfg_schedule: str,
    cfg: float,
    num_images: int,
    diff_upper_steps: int,
    diff_lower_steps: int,
    diff_annealing_strategy: str,
    num_sampling_steps: str | None = None,
    use_ema: bool = True,
    evaluate: bool = True,
) -> str:
    """The official sample folder name (relative to ``--output_dir``).

    MAR_DiSA: ``ariter{K}-diffsteps-{strategy}-{upper}-to-{lower}-temp{T}-{cfg_schedule}cfg{cfg}-image{N}``; with
    the original MAR flag ``num_sampling_steps`` the original ``ariter{K}-diffsteps{S}-temp{T}-...``. Then ``_ema``
    (EMA weights) and ``_evaluate`` (``--evaluate``). Numbers print as Python does (``cfg 3`` -> ``3.0``). As
    upstream, the sampler and the clips are not part of the name.
    """
    cfg_part = f"temp{float(temperature)}-{cfg_schedule}cfg{float(cfg)}-image{num_images}"
    if num_sampling_steps is not None:
        name = f"ariter{num_iter}-diffsteps{num_sampling_steps}-{cfg_part}"
    else:
        name = (
            f"ariter{num_iter}-diffsteps-{diff_annealing_strategy}-{diff_upper_steps}-to-{diff_lower_steps}-{cfg_part}"
        )
    return name + ("_ema" if use_ema else "") + ("_evaluate" if evaluate else "")


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema_params: Sequence[torch.Tensor]) -> Iterator[nn.Module]:
    """Run the block with the EMA values in ``model``'s parameters, then put the trained values back (upstream's
    ``evaluate(use_ema=True)`` swap), also when the block raises."""
    params = list(model.parameters())
    if len(params) != len(ema_params):
        raise ValueError(f"{len(ema_params)} EMA tensors for {len(params)} parameters")
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, ema in zip(params, ema_params):
            p.copy_(ema)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, value in zip(params, trained):
                p.copy_(value)
