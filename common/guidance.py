"""Classifier-free guidance, applied once in a model wrapper so that every sampler works with it.

Samplers only ever see ``model_fn(x, t) -> output`` for the rows of their state. The wrappers here turn a
network that evaluates conditional and unconditional rows into such a function, the way each official model
does it:

* :func:`eps_cfg` — MAR / Harmon diffusion heads: only the noise-prediction channels are guided; the learned
  variance channels keep each branch's own value.
* :func:`interval_velocity_cfg` — FlowAR: the state holds both halves; inside the guidance interval the
  conditional half is evaluated twice (cond / uncond) and the guided velocity is written to both halves,
  outside it both halves are integrated independently.
* :func:`doubled_velocity_cfg` — xAR: the state holds the conditional rows only; every evaluation doubles them.

And the guidance-scale schedules across AR steps: :func:`mar_cfg_scale` (Muse linear / constant) and
:func:`ramp_cfg_scale` (FlowAR / xAR linear ramp over scales or cells).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = [
    "ModelFn",
    "CFG_SCHEDULES",
    "check_cfg",
    "eps_cfg",
    "interval_velocity_cfg",
    "doubled_velocity_cfg",
    "mar_cfg_scale",
    "mar_cfg_is_guided",
    "ramp_cfg_scale",
]

# model_fn(x, t): x (R, ...) sampler state rows; t the current time (see each sampler); returns (R, ...) output.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CFG_SCHEDULES = ("linear", "constant")


def check_cfg(cfg: float) -> float:
    """Guidance scales must be finite and >= 0 (1 = no guidance, 0 = unconditional)."""
    cfg = float(cfg)
    if not (cfg >= 0.0 and cfg != float("inf")):
        raise ValueError(f"cfg scale must be a finite number >= 0 (1.0 = no guidance), got {cfg}")
    return cfg


def _guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    # Written as uncond + s * (cond - uncond), the official evaluation order (bit-identical results).
    return uncond + scale * (cond - uncond)


def eps_cfg(net: ModelFn, cfg_scale: float | torch.Tensor, *, eps_channels: int) -> ModelFn:
    """Guided diffusion-head function over ``2N`` rows ``[cond; uncond]`` (MAR ``forward_with_cfg``).

    ``net(x, t)`` evaluates all ``2N`` rows with their own conditions (cond rows first). The wrapper feeds the
    conditional half of ``x`` twice, guides the first ``eps_channels`` output channels and writes the guided
    eps to both halves; the remaining (variance) channels are not guided, each half keeps its own.
    """
    if isinstance(cfg_scale, (int, float)):
        check_cfg(cfg_scale)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = x[: x.shape[0] // 2]  # (N, C)
        out = net(torch.cat([half, half]), t)  # (2N, C_out)
        eps, rest = out[:, :eps_channels], out[:, eps_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = _guide(cond_eps, uncond_eps, cfg_scale)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    return guided


def interval_velocity_cfg(
    net: ModelFn, cfg_scale: float, *, interval: tuple[float, float] = (0.0, 1.0), branch_on_host: bool = False
) -> ModelFn:
    """FlowAR's guidance over a ``2B``-row state ``[cond; uncond]``, active for ``low <= t <= high``.

    Inside the interval (and when ``cfg_scale > 1``) the conditional half is evaluated twice and the guided
    velocity goes to both halves. Outside, ``net`` sees the whole state and the unconditional half follows its
    own trajectory (FlowAR's behaviour: that half is discarded at the end or overwritten once guidance starts).
    ``t`` is the float64 grid point (0-d tensor); the interval test uses it in float64, as the official code does.
    Returns float64 velocities.

    The interval test runs on ``t``'s device and selects with ``torch.where`` (one network call either way, whose
    input rows are exactly those of the branching rule), so the sampling loop never waits for the device.
    ``branch_on_host=True`` is the reference form: it reads ``t`` back (``float(t)``, one host sync per step) and
    branches in Python; the results are identical.
    """
    check_cfg(cfg_scale)
    low, high = interval
    if not 0.0 <= low <= high:
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high, got ({low}, {high})")

    def halves(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"interval CFG needs an even number of rows [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        return torch.cat([half, half])  # the conditional half, fed against both conditions

    def guide_doubled(out: torch.Tensor) -> torch.Tensor:
        # FlowAR guides in float64 (the sampler's state dtype), after casting the network's float32 output.
        cond_v, uncond_v = out.double().chunk(2)
        v = _guide(cond_v, uncond_v, cfg_scale)
        return torch.cat([v, v])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not cfg_scale > 1.0:
            return net(x, t).double()
        if branch_on_host:
            if not low <= float(t) <= high:
                return net(x, t).double()
            return guide_doubled(net(halves(x), t))
        active = (t >= low) & (t <= high)  # 0-d bool on t's device, float64 comparison
        out = net(torch.where(active, halves(x), x), t)  # (2B, ...)
        return torch.where(active, guide_doubled(out), out.double())

    return guided


def doubled_velocity_cfg(net: ModelFn, cfg_scale: float) -> ModelFn:
    """xAR's guidance: the ``B``-row state is doubled at every evaluation (even when ``cfg_scale == 1``).

    ``net(x2, t)`` evaluates ``[x; x]`` against ``[labels; null]`` and returns ``(2B, ...)``; the guided velocity
    is float64 (guiding the velocity equals xAR's guiding of the drift ``(2 - t) v + x``, as both halves share x).
    """
    check_cfg(cfg_scale)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # xAR guides in float64 (its sampler's state dtype), after casting the network's float32 output.
        cond_v, uncond_v = net(torch.cat([x, x]), t).double().chunk(2)
        return _guide(cond_v, uncond_v, cfg_scale)

    return guided


def mar_cfg_scale(cfg: float, schedule: str, mask_len_after: torch.Tensor, seq_len: int) -> torch.Tensor:
    """MAR / Harmon guidance scale for one AR step (Muse schedule), a ``(1,)`` float32 tensor.

    ``linear``: ``1 + (cfg - 1) * (seq_len - m) / seq_len`` with ``m`` the number of tokens still masked after the
    step (a float32 tensor; MAR clamps it to >= 1 at the last step, so the full ``cfg`` is never reached).
    ``constant``: ``cfg``.
    """
    check_cfg(cfg)
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len_after) / seq_len
    if schedule == "constant":
        return torch.full((1,), cfg, dtype=torch.float32, device=mask_len_after.device)
    raise ValueError(f"unknown cfg schedule {schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")


def mar_cfg_is_guided(cfg: float, schedule: str, masked_after: int, seq_len: int) -> bool:
    """Whether :func:`mar_cfg_scale` differs from 1 at this step, decided on the host (no device read).

    The official head tests ``cfg_iter == 1.0`` on the device tensor, a host synchronisation per AR step. The same
    float32 arithmetic is done here in numpy. On CUDA torch divides by the scalar ``seq_len`` through its reciprocal,
    so the device value may differ from this one by one ulp: the decisions can differ only when ``cfg`` lies within
    about ``1e-7 * seq_len`` of 1, where guiding or not changes nothing measurable.
    """
    check_cfg(cfg)
    one, f32 = np.float32(1.0), np.float32
    if schedule == "linear":
        value = one + f32(cfg - 1) * (f32(seq_len) - f32(masked_after)) / f32(seq_len)
    elif schedule == "constant":
        value = f32(cfg)
    else:
        raise ValueError(f"unknown cfg schedule {schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
    return bool(value != one)


def ramp_cfg_scale(cfg: float, index: int, num: int) -> float:
    """FlowAR / xAR ramp over scales or cells: ``1 + (cfg - 1) * index / (num - 1)`` (1 at the first, cfg at the last)."""
    check_cfg(cfg)
    if num < 1 or not 0 <= index < num:
        raise ValueError(f"index must be in [0, {num - 1}], got {index}")
    if num == 1:
        return cfg
    return 1 + (cfg - 1) * index / (num - 1)
