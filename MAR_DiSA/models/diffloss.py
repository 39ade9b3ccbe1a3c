"""MAR's per-token diffusion head: the AdaLN MLP denoiser and the DiffLoss wrapper (MAR_DiSA behaviour).

Module and parameter names match the official checkpoints (``diffloss.net.*``, spec ``mar.md`` §1.2, §2.1), so
``state_dict`` slices load strictly. The diffusion maths and the samplers live in :mod:`disa.diffusion`; this file
only decides which sampler MAR_DiSA's ``--diff_sampler`` means and how many steps AR step k gets.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from disa.diffusion import GaussianDiffusion, VPSchedule, ddim_sample, ddpm_sample, dpm_solver_sample, Callback
from disa.guidance import eps_cfg
from disa.layers import TimestepEmbedder, modulate
from disa.noise import NoiseSource, TorchNoise
from disa.schedules import DDIM_CLIP, DISA_CLIP, NO_CLIP, STRATEGIES, annealed_steps

__all__ = ["SAMPLERS", "TimestepEmbedder", "ResBlock", "FinalLayer", "SimpleMLPAdaLN", "DiffLoss"]

SAMPLERS = ("default", "DiSA", "DDIM", "DPM_Solver", "DPM_Solver++")


class ResBlock(nn.Module):
    """``x + gate * MLP(modulate(LN(x), shift, scale))`` with (shift, scale, gate) from SiLU(y)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # (R, W) each
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Non-affine LN, AdaLN modulation (shift, scale), then Linear to the output channels."""

    def __init__(self, model_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The diffusion MLP: ``(x (R, C), t (R,), c (R, Z)) -> [eps, v] (R, 2C)``.

    ``y = time_embed(t) + cond_embed(c)`` conditions every residual block and the final layer through AdaLN.
    ``t`` is the original 0..999 timestep (int) or a float time (DiSA's DPM-Solver path passes ``1000 t``).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        z_channels: int,
        num_res_blocks: int,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier Linears with zero bias; N(0, 0.02) time MLP; zeroed AdaLN heads and output layer (MAR's init)."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero-init modulation and output: every block starts as the identity and the head outputs 0.
        for layer in [b.adaLN_modulation[-1] for b in self.res_blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, *, c_embedded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (R, C) noisy tokens, t (R,) timesteps, c (R, Z) conditions -> (R, 2C). ``c_embedded``: ``cond_embed(c)``
        (R, W) when precomputed (the sampler computes it once per token instead of once per diffusion step)."""
        h = self.input_proj(x)  # (R, W)
        y = self.time_embed(t) + (self.cond_embed(c) if c_embedded is None else c_embedded)  # (R, W)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)  # (R, 2C)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """Guided output for ``2N`` rows ``[cond; uncond]``: only ``x[:N]`` is used (fed to both halves), only the
        eps channels are guided (``uncond + s (cond - uncond)``, written to both halves); each half keeps its own
        variance channels."""
        guided = eps_cfg(lambda xx, tt: self.forward(xx, tt, c), cfg_scale, eps_channels=self.in_channels)
        return guided(x, t)


def _is_guided(cfg: float | torch.Tensor) -> bool:
    # MAR passes the per-AR-step scale as a (1,) float32 tensor; "no guidance" is exactly 1.0 (official test).
    return bool(torch.as_tensor(cfg) != 1.0)


class DiffLoss(nn.Module):
    """Diffusion loss and sampler of MAR's per-token head, with MAR_DiSA's step annealing.

    ``diff_sampler`` (MAR_DiSA ``--diff_sampler``), reproduced by default including the official quirks:

    * ``"default"``: ancestral DDPM with ``diff_upper_steps`` evenly spaced steps, top timestep 999 kept (no
      clip), whatever the AR step (the original MAR with ``num_sampling_steps = upper``);
    * ``"DiSA"``: ancestral DDPM with ``annealed_steps(step, ar_num_iter, upper, lower, strategy)`` steps, the
      respaced timesteps clipped at 950 (MAR_DiSA's hidden ``create_diffusion`` default: 50 steps run 48, and
      every AR step starts at t = 950);
    * ``"DDIM"``: deterministic DDIM (eta 0) on ``ddimN`` respacing clipped at 980; ignores ``temperature``;
    * ``"DPM_Solver"`` / ``"DPM_Solver++"``: first-order multistep DPM-Solver(++) (= DDIM in both cases) over
      N annealed steps from t = 0.95 on :meth:`VPSchedule.disa`. Faithfully to MAR_DiSA these ignore the
      temperature and **the CFG scale**: every row is integrated with its own condition, so under CFG the first
      half is plain conditional sampling. ``dpm_cfg=True`` makes them honour CFG through
      :func:`disa.guidance.eps_cfg` (default off for parity with the official numbers).

    The sampling clips are explicit options with the official values as defaults: ``disa_clip`` (950) for the
    DiSA sampler and ``ddim_clip`` (980) for DDIM; ``None`` keeps the top timestep of the respacing (999 for the
    ancestral sampler). Training (:meth:`forward`) uses the cosine diffusion with ``train_clip`` (default 950:
    MAR_DiSA's training diffusion has 951 timesteps, t in [0, 950]; ``train_clip=None`` gives the original MAR's
    1000). The DPM-Solver schedule always uses the 951 clip-950 betas, which its ``t_max = 0.95`` assumes.
    """

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        diff_upper_steps: int = 25,
        diff_lower_steps: int = 5,
        diff_annealing_strategy: str = "linear",
        diff_sampler: str = "default",
        grad_checkpointing: bool = False,
        *,
        train_clip: int | None = DISA_CLIP,
        disa_clip: int | None = DISA_CLIP,
        ddim_clip: int | None = DDIM_CLIP,
        dpm_cfg: bool = False,
    ) -> None:
        super().__init__()
        if diff_sampler not in SAMPLERS:
            raise ValueError(f"unknown diff_sampler {diff_sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if diff_annealing_strategy not in STRATEGIES:
            raise ValueError(
                f"unknown diff_annealing_strategy {diff_annealing_strategy!r}; allowed: {', '.join(STRATEGIES)}"
            )
        if not 1 <= diff_lower_steps <= diff_upper_steps:
            raise ValueError(
                "need 1 <= diff_lower_steps <= diff_upper_steps, "
                f"got lower={diff_lower_steps}, upper={diff_upper_steps}"
            )
        for name, clip in (("train_clip", train_clip), ("disa_clip", disa_clip), ("ddim_clip", ddim_clip)):
            if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int) or clip < 1):
                raise ValueError(f"{name} must be a timestep >= 1 or None (no clip), got {clip!r}")
        self.in_channels = target_channels
        self.upper_steps = diff_upper_steps
        self.lower_steps = diff_lower_steps
        self.strategy = diff_annealing_strategy
        self.sampler = diff_sampler
        self.disa_clip = disa_clip
        self.ddim_clip = ddim_clip
        self.dpm_cfg = dpm_cfg
        self.cache_condition = True  # speed only (see sample); False = the reference path, for comparisons
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=target_channels * 2,  # eps and the learned-range variance value
            z_channels=z_channels,
            num_res_blocks=depth,
            grad_checkpointing=grad_checkpointing,
        )
        # Schedule tables are host-side float64 constants (built on the CPU even under `with torch.device("meta")`).
        self.train_diffusion = GaussianDiffusion.from_spec("", clip=train_clip)
        # Sampling schedules, built on first use and kept: {(kind, steps): GaussianDiffusion}.
        self._diffusions: dict[tuple[str, int], GaussianDiffusion] = {}
        self._dpm_schedule: VPSchedule | None = None

    # ---- training --------------------------------------------------------------------------------------------

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over rows (over ``mask == 1`` rows if given): eps MSE + VLB (variance), random t per row.

        ``target`` (R, C) clean tokens, ``z`` (R, Z) conditions, ``mask`` (R,) float.
        """
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)  # (R,)
        noise = torch.randn_like(target)
        losses = self.train_diffusion.training_losses(lambda x, tt: self.net(x, tt, z), target, t, noise)
        loss = losses["loss"]  # (R,)
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    # ---- sampling --------------------------------------------------------------------------------------------

    def steps_for(self, step: int, ar_num_iter: int) -> int:
        """Nominal diffusion steps at AR step ``step`` of ``ar_num_iter`` (``upper`` for the default sampler)."""
        if self.sampler == "default":
            return self.upper_steps
        return annealed_steps(step, ar_num_iter, self.upper_steps, self.lower_steps, self.strategy)

    def diffusion_for(self, steps: int) -> GaussianDiffusion:
        """The cached respaced diffusion this sampler runs with ``steps`` nominal steps (not for DPM samplers)."""
        if self.sampler in ("default", "DiSA"):
            # Why two clips: MAR_DiSA's "default" passes clip_timesteps=1001 (no clip), "DiSA" gets the 950 default.
            key, spec, clip = ("ddpm", steps), str(steps), (NO_CLIP if self.sampler == "default" else self.disa_clip)
        elif self.sampler == "DDIM":
            key, spec, clip = ("ddim", steps), f"ddim{steps}", self.ddim_clip
        else:
            raise ValueError(f"{self.sampler} does not use a respaced GaussianDiffusion")
        if key not in self._diffusions:
            self._diffusions[key] = GaussianDiffusion.from_spec(spec, clip=clip)
        return self._diffusions[key]

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        cfg: float | torch.Tensor = 1.0,
        step: int = 0,
        ar_num_iter: int = 1,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        *,
        guided: bool | None = None,
    ) -> torch.Tensor:
        """Sample one token per row of ``z`` (R, Z); under CFG (``cfg != 1``) rows are ``[cond; uncond]``.

        Returns (R, C). The starting noise is drawn for R rows, or for R/2 rows and stacked twice under CFG (both
        halves start from the same point); per-step noise is drawn for all R rows. ``noise`` defaults to the
        global torch RNG. ``guided``: whether ``cfg != 1``, when the caller knows it without reading a device
        tensor (:func:`disa.guidance.mar_cfg_is_guided`); ``None`` reads ``cfg`` (a host sync for a device tensor).
        The head's condition embedding ``cond_embed(z)`` is computed once here and reused by every diffusion step
        (bit-identical; :attr:`cache_condition` ``= False`` recomputes it per step, the reference path).
        """
        noise = TorchNoise() if noise is None else noise
        rows, channels = z.shape[0], self.in_channels
        guided = _is_guided(cfg) if guided is None else guided
        if guided:
            if rows % 2:
                raise ValueError(f"CFG sampling needs an even number of rows [cond; uncond], got {rows}")
            half = noise((rows // 2, channels), dtype=torch.float32, device=z.device)  # (R/2, C)
            x = torch.cat([half, half])  # (R, C)
        else:
            x = noise((rows, channels), dtype=torch.float32, device=z.device)  # (R, C)

        c_embedded = self.net.cond_embed(z) if self.cache_condition else None  # (R, W): z is fixed for all steps

        def net_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x, t, z, c_embedded=c_embedded)  # (R, 2C)

        model_fn = eps_cfg(net_fn, cfg, eps_channels=channels) if guided else net_fn
        steps = self.steps_for(step, ar_num_iter)

        if self.sampler in ("default", "DiSA"):
            return ddpm_sample(
                model_fn, x, self.diffusion_for(steps), noise=noise, temperature=temperature, callback=callback
            )
        if self.sampler == "DDIM":
            return ddim_sample(model_fn, x, self.diffusion_for(steps), callback=callback)

        # DPM-Solver(++): MAR_DiSA calls the plain net on all rows (CFG scale unused) unless dpm_cfg is set.
        dpm_fn = model_fn if self.dpm_cfg else net_fn
        if self._dpm_schedule is None:
            self._dpm_schedule = VPSchedule.disa()
        return dpm_solver_sample(
            lambda x, t: dpm_fn(x, t)[:, :channels],  # eps only: (R, C)
            x,
            self._dpm_schedule,
            steps=steps,
            order=1,
            algorithm="dpmsolver++" if self.sampler == "DPM_Solver++" else "dpmsolver",
            t_start=0.95,
            callback=callback,
        )
