"""The shared generation loop behind every model's ``--evaluate`` (one process or ``torchrun``, any world size).

A model plugs in through :class:`ImageGenerator` — one method::

    generate(conditions, seeds) -> GeneratedBatch(images=(B, H, W, 3) uint8 RGB, nfe_per_ar_step=(n_0, n_1, ...))

and :func:`run_evaluation` does the rest::

    ctx = init_distributed()                                   # disa.distributed
    cfg = EvalConfig(sample_dir=Path(out) / folder_name, num_images=50_000, batch_size=64, seed=0)
    results = run_evaluation(model, cfg, conditions=ClassBalancedLabels(50_000, 1000),
                             model_config=vars(args), metrics_fn=my_metrics, device=ctx.device)

What it guarantees, and how it relates to the official ``engine*.evaluate``:

* **Labels** — image id ``k`` gets class ``k // (num_images / num_classes)`` (:class:`ClassBalancedLabels`), the
  official class-major assignment. Any other conditioning (Harmon's prompts) is a callable ``ids -> conditions``.
* **Seeds** — image ``k``'s noise comes only from its seed :func:`image_seed` ``(seed, k, N) = seed * N + k``,
  which a model feeds to :class:`disa.noise.PerImageNoise`. Image ``k`` is therefore the same whatever the world
  size, the batch size or the resume point — bit for bit when the model's arithmetic is row-independent; a real
  network may still differ in the last float bit between batch sizes (BLAS picks kernels by shape), which the uint8
  rounding almost always hides. (Deviation: upstream seeds one generator per rank with ``seed + rank``, so its
  images depend on the GPU count and batch size.)
* **Sharding** — :func:`shard_batches` is the official layout (global batch ``i`` covers ``world * bsz`` consecutive
  ids, rank ``r`` takes the ``r``-th slice). It is applied to the ids still to generate, so a resumed run stays
  balanced. (Deviation: no wasted padding batch — upstream runs ``num_images // (bsz * world) + 1`` full batches
  per rank and discards ids >= ``num_images``.)
* **Files** — ``<sample_dir>/<id:05d>.png``, RGB on disk (upstream hands BGR arrays to ``cv2.imwrite``, which also
  stores RGB); ids >= ``num_images`` never exist. Optional ADM-format ``<sample_dir>.npz`` (``arr_0``: uint8
  ``(N, H, W, 3)``) assembled by rank 0 from the PNGs. PNGs are kept unless ``keep_pngs=False`` (upstream deletes
  the folder after computing FID).
* **Resume** — each PNG is written to ``<name>.tmp`` and renamed, so a crash leaves either a complete file or a
  stale ``.tmp`` (removed on restart). On restart every existing PNG is decoded (sharded across ranks); files that
  do not decode are regenerated, the others skipped. ``generation.json`` in the folder records what the images
  depend on (seed, num_images, conditions, model config) and a restart with different values is refused.
* **Timing** — as upstream: device synchronised before and after each ``generate`` call, which covers sampling and
  VAE decode but not PNG writing; the first ``warmup_batches`` batches of each rank are not timed. ``sec_per_image``
  is rank 0's per-GPU figure (what the official code prints); ``images_per_second`` adds up all ranks.
* **results.json** in the folder: metrics, timing, NFE per AR step, resolved config, git commit, world size and
  torch/device info. It is written before the metrics run (``"metrics": null``) and again after, so a failing
  metric never loses the timing.

The metrics hook ``metrics_fn(sample_dir) -> dict`` runs on **every** rank after all images are on disk, so a
metric can shard the feature extraction and reduce across ranks (``disa.distributed.all_reduce``); rank 0's return
value is recorded. A single-process metric should compute on rank 0 and return ``{}`` elsewhere. For FID/IS/KID/PRC
with a :class:`disa.metrics.MetricsConfig`, :func:`metrics_hook` builds that hook and checks its inputs up front.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed as dist_utils

__all__ = [
    "atomic_path",
    "EvalConfig",
    "GeneratedBatch",
    "ImageGenerator",
    "ClassBalancedLabels",
    "EvaluationError",
    "image_seed",
    "image_filename",
    "shard_batches",
    "write_png",
    "png_is_valid",
    "run_evaluation",
    "metrics_hook",
    "MANIFEST_NAME",
    "RESULTS_NAME",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "generation.json"
RESULTS_NAME = "results.json"
_MANIFEST_FORMAT = 1
_TMP_SUFFIX = ".tmp"
_PNG_NAME = re.compile(r"^(\d{5,})\.png$")
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: 2**32 + k gives the same numbers as k.
_SEED_SPACE = 2**32


class EvaluationError(RuntimeError):
    """Bad evaluation input or state (unwritable folder, foreign files, mismatched resume, bad model output)."""


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalConfig:
    """What to generate and where. Model-specific settings (cfg, steps, temperature) stay in the model's config.

    * ``sample_dir`` — folder of the PNGs (models build the official name, e.g. ``output_dir/steps25-to-15-...``).
    * ``num_images`` — images 0 .. num_images-1 (official 50,000).
    * ``batch_size`` — images per ``generate`` call on each rank (official ``--eval_bsz``).
    * ``seed`` — base seed; image k uses ``image_seed(seed, k, num_images) = seed * num_images + k``, so different
      base seeds share no image. ``(seed + 1) * num_images`` must stay <= 2^32 (seed < 85,899 for 50k images).
    * ``resume`` — skip images already in ``sample_dir`` (verified to decode). ``False`` refuses a folder that
      already holds images instead of overwriting them.
    * ``save_npz`` — also write ``<sample_dir>.npz`` with ``arr_0`` uint8 (N, H, W, 3) (the ADM evaluation suite's
      input). Rank 0 holds all N images in memory for this (9.8 GB for 50k 256x256 images).
    * ``keep_pngs`` — ``False`` deletes the PNGs after the metrics (and the npz) are done, as upstream does.
    * ``warmup_batches`` — leading batches of each rank left out of the timing (official: 1).
    * ``progress`` — tqdm bar on rank 0.
    """

    sample_dir: Path
    num_images: int = 50_000
    batch_size: int = 64
    seed: int = 0
    resume: bool = True
    save_npz: bool = False
    keep_pngs: bool = True
    warmup_batches: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_dir", Path(self.sample_dir))
        for name, lowest in (("num_images", 1), ("batch_size", 1), ("warmup_batches", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"EvalConfig.{name} must be an integer >= {lowest}, got {value!r}")
        top = _SEED_SPACE // self.num_images  # seeds 0 .. top-1 fit image_seed's 32-bit range
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < top:
            raise ValueError(
                f"EvalConfig.seed must be an integer in [0, {top}) for num_images={self.num_images} (per-image seeds "
                f"seed * num_images + k must fit torch's 32-bit seeds), got {self.seed!r}"
            )
        for name in ("resume", "save_npz", "keep_pngs", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EvalConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.sample_dir.name in ("", ".", ".."):
            raise ValueError(f"EvalConfig.sample_dir must name a folder of its own, got {str(self.sample_dir)!r}")


@dataclass(frozen=True)
class ClassBalancedLabels:
    """The official class-balanced labels: image id ``k`` gets class ``k // (num_images // num_classes)``.

    Upstream builds ``arange(num_classes).repeat_interleave(num_images // num_classes)`` and pads it with zeros for
    the overflow of its last batch; ids >= ``num_images`` accordingly get class 0 here (they are never written).
    Returns a CPU ``int64`` tensor ``(B,)``; the model moves it to its device.
    """

    num_images: int
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.num_images < 1:
            raise ValueError(f"need num_images >= 1 and num_classes >= 1, got {self.num_images}, {self.num_classes}")
        if self.num_images % self.num_classes != 0:
            raise ValueError(
                f"num_images={self.num_images} is not a multiple of num_classes={self.num_classes}: class-balanced "
                "evaluation (as upstream asserts) needs the same number of images for every class"
            )

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        per_class = self.num_images // self.num_classes
        return torch.tensor([k // per_class if k < self.num_images else 0 for k in ids], dtype=torch.int64)  # (B,)


# ---------------------------------------------------------------------------------------------- model protocol


@dataclass(frozen=True)
class GeneratedBatch:
    """What :meth:`ImageGenerator.generate` returns.

    * ``images`` — ``(B, H, W, 3)`` uint8 RGB, one row per seed, in order (``disa.vae.to_uint8`` of the decoder
      output gives exactly this, with the official rounding).
    * ``nfe_per_ar_step`` — number of sequential per-token-head network evaluations at each AR step of this batch
      (a CFG-doubled batch counts once). Empty if the model does not count.
    """

    images: np.ndarray
    nfe_per_ar_step: tuple[int, ...] = ()


@runtime_checkable
class ImageGenerator(Protocol):
    """A model as the evaluation loop sees it.

    ``generate(conditions, seeds)``: ``conditions`` is what the conditions callable returned for the batch's ids
    (class labels: int64 ``(B,)`` on the CPU; prompts: whatever the model's conditions callable builds);
    ``seeds[b]`` is image b's seed, and image b's randomness must come from it alone (e.g.
    ``disa.noise.PerImageNoise(seeds)``), never from the batch composition. Run under ``torch.no_grad()``; the
    model picks its own device, dtype and autocast.
    """

    def generate(self, conditions: Any, seeds: Sequence[int]) -> GeneratedBatch: ...


# ---------------------------------------------------------------------------------------------- pure helpers


def image_seed(seed: int, image_id: int, num_images: int) -> int:
    """The generator seed of image ``image_id`` of a ``num_images`` run under base seed ``seed``:
    ``seed * num_images + image_id`` (EDM's ``--seeds 0-49999`` for seed 0).

    Base seed ``s`` owns the block ``[s*N, (s+1)*N)``, so runs with different base seeds share no image (``seed +
    id`` would make seed 1 a shifted copy of seed 0). The result must stay below 2**32: torch's CPU generator
    silently drops higher bits, which would alias seeds.
    """
    if not 0 <= image_id < num_images or seed < 0 or (seed + 1) * num_images > _SEED_SPACE:
        raise ValueError(
            f"need 0 <= image_id < num_images and 0 <= seed with (seed + 1) * num_images <= 2**32, got seed={seed}, "
            f"image_id={image_id}, num_images={num_images}"
        )
    return seed * num_images + image_id


def image_filename(image_id: int) -> str:
    """The official file name: the id zero-padded to 5 digits, ``.png`` (``00042.png``)."""
    return f"{image_id:05d}.png"


def shard_batches(ids: Sequence[int], batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Rank ``rank``'s batches of ``ids`` in the official layout: global batch ``i`` is
    ``ids[i*world*bsz : (i+1)*world*bsz]`` and rank ``r`` takes its ``r``-th slice of ``bsz``. Trailing batches
    may be short or absent on some ranks.

    Applied to ``range(num_batches * world * bsz)`` this is exactly the official assignment of global positions to
    ``(rank, batch)``; the loop applies it to the ids still missing.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    ids = list(ids)
    step = batch_size * world_size
    batches = [ids[start + rank * batch_size : start + (rank + 1) * batch_size] for start in range(0, len(ids), step)]
    return [b for b in batches if b]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` when the block succeeds, remove it if not
    (so ``path`` never holds a half-written file). Used for PNGs, manifests, results and checkpoints alike."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the complete new one
    finally:
        tmp.unlink(missing_ok=True)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB image atomically (temporary file + rename)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {tuple(image.shape)}")
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")  # (H, W, 3) uint8 -> mode RGB


def png_is_valid(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` decodes completely as an RGB image (catches truncated and garbled files)."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated or corrupted data stream raises here
            return im.mode == "RGB"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, zlib errors ... for broken files
        return False


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _to_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=_json_default)


def _describe_conditions(conditions: Callable[[Sequence[int]], Any]) -> Any:
    """What the images depend on in ``conditions``: a dataclass's fields, else its qualified name (a bare
    ``repr`` would embed a memory address and make every resume look like a different run)."""
    name = f"{type(conditions).__module__}.{type(conditions).__qualname__}"
    if dataclasses.is_dataclass(conditions) and not isinstance(conditions, type):
        return {"type": name, **dataclasses.asdict(conditions)}
    qualname = getattr(conditions, "__qualname__", None)
    return f"{getattr(conditions, '__module__', '?')}.{qualname}" if qualname else name


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: folder has {old!r}, this run {new!r}"]


def _git_info() -> dict[str, Any]:
    """Commit and dirtiness of the checkout this package lives in (None where git or the repository is absent)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


# ---------------------------------------------------------------------------------------------- folder state


def _prepare_folder(cfg: EvalConfig, fingerprint: dict[str, Any]) -> list[int]:
    """Rank 0: create and probe the folder, clear stale temporaries, check what is there; returns existing ids."""
    folder = cfg.sample_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise EvaluationError(
            f"cannot write samples to {str(folder)!r}: {err.strerror or err}. Choose a writable output folder "
            "(e.g. --output_dir)."
        ) from err

    existing, foreign = [], []
    for entry in os.scandir(folder):
        if entry.name.endswith(".png" + _TMP_SUFFIX):  # left by a crash between write and rename
            Path(entry.path).unlink()
            continue
        if not entry.name.endswith(".png"):
            continue
        match = _PNG_NAME.match(entry.name)
        image_id = int(match.group(1)) if match else -1
        if match and image_id < cfg.num_images and entry.name == image_filename(image_id):
            existing.append(image_id)
        else:
            foreign.append(entry.name)
    if foreign:
        raise EvaluationError(
            f"{str(folder)!r} holds {len(foreign)} PNG file(s) that are not images 0..{cfg.num_images - 1} of this "
            f"run (e.g. {sorted(foreign)[:5]}); metrics would count them. Use an empty or new folder."
        )

    manifest = folder / MANIFEST_NAME
    if existing and not cfg.resume:
        raise EvaluationError(
            f"{str(folder)!r} already holds {len(existing)} image(s) and resume is off; nothing was overwritten. "
            "Resume the run, or delete the folder / pick another one to start afresh."
        )
    if existing and not manifest.is_file():
        raise EvaluationError(
            f"{str(folder)!r} holds {len(existing)} image(s) but no {MANIFEST_NAME}, so it cannot be told whether "
            "they come from this model, seed and config (they were not written by this loop). Use another folder."
        )
    if existing:
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise EvaluationError(f"cannot read {str(manifest)!r} ({err}); use another folder") from err
        differences = _diff(recorded, fingerprint)
        if differences:
            raise EvaluationError(
                f"cannot resume in {str(folder)!r}: its {len(existing)} image(s) were generated with other "
                "settings:\n  "
                + "\n  ".join(differences[:10])
                + "\nUse another folder for these settings (nothing was overwritten)."
            )
    else:
        with atomic_path(manifest) as tmp:
            tmp.write_text(_to_json(fingerprint))
    return sorted(existing)


def _verify_existing(cfg: EvalConfig, existing: list[int], rank: int, world: int) -> set[int]:
    """Every rank decodes its share of the existing PNGs and deletes the broken ones; returns all broken ids."""
    broken_here = [i for i in existing[rank::world] if not png_is_valid(cfg.sample_dir / image_filename(i))]
    for i in broken_here:
        (cfg.sample_dir / image_filename(i)).unlink(missing_ok=True)
    broken = {i for part in dist_utils.all_gather_object(broken_here) for i in part}
    if broken and rank == 0:
        logger.warning("%d corrupted or partial PNG(s) will be regenerated: %s", len(broken), sorted(broken)[:20])
    return broken


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class _RankStats:
    generated: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0
    wall_seconds: float = 0.0
    nfe: dict[tuple[int, ...], int] = field(default_factory=dict)  # per-AR-step NFE -> images generated with it
    device_name: str = ""


def _check_batch(out: Any, n: int, model: ImageGenerator) -> GeneratedBatch:
    where = f"{type(model).__name__}.generate"
    if not isinstance(out, GeneratedBatch):
        raise EvaluationError(f"{where} returned {type(out).__name__}; it must return a disa.evaluation.GeneratedBatch")
    img = out.images
    well_formed = isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 4
    if not well_formed or img.shape[0] != n or img.shape[-1] != 3:
        got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
        raise EvaluationError(f"{where} must return images as a uint8 array ({n}, H, W, 3) (RGB), got {got}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in out.nfe_per_ar_step):
        raise EvaluationError(f"{where}: nfe_per_ar_step must hold non-negative integers, got {out.nfe_per_ar_step}")
    return out


def _generate_shard(
    model: ImageGenerator,
    cfg: EvalConfig,
    conditions: Callable[[Sequence[int]], Any],
    batches: list[list[int]],
    device: torch.device,
    show_progress: bool,
) -> _RankStats:
    stats = _RankStats(device_name=_device_name(device))
    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, batches)), unit="img", desc="generating (rank 0)", disable=not show_progress)
    with bar, torch.no_grad():
        for b, ids in enumerate(batches):
            cond = conditions(ids)
            seeds = [image_seed(cfg.seed, i, cfg.num_images) for i in ids]
            dist_utils.synchronize(device)
            t0 = time.perf_counter()
            out = model.generate(cond, seeds)
            dist_utils.synchronize(device)
            elapsed = time.perf_counter() - t0
            out = _check_batch(out, len(ids), model)
            if b >= cfg.warmup_batches:  # the first batches pay for allocation, autotuning and compilation
                stats.timed_seconds += elapsed
                stats.timed_images += len(ids)
                bar.set_postfix(sec_per_img=f"{stats.timed_seconds / stats.timed_images:.4f}")
            key = tuple(int(v) for v in out.nfe_per_ar_step)
            stats.nfe[key] = stats.nfe.get(key, 0) + len(ids)
            for i, image in zip(ids, out.images):
                write_png(cfg.sample_dir / image_filename(i), image)
            stats.generated += len(ids)
            bar.update(len(ids))
    stats.wall_seconds = time.perf_counter() - start
    return stats


def _summarise_timing(per_rank: list[_RankStats], warmup_batches: int) -> dict[str, Any]:
    rates = [s.timed_seconds / s.timed_images if s.timed_images else None for s in per_rank]
    throughput = [s.timed_images / s.timed_seconds for s in per_rank if s.timed_images and s.timed_seconds > 0]
    return {
        "sec_per_image": rates[0],  # rank 0's per-GPU seconds per image: the figure the official code prints
        "sec_per_image_per_rank": rates,
        "images_per_second": sum(throughput) if throughput else None,  # all ranks together
        "timed_images": sum(s.timed_images for s in per_rank),
        "timed_seconds_per_rank": [s.timed_seconds for s in per_rank],
        "warmup_batches_per_rank": warmup_batches,
        "generation_wall_seconds": max(s.wall_seconds for s in per_rank),
        "covers": "model.generate (sampling + VAE decode), device-synchronised; not PNG writing",
    }


def _summarise_nfe(per_rank: list[_RankStats]) -> dict[str, Any]:
    counts: dict[tuple[int, ...], int] = {}
    for s in per_rank:
        for key, n in s.nfe.items():
            counts[key] = counts.get(key, 0) + n
    counted = {k: n for k, n in counts.items() if k}
    if not counted:
        return {"per_ar_step": None, "ar_steps": None, "per_image": None}
    if len(counted) == 1:
        (steps,) = counted
        return {"per_ar_step": list(steps), "ar_steps": len(steps), "per_image": sum(steps)}
    images = sum(counted.values())
    return {  # batches differed (e.g. an adaptive solver): list every variant with its image count
        "per_ar_step": None,
        "ar_steps": None,
        "per_image": sum(sum(k) * n for k, n in counted.items()) / images,
        "variants": [{"per_ar_step": list(k), "images": n} for k, n in sorted(counted.items())],
    }


def _environment(device: torch.device, per_rank: list[_RankStats]) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_names": sorted({s.device_name for s in per_rank}),
        "backend": torch.distributed.get_backend() if dist_utils.is_distributed() else None,
        "argv": sys.argv,
    }


def _write_npz(cfg: EvalConfig) -> Path:
    arr: np.ndarray | None = None
    for i in range(cfg.num_images):
        with Image.open(cfg.sample_dir / image_filename(i)) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3)
        if arr is None:
            arr = np.empty((cfg.num_images, *pixels.shape), dtype=np.uint8)  # (N, H, W, 3)
        if pixels.shape != arr.shape[1:]:
            raise EvaluationError(
                f"{image_filename(i)} is {pixels.shape[1]}x{pixels.shape[0]}, image 0 {arr.shape[2]}x{arr.shape[1]}: "
                "an npz needs images of one size"
            )
        arr[i] = pixels
    path = cfg.sample_dir.parent / f"{cfg.sample_dir.name}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)  # a file object: np.savez would append ".npz" to a path that lacks it
    return path


def run_evaluation(
    model: ImageGenerator,
    config: EvalConfig,
    *,
    conditions: Callable[[Sequence[int]], Any],
    model_config: Mapping[str, Any] | None = None,
    metrics_fn: Callable[[Path], Mapping[str, Any]] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Generate images ``0 .. num_images-1`` into ``config.sample_dir`` (resuming), run the metrics, write
    ``results.json``; returns the results dict on every rank (rank 0 writes the files).

    Call it on every rank after :func:`disa.distributed.init_distributed` (or in a plain single process).

    * ``conditions(ids)`` builds what ``model.generate`` takes for those image ids (:class:`ClassBalancedLabels`
      for class-conditional models).
    * ``model_config`` — the model's resolved settings (checkpoint, cfg, steps, ...): recorded in results.json and
      in ``generation.json``; a resume with different values is refused, so pass everything the images depend on.
    * ``metrics_fn(sample_dir)`` — runs on every rank once all images are written (see the module docstring);
      rank 0's dict becomes ``results["metrics"]``.
    * ``device`` — the device to synchronise for timing (default: the current CUDA device if any, else the CPU).

    Raises :class:`EvaluationError` for an unwritable folder, a folder holding foreign or mismatched images, or
    malformed model output. Nothing already written is deleted, except PNGs that fail to decode (regenerated) and,
    with ``keep_pngs=False``, the PNGs at the very end.
    """
    if not isinstance(model, ImageGenerator):  # runtime_checkable: checks that a generate method exists
        raise EvaluationError(f"{type(model).__name__} has no generate(conditions, seeds) method (see ImageGenerator)")
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    try:
        fingerprint = json.loads(_to_json({
            "format": _MANIFEST_FORMAT,
            "num_images": config.num_images,
            "seed": config.seed,
            "conditions": _describe_conditions(conditions),
            "model": dict(model_config or {}),
        }))
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"model_config must be JSON-able (numbers, strings, lists, dicts, paths): {err}") from err

    existing = dist_utils.run_on_main(lambda: _prepare_folder(config, fingerprint))
    broken = _verify_existing(config, existing, rank, world)
    done = set(existing) - broken
    pending = [i for i in range(config.num_images) if i not in done]
    if rank == 0:
        logger.info(
            "%s: %d of %d images to generate on %d rank(s) (%d already there, %d corrupted)",
            config.sample_dir, len(pending), config.num_images, world, len(done), len(broken),
        )
    batches = shard_batches(pending, config.batch_size, world, rank)
    mine = _generate_shard(model, config, conditions, batches, device, show_progress=config.progress and rank == 0)
    per_rank: list[_RankStats] = dist_utils.all_gather_object(mine)  # also waits until every rank has written
    timing = _summarise_timing(per_rank, config.warmup_batches)
    if rank == 0 and timing["sec_per_image"] is not None:
        logger.info(
            "%.4f s/img on rank 0 (per-device figure, as upstream prints it); %.2f img/s over %d rank(s)",
            timing["sec_per_image"], timing["images_per_second"], world,
        )

    results: dict[str, Any] = {
        "metrics": None,
        "timing": timing,
        "nfe": _summarise_nfe(per_rank),
        "images": {
            "sample_dir": str(config.sample_dir),
            "num_images": config.num_images,
            "generated_this_run": sum(s.generated for s in per_rank),
            "reused": len(done),
            "regenerated_corrupt": sorted(broken),
            "npz": None,
            "pngs_kept": True,
        },
        "config": {"eval": dataclasses.asdict(config), "model": fingerprint["model"],
                   "conditions": fingerprint["conditions"]},
        "world_size": world,
        "git": _git_info() if rank == 0 else None,
        "environment": _environment(device, per_rank),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    results_path = config.sample_dir / RESULTS_NAME

    def check_and_record() -> None:
        on_disk = {e.name for e in os.scandir(config.sample_dir)}
        lost = [i for i in range(config.num_images) if image_filename(i) not in on_disk]
        if lost:
            raise EvaluationError(f"{len(lost)} image(s) missing after generation (e.g. {lost[:5]}); rerun to resume")
        _write_results(results_path, results)

    dist_utils.run_on_main(check_and_record)

    if metrics_fn is not None:
        metrics = metrics_fn(config.sample_dir)
        if rank == 0:
            try:
                results["metrics"] = json.loads(_to_json(dict(metrics)))
            except (TypeError, ValueError) as err:
                raise EvaluationError(f"metrics_fn returned a value that is not a JSON-able dict: {err}") from err
    if rank == 0:
        if config.save_npz:
            results["images"]["npz"] = str(_write_npz(config))
        if not config.keep_pngs:
            for i in range(config.num_images):
                (config.sample_dir / image_filename(i)).unlink(missing_ok=True)
            results["images"]["pngs_kept"] = False
        _write_results(results_path, results)
        logger.info("results written to %s", results_path)
    return results


def metrics_hook(config: Any | None) -> Callable[[Path], Mapping[str, Any]] | None:
    """The ``metrics_fn`` of :func:`run_evaluation` for a :class:`disa.metrics.MetricsConfig` (``None``: no
    metrics). Rank 0 first checks that the metrics can run (statistics file, reference images, extractor weights)
    and every rank raises :class:`EvaluationError` naming the problem if not, so that a missing file fails before
    any image is generated. The hook runs on every rank (they share the feature extraction)."""
    if config is None:
        return None
    from .metrics import check_metrics_inputs, compute_metrics  # torch-fidelity: imported only when metrics run

    def check() -> None:
        try:
            check_metrics_inputs(config)
        except (OSError, ValueError, ImportError) as err:
            raise EvaluationError(
                f"metrics cannot run: {err}\nFetch the statistics with `python util/download.py fid-stats`, point "
                "--fid_stats / --metrics_weights at your files, or pass --no_metrics to only generate."
            ) from None

    dist_utils.run_on_main(check)
    return lambda folder: compute_metrics(folder, config)


def _write_results(path: Path, results: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(_to_json(results) + "\n")
