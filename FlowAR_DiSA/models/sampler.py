"""FlowAR's per-scale ODE solve (upstream ``models/sampler.py::euler_sampler``), as a thin adapter onto :mod:`disa`.

No sampling maths lives here: the time grid is :func:`disa.schedules.flowar_time_grid`, the guidance rule
:func:`disa.guidance.interval_velocity_cfg`, the integrators :func:`disa.flow.euler_sample` /
:func:`disa.flow.heun_sample`. This file only wires the official call signature onto them and adapts the flow
network: the official sampler hands the network the float64 grid point cast to float32, one value per row, and the
network derives its time index from that float32 value (see :mod:`disa.flow`).
"""
from __future__ import annotations

from typing import Callable

import torch

from disa.flow import Callback, euler_sample, heun_sample
from disa.guidance import ModelFn, interval_velocity_cfg
from disa.schedules import flowar_time_grid

__all__ = ["FlowNet", "velocity_fn", "euler_sampler", "num_evaluations"]

# net(x (R, ...) float32, t (R,) float32, y (R, ...) condition) -> velocity (R, ...)
FlowNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def velocity_fn(net: FlowNet, y: torch.Tensor, *, cache_condition: bool = True) -> ModelFn:
    """``(x, t) -> net(x, t as float32 per row, y)``: the official sampler's view of a conditioned flow network.

    ``cache_condition``: when ``net`` has ``prepare_condition`` (:class:`~.flowmodel.SimpleTransformerAdaLN`), what
    depends on ``y`` alone is computed here once and reused at every step (bit-identical); ``False`` recomputes it
    at every evaluation (the official behaviour, kept as the reference for comparisons).
    """
    prepare = getattr(net, "prepare_condition", None) if cache_condition else None
    kwargs = {} if prepare is None else {"condition": prepare(y)}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t.to(torch.float32).expand(x.shape[0]), y, **kwargs)  # t: 0-d float64 -> (R,) float32

    return fn


def euler_sampler(
    model: FlowNet,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    *,
    official_grid: bool = True,
    callback: Callback | None = None,
    cache_condition: bool = True,
    sync_free_guidance: bool = True,
) -> torch.Tensor:
    """Integrate ``latents`` (R, N, C) from t = 1 to 0 with ``model(x, t, y)``; returns the float64 sample.

    Under CFG the R rows are ``[cond; uncond]`` and ``y`` holds both halves' conditions; guidance with
    ``cfg_scale`` applies to grid points ``guidance_low <= t <= guidance_high`` (FlowAR: the conditional half is
    evaluated against both conditions there; elsewhere the halves run independently).

    ``num_steps`` is FlowAR's requested count: ``official_grid=True`` (default) keeps the official grid (uniform only
    for 50; otherwise coarse on [1, 0.3], fine on [0.25, 0], so odd counts lose a step and 1 returns the noise);
    ``official_grid=False`` gives ``num_steps`` uniform Euler steps.
    ``heun``: the official sampler accepts this flag and ignores it (its correction is commented out); here
    ``heun=True`` runs Heun's method (:func:`disa.flow.heun_sample`, ``2 * steps - 1`` evaluations) — an option,
    not the official behaviour.
    ``cache_condition`` (see :func:`velocity_fn`) and ``sync_free_guidance`` (the guidance-interval test on the
    device, :func:`disa.guidance.interval_velocity_cfg`) change the speed only; ``False`` gives the reference paths.
    """
    grid = flowar_time_grid(num_steps, official=official_grid)
    model_fn = interval_velocity_cfg(
        velocity_fn(model, y, cache_condition=cache_condition), cfg_scale, interval=(guidance_low, guidance_high),
        branch_on_host=not sync_free_guidance,
    )
    integrate = heun_sample if heun else euler_sample
    return integrate(model_fn, latents, grid, callback=callback)


def num_evaluations(num_steps: int, *, heun: bool = False, official_grid: bool = True) -> int:
    """Flow-network calls :func:`euler_sampler` makes for ``num_steps`` (each call runs all R rows)."""
    steps = len(flowar_time_grid(num_steps, official=official_grid)) - 1
    return 2 * steps - 1 if heun and steps > 0 else steps
