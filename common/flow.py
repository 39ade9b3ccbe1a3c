"""Flow-matching samplers for FlowAR and xAR, as plain functions (k-diffusion style).

Convention (both models): ``x_t = (1 - t) * x0 + t * eps`` with ``t = 1`` pure noise and ``t = 0`` data; the network
predicts the velocity ``v = eps - x0`` and sampling integrates ``dx/dt = v`` from ``t = 1`` down to ``t = 0``.

Every sampler has the shape ``sample(model_fn, x, grid, *, ..., callback=None) -> x0``:

* ``model_fn(x, t) -> v``: ``x`` is the sampler state cast to ``model_dtype`` (``(R, ...)``); ``t`` is the current
  grid point as a **0-d float64 tensor** on ``x``'s device, exactly the float64 value of the grid. Classifier-free
  guidance lives in ``model_fn`` (see :mod:`disa.guidance`); the samplers never know about it.
* ``grid``: 1-D time points, strictly decreasing within ``[0, 1]``, the last one included (``len(grid) - 1`` steps).
  Build them with :func:`disa.schedules.flowar_time_grid` / :func:`disa.schedules.xar_time_grid`.
* The state is **float64** throughout, as in the official samplers; the returned tensor is float64.

How ``t`` reaches an official network (what a model adapter must do to reproduce the golden data): the official
samplers cast the float64 grid point to float32 (the latents' dtype), one value per row, and the network computes
its time index as ``floor(1000 * t)`` **in float32**. An adapter therefore does ``t.to(torch.float32).expand(R)``
(the golden ``model_t``) and :func:`flow_t_index` on that. Doing the multiplication in float64 changes the index:
the official 50-step grid holds 0.6799999999999999 and 0.5599999999999999, which give 680 and 560 in float32 but
679 and 559 in float64.

Precision of the velocity: the official samplers guide and update in float64, i.e. the float32 network output is
cast to float64 *before* guidance (the golden traces pin this down). The velocity CFG wrappers in
:mod:`disa.guidance` do that cast, and the samplers cast whatever they get to float64; the golden traces then match
exactly (FlowAR) or to ~4e-15 (xAR). Guiding the float32 velocities instead is off by ~1e-7 (FlowAR) and ~7e-7
(xAR), outside the traces' 1e-12 tolerance.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .guidance import ModelFn
from .noise import NoiseSource

__all__ = ["Callback", "flow_t_index", "euler_sample", "heun_sample", "euler_maruyama_sample"]

# callback(info) once per step, after the (first) network evaluation and before the update. ``info`` holds
# "i" (step index), "x" (float64 state the velocity was evaluated at), "t", "t_next" (0-d float64), "v" (model_fn's
# output at (x, t), cast to float64).
Callback = Callable[[dict[str, Any]], None]


def flow_t_index(t: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer time index the official FlowAR/xAR time embeddings get: ``floor(1000 * t)`` computed in ``dtype``.

    ``t`` (any shape, in ``[0, 1]``) is first cast to ``dtype`` and the product is rounded in ``dtype``; the
    official networks receive t in float32, so the default reproduces them (t = 1 gives 1000, one past the training
    range 0..999). xAR's first-evaluation code path promotes its (float32) times to float64 before the product;
    there use ``flow_t_index(t.to(torch.float32), torch.float64)`` (exact for its usual t = 0 and 1; the official
    N = 2 grid gives 39 instead of 40 at t = 0.04).
    Returns int64 with the shape of ``t``.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"flow_t_index computes in a floating dtype, got {dtype}")
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating tensor, got {t.dtype}")
    return torch.floor(t.to(dtype) * 1000).long()


# --------------------------------------------------------------------------------------------------------------
# Validation


def _check_state(x: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (the initial noise), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    if not isinstance(model_dtype, torch.dtype) or not model_dtype.is_floating_point:
        raise TypeError(f"model_dtype must be a floating torch.dtype, got {model_dtype!r}")
    return x.to(torch.float64)


def _check_grid(grid: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """The grid as float64 on ``device`` and as host floats; it must be 1-D, within [0, 1], strictly decreasing.

    The values are read before the grid moves to ``device``: for the usual CPU grid (``disa.schedules``) that is a
    host-only read; a grid already on an accelerator costs one synchronisation per sampler call, never per step.
    """
    if not isinstance(grid, torch.Tensor) or not grid.dtype.is_floating_point:
        raise TypeError(
            "grid must be a 1-D floating tensor of time points (see disa.schedules.flowar_time_grid / xar_time_grid), "
            f"got {type(grid).__name__}" + (f" of dtype {grid.dtype}" if isinstance(grid, torch.Tensor) else "")
        )
    if grid.dim() != 1 or grid.numel() == 0:
        raise ValueError(f"grid must be a non-empty 1-D tensor, got shape {tuple(grid.shape)}")
    values = grid.to(torch.float64).tolist()  # float32 -> float64 is exact
    grid = grid.to(device=device, dtype=torch.float64)
    if not all(0.0 <= t <= 1.0 for t in values):  # also rejects NaN
        raise ValueError(f"grid time points must lie in [0, 1] (t = 1 noise, t = 0 data), got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"grid must be strictly decreasing (sampling runs from t = 1 to t = 0), got {values}")
    return grid, values


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    v = model_fn(x.to(model_dtype), t)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"model_fn must return a velocity shaped like the state {tuple(x.shape)}, got {got}")
    return v


# --------------------------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    grid: torch.Tensor,
    *,
    model_dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Explicit Euler, ``x <- x + (t_next - t) * v(x, t)``: FlowAR's sampler, one evaluation per step.

    x: (R, ...) initial noise at ``grid[0]`` (any float dtype; integrated in float64). A one-point grid runs no step
    and returns the noise (FlowAR's official ``num_steps == 1``). Returns the float64 state at ``grid[-1]``.

    The velocity is cast to float64 before the update: torch's type promotion would otherwise round the product of
    the 0-d float64 step and a float32 velocity to float32.
    """
    x = _check_state(x, model_dtype)  # (R, ...) float64
    grid, _ = _check_grid(grid, x.device)
    dts = grid[1:] - grid[:-1]  # (S,) step sizes, once per call (elementwise: the same values as per step)
    for i in range(grid.numel() - 1):
        t, t_next = grid[i], grid[i + 1]  # 0-d float64
        v = _velocity(model_fn, x, t, model_dtype).to(torch.float64)  # (R, ...)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v})
        x = x + dts[i] * v
    return x


@torch.no_grad()
def heun_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    grid: torch.Tensor,
    *,
    model_dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's second-order method (trapezoidal corrector), the last step plain Euler: ``2 * steps - 1`` evaluations.

    Not used by the official FlowAR (its Heun branch is commented out); an option. As in EDM's sampler, the final
    step is not corrected, which saves an evaluation at the end point and keeps second order. Arguments as
    :func:`euler_sample`; all arithmetic is float64.
    """
    x = _check_state(x, model_dtype)  # (R, ...) float64
    grid, _ = _check_grid(grid, x.device)
    num_steps = grid.numel() - 1
    dts = grid[1:] - grid[:-1]  # (S,)
    for i in range(num_steps):
        t, t_next = grid[i], grid[i + 1]
        v = _velocity(model_fn, x, t, model_dtype).to(torch.float64)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v})
        dt = dts[i]
        x_euler = x + dt * v
        if i == num_steps - 1:
            x = x_euler
        else:
            v_next = _velocity(model_fn, x_euler, t_next, model_dtype).to(torch.float64)
            x = x + dt * (v + v_next) / 2
    return x


@torch.no_grad()
def euler_maruyama_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    grid: torch.Tensor,
    *,
    noise: NoiseSource,
    model_dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
) -> torch.Tensor:
    """xAR's sampler: Euler–Maruyama on the reverse SDE with diffusion ``g(t)^2 = 2t`` (REPA/SiT style).

    With ``score = ((t - 1) v - x) / t`` the reverse drift ``v - g^2/2 * score`` simplifies to ``(2 - t) v + x``
    (no division by t, so it is finite down to t = 0). A step to ``t_next > 0`` is
    ``x + d * dt + sqrt(2 t) * sqrt(|dt|) * xi`` with ``dt = t_next - t < 0`` and ``xi`` a float64 draw of
    ``noise(x.shape)``; the step into ``t_next == 0`` (the last one of :func:`disa.schedules.xar_time_grid`,
    from ``t_min``) is deterministic, ``x + d * dt``, and still uses the full drift. With xAR's grid this is
    ``N - 1`` noise draws and ``N`` evaluations.

    Guidance: xAR guides the float64 *drift*, ``d_u + w (d_c - d_u)``. The drift is affine in ``v`` with the same
    ``x`` in both branches, so guiding the velocity first (:func:`disa.guidance.doubled_velocity_cfg`) is the same
    rule; it matches the official result to float64 rounding (~1e-15) provided the velocities are float64 before
    guidance (see the module docstring; float32 guidance is off by ~5e-7 on the golden trace).
    """
    x = _check_state(x, model_dtype)  # (R, ...) float64
    grid, values = _check_grid(grid, x.device)
    num_steps = grid.numel() - 1
    # The grid is strictly decreasing in [0, 1], so only its last point can be 0.
    num_stochastic = num_steps - 1 if values[-1] == 0.0 else num_steps
    # Per-step coefficients for all steps at once (elementwise, so the same float64 values as step by step).
    dts = grid[1:] - grid[:-1]  # (S,) < 0
    drift_scales = 2 - grid[:-1]  # (S,)
    noise_scales = torch.sqrt(2 * grid[:-1]) * torch.sqrt(dts.abs())  # (S,)
    for i in range(num_steps):
        t, t_next = grid[i], grid[i + 1]
        v = _velocity(model_fn, x, t, model_dtype).to(torch.float64)  # (R, ...)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v})
        drift = drift_scales[i] * v + x
        x = x + drift * dts[i]
        if i < num_stochastic:
            xi = noise(x.shape, dtype=torch.float64, device=x.device)
            if xi.shape != x.shape:
                raise ValueError(f"noise source returned shape {tuple(xi.shape)} for a state of shape {tuple(x.shape)}")
            x = x + noise_scales[i] * xi
    return x
