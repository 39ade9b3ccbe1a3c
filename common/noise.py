"""Explicit noise sources for samplers.

Every sampler takes ``noise: NoiseSource`` instead of calling ``torch.randn`` itself, so that

* tests can replay the noise recorded from the official code (:class:`ReplayNoise`);
* evaluation can give every image its own seeded stream (:class:`PerImageNoise`), which makes image k identical
  whatever the world size, batch size or resume point;
* plain use stays one line (:class:`TorchNoise`, optionally with a ``torch.Generator``).
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import torch

__all__ = ["NoiseSource", "TorchNoise", "ReplayNoise", "PerImageNoise"]


def _to_device(cpu: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move host-drawn noise to ``device`` without stalling the host on CUDA.

    A plain ``.to("cuda")`` from pageable memory waits for the copy, i.e. for every kernel queued before it: one
    host synchronisation per diffusion step. Copying from pinned memory with ``non_blocking=True`` keeps the queue
    full; the values are the same (torch's pinned-memory cache keeps the buffer alive until the copy is done).
    """
    device = torch.device(device)
    if device.type == "cuda" and cpu.device.type == "cpu":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


class NoiseSource(Protocol):
    def __call__(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Return a standard-normal tensor of ``shape``."""
        ...


class TorchNoise:
    """``torch.randn`` from an optional generator (the global RNG when ``generator`` is None)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else device
        out = torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=gen_device)
        return _to_device(out, device)


class ReplayNoise:
    """Hands out given tensors in order (e.g. noise recorded from the official code); shapes are checked."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._queue = list(tensors)
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._queue) - self._next

    def __call__(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        if self._next >= len(self._queue):
            raise RuntimeError(f"ReplayNoise exhausted after {len(self._queue)} draws (asked for shape {tuple(shape)})")
        t = self._queue[self._next]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"ReplayNoise draw {self._next}: recorded shape {tuple(t.shape)} != requested {tuple(shape)}")
        self._next += 1
        return t.to(device=device, dtype=dtype)


class PerImageNoise:
    """One seeded CPU generator per image, so each image's noise depends on its seed only.

    A request of shape ``(R, *rest)`` with ``R`` a multiple of the number of images ``B`` is filled block by block:
    row ``j * B + b`` comes from image ``b``'s generator (rows are laid out ``[cond; uncond]`` under CFG). Draws
    happen on the CPU (bit-identical across devices and batch compositions) and are then moved to ``device``.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        if len(seeds) == 0:
            raise ValueError("PerImageNoise needs at least one seed")
        # torch's CPU generator keeps only the low 32 bits of a seed: 2**32 + 5 would silently alias 5.
        bad = [s for s in seeds if not 0 <= int(s) < 2**32]
        if bad:
            raise ValueError(f"PerImageNoise seeds must lie in [0, 2**32), got {bad[:5]}")
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def __call__(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        rows, rest, b = shape[0], tuple(shape[1:]), len(self.generators)
        if rows % b != 0:
            raise ValueError(f"PerImageNoise with {b} images cannot fill {rows} rows (need a multiple of {b})")
        blocks = [
            torch.stack([torch.randn(rest, generator=g, dtype=dtype) for g in self.generators])
            for _ in range(rows // b)
        ]
        return _to_device(torch.cat(blocks), device)
