"""Gaussian diffusion for the per-token heads of MAR and Harmon, and the samplers that run it.

The heads predict ``[eps (C), v (C)]`` for a noisy token: eps-prediction with the *learned-range* variance of
improved DDPM (Nichol & Dhariwal 2021, eq. 15), on the iDDPM cosine schedule over 1000 steps. This module holds

* :func:`cosine_betas` and :class:`GaussianDiffusion`: the (respaced) discrete diffusion, its float64 tables,
  ``p_mean_variance`` / ``p_sample`` and the training loss (eps MSE + VLB with the mean detached);
* samplers as plain functions, k-diffusion style — ``sampler(model_fn, x, schedule, *, ...) -> x0``:
  :func:`ddpm_sample` (ancestral, with temperature), :func:`ddim_sample` (Song et al. 2021) and
  :func:`dpm_solver_sample` (multistep DPM-Solver, Lu et al. 2022, and DPM-Solver++, Lu et al. 2022b, orders 1-3)
  on :class:`VPSchedule`, the continuous-time view of the discrete schedule.

``model_fn(x, t)`` maps the ``(R, C)`` state rows to ``(R, 2C)`` head outputs (``(R, C)`` eps for DPM-Solver).
For the discrete samplers ``t`` is the **original** int64 timestep of each row (``timestep_map[j]``, never rescaled:
the heads were trained on 0..999); for DPM-Solver it is the float time ``time_scale * t`` (MAR_DiSA passes
``1000 * t``). Classifier-free guidance belongs in ``model_fn`` (:func:`disa.guidance.eps_cfg`), so every sampler
works with it.

Numerics follow the official code (MAR / MAR_DiSA ``diffusion/``): tables are computed in float64, gathered and cast
to float32 before use. Here they are cast once and cached per device, so a sampling loop does no host
synchronisation and no numpy. Samplers draw noise only where it is used: the official loops also draw a tensor
at the last ancestral step and at every eta = 0 DDIM step and multiply it by zero; those draws are skipped here,
so replaying recorded official noise means dropping them (see ``tests/test_diffusion.py``).

Written from the project's specification (``specs/mar.md`` §2-3) and the papers; no upstream code is copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .noise import NoiseSource
from .schedules import respaced_timesteps

__all__ = [
    "ModelFn",
    "Callback",
    "cosine_betas",
    "GaussianDiffusion",
    "MeanVariance",
    "DiffusionTables",
    "VPSchedule",
    "DPM_ALGORITHMS",
    "ddpm_sample",
    "ddim_sample",
    "dpm_solver_sample",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(dict(i=iteration, t=model time of the step, x=state after the step, denoised=x0 estimate))
Callback = Callable[[dict[str, Any]], None]

DPM_ALGORITHMS = ("dpmsolver", "dpmsolver++")


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """iDDPM cosine schedule: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)`` in float64, ``(T,)``.

    ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``; evaluated with Python floats, as the official code does.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")  # host constants, whatever the default device


class MeanVariance(NamedTuple):
    """Reverse-step distribution p(x_{t-1} | x_t) of the head, all ``(R, C)`` float32."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


@dataclass(frozen=True)
class DiffusionTables:
    """float32 copies of the schedule tables on one device (``(J,)`` each; ``timestep_map`` int64)."""

    timestep_map: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor


def _per_row(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[t]`` shaped ``(R, 1, ..., 1)`` to broadcast against an ``ndim``-dimensional ``(R, ...)`` state."""
    return table[t].view(-1, *([1] * (ndim - 1)))


def _coef(table: torch.Tensor, t: torch.Tensor | int, ndim: int) -> torch.Tensor:
    """``table`` at respaced index ``t``: per row for a ``(R,)`` tensor, or one shared 0-d view for an int.

    The samplers run every row at the same index, so they pass an int: a 0-d view of the cached table is free (no
    gather kernel, no host sync) and broadcasts to the same float32 values, hence bit-identical results.
    """
    return table[t] if isinstance(t, int) else _per_row(table, t, ndim)


def _reverse_gaussian(tab: DiffusionTables, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor | int) -> MeanVariance:
    """The reverse-step Gaussian from head output ``out`` (R, 2C) ``[eps, v]`` at respaced index ``t`` (see
    :meth:`GaussianDiffusion.p_mean_variance`; ``t`` as in :func:`_coef`)."""
    n, channels = x.dim(), x.shape[1]
    if out.shape[0] != x.shape[0] or out.shape[1] != 2 * channels:
        raise ValueError(
            f"model_fn must return (R, 2C) = ({x.shape[0]}, {2 * channels}) [eps, v]; got {tuple(out.shape)}"
        )
    eps, v = out[:, :channels], out[:, channels:]  # (R, C) each
    frac = (v + 1) / 2
    max_log = _coef(tab.log_betas, t, n)
    min_log = _coef(tab.posterior_log_variance_clipped, t, n)
    log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = _coef(tab.sqrt_recip_alphas_cumprod, t, n) * x - _coef(tab.sqrt_recipm1_alphas_cumprod, t, n) * eps
    mean = _coef(tab.posterior_mean_coef1, t, n) * pred_xstart + _coef(tab.posterior_mean_coef2, t, n) * x
    return MeanVariance(mean, torch.exp(log_variance), log_variance, pred_xstart)


class GaussianDiffusion:
    """A discrete Gaussian diffusion that keeps a subset of the base schedule's timesteps ("respacing").

    Keeping original timesteps ``tau_0 < ... < tau_{J-1}`` gives the J-step chain with
    ``beta'_j = 1 - abar[tau_j] / abar[tau_{j-1}]`` (``abar[tau_{-1}] = 1``), so ``abar'_j = abar[tau_j]``; the
    model still sees ``tau_j`` (``timestep_map[j]``). Indices ``t`` passed to the methods are respaced
    (``0..J-1``). The float64 tables are public attributes (``betas``, ``alphas_cumprod``, ``..._prev``,
    ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1/2``); :meth:`tables` gives float32 copies per device.

    Args:
        timesteps: kept original timesteps (any order, duplicates merged); ``None`` keeps all of them.
        base_betas: the unrespaced float64 betas; default :func:`cosine_betas` over 1000 steps.
    """

    def __init__(self, timesteps: Sequence[int] | None = None, *, base_betas: torch.Tensor | None = None) -> None:
        base = cosine_betas() if base_betas is None else base_betas.detach().to("cpu", torch.float64)
        if base.dim() != 1 or base.numel() == 0:
            raise ValueError(f"base_betas must be a non-empty 1-D tensor, got shape {tuple(base.shape)}")
        kept = list(range(base.numel())) if timesteps is None else sorted({int(s) for s in timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= base.numel():
            raise ValueError(f"timesteps must be a non-empty subset of [0, {base.numel() - 1}], got {timesteps!r}")
        base_abar = torch.cumprod(1.0 - base, dim=0)
        kept_abar = base_abar[kept]  # (J,)
        prev_abar = torch.cat([kept_abar.new_ones(1), kept_abar[:-1]])
        betas = 1.0 - kept_abar / prev_abar  # (J,) respaced betas

        self.base_betas = base
        self.timestep_map = torch.tensor(kept, dtype=torch.int64, device="cpu")
        self.num_timesteps = len(kept)
        self.betas = betas
        alphas = 1.0 - betas
        # Rebuilt from the respaced betas (not taken from base_abar), as the official SpacedDiffusion does.
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # The posterior variance is 0 at j = 0; its log is clipped by reusing entry 1. A single-step chain has no
        # entry 1: fall back to log(beta_0) there (only reported; the last step never adds noise).
        if self.num_timesteps > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = betas.clone()
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus
        self._device_tables: dict[torch.device, DiffusionTables] = {}

    @classmethod
    def from_spec(cls, spec: str | int, *, clip: int | None, num_timesteps: int = 1000) -> "GaussianDiffusion":
        """The official ``create_diffusion(spec, noise_schedule="cosine", clip_timesteps=clip)`` diffusion.

        ``spec``: ``""`` (all steps), ``"N"``, ``"N1,N2,..."`` or ``"ddimN"``. ``clip`` must be explicit:
        :data:`disa.schedules.DISA_CLIP` (950) for MAR_DiSA's DiSA sampler and training diffusion,
        :data:`disa.schedules.DDIM_CLIP` (980) for its DDIM sampler, ``None`` for the original MAR.
        """
        kept = respaced_timesteps(spec, clip=clip, num_timesteps=num_timesteps)
        return cls(kept, base_betas=cosine_betas(num_timesteps))

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, top_timestep={int(self.timestep_map[-1])})"

    def tables(self, device: torch.device | str) -> DiffusionTables:
        """float32 tables on ``device`` (cast from float64 once, then cached)."""
        device = torch.device(device)
        if device not in self._device_tables:
            f32 = lambda a: a.to(device=device, dtype=torch.float32)  # noqa: E731
            self._device_tables[device] = DiffusionTables(
                timestep_map=self.timestep_map.to(device),
                alphas_cumprod=f32(self.alphas_cumprod),
                alphas_cumprod_prev=f32(self.alphas_cumprod_prev),
                sqrt_alphas_cumprod=f32(self.sqrt_alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=f32(self.sqrt_one_minus_alphas_cumprod),
                sqrt_recip_alphas_cumprod=f32(self.sqrt_recip_alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=f32(self.sqrt_recipm1_alphas_cumprod),
                log_betas=f32(torch.log(self.betas)),
                posterior_variance=f32(self.posterior_variance),
                posterior_log_variance_clipped=f32(self.posterior_log_variance_clipped),
                posterior_mean_coef1=f32(self.posterior_mean_coef1),
                posterior_mean_coef2=f32(self.posterior_mean_coef2),
            )
        return self._device_tables[device]

    # ---- forward process -------------------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`` for respaced indices ``t`` ``(R,)``."""
        tab, n = self.tables(x_start.device), x_start.dim()
        return _per_row(tab.sqrt_alphas_cumprod, t, n) * x_start + _per_row(tab.sqrt_one_minus_alphas_cumprod, t, n) * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        tab, n = self.tables(x_t.device), x_t.dim()
        mean = _per_row(tab.posterior_mean_coef1, t, n) * x_start + _per_row(tab.posterior_mean_coef2, t, n) * x_t
        return mean, _per_row(tab.posterior_log_variance_clipped, t, n).expand_as(x_t)

    # ---- reverse process -------------------------------------------------------------------------------------

    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor) -> MeanVariance:
        """Reverse-step Gaussian from the head output ``[eps, v]`` at respaced indices ``t`` ``(R,)`` int64.

        ``log var = frac * log(beta_t) + (1 - frac) * log(posterior var, clipped)`` with ``frac = (v + 1) / 2``
        (learned range); ``x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps`` (no clamp: latents are unbounded);
        ``mean = coef1 * x0 + coef2 * x``.
        """
        tab = self.tables(x.device)
        return _reverse_gaussian(tab, model_fn(x, tab.timestep_map[t]), x, t)

    def p_sample(
        self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step for rows at respaced indices ``t``; returns ``(sample, pred_xstart)``.

        ``sample = mean + [t != 0] * exp(log var / 2) * noise * temperature``: the temperature scales the standard
        deviation of the injected noise only (MAR's convention). Rows at ``t == 0`` get the mean.
        """
        _check_temperature(temperature)
        out = self.p_mean_variance(model_fn, x, t)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise * temperature, out.pred_xstart

    # ---- training --------------------------------------------------------------------------------------------

    def training_losses(
        self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row losses ``(R,)``: ``mse`` on eps, ``vb`` (bits per dim) and ``loss = mse + vb``.

        The VLB term trains only the variance channels: it sees the eps prediction detached (improved DDPM's
        L_hybrid without the lambda weighting, as MAR uses it). At ``t == 0`` the VLB is the discretised Gaussian
        decoder NLL, elsewhere KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
        """
        channels = x_start.shape[1]
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.tables(x_start.device).timestep_map[t])  # (R, 2C)
        eps = out[:, :channels]
        frozen = torch.cat([eps.detach(), out[:, channels:]], dim=1)
        reverse = self.p_mean_variance(lambda *_: frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, reverse.mean, reverse.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, reverse.mean, 0.5 * reverse.log_variance)
        vb = torch.where(t == 0, _mean_flat(nll) / math.log(2.0), kl)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi used by the DDPM/iDDPM decoder likelihood.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of ``x`` under a Gaussian discretised into 256 bins on [-1, 1] (DDPM decoder)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ------------------------------------------------------------------------------------------------------------------
# Discrete samplers


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0 (1.0 = unchanged), got {temperature!r}")


def _check_state(x: torch.Tensor, diffusion: GaussianDiffusion) -> None:
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be (R, C, ...) state rows, got shape {tuple(x.shape)}")


def ddpm_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    diffusion: GaussianDiffusion,
    *,
    noise: NoiseSource,
    temperature: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling (MAR's ``p_sample_loop``) from ``x`` (R, C) at the top kept timestep down to 0.

    Each of the J steps evaluates ``model_fn`` once and, except the last, adds
    ``exp(log var / 2) * temperature * n`` with ``n = noise(x.shape)``. The temperature scales only these
    injected noises, not the starting noise (MAR's behaviour). ``J - 1`` draws in total: the official loop draws a
    J-th tensor at the last step and multiplies it by 0; this function does not draw it.
    """
    _check_state(x, diffusion)
    _check_temperature(temperature)
    tab = diffusion.tables(x.device)
    for i, j in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        t_model = tab.timestep_map[j].expand(x.shape[0])  # (R,) original timestep, a view: no kernel, no sync
        out = _reverse_gaussian(tab, model_fn(x, t_model), x, j)
        if j > 0:
            step_noise = noise(x.shape, dtype=x.dtype, device=x.device)  # (R, C)
            x = out.mean + torch.exp(0.5 * out.log_variance) * step_noise * temperature
        else:
            x = out.mean
        if callback is not None:
            callback({"i": i, "t": tab.timestep_map[j], "x": x, "denoised": out.pred_xstart})
    return x


def ddim_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    diffusion: GaussianDiffusion,
    *,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from ``x`` (R, C) at the top kept timestep down to 0.

    ``x_prev = x0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + sigma n`` with eps re-derived from x0 and
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)``. With ``eta = 0`` (MAR_DiSA's
    setting) it is deterministic and the learned variance is unused; noise is drawn only when ``eta > 0`` (and
    not at the last step), unlike the official loop, which draws one tensor per step and multiplies it by 0.
    There is no temperature (the official DDIM path has none).
    """
    _check_state(x, diffusion)
    if not (isinstance(eta, (int, float)) and 0.0 <= eta < math.inf):
        raise ValueError(f"eta must be a finite number >= 0 (0 = deterministic DDIM), got {eta!r}")
    if eta > 0 and noise is None:
        raise ValueError("ddim_sample with eta > 0 needs a noise source (noise=...)")
    tab, n = diffusion.tables(x.device), x.dim()
    for i, j in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        out = _reverse_gaussian(tab, model_fn(x, tab.timestep_map[j].expand(x.shape[0])), x, j)
        x0 = out.pred_xstart
        eps = (_coef(tab.sqrt_recip_alphas_cumprod, j, n) * x - x0) / _coef(tab.sqrt_recipm1_alphas_cumprod, j, n)
        abar, abar_prev = _coef(tab.alphas_cumprod, j, n), _coef(tab.alphas_cumprod_prev, j, n)
        if eta > 0 and j > 0:
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
            x = x + sigma * noise(x.shape, dtype=x.dtype, device=x.device)
        else:
            # sigma = 0: eta = 0, or the last step (abar_prev = 1 makes sigma vanish).
            x = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev) * eps
        if callback is not None:
            callback({"i": i, "t": tab.timestep_map[j], "x": x, "denoised": x0})
    return x


# ------------------------------------------------------------------------------------------------------------------
# Continuous-time VP schedule and DPM-Solver


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp`` over ascending ``xp`` at ``x``, extrapolating the end segments."""
    right = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[right - 1], xp[right], fp[right - 1], fp[right]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class VPSchedule:
    """Continuous-time VP schedule from discrete betas (DPM-Solver's "discrete" noise schedule).

    ``log alpha_n = 0.5 * sum_{i<=n} log(1 - beta_i)`` is placed at ``t_n = t_max (n + 1) / N`` and interpolated
    linearly in t; ``sigma_t = sqrt(1 - alpha_t^2)``, ``lambda_t = log(alpha_t / sigma_t)``. Trailing steps with
    ``lambda < lambda_min`` are dropped first (DPM-Solver's guard against the ill-conditioned end of the cosine
    schedule; it does not bind for MAR_DiSA's 951 steps). Interpolation runs in float32, as in DPM-Solver.

    MAR_DiSA (:meth:`disa`) uses the 951 betas of its clip-950 training diffusion with ``t_max = 0.95`` (upstream
    DPM-Solver uses 1.0), so that ``t_n = 0.95 (n + 1) / 951``: the noise level at t = 0.95 is that of step 950.
    """

    def __init__(self, betas: torch.Tensor, *, t_max: float = 1.0, lambda_min: float | None = -5.1) -> None:
        betas = betas.detach().to("cpu", torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not t_max > 0:
            raise ValueError(f"t_max must be > 0, got {t_max}")
        log_alpha = 0.5 * torch.cumsum(torch.log(1.0 - betas), dim=0)  # (N,) float64
        if lambda_min is not None:
            lambdas = log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
            log_alpha = log_alpha[: max(2, int((lambdas >= lambda_min).sum()))]
        self.total_n = log_alpha.numel()
        self.t_max = float(t_max)
        self._log_alpha = log_alpha.to(torch.float32)  # (N,)
        self._t = torch.linspace(0.0, self.t_max, self.total_n + 1, dtype=torch.float32, device="cpu")[1:]  # (N,)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {self._t.device: (self._t, self._log_alpha)}
        self._grids: dict[tuple[int, float, float, torch.device], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def disa(cls) -> "VPSchedule":
        """MAR_DiSA's DPM-Solver schedule: its 951-step (clip 950) training betas, ``t_max = 0.95``."""
        return cls(GaussianDiffusion.from_spec("", clip=950).betas, t_max=0.95)

    @property
    def t_min(self) -> float:
        """Default end time ``1 / N`` (DPM-Solver's default ``t_end`` for discrete schedules)."""
        return 1.0 / self.total_n

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``log alpha_t`` for float times ``t`` (any shape)."""
        if t.device not in self._cache:
            self._cache[t.device] = (self._t.to(t.device), self._log_alpha.to(t.device))
        grid, values = self._cache[t.device]
        return _interp(t.reshape(-1), grid, values).reshape(t.shape)

    def uniform_grid(
        self, steps: int, t_start: float, t_end: float, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, log alpha, alpha, sigma, lambda)`` on ``linspace(t_start, t_end, steps + 1)`` (float32, on
        ``device``), computed once per setting and cached: MAR asks for the same few grids at every AR step."""
        key = (steps, float(t_start), float(t_end), torch.device(device))
        if key not in self._grids:
            grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float32, device=device)  # (S+1,)
            self._grids[key] = (grid, *self.alpha_sigma_lambda(grid))
        return self._grids[key]

    def alpha_sigma_lambda(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log alpha_t, alpha_t, sigma_t, lambda_t)``."""
        log_alpha = self.log_alpha(t)
        one_minus = 1.0 - torch.exp(2.0 * log_alpha)
        return log_alpha, torch.exp(log_alpha), torch.sqrt(one_minus), log_alpha - 0.5 * torch.log(one_minus)


def dpm_solver_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: VPSchedule,
    *,
    steps: int,
    order: int = 1,
    algorithm: str = "dpmsolver++",
    t_start: float | None = None,
    t_end: float | None = None,
    lower_order_final: bool = True,
    time_scale: float = 1000.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multistep DPM-Solver / DPM-Solver++ (orders 1-3) on a uniform time grid; ``steps`` model evaluations.

    ``model_fn(x, time_scale * t)`` returns eps ``(R, C)``; ``t`` is a float32 ``(R,)`` tensor. With
    ``time_scale = 1000`` this is MAR_DiSA's convention: on its schedule the head then sees ``1000 t ~= n + 1``
    for discrete step n (one step off; reproduced, not corrected). Wrap ``model_fn`` to map times differently.

    The grid is ``linspace(t_start, t_end, steps + 1)`` ("time_uniform"; defaults ``schedule.t_max`` and
    ``schedule.t_min``). ``"dpmsolver"`` integrates with the noise prediction, ``"dpmsolver++"`` with the data
    prediction ``x0 = (x - sigma eps) / alpha``. Multistep warm-up uses lower orders for the first steps;
    ``lower_order_final`` also lowers them for the last steps (step i of S uses order ``min(order, i, S + 1 - i)``).
    Upstream DPM-Solver does the latter only when ``steps < 10``; here it applies at every step count, because
    on a time-uniform grid the last step spans a large lambda interval (1.8 -> 5.0 for 10 steps on
    :meth:`VPSchedule.disa`) and a high order there made DPM-Solver++ up to 10x less accurate on Gaussian data
    (and non-monotone in the step count; see ``tests/test_diffusion.py``). Order 1 (MAR_DiSA's setting) is
    unaffected and is DDIM in both algorithms. Deterministic: no noise, no temperature. The last grid point
    needs no model call, so a run makes exactly ``steps`` evaluations.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if steps < order:
        raise ValueError(f"multistep DPM-Solver needs steps >= order, got steps={steps}, order={order}")
    if algorithm not in DPM_ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; allowed: {', '.join(DPM_ALGORITHMS)}")
    if not isinstance(schedule, VPSchedule):
        raise TypeError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
    t_start = schedule.t_max if t_start is None else float(t_start)
    t_end = schedule.t_min if t_end is None else float(t_end)
    if not 0.0 < t_end < t_start:
        raise ValueError(f"need 0 < t_end < t_start, got t_start={t_start}, t_end={t_end}")

    rows, data_pred = x.shape[0], algorithm == "dpmsolver++"
    grid, log_alpha, alpha, sigma, lam = schedule.uniform_grid(steps, t_start, t_end, x.device)  # (S+1,) each

    def evaluate(x: torch.Tensor, i: int) -> torch.Tensor:
        eps = model_fn(x, grid[i].expand(rows) * time_scale)  # (R, C)
        return (x - sigma[i] * eps) / alpha[i] if data_pred else eps

    history = [evaluate(x, 0)]  # model outputs at the last `order` grid points, oldest first
    for i in range(1, steps + 1):
        k = min(order, i, steps + 1 - i) if lower_order_final else min(order, i)
        if callback is not None:  # the x0 estimate at grid point i - 1, which this update starts from
            denoised = history[-1] if data_pred else (x - sigma[i - 1] * history[-1]) / alpha[i - 1]
        x = _dpm_update(x, history[-k:], lam[i - k : i + 1], log_alpha, alpha, sigma, i, data_pred)
        if i < steps:
            history = (history + [evaluate(x, i)])[-order:]
        if callback is not None:
            callback({"i": i - 1, "t": grid[i], "x": x, "denoised": denoised})
    return x


def _dpm_update(
    x: torch.Tensor,
    outputs: list[torch.Tensor],
    lams: torch.Tensor,
    log_alpha: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    i: int,
    data_pred: bool,
) -> torch.Tensor:
    """One multistep update from grid point ``i - 1`` to ``i`` of order ``len(outputs)``.

    ``outputs`` hold the model outputs (eps or x0) at the previous ``k`` grid points, ``lams`` the ``k + 1``
    half-log-SNRs ending at ``i``. Both algorithms share one form: with ``hs = h`` (noise prediction) or ``-h``
    (data prediction), ``phi1 = expm1(hs)``, ``phi2 = phi1 / hs - 1``, ``phi3 = phi2 / hs - 1/2``,
    ``x_t = scale x - coef (phi1 m0 + phi2 D1 + phi3 D2)`` where ``scale``, ``coef`` are ``alpha_t/alpha_s``,
    ``sigma_t`` (noise) or ``sigma_t/sigma_s``, ``alpha_t`` (data); order 2 uses ``phi1 / 2`` in place of phi2
    (the "dpmsolver" variant of Lu et al.), D1 and D2 are divided differences in lambda.
    """
    k, s = len(outputs), i - 1
    h = lams[-1] - lams[-2]
    if data_pred:
        scale, coef, hs = sigma[i] / sigma[s], alpha[i], -h
    else:
        scale, coef, hs = torch.exp(log_alpha[i] - log_alpha[s]), sigma[i], h
    phi1 = torch.expm1(hs)
    m0 = outputs[-1]
    if k == 1:
        return scale * x - (coef * phi1) * m0
    r0 = (lams[-2] - lams[-3]) / h
    d1_0 = (m0 - outputs[-2]) / r0
    if k == 2:
        return scale * x - (coef * phi1) * m0 - 0.5 * (coef * phi1) * d1_0
    r1 = (lams[-3] - lams[-4]) / h
    d1_1 = (outputs[-2] - outputs[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / hs - 1.0
    phi3 = phi2 / hs - 0.5
    return scale * x - (coef * phi1) * m0 - (coef * phi2) * d1 - (coef * phi3) * d2
