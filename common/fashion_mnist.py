"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline, MIT-licensed, 70k 28x28 images).

Install it with::

    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist

which puts the four gzipped IDX files of Zalando's release under ``/usr/share/datasets/fashion-mnist/``. On other
systems, download the same four files (``train-images-idx3-ubyte.gz`` ...) from github.com/zalandoresearch/fashion-mnist
and point ``root=`` (or the ``DISA_FASHION_MNIST_DIR`` environment variable) at their folder; uncompressed files work
too. Used for the metric sanity tests and the embedded demo model.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "APT_INSTALL",
    "CLASSES",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FashionMNIST",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "to_rgb",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DISA_FASHION_MNIST_DIR"
APT_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), then the number of dimensions.
_IDX_UBYTE = 0x08


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root`` if given, else ``$DISA_FASHION_MNIST_DIR``, else the Debian package's folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_ROOT


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {root}. Install the Debian package with\n    {APT_INSTALL}\n"
        f"(it installs to {DEFAULT_ROOT}), or put Zalando's four IDX files in a folder and pass root= or set "
        f"{ENV_VAR}."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (big-endian int32 sizes after the magic)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = bytearray(f.read())  # writable, so the arrays below are too (torch warns on read-only)
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError on a truncated file
        raise ValueError(f"cannot read {path}: {err}") from err
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is not an IDX file: {len(data)} bytes, shorter than its {header}-byte header")
    magic = data[:4]
    if magic[:2] != b"\x00\x00" or magic[2] != _IDX_UBYTE or magic[3] != ndim:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s): magic {magic.hex()}, "
            f"expected 0000{_IDX_UBYTE:02x}{ndim:02x}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 (0 = background) and labels ``(N,)`` int64 in [0, 10) of one split.

    ``train`` has 60,000 images (6,000 per class), ``test`` 10,000. Class names are in :data:`CLASSES`.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; allowed: {', '.join(_FILES)}")
    folder = fashion_mnist_root(root)
    image_stem, label_stem, count = _FILES[split]
    images = _read_idx(_find(folder, image_stem), ndim=3)
    labels = _read_idx(_find(folder, label_stem), ndim=1).astype(np.int64)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(
            f"Fashion-MNIST {split} in {folder}: expected {count} images of 28x28 and {count} labels, got images "
            f"{images.shape} and labels {labels.shape}"
        )
    if labels.max() >= len(CLASSES):
        raise ValueError(f"Fashion-MNIST {split} in {folder}: label {labels.max()} outside [0, {len(CLASSES)})")
    return images, labels


def to_rgb(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Grayscale ``(N, H, W)`` uint8 -> ``(N, 3, H, W)`` uint8 RGB (the input the feature extractors take)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 3:
        raise ValueError(f"expected grayscale uint8 images (N, H, W), got {x.dtype} {tuple(x.shape)}")
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W)


class FashionMNIST(Dataset):
    """One split as training items ``(image (1, 28, 28) float32 in [-1, 1], label)``.

    ``random_flip`` mirrors each image left-right with probability 1/2 (the augmentation of MAR's ImageNet
    training; garments stay garments when mirrored). The whole split is held in memory (47 MB for ``train``).
    """

    def __init__(
        self, split: Literal["train", "test"] = "train", root: str | os.PathLike[str] | None = None, *,
        random_flip: bool = False,
    ) -> None:  # fmt: skip
        images, labels = load_fashion_mnist(split, root)
        self.images = torch.from_numpy(images.copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(labels)  # (N,) int64
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index][None].float() / 127.5 - 1.0  # (1, 28, 28) in [-1, 1]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])
