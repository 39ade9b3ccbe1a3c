"""Side-by-side speed measurements: time per image with its spread, images/s, NFE, peak memory, FLOPs and the
fraction of the device's peak matmul throughput, all measured in one run.

Each family's benchmark (``<Family>_DiSA/benchmark.py``, dispatched by ``scripts/benchmark.py``) describes what can
vary as :class:`Knobs` (``sampler``, ``precision``, ``attention``, ...; new knobs plug in there), turns a choice
of knob values into a :class:`Setting` (a callable that generates and decodes one batch and returns its NFE per
image) and hands the settings to :func:`time_interleaved`:

* warm-up calls are not timed; the device is synchronised around every timed call;
* the settings run interleaved, ``A, B, A, B, ...`` (one call of each per repeat), so that a slow spell of a shared
  machine hits every setting instead of whichever was running; speed-ups are paired per repeat
  (:func:`paired_speedups`) and reported with their spread;
* peak memory is measured around the warm-up calls by a :class:`MemoryProbe` (CUDA: ``max_memory_allocated``; CPU:
  the growth of the process's peak resident set size, see :class:`MemoryProbe`);
* the achieved fraction of the device's peak matmul throughput is the setting's FLOP rate (FLOPs counted by
  ``torch.utils.flop_counter``, or by a family's formula) over a square-matmul microbenchmark run in the same
  process and dtype (:func:`peak_matmul_flops`).

``--compare A B`` (:func:`add_arguments`) runs two configurations given as ``key=value[,key=value]`` overrides of
the family's setting (``--compare precision=fp32 precision=bf16``) and prints their ratio. Timings are wall-clock
on whatever device runs the script: name the device, and on a shared machine trust the ratios more than the times.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .cli import int_at_least
from .distributed import synchronize
from .layers import uncompile_forward

__all__ = [
    "Knob",
    "Knobs",
    "OverrideError",
    "ATTENTION",
    "PRECISIONS",
    "attention_knob",
    "precision_knob",
    "compile_knob",
    "CompiledHead",
    "attention_backend",
    "compute_dtype",
    "Setting",
    "Spread",
    "Timing",
    "MemoryProbe",
    "time_interleaved",
    "paired_speedups",
    "count_flops",
    "peak_matmul_flops",
    "peak_fraction",
    "format_report",
    "add_arguments",
    "configurations",
    "resolve_device",
    "machine_line",
    "report",
]

Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------- overrides


class OverrideError(ValueError):
    """A ``key=value`` override names an unknown knob or a value the knob does not allow."""


@dataclass(frozen=True)
class Knob:
    """One thing a benchmark setting can vary. Values are written as text on the command line; ``choices`` (if
    given) lists the allowed ones, otherwise ``parse`` converts the text and raises ``ValueError`` on bad input."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] = str

    def value(self, text: str) -> Any:
        if self.choices is not None:
            if text not in self.choices:
                raise OverrideError(f"{self.name}={text!r} is not allowed; {self.name} takes {'|'.join(self.choices)}")
            return self.parse(text)
        try:
            return self.parse(text)
        except (TypeError, ValueError) as err:
            raise OverrideError(f"{self.name}={text!r}: {err}") from None

    def describe(self) -> str:
        allowed = "|".join(self.choices) if self.choices is not None else f"<{getattr(self.parse, '__name__', 'value')}>"
        return f"{self.name}={allowed} (default {self.default}: {self.help})"


@dataclass(frozen=True)
class Knobs:
    """The knobs of one family's benchmark, in display order. A configuration is a ``dict`` of every knob's value;
    :meth:`parse` applies ``key=value[,key=value...]`` overrides to a base configuration."""

    knobs: tuple[Knob, ...]

    def __post_init__(self) -> None:
        names = [k.name for k in self.knobs]
        if len(set(names)) != len(names):
            raise ValueError(f"knob names must be unique, got {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    def defaults(self) -> dict[str, Any]:
        return {k.name: k.default for k in self.knobs}

    def describe(self) -> str:
        """One line per knob: its name, allowed values and default (for errors and ``--help``)."""
        return "\n".join(f"  {k.describe()}" for k in self.knobs)

    def parse(self, spec: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``base`` (default: the defaults) with the overrides of ``spec`` (``"key=value,key=value"``) applied."""
        values = dict(self.defaults() if base is None else base)
        by_name = {k.name: k for k in self.knobs}
        seen: set[str] = set()
        for item in spec.split(","):
            key, sep, text = item.strip().partition("=")
            key, text = key.strip(), text.strip()
            if not sep or not key or not text:
                raise OverrideError(f"override {item.strip()!r} is not key=value; allowed keys:\n{self.describe()}")
            if key not in by_name:
                raise OverrideError(f"unknown override key {key!r}; allowed keys:\n{self.describe()}")
            if key in seen:
                raise OverrideError(f"override key {key!r} given twice in {spec!r}")
            seen.add(key)
            values[key] = by_name[key].value(text)
        return values


# Backends of F.scaled_dot_product_attention ("sdpa" = torch's own choice, what the models use by default).
ATTENTION: dict[str, SDPBackend | None] = {
    "sdpa": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
PRECISIONS = ("fp16", "bf16", "fp32")


def attention_knob() -> Knob:
    return Knob("attention", "sdpa", "F.scaled_dot_product_attention backend; sdpa = torch's choice, math = the "
                "unfused reference; flash/efficient/cudnn must exist on the device", tuple(ATTENTION))


def precision_knob(default: str = "fp16") -> Knob:
    return Knob("precision", default, "autocast dtype; fp16 = the official fp16 autocast on CUDA, fp32 elsewhere",
                PRECISIONS)


def attention_backend(name: str) -> ContextManager[None]:
    """Restrict ``F.scaled_dot_product_attention`` to the backend ``name`` (:data:`ATTENTION`)."""
    if name not in ATTENTION:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(ATTENTION)}")
    backend = ATTENTION[name]
    return contextlib.nullcontext() if backend is None else sdpa_kernel(backend)


def compile_knob() -> Knob:
    return Knob("compile", "off", "the per-token head: off = eager; on = torch.compile (the family's compile_head); "
                "graphs = compiled and replayed from CUDA graphs (CUDA only)", ("off", "on", "graphs"))


class CompiledHead:
    """A head module's forward for each ``compile`` knob value (:func:`compile_knob`), built on first use and
    swapped in for each call: the interleaved settings share one module, and recompiling at every switch would time
    the compiler. ``compile_fn(cuda_graphs)`` compiles ``module`` in place (the family's ``compile_head``, i.e.
    :func:`disa.layers.compile_forward`, which installs the compiled forward as an instance attribute)."""

    def __init__(self, module: torch.nn.Module, compile_fn: Callable[[bool], Any]) -> None:
        self.module, self._compile = module, compile_fn
        self._forwards: dict[str, Callable[..., Any] | None] = {"off": None}

    @contextlib.contextmanager
    def use(self, value: str) -> Iterator[None]:
        """Run the block with the forward of ``value`` (``off``, ``on``, ``graphs``)."""
        if value not in self._forwards:
            self._compile(value == "graphs")
            self._forwards[value] = self.module.forward
            uncompile_forward(self.module)
        forward = self._forwards[value]
        if forward is not None:
            self.module.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            uncompile_forward(self.module)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in under ``precision`` (fp16 autocasts on CUDA only, as the official code did)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16 if precision == "fp16" and device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Setting:
    """One configuration: ``generate()`` produces (and decodes) one batch of ``batch_size`` images and returns the
    sequential network evaluations per image (NFE). ``dtype``: what its matmuls run in (the peak it is compared
    with)."""

    name: str
    generate: Callable[[], float]
    batch_size: int
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of a sample (quartiles by linear interpolation, as ``numpy.percentile``)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Spread":
        if not samples:
            raise ValueError("a spread needs at least one sample")
        xs = sorted(samples)

        def quantile(q: float) -> float:
            pos = q * (len(xs) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

        return cls(statistics.median(xs), quantile(0.25), quantile(0.75), xs[0], xs[-1], len(xs))

    def text(self, fmt: str = ".3g") -> str:
        """``median [min-max]`` (one token, no spaces)."""
        return f"{self.median:{fmt}}[{self.low:{fmt}}-{self.high:{fmt}}]"


@dataclass(frozen=True)
class Timing:
    """What :func:`time_interleaved` measured for one setting. ``seconds``: wall-clock seconds of every timed batch
    in the order they ran; ``peak_memory``: the largest growth in bytes over one warm-up batch (:class:`MemoryProbe`);
    ``flops_per_batch``: counted FLOPs of one batch (None when not counted)."""

    name: str
    batch_size: int
    seconds: tuple[float, ...]
    nfe_per_image: float
    dtype: torch.dtype = torch.float32
    peak_memory: int | None = None
    flops_per_batch: float | None = None

    def per_image(self) -> Spread:
        return Spread.of([s / self.batch_size for s in self.seconds])

    def images_per_second(self) -> Spread:
        return Spread.of([self.batch_size / s for s in self.seconds])

    @property
    def seconds_per_image(self) -> float:
        """Median seconds per image."""
        return self.per_image().median

    @property
    def tflops_per_image(self) -> float | None:
        return None if self.flops_per_batch is None else self.flops_per_batch / self.batch_size / 1e12


class MemoryProbe:
    """Peak memory of a call above the level when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the caching
    allocator's reserve). CPU on Linux: the growth of the process's peak resident set size (``VmHWM`` in
    ``/proc/self/status``, reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``); before that,
    glibc's ``malloc_trim(0)`` hands freed heap pages back to the system so that memory the call reuses from an
    earlier one counts again. It counts every page the call touches (tensors, allocator and library buffers).
    Elsewhere: the growth of ``ru_maxrss``, the lifetime peak, which only shows a call that exceeds every earlier
    one (a lower bound). ``method`` names the one in use. Re-faulting trimmed pages costs time, which is why
    :func:`time_interleaved` probes the warm-up calls, not the timed ones."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0
        self._libc = _glibc()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif device.type == "cpu" and _can_reset_rss_peak():
            self.method = "peak RSS growth (/proc/self/clear_refs + VmHWM)"
        elif device.type == "cpu":
            self.method = "ru_maxrss growth (lifetime peak: a lower bound)"
        else:
            self.method = "not measured"

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            if self._libc is not None:
                self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _proc_status_bytes("VmRSS")
        elif self.method.startswith("ru_maxrss"):
            self._base = _ru_maxrss_bytes()

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method.startswith("peak RSS"):
            return max(_proc_status_bytes("VmHWM") - self._base, 0)
        if self.method.startswith("ru_maxrss"):
            return _ru_maxrss_bytes() - self._base
        return None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _can_reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_bytes("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def time_interleaved(
    settings: Sequence[Setting],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 3,
    memory: MemoryProbe | None = None,
    clock: Clock = time.perf_counter,
) -> list[Timing]:
    """Time ``settings`` interleaved: ``warmup`` untimed calls of each, then ``repeats`` rounds of one timed call
    of each in the given order (``A, B, A, B, ...``), the device synchronised before and after every timed call.
    ``memory`` (optional) measures each setting's peak over its warm-up calls (none without warm-up), so that the
    probe never touches a timed call. With a probe, one extra unprobed call of the first setting runs before them:
    the process's one-time allocations (thread pools, library workspaces, allocator growth) would otherwise land on
    whichever setting warms up first (FlowAR-S on a CPU, one configuration timed twice: 52 and 27 MiB without the
    priming call, 21 and 21 MiB with it)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if not settings:
        raise ValueError("no settings to time")
    peaks: list[int | None] = [None for _ in settings]
    if memory is not None and warmup > 0:
        settings[0].generate()
    for i, s in enumerate(settings):
        for _ in range(warmup):
            if memory is not None:
                memory.start()
            s.generate()
            if memory is not None and (peak := memory.stop()) is not None:
                peaks[i] = max(peak, peaks[i] or 0)
    seconds: list[list[float]] = [[] for _ in settings]
    nfe = [0.0 for _ in settings]
    for _ in range(repeats):
        for i, s in enumerate(settings):
            synchronize(device)
            start = clock()
            nfe[i] = float(s.generate())
            synchronize(device)
            seconds[i].append(clock() - start)
    return [
        Timing(s.name, s.batch_size, tuple(sec), n, s.dtype, peak)
        for s, sec, n, peak in zip(settings, seconds, nfe, peaks)
    ]


def paired_speedups(base: Timing, other: Timing) -> Spread:
    """Speed-up of ``other`` over ``base`` (> 1: ``other`` is faster), per image, paired by repeat: repeat ``r`` of
    both ran back to back, so a slow spell of the machine largely cancels in their ratio."""
    if len(base.seconds) != len(other.seconds):
        raise ValueError(f"{base.name!r} has {len(base.seconds)} repeats, {other.name!r} {len(other.seconds)}")
    return Spread.of([
        (b / base.batch_size) / (o / other.batch_size) for b, o in zip(base.seconds, other.seconds)
    ])  # fmt: skip


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention), as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2). The CPU's fused attention kernels are invisible to the
    counter: wrap ``fn`` in ``attention_backend("math")`` to count attention."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_matmul_flops(
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: int | None = None,
    repeats: int = 5,
    clock: Clock = time.perf_counter,
) -> float:
    """The device's matmul throughput in FLOP/s for ``dtype``: the fastest of ``repeats`` timed ``size x size``
    products (after one untimed), ``2 size^3`` FLOPs each, taking the faster of ``torch.mm`` and ``F.linear``
    (``nn.Linear``'s kernel): on CPUs without bf16 instructions the two differ by 10x in bfloat16. Default size:
    8192 on CUDA (large enough to saturate a data-centre GPU), 512 elsewhere (a CPU reaches its plateau there
    within a fraction of a second). It runs under the process's current backend flags (TF32 included), as the
    benchmark does."""
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    n = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    with torch.no_grad():
        for product in (lambda: torch.mm(a, b), lambda: F.linear(a, b)):
            product()
            for _ in range(repeats):
                synchronize(device)
                start = clock()
                product()
                synchronize(device)
                best = min(best, clock() - start)
    return 2.0 * n**3 / max(best, 1e-12)


def peak_fraction(flops_per_batch: float, seconds_per_batch: float, peak_flops_per_second: float) -> float:
    """Achieved fraction of the peak: ``(flops / seconds) / peak``."""
    if seconds_per_batch <= 0 or peak_flops_per_second <= 0:
        raise ValueError(f"need positive time and peak, got {seconds_per_batch} s and {peak_flops_per_second} FLOP/s")
    return flops_per_batch / seconds_per_batch / peak_flops_per_second


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}MiB"


def format_report(
    timings: Sequence[Timing],
    *,
    peaks: Mapping[torch.dtype, float] | None = None,
    memory_method: str | None = None,
) -> str:
    """A plain-text table (one row per setting: batch, seconds per image ``median[min-max]`` over repeats,
    images/s, NFE/img, TFLOP/img, % of peak matmul throughput, peak memory), then the speed-up of every setting
    over the first, paired by repeat, and the FLOP ratio where FLOPs were counted."""
    if not timings:
        raise ValueError("no timings to format")
    rows = []
    for t in timings:
        per_image = t.per_image()
        tflops = "-" if t.tflops_per_image is None else f"{t.tflops_per_image:.4g}"
        fraction = "-"
        if t.flops_per_batch is not None and peaks and t.dtype in peaks:
            median_batch = statistics.median(t.seconds)
            fraction = f"{100 * peak_fraction(t.flops_per_batch, median_batch, peaks[t.dtype]):.1f}%"
        rows.append((t.name, str(t.batch_size), per_image.text(), f"{t.images_per_second().median:.3g}",
                     f"{t.nfe_per_image:.0f}", tflops, fraction, _mib(t.peak_memory)))  # fmt: skip
    header = ("setting", "batch", "s/img median[min-max]", "img/s", "NFE/img", "TFLOP/img", "%peak", "peak mem")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]  # fmt: skip
    base = timings[0]
    for t in timings[1:]:
        s = paired_speedups(base, t)
        line = (f"speed-up of {t.name} over {base.name}: {s.median:.2f}x (paired over {s.n} repeats: min "
                f"{s.low:.2f}x, IQR {s.q1:.2f}-{s.q3:.2f}x, max {s.high:.2f}x)")
        if t.flops_per_batch and base.flops_per_batch:
            flop_ratio = (base.flops_per_batch / base.batch_size) / (t.flops_per_batch / t.batch_size)
            line += f"; FLOP ratio {flop_ratio:.2f}x"
        lines.append(line)
    if peaks:
        lines.append("peak matmul throughput (same run): " + ", ".join(
            f"{str(d).removeprefix('torch.')} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()))  # fmt: skip
    if memory_method:
        lines.append(f"peak mem: {memory_method}, over the warm-up calls ('-' without warm-up)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, knobs: Knobs, *, batch_size: int | None, batch_note: str) -> None:
    """The options every family's benchmark shares: ``--batch_size`` (default: the official evaluation's),
    ``--warmup``, ``--repeats``, ``--device``, ``--threads``, ``--set`` / ``--compare`` overrides, ``--no_flops``
    and ``--no_peak``. The knobs are listed in the parser's epilog."""
    g = parser.add_argument_group("measurement (disa.benchmark)")
    g.add_argument("--batch_size", type=int_at_least(1), default=batch_size,
                   help=f"images per generation call (default: {batch_note}; 1 measures latency)")
    g.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls of each setting (default 1)")
    g.add_argument("--repeats", type=int_at_least(1), default=3,
                   help="interleaved timed calls of each setting (A, B, A, B, ...; default 3)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--set", dest="overrides", metavar="KEY=VALUE[,...]", default=None,
                   help="overrides of the base setting (see the knobs below)")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="time two configurations given as KEY=VALUE[,...] overrides of the base setting, "
                        "interleaved, and print B's speed-up over A (e.g. --compare precision=fp32 precision=bf16)")
    g.add_argument("--no_flops", action="store_true", help="skip the FLOP count (and so the %%peak column)")
    g.add_argument("--no_peak", action="store_true", help="skip the peak matmul microbenchmark")
    parser.epilog = (parser.epilog or "") + "\nknobs for --set / --compare:\n" + knobs.describe()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def configurations(
    parser: argparse.ArgumentParser,
    knobs: Knobs,
    args: argparse.Namespace,
    presets: Sequence[tuple[str, Mapping[str, Any]]],
    base: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(name, knob values)`` to time: with ``--compare A B`` the two overridden configurations (named by their
    overrides), otherwise the family's ``presets`` (each a name and overrides). ``base`` (default: the knobs'
    defaults) gets ``--set`` applied first. Bad overrides end the program through ``parser.error`` (exit 2) with the
    allowed keys and values; so does ``compile=graphs`` when ``device`` is given and is not a CUDA device."""
    try:
        start = knobs.parse(args.overrides, base) if args.overrides else dict(knobs.defaults() if base is None else base)
        if args.compare:
            configs = [(spec, knobs.parse(spec, start)) for spec in args.compare]
        else:
            configs = [(name, {**start, **values}) for name, values in presets]
    except OverrideError as err:
        parser.error(str(err))
    if device is not None and device.type != "cuda" and any(v.get("compile") == "graphs" for _, v in configs):
        parser.error(f"compile=graphs replays CUDA graphs and needs a CUDA device, this run is on {device}; use "
                     "compile=on or --device cuda")
    return configs


def resolve_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def machine_line(device: torch.device) -> str:
    """The device in words (GPU name, or CPU threads and the load average: CPU times mean little under load)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    return f"{device} ({torch.get_num_threads()} threads{load})"


def report(
    timings: Sequence[Timing],
    device: torch.device,
    *,
    peak: bool,
    memory: MemoryProbe | None,
    peak_cache: dict[torch.dtype, float] | None = None,
) -> str:
    """:func:`format_report` with the peak matmul throughput of every dtype among ``timings`` measured now (or
    taken from ``peak_cache``, which this fills) when ``peak`` and FLOPs were counted."""
    peaks: dict[torch.dtype, float] = {}
    if peak and any(t.flops_per_batch is not None for t in timings):
        cache = {} if peak_cache is None else peak_cache
        for t in timings:
            if t.dtype not in cache:
                cache[t.dtype] = peak_matmul_flops(device, t.dtype)
            peaks[t.dtype] = cache[t.dtype]
    return format_report(timings, peaks=peaks, memory_method=memory.method if memory else None)

