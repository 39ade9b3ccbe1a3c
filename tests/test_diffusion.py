"""disa.diffusion: golden parity with the official MAR / MAR_DiSA diffusion code, and analytic Gaussian checks.

Golden data: ``tests/fixtures/golden/mar/diffusion/*`` (see ``../shared/golden/mar/README.md``), replayed through
the tiny MAR's diffusion MLP. The official loops draw noise that they multiply by zero (the last ancestral step,
every eta = 0 DDIM step); our samplers do not draw it, so those recorded tensors are skipped on replay.

Analytic checks: for per-dimension Gaussian data N(m, s^2) the optimal eps predictor is known in closed form,
``eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)``, so every sampler must approach the
exact output distribution as its step count grows. Chains start from the exact marginal at their first time,
so the only error left is the sampler's discretisation error.
"""
from __future__ import annotations

import math

import pytest
import torch

from disa.diffusion import (
    DPM_ALGORITHMS,
    GaussianDiffusion,
    VPSchedule,
    cosine_betas,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
)
from disa.guidance import eps_cfg
from disa.noise import ReplayNoise, TorchNoise
from disa.schedules import DISA_CLIP
from mar_disa.models.diffloss import SimpleMLPAdaLN

TABLES = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]
SINGLE = dict(rtol=1e-5, atol=1e-5)  # README tolerances: single forward passes
CHAIN = dict(rtol=1e-4, atol=1e-4)  # whole chains


def _parse_key(key: str) -> tuple[str, int]:
    """'25@clip950' -> ('25', 950); 'full@clip1001' -> ('', 1001)."""
    spec, clip = key.split("@clip")
    return ("" if spec == "full" else spec), int(clip)


@pytest.fixture(scope="module")
def tiny_net(golden) -> SimpleMLPAdaLN:
    """The tiny MAR's diffusion MLP, loaded strictly from the golden state_dict."""
    kwargs = golden("mar/tiny_mar/config.json")["kwargs"]
    state = golden("mar/tiny_mar/state_dict.pt")
    net = SimpleMLPAdaLN(
        in_channels=kwargs["vae_embed_dim"],
        model_channels=kwargs["diffloss_w"],
        out_channels=2 * kwargs["vae_embed_dim"],
        z_channels=kwargs["decoder_embed_dim"],
        num_res_blocks=kwargs["diffloss_d"],
    )
    prefix = "diffloss.net."
    net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return net.eval()


def _head(net: SimpleMLPAdaLN, c: torch.Tensor, cfg_scale: float | None = None):
    fn = lambda x, t: net(x, t, c)  # noqa: E731
    return fn if cfg_scale is None else eps_cfg(fn, cfg_scale, eps_channels=net.in_channels)


# ------------------------------------------------------------------------------------------------------------------
# Golden parity


def test_base_cosine_betas(golden):
    expected = golden("mar/diffusion/respacing.pt")["base_cosine_betas_1000"]
    torch.testing.assert_close(cosine_betas(1000), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "key",
    [f"{s}@clip{c}" for s in ["100", "50", "25", "5", "ddim25", "ddim5", "full"] for c in [950, 980, 1001]],
)
def test_respacing_tables(golden, key):
    expected = golden("mar/diffusion/respacing.pt")[key]
    spec, clip = _parse_key(key)
    diffusion = GaussianDiffusion.from_spec(spec, clip=clip)
    assert diffusion.timestep_map.tolist() == expected["timestep_map"].tolist()
    assert diffusion.num_timesteps == expected["num_timesteps"]
    for name in TABLES:
        torch.testing.assert_close(getattr(diffusion, name), expected[name], rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("key", ["25@clip950", "100@clip1001", "ddim25@clip980"])
def test_p_mean_variance_math(golden, key):
    """The diffusion maths alone, fed the recorded head output: README tolerance (in practice bit-exact)."""
    entry = golden("mar/diffusion/units.pt")["p_mean_variance"][key]
    spec, clip = _parse_key(key)
    diffusion = GaussianDiffusion.from_spec(spec, clip=clip)
    seen = []

    def recorded(x, t):
        seen.append(t)
        return entry["model_output"]

    out = diffusion.p_mean_variance(recorded, entry["x"], entry["t"])
    assert seen[0].dtype == torch.int64 and seen[0].tolist() == entry["mapped_t"].tolist()  # original timesteps
    for name in ["mean", "variance", "log_variance", "pred_xstart"]:
        torch.testing.assert_close(getattr(out, name), entry[name], **SINGLE, msg=name)


@pytest.mark.parametrize("key", ["25@clip950", "100@clip1001", "ddim25@clip980", "25@clip950_cfg2.9"])
def test_p_mean_variance_with_net(golden, tiny_net, key):
    """End to end through the tiny head (and ``eps_cfg`` for the cfg entry), at the README's tolerance.

    Bit-identical head outputs need one CPU thread (see conftest): ``pred_xstart = sqrt(1/abar) x - sqrt(1/abar - 1) eps``
    amplifies matmul round-off up to 2e4x at t = 999 (quirk 9 of the golden README)."""
    entry = golden("mar/diffusion/units.pt")["p_mean_variance"][key]
    spec, clip = _parse_key(key.split("_cfg")[0])
    diffusion = GaussianDiffusion.from_spec(spec, clip=clip)
    with torch.no_grad():
        out = diffusion.p_mean_variance(_head(tiny_net, entry["c"], entry.get("cfg_scale")), entry["x"], entry["t"])
    for name in ["mean", "variance", "log_variance", "pred_xstart"]:
        torch.testing.assert_close(getattr(out, name), entry[name], **SINGLE, msg=name)


@pytest.mark.parametrize("key", ["temp1.0", "temp0.95"])
def test_p_sample_step(golden, tiny_net, key):
    entry = golden("mar/diffusion/units.pt")["p_sample_step"][key]
    diffusion = GaussianDiffusion.from_spec("25", clip=DISA_CLIP)
    with torch.no_grad():
        sample, pred_xstart = diffusion.p_sample(
            _head(tiny_net, entry["c"]), entry["x"], entry["t"], entry["noise"], temperature=entry["temperature"]
        )
    torch.testing.assert_close(sample, entry["sample"], **SINGLE)
    torch.testing.assert_close(pred_xstart, entry["pred_xstart"], **SINGLE)


@pytest.mark.parametrize(
    "key",
    [
        "ddpm_25_clip950_temp1.0",
        "ddpm_25_clip950_temp0.95",
        "ddim_ddim25_clip980",
        "ddpm_25_clip950_cfg2.9",
        "ddim_ddim25_clip980_cfg2.9",
    ],
)
def test_sampling_loops(golden, tiny_net, key):
    entry = golden("mar/diffusion/loops.pt")[key]
    diffusion = GaussianDiffusion.from_spec(entry["spec"], clip=entry["clip"])
    assert diffusion.timestep_map.tolist() == entry["timestep_map"].tolist()
    head = _head(tiny_net, entry["c"], entry["cfg_scale"])
    states: list[torch.Tensor] = []
    record = lambda info: states.append(info["x"])  # noqa: E731
    with torch.no_grad():
        if entry["sampler"] == "ddpm":
            # The official loop's last draw (t = 0) is multiplied by 0; ours does not make it.
            noise = ReplayNoise(entry["step_noise"][:-1])
            out = ddpm_sample(head, entry["initial_x"], diffusion, noise=noise, temperature=entry["temperature"], callback=record)
            assert noise.remaining == 0
        else:
            out = ddim_sample(head, entry["initial_x"], diffusion, callback=record)  # eta 0: no draws at all
    torch.testing.assert_close(torch.stack(states), entry["intermediates"], **CHAIN)
    torch.testing.assert_close(out, entry["final"], **CHAIN)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # diffusers' own deprecations
def test_dpm_solver_matches_diffusers():
    """Our multistep DPM-Solver(++) against diffusers' DPMSolverMultistepScheduler, orders 1-3.

    Discrete steps n = 950, 890, ..., 50 of the 951-step schedule sit at t_n = 0.95 (n + 1) / 951, so they form a
    time-uniform grid of :meth:`VPSchedule.disa`; diffusers is given the same timesteps. Its final step (to 0) is
    not compared, nor is lower-order-final (off on our side; diffusers only lowers the very last step here).
    """
    diffusers = pytest.importorskip("diffusers")
    schedule = VPSchedule.disa()
    betas = GaussianDiffusion.from_spec("", clip=DISA_CLIP).betas
    mean, std = torch.linspace(-1.5, 1.5, 8), torch.linspace(0.3, 1.2, 8)

    def eps(x, abar):
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)

    def ours_fn(x, t):
        _, alpha, _, _ = schedule.alpha_sigma_lambda(t / 1000)
        return eps(x, alpha[:, None] ** 2)

    steps = list(range(950, 49, -60))  # 16 timesteps: diffusers' "< 15" lower-order rules stay off
    x_start = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    for algorithm in DPM_ALGORITHMS:
        for order in (1, 2, 3):
            ref_sched = diffusers.DPMSolverMultistepScheduler(
                num_train_timesteps=951,
                trained_betas=betas.numpy(),
                solver_order=order,
                algorithm_type=algorithm,
                solver_type="midpoint",  # = DPM-Solver's "dpmsolver" second-order variant
                final_sigmas_type="sigma_min",  # diffusers refuses "zero" for "dpmsolver"; the last step is not compared
            )
            ref_sched.set_timesteps(timesteps=steps)
            x, reference = x_start.clone(), []
            for n in ref_sched.timesteps:
                x = ref_sched.step(eps(x, ref_sched.alphas_cumprod[n]), n, x).prev_sample
                reference.append(x)
            states: list[torch.Tensor] = []
            dpm_solver_sample(
                ours_fn,
                x_start.clone(),
                schedule,
                steps=len(steps) - 1,
                order=order,
                algorithm=algorithm,
                t_end=0.95 * (steps[-1] + 1) / 951,
                lower_order_final=False,
                callback=lambda info: states.append(info["x"]),
            )
            for got, want in zip(states, reference[:-1]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=f"{algorithm} order {order}")


# ------------------------------------------------------------------------------------------------------------------
# Analytic Gaussian targets

CHANNELS = 8
MEAN = torch.linspace(-1.5, 1.5, CHANNELS)  # (C,) per-dimension target mean
STD = torch.linspace(0.3, 1.2, CHANNELS)  # (C,) per-dimension target std
BASE_ABAR = torch.cumprod(1 - cosine_betas(), 0).float()  # (1000,)
DPM_SCHEDULE = VPSchedule.disa()


def _eps_star(x: torch.Tensor, abar: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Optimal eps for data N(mean, STD^2) at noise level abar: (R, C)."""
    return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * STD**2 + 1 - abar)


def _discrete_head(means: list[torch.Tensor]):
    """Head for the discrete samplers: exact eps plus v = -1 (learned variance = posterior variance).

    ``means`` holds one target mean per block of rows (one block, or [cond, uncond] for CFG)."""

    def head(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = BASE_ABAR[t][:, None]  # (R, 1): t is the original timestep
        mean = torch.cat([m.expand(x.shape[0] // len(means), -1) for m in means])  # (R, C)
        return torch.cat([_eps_star(x, abar, mean), -torch.ones_like(x)], dim=1)  # (R, 2C)

    return head


def _dpm_head(means: list[torch.Tensor]):
    """eps-only head for DPM-Solver: it sees 1000 t, with t on the continuous schedule."""

    def head(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, alpha, _, _ = DPM_SCHEDULE.alpha_sigma_lambda(t / 1000)
        mean = torch.cat([m.expand(x.shape[0] // len(means), -1) for m in means])
        return _eps_star(x, alpha[:, None] ** 2, mean)

    return head


def _standard_normal(rows: int, seed: int) -> torch.Tensor:
    """(rows, C) noise standardised per column: a deterministic affine sampler then maps it to a sample whose
    mean and std *are* the exact output mean and std (no statistical error)."""
    n = torch.randn(rows, CHANNELS, generator=torch.Generator().manual_seed(seed))
    return (n - n.mean(0)) / n.std(0)


def _marginal(n: torch.Tensor, abar: float | torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Map standard noise to the exact marginal N(sqrt(abar) mean, abar STD^2 + 1 - abar)."""
    abar = torch.as_tensor(abar, dtype=torch.float32)
    return abar.sqrt() * mean + (abar * STD**2 + 1 - abar).sqrt() * n


def _errors(x: torch.Tensor, abar_end: float | torch.Tensor, mean: torch.Tensor) -> tuple[float, float]:
    """Max over dims of |mean error| and |std error| against the exact distribution of the sampler's output."""
    abar_end = torch.as_tensor(abar_end, dtype=torch.float32)
    return (
        (x.mean(0) - abar_end.sqrt() * mean).abs().max().item(),
        (x.std(0) - (abar_end * STD**2 + 1 - abar_end).sqrt()).abs().max().item(),
    )


def _discrete_run(kind: str, steps: int, means: list[torch.Tensor], cfg: float | None, rows: int) -> torch.Tensor:
    diffusion = GaussianDiffusion.from_spec(str(steps), clip=DISA_CLIP)
    target = means[0] if cfg is None else means[1] + cfg * (means[0] - means[1])
    n = _standard_normal(rows, seed=0)
    x = _marginal(n, BASE_ABAR[diffusion.timestep_map[-1]], target)  # (rows, C)
    head = _discrete_head(means)
    if cfg is not None:  # [cond; uncond] rows from the same start, as DiffLoss.sample does
        x, head = torch.cat([x, x]), eps_cfg(head, cfg, eps_channels=CHANNELS)
    if kind == "ddpm":
        out = ddpm_sample(head, x, diffusion, noise=TorchNoise(torch.Generator().manual_seed(steps)))
    else:
        out = ddim_sample(head, x, diffusion)
    return out[:rows]


def _dpm_run(algorithm: str, order: int, steps: int, means: list[torch.Tensor], cfg: float | None, rows: int):
    target = means[0] if cfg is None else means[1] + cfg * (means[0] - means[1])
    _, alpha, _, _ = DPM_SCHEDULE.alpha_sigma_lambda(torch.tensor([0.95, DPM_SCHEDULE.t_min]))
    x = _marginal(_standard_normal(rows, seed=0), alpha[0] ** 2, target)
    head = _dpm_head(means)
    if cfg is not None:
        x, head = torch.cat([x, x]), eps_cfg(head, cfg, eps_channels=CHANNELS)
    out = dpm_solver_sample(head, x, DPM_SCHEDULE, steps=steps, order=order, algorithm=algorithm, t_start=0.95)
    return out[:rows], alpha[1] ** 2


# DDPM with the posterior variance converges like O(1/N); its sample statistics carry ~0.5% noise (16384 rows).
@pytest.mark.parametrize("kind, rows, final_tol", [("ddpm", 16384, 0.035), ("ddim", 2048, 0.01)])
def test_discrete_samplers_converge_to_gaussian(kind, rows, final_tol):
    std_errors = []
    for steps in (10, 50, 200):
        x = _discrete_run(kind, steps, [MEAN], None, rows)
        mean_err, std_err = _errors(x, BASE_ABAR[0], MEAN)
        assert mean_err < 0.03, (kind, steps, mean_err)
        std_errors.append(std_err)
    assert std_errors[0] > std_errors[1] > std_errors[2], std_errors
    assert std_errors[2] < final_tol and std_errors[0] > 5 * std_errors[2], std_errors


# Final std error at 50 steps: ~0.026 (order 1), ~0.002 (order 2), ~0.0015 (order 3).
@pytest.mark.parametrize("algorithm", DPM_ALGORITHMS)
@pytest.mark.parametrize("order, final_tol", [(1, 0.04), (2, 0.005), (3, 0.005)])
def test_dpm_solver_converges_to_gaussian(algorithm, order, final_tol):
    std_errors = []
    for steps in (5, 10, 20, 50):
        x, abar_end = _dpm_run(algorithm, order, steps, [MEAN], None, rows=2048)
        mean_err, std_err = _errors(x, abar_end, MEAN)
        assert mean_err < 1e-4, (steps, mean_err)  # the solvers follow the mean path exactly
        std_errors.append(std_err)
    assert all(a > b for a, b in zip(std_errors, std_errors[1:])), std_errors
    assert std_errors[-1] < final_tol, std_errors


COND_MEAN, UNCOND_MEAN, GUIDANCE = torch.full((CHANNELS,), 0.5), torch.zeros(CHANNELS), 3.0


@pytest.mark.parametrize(
    "sampler, steps, rows, tol",
    [
        ("ddpm", 100, 16384, 0.035),
        ("ddim", 100, 2048, 0.02),
        ("dpmsolver-1", 50, 2048, 0.04),
        ("dpmsolver-2", 50, 2048, 0.005),
        ("dpmsolver-3", 50, 2048, 0.005),
        ("dpmsolver++-1", 50, 2048, 0.04),
        ("dpmsolver++-2", 50, 2048, 0.005),
        ("dpmsolver++-3", 50, 2048, 0.005),
    ],
)
def test_samplers_with_cfg_reach_guided_gaussian(sampler, steps, rows, tol):
    """cond N(0.5, s^2), uncond N(0, s^2), scale 3: the guided eps is exact for N(1.5, s^2) (not 0.5, not 0)."""
    guided_mean = UNCOND_MEAN + GUIDANCE * (COND_MEAN - UNCOND_MEAN)
    means = [COND_MEAN, UNCOND_MEAN]
    if sampler in ("ddpm", "ddim"):
        x, abar_end = _discrete_run(sampler, steps, means, GUIDANCE, rows), BASE_ABAR[0]
    else:
        algorithm, order = sampler.rsplit("-", 1)
        x, abar_end = _dpm_run(algorithm, int(order), steps, means, GUIDANCE, rows)
    mean_err, std_err = _errors(x, abar_end, guided_mean)
    assert mean_err < 0.03 and std_err < tol, (mean_err, std_err)


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """DDIM with eta = 1 injects the posterior variance: with the same noise it equals ancestral DDPM at v = -1."""
    diffusion = GaussianDiffusion.from_spec("20", clip=DISA_CLIP)
    x = _marginal(_standard_normal(256, seed=1), BASE_ABAR[diffusion.timestep_map[-1]], MEAN)
    head = _discrete_head([MEAN])
    a = ddim_sample(head, x, diffusion, eta=1.0, noise=TorchNoise(torch.Generator().manual_seed(5)))
    b = ddpm_sample(head, x, diffusion, noise=TorchNoise(torch.Generator().manual_seed(5)))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_temperature_scales_only_injected_noise():
    diffusion = GaussianDiffusion.from_spec("25", clip=DISA_CLIP)
    head = _discrete_head([MEAN])
    x = _marginal(_standard_normal(4096, seed=2), BASE_ABAR[diffusion.timestep_map[-1]], MEAN)
    run = lambda temp: ddpm_sample(head, x, diffusion, noise=TorchNoise(torch.Generator().manual_seed(3)), temperature=temp)  # noqa: E731
    assert (run(0.5).std(0) < run(1.0).std(0)).all()
    # One step: no noise is injected at all, so the temperature cannot matter.
    single = GaussianDiffusion([0])
    assert torch.equal(ddpm_sample(head, x, single, noise=TorchNoise(), temperature=0.3), ddpm_sample(head, x, single, noise=TorchNoise()))


def test_callbacks_and_draw_counts():
    diffusion = GaussianDiffusion.from_spec("5", clip=DISA_CLIP)
    head = _discrete_head([MEAN])
    x = torch.randn(4, CHANNELS)
    seen: list[dict] = []
    draws: list[tuple] = []

    def counting_noise(shape, *, dtype, device):
        draws.append(tuple(shape))
        return torch.randn(tuple(shape), dtype=dtype, device=device)

    ddpm_sample(head, x, diffusion, noise=counting_noise, callback=seen.append)
    assert [int(s["t"]) for s in seen] == [950, 749, 500, 250, 0]  # original timesteps, descending
    assert draws == [(4, CHANNELS)] * 4  # J - 1 draws: none at the last step
    steps_seen: list[dict] = []
    dpm_solver_sample(_dpm_head([MEAN]), x, DPM_SCHEDULE, steps=4, order=2, callback=steps_seen.append)
    assert [s["i"] for s in steps_seen] == [0, 1, 2, 3]


def test_vp_schedule_matches_discrete_levels():
    """At t_n = 0.95 (n + 1) / 951 the continuous DiSA schedule has the discrete noise level abar_n."""
    schedule = DPM_SCHEDULE
    assert schedule.total_n == 951 and schedule.t_max == 0.95
    n = torch.tensor([0, 100, 500, 950])
    _, alpha, sigma, lam = schedule.alpha_sigma_lambda(0.95 * (n + 1).float() / 951)
    torch.testing.assert_close(alpha**2, BASE_ABAR[n], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    # With the full 1000 cosine betas DPM-Solver's lambda clip (-5.1) drops the last 4 steps.
    assert VPSchedule(cosine_betas()).total_n == 996


# ------------------------------------------------------------------------------------------------------------------
# Bad arguments


def _dummy_head(x, t):
    return torch.zeros(x.shape[0], 2 * x.shape[1])


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_ddpm_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ddpm_sample(_dummy_head, torch.zeros(2, 4), GaussianDiffusion([0, 500]), noise=TorchNoise(), temperature=temperature)


def test_ddim_rejects_bad_eta():
    diffusion = GaussianDiffusion([0, 500])
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_sample(_dummy_head, torch.zeros(2, 4), diffusion, eta=-0.1)
    with pytest.raises(ValueError, match="eta > 0 needs a noise source"):
        ddim_sample(_dummy_head, torch.zeros(2, 4), diffusion, eta=0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=2.5), "steps must be an int >= 1"),
        (dict(steps=5, order=4), "order must be 1, 2 or 3"),
        (dict(steps=2, order=3), "needs steps >= order"),
        (dict(steps=5, algorithm="unipc"), "allowed: dpmsolver, dpmsolver\\+\\+"),
        (dict(steps=5, t_start=0.5, t_end=0.6), "need 0 < t_end < t_start"),
    ],
)
def test_dpm_solver_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpm_solver_sample(lambda x, t: x, torch.zeros(2, 4), DPM_SCHEDULE, **kwargs)


def test_bad_diffusion_arguments():
    with pytest.raises(ValueError, match="subset of \\[0, 999\\]"):
        GaussianDiffusion([0, 1000])
    with pytest.raises(ValueError, match="invalid timestep respacing"):
        GaussianDiffusion.from_spec("abc", clip=None)
    with pytest.raises(ValueError, match="model_fn must return \\(R, 2C\\)"):
        GaussianDiffusion([0, 10]).p_mean_variance(lambda x, t: x, torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a GaussianDiffusion"):
        ddpm_sample(_dummy_head, torch.zeros(2, 4), "100", noise=TorchNoise())
