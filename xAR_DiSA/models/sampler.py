"""xAR's per-cell flow sampler: a thin adapter from the network's cache protocol to :mod:`disa.flow`.

The maths (Euler–Maruyama with ``g² = 2t``, the final deterministic step, the time grid, the guidance) lives in
:func:`disa.flow.euler_maruyama_sample`, :func:`disa.schedules.xar_time_grid` and
:func:`disa.guidance.doubled_velocity_cfg`. This file only decides **how each evaluation reaches the network**,
which is what xAR's KV cache depends on (spec ``flowar_xar.md`` §3.6):

* the first evaluation of a cell re-encodes the previous (clean) cell in front of the current one, the context at
  t = 0, with the block-causal mask, and rewrites every attention cache (``update_cache=True``);
* later evaluations send the current cell only and read the cache without changing it.

Official numerics reproduced here: the network receives the float64 grid point cast to float32, one per row, and
computes ``floor(1000 t)`` in the dtype it receives; on the first-evaluation path the official sampler concatenates
a float64 tensor in front (the context's zeros; empty for cell 0), so those times arrive as float64 (the float32
value promoted). Every evaluation doubles the rows (labels, then the null class), cell 0 included.
"""
from __future__ import annotations

from typing import Callable

import torch

from disa.flow import Callback, euler_maruyama_sample
from disa.guidance import check_cfg, doubled_velocity_cfg
from disa.noise import NoiseSource, TorchNoise
from disa.schedules import xar_time_grid

__all__ = ["SampleInference", "CellVelocity", "first_eval_path", "euler_maruyama_sampler"]

# xAR.sample_inference(x, label, time_input, update_cache, scale_index, mask=None) -> velocity of the current cell.
SampleInference = Callable[..., torch.Tensor]


def first_eval_path(eval_index: int, num_steps: int, official_short_grid: bool) -> bool:
    """Whether evaluation ``eval_index`` of a cell sampled with ``num_steps`` steps takes the first-evaluation path.

    Only the first one does, except in the official code with ``num_steps == 2``: its final (deterministic) step
    tests the loop variable of the stochastic loop, which still says "first step", so the last evaluation goes
    down that path again — float64 time index (39 instead of 40 at t = 0.04), the context re-encoded and appended
    to the cache a second time, no mask. ``official_short_grid=False`` sends it down the ordinary path.
    """
    return eval_index == 0 or (official_short_grid and num_steps == 2 and eval_index == 1)


class CellVelocity:
    """``net(x, t)`` over the doubled rows of one cell, as :func:`disa.guidance.doubled_velocity_cfg` calls it.

    x: (2B, L, C) float32 (conditional rows, then the same rows again for the null class); t: 0-d float64 grid
    point. Returns the network's float32 velocity of the current cell, (2B, L, C). Records the number of tokens of
    every evaluation in ``tokens_per_eval``.
    """

    def __init__(
        self,
        model: SampleInference,
        y: torch.Tensor,
        scale_index: int,
        *,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        num_steps: int,
        null_label: int,
        official_short_grid: bool = True,
    ) -> None:
        if (context is None) != (scale_index == 0):
            raise ValueError(
                f"cell {scale_index}: the previous cell's sample (condition) is required for cells >= 1 and not "
                f"allowed for cell 0, got {'none' if context is None else 'one'}"
            )
        self.model = model
        self.y = torch.cat([y, torch.full_like(y, null_label)])  # (2B,) labels then the null class
        self.scale_index = scale_index
        self.context = None if context is None else torch.cat([context, context]).to(torch.float32)  # (2B, L, C)
        self.mask = mask
        self.num_steps = num_steps
        self.official_short_grid = official_short_grid
        self.tokens_per_eval: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        t_rows = t.to(x.dtype).expand(rows)  # (2B,) float32, one time per row
        eval_index = len(self.tokens_per_eval)
        if first_eval_path(eval_index, self.num_steps, self.official_short_grid):
            if self.context is not None:
                x = torch.cat([self.context, x], dim=1)  # (2B, 2L, C): clean previous cell, then current cell
            # The context's t = 0 rows come first (one condition per cell); float64 as in the official sampler.
            context_t = torch.zeros(rows if self.scale_index else 0, dtype=torch.float64, device=x.device)
            time_input = torch.cat([context_t, t_rows.to(torch.float64)])  # (2B,) or (4B,) float64
            # The official final step of a 2-step grid passes no mask (see first_eval_path).
            mask = self.mask if eval_index == 0 else None
            out = self.model(x, self.y, time_input, True, self.scale_index, mask)
        else:
            out = self.model(x, self.y, t_rows, False, self.scale_index)
        self.tokens_per_eval.append(x.shape[1])
        return out  # (2B, L, C)


def euler_maruyama_sampler(
    model: SampleInference,
    latents: torch.Tensor,
    y: torch.Tensor,
    scale_index: int,
    condition: torch.Tensor | None = None,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    noise: NoiseSource | None = None,
    null_label: int = 1000,
    official_short_grid: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample one cell (the official ``models/sampler.py::euler_maruyama_sampler`` call, maths from :mod:`disa`).

    ``model``: the network's ``sample_inference``; ``latents`` (B, L, C) initial noise; ``y`` (B,) labels;
    ``condition`` (B, L, C) the previous cell's sample (cells >= 1); ``mask`` the block-causal mask for the first
    evaluation (cells ``0..scale_index``). ``noise`` supplies the float64 per-step draws (default: the global RNG on
    the latents' device, as the official ``randn_like``). Returns the float64 sample (B, L, C).

    Guidance: every evaluation is doubled; the drift is guided only when ``cfg_scale > 1`` (the official test),
    otherwise the conditional half is used. The official ``guidance_low/high`` (never changed by xAR) and ``heun``
    (unused) arguments are not offered.
    """
    check_cfg(cfg_scale)
    net = CellVelocity(
        model, y, scale_index, context=condition, mask=mask, num_steps=num_steps, null_label=null_label,
        official_short_grid=official_short_grid,
    )
    # cfg_scale <= 1: the official sampler takes the conditional drift; scale 1 is that rule here.
    guided = doubled_velocity_cfg(net, cfg_scale if cfg_scale > 1.0 else 1.0)
    return euler_maruyama_sample(
        guided, latents, xar_time_grid(num_steps), noise=TorchNoise() if noise is None else noise, callback=callback
    )
