"""Flow samplers (disa.flow): golden parity with the official FlowAR/xAR samplers, DiSA step counts, analytic
convergence on Gaussian targets, and argument validation."""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from disa.flow import euler_maruyama_sample, euler_sample, flow_t_index, heun_sample
from disa.guidance import doubled_velocity_cfg, interval_velocity_cfg, ramp_cfg_scale
from disa.noise import ReplayNoise, TorchNoise
from disa.schedules import annealed_steps, flowar_time_grid, xar_time_grid

TRACE_ATOL = 1e-12  # golden README: sampler arithmetic given recorded velocities, float64


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


class ScriptedNet:
    """Evaluation e returns ``outputs[e]`` (as float64, as the official samplers cast it before guidance) whatever its
    input; records each input and the per-row float32 time an official network adapter would pass on."""

    def __init__(self, outputs: torch.Tensor | list[torch.Tensor]) -> None:
        self.outputs = list(outputs)
        self.x: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dim() == 0 and t.dtype == torch.float64
        self.x.append(x.clone())
        self.t.append(t.to(torch.float32).expand(x.shape[0]))  # the adapter's view of t: one float32 per row
        return self.outputs[len(self.x) - 1]  # float32, as a real network returns


class CountingNoise:
    """Standard-normal draws (seeded) that counts how often it is asked."""

    def __init__(self) -> None:
        self.draws = 0
        self.source = TorchNoise(torch.Generator().manual_seed(0))

    def __call__(self, shape, *, dtype, device):
        self.draws += 1
        return self.source(shape, dtype=dtype, device=device)


def zero_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


# --------------------------------------------------------------------------------------------------------------
# (a) time grids


def test_flowar_grids_match_official(golden):
    data = golden("flowar/sampler_grids.json")
    assert len(data["grids"]) > 0
    for entry in data["grids"]:
        n = entry["num_steps"]
        grid = flowar_time_grid(n)
        assert grid.dtype == torch.float64
        assert grid.tolist() == entry["grid"], f"N={n}"  # exact float64 equality
        # Through the sampler: evaluations made and the index an official net derives from the t it is given.
        seen: list[int] = []

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(int(flow_t_index(t.to(torch.float32).expand(x.shape[0]))[0]))
            return torch.zeros_like(x)

        euler_sample(net, torch.randn(2, 1, 16), grid)
        assert len(seen) == entry["num_evals"] == len(grid) - 1, f"N={n}"
        assert seen == entry["t_index_fp32"], f"N={n}"
        assert flow_t_index(grid[:-1]).tolist() == entry["t_index_fp32"]
    counts = {str(n): len(flowar_time_grid(n)) - 1 for n in range(1, 101)}
    assert counts == data["num_evals_by_num_steps"]


def test_flowar_single_step_returns_noise():
    # Official quirk: N = 1 gives the grid [0.25]; no evaluation, the noise comes back (as float64).
    noise = torch.randn(2, 4, 16)
    out = euler_sample(lambda x, t: pytest.fail("no evaluation expected"), noise, flowar_time_grid(1))
    assert out.dtype == torch.float64 and torch.equal(out, noise.double())


def test_xar_grids_match_official(golden):
    data = golden("xar/sampler_grids.json")
    checked = 0
    for entry in data["grids"]:
        n = entry["num_steps"]
        if entry.get("error"):
            # The official code crashes with UnboundLocalError for N = 1; ours refuses with a clear message.
            with pytest.raises(ValueError, match="num_steps must be >= 2"):
                xar_time_grid(n)
            continue
        grid = xar_time_grid(n)
        assert grid.tolist() == entry["grid"], f"N={n}"
        evals: list[torch.Tensor] = []
        noise = CountingNoise()
        euler_maruyama_sample(lambda x, t: evals.append(t) or torch.zeros_like(x), torch.randn(1, 64, 16), grid,
                              noise=noise)
        assert len(evals) == entry["num_evals"] == n
        assert noise.draws == entry["stochastic_steps"] == n - 1
        expected = flow_t_index(torch.stack(evals)).tolist()  # float32 path
        if n == 2:
            # Model-path quirk, not the sampler's: the official final step of N = 2 goes through the "first
            # evaluation" branch, which promotes the float32 t to float64 before x1000 (float32(0.04) =
            # 0.0399999991 -> 39, not 40). The xAR model adapter owns that branch; this pins down its result.
            expected[-1] = int(flow_t_index(evals[-1].to(torch.float32), torch.float64))
        assert expected == entry["t_index_as_seen"], f"N={n}"
        checked += 1
    assert checked >= 5
    counts = {str(n): (0 if n == 1 else len(xar_time_grid(n)) - 1) for n in range(1, 101)}
    assert counts == data["num_evals_by_num_steps"]


def test_flow_t_index_float32_quirk():
    # Points of the official 50-step grid where the float64 product would floor one lower.
    t = torch.tensor([0.6799999999999999, 0.5599999999999999], dtype=torch.float64)
    assert t.tolist() == [flowar_time_grid(50)[16].item(), flowar_time_grid(50)[22].item()]
    assert flow_t_index(t).tolist() == [680, 560]
    assert flow_t_index(t, torch.float64).tolist() == [679, 559]
    # xAR's first-evaluation path: float32 t promoted to float64 before x1000.
    assert flow_t_index(torch.tensor(0.04).to(torch.float32), torch.float64).item() == 39
    assert flow_t_index(torch.tensor(1.0, dtype=torch.float64)).item() == 1000
    assert flow_t_index(torch.zeros(3)).tolist() == [0, 0, 0]
    assert flow_t_index(torch.tensor([0.5, 0.9995])).dtype == torch.int64


# --------------------------------------------------------------------------------------------------------------
# (b) FlowAR trace: Euler + interval CFG with scripted velocities


def test_flowar_sampler_trace(golden):
    cases = golden("flowar/sampler_trace.pt")["cases"]
    assert len(cases) >= 4
    worst = 0.0
    for c in cases:
        net = ScriptedNet(c["model_out"])
        model_fn = interval_velocity_cfg(net, c["cfg_scale"], interval=(c["guidance_low"], c["guidance_high"]))
        out = euler_sample(model_fn, c["latents"], flowar_time_grid(c["num_steps"]))
        rows = c["latents"].shape[0]
        assert len(net.x) == len(c["model_out"])
        for e, x in enumerate(net.x):
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, c["model_x"][e], rtol=1.2e-7, atol=0.0)
            assert torch.equal(net.t[e], c["model_t"][e])
        # Guided evaluations are those where the network got the conditional half twice (the initial halves differ).
        guided = [rows % 2 == 0 and torch.equal(x[: rows // 2], x[rows // 2:]) for x in net.x]
        assert guided == c["guided"]
        assert out.dtype == torch.float64
        worst = max(worst, max_abs(out, c["out"]))
    assert worst <= TRACE_ATOL, worst


# --------------------------------------------------------------------------------------------------------------
# (c) xAR trace: Euler–Maruyama + always-doubled CFG with scripted velocities and replayed noise


def test_xar_sampler_trace(golden):
    cases = golden("xar/sampler_trace.pt")["cases"]
    assert len(cases) >= 3
    worst = 0.0
    for c in cases:
        net = ScriptedNet(c["model_out"])
        states: list[torch.Tensor] = []
        noise = ReplayNoise(c["noise"])
        out = euler_maruyama_sample(doubled_velocity_cfg(net, c["cfg_scale"]), c["latents"],
                                    xar_time_grid(c["num_steps"]), noise=noise,
                                    callback=lambda info: states.append(info["x"]))
        assert noise.remaining == 0
        assert len(net.x) == c["num_steps"]
        tokens = c["latents"].shape[1]
        for e, x in enumerate(net.x):
            # The first evaluation of a cell with context is [context, current cell] (128 tokens): that
            # concatenation, the cache/mask protocol and model_y belong to the xAR model; the sampler owns the
            # current-cell part, the last `tokens` tokens.
            torch.testing.assert_close(x, c["model_x"][e][:, -tokens:], rtol=1.2e-7, atol=0.0)
            golden_t = c["model_t"][e]
            if e == 0:  # first-evaluation path: float64 per-cell times, the current cell's at the end
                assert torch.equal(golden_t[-x.shape[0]:], torch.full((x.shape[0],), 1.0, dtype=torch.float64))
            else:
                assert torch.equal(net.t[e], golden_t)
        worst = max(worst, max_abs(torch.stack(states), c["states"]), max_abs(out, c["out"]))
    assert worst <= TRACE_ATOL, worst


def test_xar_single_step(golden):
    s = golden("xar/sampler_trace.pt")["single_step"]
    grid = torch.tensor([s["t_cur"], s["t_next"], 0.0], dtype=torch.float64)
    x_next: list[torch.Tensor] = []
    net = ScriptedNet([s["v"], torch.zeros_like(s["v"])])
    euler_maruyama_sample(doubled_velocity_cfg(net, s["cfg_scale"]), s["x_cur"], grid,
                          noise=ReplayNoise([s["noise"]]), callback=lambda info: x_next.append(info["x"]))
    assert max_abs(x_next[1], s["x_next"]) <= TRACE_ATOL


# --------------------------------------------------------------------------------------------------------------
# (d) DiSA step counts


def test_flowar_disa_sweep(golden):
    sweep = golden("flowar/disa_schedules.json")["sweep"]
    num = sweep["num_scales"]
    assert num == 5 and len(sweep["entries"]) == 5050
    for key, expected in sweep["entries"].items():
        upper, lower = map(int, key.split(","))
        assert [annealed_steps(k, num, upper, lower, "linear") for k in range(num)] == expected, key
    assert sweep["mismatches_vs_exact_rational_formula"] == []


def test_flowar_disa_settings(golden):
    for setting in golden("flowar/disa_schedules.json")["settings"]:
        num = setting["num_scales"]
        total, token_evals = 0, 0
        for k, step in enumerate(setting["per_ar_step"]):
            n = annealed_steps(k, num, setting["flow_upper_steps"], setting["flow_lower_steps"], "linear")
            assert n == step["num_steps_arg"], (setting["name"], k)
            w = ramp_cfg_scale(setting["cfg"], k, num)
            assert w == step["cfg_scale"]
            inputs: list[torch.Tensor] = []
            model_fn = interval_velocity_cfg(lambda x, t: inputs.append(x) or torch.zeros_like(x), w,
                                             interval=(0.0, setting["guidance"]))
            # B = 1 with distinct halves; a guided call sees the conditional half twice.
            euler_sample(model_fn, torch.tensor([[1.0], [2.0]]), flowar_time_grid(n))
            assert len(inputs) == step["flow_evals"], (setting["name"], k)
            assert sum(torch.equal(x[0], x[1]) for x in inputs) == step["guided_evals"], (setting["name"], k)
            total += len(inputs)
            token_evals += step["tokens"] * len(inputs)
        assert total == setting["total_flow_evals"]
        assert token_evals == setting["total_flow_token_evals_per_row"]


def test_xar_disa_sweep(golden):
    sweep = golden("xar/disa_schedules.json")["sweep"]
    num = sweep["num_cells"]
    assert num == 4 and len(sweep["entries"]) == 5050
    for key, expected in sweep["entries"].items():
        upper, lower = map(int, key.split(","))
        assert [annealed_steps(s, num, upper, lower, "linear") for s in range(num)] == expected, key
    assert sweep["mismatches_vs_exact_rational_formula"] == []


def test_xar_disa_settings(golden):
    for setting in golden("xar/disa_schedules.json")["settings"]:
        num = len(setting["per_ar_step"])
        total, token_evals = 0, 0
        for s, step in enumerate(setting["per_ar_step"]):
            n = annealed_steps(s, num, setting["flow_upper_steps"], setting["flow_lower_steps"], "linear")
            assert n == step["num_steps_arg"], (setting["name"], s)
            assert ramp_cfg_scale(setting["cfg"], s, num) == step["cfg_scale"]
            calls, noise = [], CountingNoise()
            model_fn = doubled_velocity_cfg(lambda x, t: calls.append(t) or torch.zeros_like(x), step["cfg_scale"])
            euler_maruyama_sample(model_fn, torch.zeros(1, 1), xar_time_grid(n), noise=noise)
            assert len(calls) == step["network_evals"] and noise.draws == step["stochastic_steps"]
            total += len(calls)
            token_evals += step["tokens_first_eval"] + step["tokens_later_evals"] * (len(calls) - 1)
        assert total == setting["total_network_evals"]
        assert token_evals == setting["total_token_evals_per_row"]


# --------------------------------------------------------------------------------------------------------------
# (e) analytic: Gaussian targets, where the velocity field is known in closed form

MEAN = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(m, s^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps (per dimension).

    x_t ~ N((1 - t) m, sigma_t^2) with sigma_t^2 = (1 - t)^2 s^2 + t^2; Cov(eps, x_t) = t and
    Cov(x0, x_t) = (1 - t) s^2, so E[v | x_t] = (t - (1 - t) s^2) (x_t - (1 - t) m) / sigma_t^2 - m.
    """
    var = (1 - t) ** 2 * s**2 + t**2
    return (t - (1 - t) * s**2) * (x - (1 - t) * m) / var - m


def standard_noise(n: int, dims: int = 3, seed: int = 0) -> torch.Tensor:
    """(n, dims) samples with exactly zero mean and unit (population) std per dimension, so that mean/std errors
    of a deterministic (affine) sampler are discretisation errors only."""
    z = torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0, unbiased=False)


def moment_error(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> float:
    return max((x.mean(0) - m).abs().max().item(), (x.std(0, unbiased=False) - s).abs().max().item())


def gaussian_net(m: torch.Tensor, s: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, t: gaussian_velocity(x, t, m, s)


@pytest.mark.parametrize("sampler, order", [(euler_sample, 1), (heun_sample, 2)])
def test_ode_samplers_converge_to_gaussian(sampler, order):
    z = standard_noise(4096)
    errors, path_errors = [], []
    for n in (4, 8, 16, 32, 64, 128):
        out = sampler(gaussian_net(MEAN, STD), z, flowar_time_grid(n, official=False), model_dtype=torch.float64)
        errors.append(moment_error(out, MEAN, STD))
        # The exact probability-flow map of this path is the monotone affine transport x1 -> m + s x1.
        path_errors.append(max_abs(out, MEAN + STD * z))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert all(b < a for a, b in zip(path_errors, path_errors[1:])), path_errors
    # Global order: halving the step divides the error by ~2 (Euler) or ~4 (Heun, last step Euler).
    assert path_errors[-2] / path_errors[-1] > 0.8 * 2**order, path_errors
    assert errors[-1] < (2e-2 if order == 1 else 1e-4), errors


def test_euler_maruyama_converges_to_gaussian():
    n_samples = 40_000
    errors = []
    for n in (2, 8, 64):
        z = torch.randn(n_samples, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out = euler_maruyama_sample(gaussian_net(MEAN, STD), z, flowar_time_grid(n, official=False),
                                    noise=TorchNoise(torch.Generator().manual_seed(2)), model_dtype=torch.float64)
        errors.append(moment_error(out, MEAN, STD))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[-1] < 0.03, errors  # sampling error ~ 1.5 / sqrt(40000) = 0.0075


def test_gaussian_velocity_at_the_ends():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    m, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(gaussian_velocity(x, one, m, s), x - m)  # x_1 = eps, E[x0] = m
    torch.testing.assert_close(gaussian_velocity(x, zero, m, s), -x)  # x_0 = x0, E[eps] = 0


CFG_W = 2.5
M_COND = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
M_UNCOND = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
M_GUIDED = M_UNCOND + CFG_W * (M_COND - M_UNCOND)


def cond_uncond_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows [0, R/2) conditional N(M_COND, STD^2), rows [R/2, R) unconditional N(M_UNCOND, STD^2)."""
    cond, uncond = x.chunk(2)
    return torch.cat([gaussian_velocity(cond, t, M_COND, STD), gaussian_velocity(uncond, t, M_UNCOND, STD)])


def test_guided_velocity_is_exact_for_equal_variance():
    # Both Gaussian velocities are affine in the mean with the same slope, so guidance shifts the mean only.
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    interval = interval_velocity_cfg(cond_uncond_net, CFG_W, interval=(0.0, 1.0))
    doubled = doubled_velocity_cfg(cond_uncond_net, CFG_W)
    worst = 0.0
    for t in torch.linspace(1.0, 0.0, 11, dtype=torch.float64):
        target = gaussian_velocity(x[:32], t, M_GUIDED, STD)
        worst = max(worst, max_abs(interval(x, t)[:32], target), max_abs(interval(x, t)[32:], target),
                    max_abs(doubled(x[:32], t), target))
    assert worst <= 1e-12, worst


def test_guided_sampling_reaches_guided_gaussian():
    b = 4096
    z = standard_noise(b)
    state = torch.cat([z, standard_noise(b, seed=1)])  # [cond; uncond], independent halves
    interval = interval_velocity_cfg(cond_uncond_net, CFG_W, interval=(0.0, 1.0))
    grid = flowar_time_grid(128, official=False)
    out = euler_sample(interval, state, grid, model_dtype=torch.float64)
    assert moment_error(out[:b], M_GUIDED, STD) < 2e-2
    out = heun_sample(interval, state, grid, model_dtype=torch.float64)
    assert moment_error(out[:b], M_GUIDED, STD) < 1e-4
    assert max_abs(out[:b], M_GUIDED + STD * z) < 5e-4
    x1 = torch.randn(40_000, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = euler_maruyama_sample(doubled_velocity_cfg(cond_uncond_net, CFG_W), x1, flowar_time_grid(64, official=False),
                                noise=TorchNoise(torch.Generator().manual_seed(5)), model_dtype=torch.float64)
    assert moment_error(out, M_GUIDED, STD) < 0.03


# --------------------------------------------------------------------------------------------------------------
# (f) other behaviour and bad arguments


def test_state_dtype_and_model_dtype():
    seen: list[torch.dtype] = []
    net = lambda x, t: seen.append(x.dtype) or torch.zeros_like(x)  # noqa: E731
    out = euler_sample(net, torch.randn(2, 3), flowar_time_grid(4))
    assert out.dtype == torch.float64 and set(seen) == {torch.float32}
    heun_sample(net, torch.randn(2, 3), flowar_time_grid(4, official=False), model_dtype=torch.bfloat16)
    assert seen[-1] == torch.bfloat16


def test_heun_evaluation_count_and_callback():
    infos: list[dict[str, Any]] = []
    calls: list[float] = []
    heun_sample(lambda x, t: calls.append(float(t)) or torch.zeros_like(x), torch.randn(2, 3),
                flowar_time_grid(5, official=False), callback=infos.append)
    assert len(calls) == 2 * 5 - 1  # the last step is Euler
    assert [info["i"] for info in infos] == list(range(5))
    assert set(infos[0]) == {"i", "x", "t", "t_next", "v"}


def test_euler_maruyama_without_zero_end_is_all_stochastic():
    noise = CountingNoise()
    euler_maruyama_sample(zero_velocity, torch.randn(2, 3), torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64),
                          noise=noise)
    assert noise.draws == 2


@pytest.mark.parametrize(
    "grid, error, match",
    [
        (torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), ValueError, "strictly decreasing"),
        (torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), ValueError, "strictly decreasing"),
        (torch.tensor([1.5, 0.5, 0.0], dtype=torch.float64), ValueError, r"in \[0, 1\]"),
        (torch.tensor([1.0, -0.1], dtype=torch.float64), ValueError, r"in \[0, 1\]"),
        (torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), ValueError, r"in \[0, 1\]"),
        (torch.zeros(0, dtype=torch.float64), ValueError, "non-empty 1-D"),
        (torch.ones(2, 2, dtype=torch.float64), ValueError, "non-empty 1-D"),
        (torch.tensor([1, 0]), TypeError, "floating tensor"),
        ([1.0, 0.0], TypeError, "floating tensor"),
    ],
)
@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_bad_grid(sampler, grid, error, match):
    with pytest.raises(error, match=match):
        run_sampler(sampler, zero_velocity, torch.randn(2, 3), grid)


def run_sampler(name: str, model_fn, x, grid, **kw):
    if name == "euler":
        return euler_sample(model_fn, x, grid, **kw)
    if name == "heun":
        return heun_sample(model_fn, x, grid, **kw)
    return euler_maruyama_sample(model_fn, x, grid, noise=CountingNoise(), **kw)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_bad_state_model_dtype_and_output(sampler):
    grid = flowar_time_grid(4)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        run_sampler(sampler, zero_velocity, torch.ones(2, 3, dtype=torch.int64), grid)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        run_sampler(sampler, zero_velocity, [[0.0]], grid)
    with pytest.raises(ValueError, match="batch dimension"):
        run_sampler(sampler, zero_velocity, torch.tensor(1.0), grid)
    with pytest.raises(TypeError, match="model_dtype"):
        run_sampler(sampler, zero_velocity, torch.randn(2, 3), grid, model_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"shaped like the state \(2, 3\), got \(1, 3\)"):
        run_sampler(sampler, lambda x, t: x[:1], torch.randn(2, 3), grid)
    with pytest.raises(ValueError, match="got NoneType"):
        run_sampler(sampler, lambda x, t: None, torch.randn(2, 3), grid)


def test_euler_maruyama_noise_errors():
    grid = xar_time_grid(3)
    with pytest.raises(TypeError):
        euler_maruyama_sample(zero_velocity, torch.randn(2, 3), grid)  # noise is required
    with pytest.raises(RuntimeError, match="exhausted"):
        euler_maruyama_sample(zero_velocity, torch.randn(2, 3), grid, noise=ReplayNoise([torch.randn(2, 3)]))
    bad_shape = lambda shape, *, dtype, device: torch.zeros(1, dtype=dtype)  # noqa: E731
    with pytest.raises(ValueError, match="noise source returned shape"):
        euler_maruyama_sample(zero_velocity, torch.randn(2, 3), grid, noise=bad_shape)


def test_flow_t_index_bad_arguments():
    with pytest.raises(TypeError, match="floating dtype"):
        flow_t_index(0.5, torch.int64)
    with pytest.raises(TypeError, match="floating tensor"):
        flow_t_index(torch.tensor([1]))


def test_xar_grid_bad_arguments():
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        xar_time_grid(1)
    with pytest.raises(ValueError, match="t_min"):
        xar_time_grid(5, t_min=0.0)
    assert math.isclose(float(xar_time_grid(5, t_min=0.1)[-2]), 0.1)
