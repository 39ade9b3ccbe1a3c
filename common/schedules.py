"""Step-count schedules (DiSA) and sampler time grids shared by every model family.

Three kinds of schedule live here, all pure functions of integers:

* :func:`annealed_steps` — how many denoising steps AR step ``k`` of ``K`` gets (the DiSA idea: many steps
  early, few late). One implementation serves MAR, Harmon, FlowAR and xAR; new strategies plug into
  :data:`_WEIGHTS`.
* :func:`respaced_timesteps` — which of the 1000 DDPM timesteps a respaced Gaussian diffusion keeps
  ("100", "ddim25", ...), including DiSA's clip of the top timestep.
* :func:`flowar_time_grid`, :func:`xar_time_grid` — the time points the flow samplers step through.

Official quirks are reproduced by default and every one of them can be switched off explicitly.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "STRATEGIES",
    "annealed_steps",
    "step_schedule",
    "DISA_CLIP",
    "DDIM_CLIP",
    "NO_CLIP",
    "respaced_timesteps",
    "flowar_time_grid",
    "xar_time_grid",
]

# Fraction w(k, U) in [0, 1] of the (upper - lower) extra steps that AR step k of U + 1 gets.
# ``None`` marks strategies whose official definition is not of the floor(extra * w) form (see annealed_steps).
_WEIGHTS: dict[str, Callable[[int, int], float] | None] = {
    "linear": None,  # exact rational floor, see annealed_steps
    # MAR_DiSA: int((cos(pi k / U) + 1) / 2 * (L - 1)), evaluated in float64 in this order.
    "cosine": lambda k, u: (math.cos(math.pi * k / u) + 1) / 2,
    "two-stage": lambda k, u: 1.0 if k < u / 2 else 0.0,
    # Official quirk (MAR_DiSA): "constant" uses the *lower* count at every AR step, not the upper one.
    # For a constant schedule at the upper count pass lower == upper.
    "constant": lambda k, u: 0.0,
}
STRATEGIES: tuple[str, ...] = tuple(_WEIGHTS)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def annealed_steps(ar_step: int, num_ar_steps: int, upper: int, lower: int, strategy: str = "linear") -> int:
    """Number of denoising steps for AR step ``ar_step`` (0-based) of ``num_ar_steps``.

    ``steps = lower + floor((upper - lower) * w(ar_step))`` with ``U = num_ar_steps - 1`` and

    * ``linear``:    w = (U - k) / U, computed in exact integer arithmetic. The official formulas of MAR/Harmon
      (``int((U-k)/U*(L-1))``), FlowAR (``int((U-L)(T-k)/T + L)``) and xAR (``int((T-s)/T*(U-L) + L)``) are float
      evaluations of this; the golden data show they never differ from the exact floor in the tested ranges.
    * ``cosine``:    w = (cos(pi k / U) + 1) / 2 (float64, in MAR_DiSA's evaluation order);
    * ``two-stage``: w = 1 while k < U / 2, else 0;
    * ``constant``:  w = 0, i.e. **lower** steps throughout (MAR_DiSA's definition).

    A single AR step (``num_ar_steps == 1``, where the official formulas divide by zero) gets ``upper`` steps
    (``lower`` for ``constant``).
    """
    _check_int("num_ar_steps", num_ar_steps, 1)
    _check_int("ar_step", ar_step, 0)
    if ar_step >= num_ar_steps:
        raise ValueError(f"ar_step must be in [0, num_ar_steps - 1] = [0, {num_ar_steps - 1}], got {ar_step}")
    _check_int("lower", lower, 1)
    _check_int("upper", upper, 1)
    if lower > upper:
        raise ValueError(f"lower steps ({lower}) must be <= upper steps ({upper})")
    if strategy not in _WEIGHTS:
        raise ValueError(f"unknown annealing strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    extra, u = upper - lower, num_ar_steps - 1
    if u == 0:
        return lower if strategy == "constant" else upper
    weight = _WEIGHTS[strategy]
    if weight is None:  # linear
        return lower + (extra * (u - ar_step)) // u
    return lower + int(weight(ar_step, u) * extra)


def step_schedule(num_ar_steps: int, upper: int, lower: int, strategy: str = "linear") -> list[int]:
    """``[annealed_steps(k, num_ar_steps, upper, lower, strategy) for k in range(num_ar_steps)]``."""
    return [annealed_steps(k, num_ar_steps, upper, lower, strategy) for k in range(num_ar_steps)]


# --------------------------------------------------------------------------------------------------------------
# Respaced DDPM timesteps (MAR / Harmon heads)

DISA_CLIP = 950  # MAR_DiSA's create_diffusion default: used by its DiSA sampler list and its training diffusion
DDIM_CLIP = 980  # MAR_DiSA's DDIM sampler list
NO_CLIP = None  # the original MAR / Harmon (MAR_DiSA spells this clip_timesteps=1001)


def _evenly_spaced(section_size: int, count: int) -> list[int]:
    """``count`` indices spread over ``range(section_size)`` the iDDPM way (float stride, Python round)."""
    if count > section_size:
        raise ValueError(f"cannot keep {count} timesteps out of a section of {section_size}")
    if count == 0:
        return []
    stride = 1.0 if count == 1 else (section_size - 1) / (count - 1)
    # Accumulated (not multiplied) position: the official code adds the stride repeatedly, and the float
    # round-off of that sum decides a few ties; the golden maps pin it down.
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


def _ddim_timesteps(count: int, num_timesteps: int, shrink_range: bool) -> list[int]:
    """``range(0, end, stride)`` with exactly ``count`` points for an integer stride.

    The original code only tries ``end = num_timesteps`` and fails when no stride fits; MAR_DiSA shrinks ``end``
    until one does (e.g. ddim37 keeps 0, 27, ..., 972).
    """
    ends = range(num_timesteps, 0, -1) if shrink_range else (num_timesteps,)
    for end in ends:
        for stride in range(1, end):
            if len(range(0, end, stride)) == count:
                return list(range(0, end, stride))
    raise ValueError(f"no integer stride gives exactly {count} DDIM steps in range(0, {num_timesteps})")


def respaced_timesteps(
    spec: str | int,
    *,
    clip: int | None,
    num_timesteps: int = 1000,
    ddim_shrink_range: bool = True,
) -> list[int]:
    """The original timesteps a respaced diffusion keeps, ascending, for an official spec string.

    ``spec``: ``""`` (all steps), ``"N"`` or ``"N1,N2,..."`` (evenly spaced within equal sections),
    ``"ddimN"`` (integer stride). ``clip``: replace every kept step above ``clip`` by ``clip`` and merge the
    duplicates (MAR_DiSA: :data:`DISA_CLIP` = 950 for DiSA, :data:`DDIM_CLIP` = 980 for DDIM); ``None`` keeps the
    original behaviour (top step 999). ``ddim_shrink_range``: MAR_DiSA's search for ddim counts that no stride fits
    exactly (``False`` raises, as the original MAR does).
    """
    _check_int("num_timesteps", num_timesteps, 1)
    if clip is not None:
        _check_int("clip", clip, 0)
    spec = str(spec).strip()
    if spec == "":
        kept = list(range(num_timesteps))
    elif spec.startswith("ddim"):
        count = _parse_count(spec[4:], spec)
        kept = _ddim_timesteps(count, num_timesteps, ddim_shrink_range)
    else:
        counts = [_parse_count(part, spec) for part in spec.split(",")]
        base, remainder = divmod(num_timesteps, len(counts))
        kept, start = [], 0
        for i, count in enumerate(counts):
            size = base + (1 if i < remainder else 0)
            kept += [start + j for j in _evenly_spaced(size, count)]
            start += size
    if clip is not None:
        kept = [min(t, clip) for t in kept]
    return sorted(set(kept))


def _parse_count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(
            f"invalid timestep respacing {spec!r}: expected '' (all steps), 'N', 'N1,N2,...' or 'ddimN' with "
            f"positive integers"
        ) from None
    if count < 1:
        raise ValueError(f"invalid timestep respacing {spec!r}: step counts must be >= 1")
    return count


# --------------------------------------------------------------------------------------------------------------
# Flow time grids (FlowAR / xAR); t = 1 is noise, t = 0 is data.


def flowar_time_grid(num_steps: int, *, official: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Time points of FlowAR's Euler sampler for a requested step count (``len - 1`` network evaluations).

    ``official=True`` reproduces FlowAR: a uniform grid only when ``num_steps == 50``; otherwise
    ``linspace(1, 0.3, N // 2)`` then ``linspace(0.25, 0, N // 2 + 1)``, so an odd count loses one step and
    ``num_steps == 1`` runs no step at all (the grid is ``[0.25]``; the noise is returned).
    ``official=False`` gives the uniform grid ``linspace(1, 0, N + 1)`` for every N (exactly N evaluations).
    Built with ``torch.linspace`` in float64, as the official code does (numpy differs in the last bit).
    """
    _check_int("num_steps", num_steps, 1)
    if not official or num_steps == 50:
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    half = num_steps // 2
    return torch.cat([torch.linspace(1.0, 0.3, half, dtype=dtype), torch.linspace(0.25, 0.0, half + 1, dtype=dtype)])


def xar_time_grid(num_steps: int, *, t_min: float = 0.04, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Time points of xAR's Euler–Maruyama sampler: ``linspace(1, t_min, N)`` then 0.

    ``N - 1`` stochastic steps down to ``t_min`` and one final deterministic step to 0, i.e. N evaluations.
    ``num_steps`` must be >= 2 (the official code crashes for 1).
    """
    _check_int("num_steps", num_steps, 2)
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}")
    return torch.cat([torch.linspace(1.0, t_min, num_steps, dtype=dtype), torch.zeros(1, dtype=dtype)])

