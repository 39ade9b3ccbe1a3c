"""The embedded Fashion-MNIST testbed: a tiny MAR trained here, shipped in the repository, and scored offline.

No official checkpoint can be had offline, so DiSA's claims are measured end to end on a model small enough to
train on a CPU: class-conditional MAR on Fashion-MNIST (28x28 grayscale, 10 classes), tokens = 4x4 pixel patches
(:class:`disa.vae.PixelTokenizer`: 49 tokens of 16 values, no VAE). The model card is ``assets/MODEL_CARD.md``.

Everything the demo, the evidence script, the ablation and the tests share lives here::

    model = load_testbed_model(sampler=SamplerConfig(num_iter=16, diff_sampler="DiSA", diff_upper_steps=50,
                                                     diff_lower_steps=5, cfg=2.0))
    run = sample_images(model, labels, seeds, cfg=2.0)           # images (N, 28, 28, 3) uint8, time, NFE
    ref = reference_features(cache_dir)                          # EfficientNet-Lite0 features of the test set
    scores = score(run.images, ref)                              # FD_EffNet-Lite0, precision, recall
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from disa.checkpoints import CheckpointError, load_checkpoint
from disa.distributed import synchronize
from disa.evaluation import ClassBalancedLabels, atomic_path, image_seed
from disa.fashion_mnist import CLASSES, load_fashion_mnist, to_rgb
from disa.features import EFFNET_LITE0
from disa.metrics import (
    MetricsConfig,
    TensorImages,
    extract_features,
    metrics_from_features,
)
from disa.vae import PixelTokenizer
from mar_disa.engine_mar import MARGenerator, load_for_generation
from mar_disa.main_mar import ModelConfig, SamplerConfig, build_model
from mar_disa.models.mar import MAR
from PIL import Image

__all__ = [
    "REFERENCE_IMAGES",
    "SHIPPED_CHECKPOINT",
    "SampleRun",
    "balanced_labels",
    "class_grid",
    "export_checkpoint",
    "load_testbed_model",
    "read_model_config",
    "reference_features",
    "sample_images",
    "score",
]

logger = logging.getLogger("mar_disa.testbed")

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "fashion_mnist_mar_tiny.pth"
# Test-set images the metrics compare against: the first 2,000 (200 per class on average; the split is shuffled).
REFERENCE_IMAGES = 2000
_CACHE_FORMAT = 1  # bump when the cached reference features change meaning


def export_checkpoint(training_checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                      model: ModelConfig, recipe: Mapping[str, Any]) -> Path:  # fmt: skip
    """Write the shippable file: the EMA weights of a ``main_mar.py`` training checkpoint, the architecture
    (``ModelConfig`` fields) and the training recipe (command, epochs, time) — no optimiser state, no second copy
    of the weights. Loads back with :func:`load_testbed_model` (and with ``main_mar.py --evaluate --resume``)."""
    state = load_checkpoint(training_checkpoint, key="model_ema")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_ema": {k: v.detach().clone().contiguous() for k, v in state.items()},
               "model_config": {f.name: getattr(model, f.name) for f in fields(ModelConfig)},
               "recipe": dict(recipe)}  # fmt: skip
    with atomic_path(out) as partial:
        torch.save(payload, partial)
    return out


def read_model_config(path: str | os.PathLike[str] = SHIPPED_CHECKPOINT) -> ModelConfig:
    """The architecture recorded in a checkpoint written by :func:`export_checkpoint`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot read the testbed checkpoint {os.fspath(path)!r}: {err}") from err
    if not isinstance(payload, dict) or "model_config" not in payload:
        raise CheckpointError(f"{os.fspath(path)!r} has no 'model_config': not a testbed checkpoint "
                              "(write one with mar_disa.testbed.export_checkpoint)")
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in payload["model_config"].items() if k in known})


def load_testbed_model(
    path: str | os.PathLike[str] = SHIPPED_CHECKPOINT, *, sampler: SamplerConfig | None = None,
    device: torch.device | str = "cpu",
) -> MAR:  # fmt: skip
    """The testbed MAR with its EMA weights loaded strictly, its head sampling as ``sampler`` says (default:
    :class:`SamplerConfig`'s), in eval mode."""
    model = build_model(read_model_config(path), sampler or SamplerConfig())
    load_for_generation(model, path)
    return model.to(device).eval()


@dataclass(frozen=True)
class SampleRun:
    """What :func:`sample_images` produced: ``images (N, 28, 28, 3)`` uint8, the mean seconds per image over the
    timed batches (the first is a warm-up, left out when there are several), the sequential head evaluations
    (NFE) per image with their split over AR steps, and the tokens each AR step produced."""

    images: np.ndarray
    labels: np.ndarray
    sec_per_image: float
    nfe_per_image: float
    nfe_per_ar_step: tuple[int, ...]
    tokens_per_ar_step: tuple[int, ...]

    @property
    def steps_per_token(self) -> float:
        """Diffusion steps per token, averaged over the tokens (an AR step of n tokens and s steps counts n times).
        With CFG each step evaluates the head on twice the rows; NFE counts sequential evaluations, not rows."""
        total = sum(self.tokens_per_ar_step)
        return sum(n * s for n, s in zip(self.tokens_per_ar_step, self.nfe_per_ar_step)) / total


def sample_images(
    model: MAR,
    labels: Sequence[int] | np.ndarray,
    seeds: Sequence[int],
    *,
    num_iter: int = 16,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    batch_size: int = 250,
    precision: str = "fp32",
) -> SampleRun:
    """Generate one image per ``(label, seed)`` with the shared :class:`MARGenerator` (per-image seeds: image k is
    the same whatever the batch), timing every batch with the device synchronised."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(seeds) or len(seeds) == 0:
        raise ValueError(f"need one seed per label and at least one image, got {len(labels)} labels and "
                         f"{len(seeds)} seeds")
    device = model.fake_latent.device
    generator = MARGenerator(model, PixelTokenizer(model.vae_embed_dim).to(device), num_iter=num_iter, cfg=cfg,
                             cfg_schedule=cfg_schedule, temperature=temperature, precision=precision)
    images, times, counts = [], [], []
    for start in range(0, len(seeds), batch_size):
        batch_labels = torch.from_numpy(labels[start : start + batch_size])
        synchronize(device)
        began = time.perf_counter()
        out = generator.generate(batch_labels, list(seeds[start : start + batch_size]))
        synchronize(device)
        times.append(time.perf_counter() - began)
        counts.append(len(batch_labels))
        images.append(out.images)
    stats = model.last_sample_stats  # the schedule is the same for every batch
    timed = slice(1, None) if len(times) > 1 else slice(None)  # the first batch pays for allocations and caches
    sec_per_image = sum(times[timed]) / sum(counts[timed])
    return SampleRun(np.concatenate(images), labels, sec_per_image, float(sum(stats.head_calls_per_step)),
                      tuple(stats.head_calls_per_step), tuple(stats.tokens_per_step))


def balanced_labels(num_images: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Class-balanced labels (the official assignment: image k has class k // (N / 10)) and per-image seeds."""
    labels = ClassBalancedLabels(num_images, len(CLASSES))(list(range(num_images)))
    return np.asarray(labels, dtype=np.int64), [image_seed(seed, k, num_images) for k in range(num_images)]


def _extractor_config(device: torch.device | str | None) -> MetricsConfig:
    # extract_features reads only the extractor settings; isc=True is merely the smallest valid metric selection.
    return MetricsConfig(extractor=EFFNET_LITE0, fid=False, isc=True, num_workers=0,
                         device=None if device is None else str(device), distributed=False)


def reference_features(cache_dir: str | os.PathLike[str] | None = None, *, num_images: int = REFERENCE_IMAGES,
                       device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """EfficientNet-Lite0 features ``(num_images, 1280)`` of the first ``num_images`` Fashion-MNIST test images,
    computed once and cached in ``cache_dir`` (default ``$XDG_CACHE_HOME/disa`` or ``~/.cache/disa``)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disa"
    path = Path(cache_dir) / f"fashion_mnist_test{num_images}_effnet_lite0_v{_CACHE_FORMAT}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:  # a damaged cache is recomputed, never trusted
            logger.warning("ignoring the unreadable feature cache %s (%s)", path, err)
    images, _ = load_fashion_mnist("test")
    if not 2 <= num_images <= len(images):
        raise ValueError(f"num_images must be in [2, {len(images)}], got {num_images}")
    logger.info("extracting EfficientNet-Lite0 features of %d Fashion-MNIST test images (cached in %s)",
                num_images, path)
    feats = extract_features(TensorImages(to_rgb(images[:num_images])), _extractor_config(device), "fid")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        torch.save(feats, partial)
    return feats


def score(images: np.ndarray, reference: torch.Tensor, *, device: torch.device | str | None = None) -> dict[str, float]:
    """``FD_EffNet-Lite0``, ``precision_EffNet-Lite0`` and ``recall_EffNet-Lite0`` of uint8 ``images (N, H, W, 3)``
    against :func:`reference_features`."""
    chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    feats = extract_features(TensorImages(chw), _extractor_config(device), "fid")
    return metrics_from_features(feats, reference, EFFNET_LITE0)


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10, scale: int = 2) -> Image.Image:
    """One row per class (in label order), the first ``per_class`` images of each, upscaled ``scale`` times."""
    rows = []
    for c in range(len(CLASSES)):
        picked = images[labels == c][:per_class]
        if len(picked) < per_class:
            raise ValueError(f"class {c} ({CLASSES[c]}) has {len(picked)} images, the grid needs {per_class}")
        rows.append(np.concatenate(list(picked), axis=1))  # (H, per_class W, 3)
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
