"""Side-by-side speed measurements: time per image, NFE and FLOP-based expected ratios, in one run.

Each family's benchmark (``<Family>_DiSA/benchmark.py``, dispatched by ``scripts/benchmark.py``) builds its
settings as :class:`Setting` objects (a callable that generates one batch and returns NFE counts) and calls
:func:`run_settings`, which times them with the same warm-up and device synchronisation, counts FLOPs of one batch
with ``torch.utils.flop_counter`` and prints one table whose ratios are all measured in this run::

    setting                      s/img   NFE/img  TFLOP/img  speed-up (measured)  speed-up (FLOPs)
    original 256 AR / 100 steps  ...

Timings are wall-clock on whatever device runs the script; say which device when you quote them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .distributed import synchronize

__all__ = ["Setting", "Measurement", "time_batches", "count_flops", "run_settings", "format_table"]


@dataclass(frozen=True)
class Setting:
    """One sampler configuration: ``generate()`` produces one batch of ``batch_size`` images and returns the
    sequential network evaluations per image (NFE) of that batch."""

    name: str
    generate: Callable[[], float]
    batch_size: int


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds_per_image: float
    nfe_per_image: float
    tflops_per_image: float | None


def time_batches(fn: Callable[[], float], device: torch.device, *, warmup: int = 1, repeats: int = 1) -> tuple[float, float]:
    """Mean wall-clock seconds per call of ``fn`` after ``warmup`` untimed calls, with the device synchronised
    around the timed region; also returns ``fn``'s last return value (the NFE)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    nfe = 0.0
    for _ in range(warmup):
        nfe = fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        nfe = fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats, nfe


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention), as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_settings(
    settings: Sequence[Setting],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 1,
    flops: bool = True,
) -> list[Measurement]:
    """Time every setting (and count its FLOPs) in this one process; the first setting is the baseline."""
    results = []
    for s in settings:
        seconds, nfe = time_batches(s.generate, device, warmup=warmup, repeats=repeats)
        tflops = count_flops(s.generate) / s.batch_size / 1e12 if flops else None
        results.append(Measurement(s.name, seconds / s.batch_size, nfe, tflops))
    return results


def format_table(results: Sequence[Measurement]) -> str:
    """A plain-text table; speed-ups are relative to the first row (measured time and, if counted, FLOPs)."""
    if not results:
        raise ValueError("no measurements to format")
    base = results[0]
    width = max(len(r.name) for r in results)
    lines = [f"{'setting':<{width}}  {'s/img':>9}  {'NFE/img':>8}  {'TFLOP/img':>9}  {'speed-up':>8}  {'FLOP ratio':>10}"]
    for r in results:
        flop_text = f"{r.tflops_per_image:9.4g}" if r.tflops_per_image is not None else f"{'-':>9}"
        ratio = (
            f"{base.tflops_per_image / r.tflops_per_image:9.2f}x"
            if r.tflops_per_image and base.tflops_per_image
            else f"{'-':>10}"
        )
        lines.append(
            f"{r.name:<{width}}  {r.seconds_per_image:9.3f}  {r.nfe_per_image:8.0f}  {flop_text}  "
            f"{base.seconds_per_image / r.seconds_per_image:7.2f}x  {ratio}"
        )
    return "\n".join(lines)
