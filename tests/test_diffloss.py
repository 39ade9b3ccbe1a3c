"""mar_disa.models.diffloss: the diffusion MLP and DiffLoss against the official MAR_DiSA golden data."""
from __future__ import annotations

import pytest
import torch

from disa.diffusion import GaussianDiffusion, ddpm_sample
from disa.noise import ReplayNoise, TorchNoise
from mar_disa.models.diffloss import SAMPLERS, DiffLoss, SimpleMLPAdaLN

PREFIX = "diffloss.net."
SINGLE = dict(rtol=1e-5, atol=1e-5)
CHAIN = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(golden):
    kwargs = golden("mar/tiny_mar/config.json")["kwargs"]
    state = golden("mar/tiny_mar/state_dict.pt")
    return kwargs, {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def _diffloss(tiny, sampler="DiSA", upper=None, lower=None, strategy=None, **extra) -> DiffLoss:
    kwargs, net_state = tiny
    loss = DiffLoss(
        target_channels=kwargs["vae_embed_dim"],
        z_channels=kwargs["decoder_embed_dim"],
        depth=kwargs["diffloss_d"],
        width=kwargs["diffloss_w"],
        diff_upper_steps=upper or kwargs["diff_upper_steps"],
        diff_lower_steps=lower or kwargs["diff_lower_steps"],
        diff_annealing_strategy=strategy or kwargs["diff_annealing_strategy"],
        diff_sampler=sampler,
        **extra,
    )
    loss.net.load_state_dict(net_state, strict=True)
    return loss.eval()


def test_state_dict_keys_and_shapes_match_official(tiny):
    _, net_state = tiny
    loss = _diffloss(tiny)
    ours = {k: tuple(v.shape) for k, v in loss.state_dict().items()}
    assert ours == {PREFIX[len("diffloss.") :] + k: tuple(v.shape) for k, v in net_state.items()}


def test_fresh_head_outputs_zero():
    """MAR's init zeroes the AdaLN heads and the output layer, so an untrained head predicts 0."""
    net = SimpleMLPAdaLN(16, 32, 32, 8, 2)
    assert torch.equal(net(torch.randn(5, 16), torch.tensor([0, 1, 500, 998, 999]), torch.randn(5, 8)), torch.zeros(5, 32))


def test_net_forward(golden, tiny):
    unit = golden("mar/tiny_mar/units.pt")["net_forward"]
    net = _diffloss(tiny).net
    with torch.no_grad():
        torch.testing.assert_close(net(unit["x"], unit["t_int"], unit["c"]), unit["out_t_int"], **SINGLE)
        torch.testing.assert_close(net(unit["x"], unit["t_float"], unit["c"]), unit["out_t_float"], **SINGLE)


def test_net_forward_with_cfg(golden, tiny):
    unit = golden("mar/tiny_mar/units.pt")["net_forward_with_cfg"]
    net = _diffloss(tiny).net
    with torch.no_grad():
        out = net.forward_with_cfg(unit["x"], unit["t"], unit["c"], unit["cfg_scale"])
        torch.testing.assert_close(out, unit["out"], **SINGLE)
        out = net.forward_with_cfg(unit["x"], unit["t"], unit["c"], unit["cfg_scale_tensor"])
        torch.testing.assert_close(out, unit["out_tensor_scale"], **SINGLE)


DIFFLOSS_KEYS = [f"{s}_cfg{c}_step{k}" for s in SAMPLERS for c in ("1.0", "2.9") for k in (0, 3)]


@pytest.mark.parametrize("key", DIFFLOSS_KEYS)
def test_diffloss_sample(golden, tiny, key):
    entry = golden("mar/diffusion/diffloss_sample.pt")[key]
    loss = _diffloss(tiny, entry["sampler"], entry["upper"], entry["lower"], entry["strategy"])
    draws = [entry["init_noise_drawn"]]
    if entry["sampler"] in ("default", "DiSA"):
        draws += list(entry["step_noise"][:-1])  # skip the official loop's last draw (multiplied by 0)
    noise = ReplayNoise(draws)  # DDIM (eta 0) and DPM-Solver draw only the starting noise
    out = loss.sample(entry["z"], entry["temperature"], entry["cfg"], entry["step"], entry["ar_num_iter"], noise=noise)
    assert noise.remaining == 0
    if entry["sampler"] == "default":
        # t = 999 is kept (abar = 2.4e-9): values reach 1e3-1e4, so the README bounds the error relative to them.
        assert (out - entry["out"]).abs().max() <= 1e-4 * entry["out"].abs().max()
    else:
        torch.testing.assert_close(out, entry["out"], **CHAIN)


def test_diffusions_are_cached_and_follow_the_official_clips(tiny):
    disa = _diffloss(tiny, "DiSA", upper=50, lower=5)
    assert disa.diffusion_for(50) is disa.diffusion_for(50)
    assert disa.diffusion_for(50).num_timesteps == 48 and int(disa.diffusion_for(50).timestep_map[-1]) == 950
    assert [disa.steps_for(k, 64) for k in (0, 1, 63)] == [50, 49, 5]
    default = _diffloss(tiny, "default", upper=50, lower=5)
    assert default.steps_for(63, 64) == 50 and int(default.diffusion_for(50).timestep_map[-1]) == 999
    ddim = _diffloss(tiny, "DDIM", upper=50, lower=5)
    assert int(ddim.diffusion_for(5).timestep_map[-1]) == 800 and int(ddim.diffusion_for(50).timestep_map[-1]) == 980


def test_sample_reuses_cached_diffusion(tiny):
    loss = _diffloss(tiny, "DiSA")
    z = torch.randn(3, 64)
    loss.sample(z, step=0, ar_num_iter=4, noise=TorchNoise(torch.Generator().manual_seed(0)))
    cached = dict(loss._diffusions)
    loss.sample(z, step=0, ar_num_iter=4, noise=TorchNoise(torch.Generator().manual_seed(0)))
    assert loss._diffusions == cached and len(cached) == 1


@pytest.mark.parametrize("sampler", ["DPM_Solver", "DPM_Solver++"])
def test_dpm_cfg_option(tiny, sampler):
    """Faithful DPM ignores the guidance scale; ``dpm_cfg=True`` guides through eps_cfg (both halves identical)."""
    z = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    start = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    faithful = _diffloss(tiny, sampler)
    guided = _diffloss(tiny, sampler, dpm_cfg=True)
    plain = faithful.sample(z, cfg=2.9, step=0, ar_num_iter=4, noise=ReplayNoise([start]))
    same_as_plain = faithful.sample(z, cfg=1.7, step=0, ar_num_iter=4, noise=ReplayNoise([start]))
    torch.testing.assert_close(plain, same_as_plain, rtol=0, atol=0)  # the scale has no effect
    out = guided.sample(z, cfg=2.9, step=0, ar_num_iter=4, noise=ReplayNoise([start]))
    torch.testing.assert_close(out[:3], out[3:], rtol=0, atol=0)
    assert (out[:3] - plain[:3]).abs().max() > 1e-3
    # cfg = 1 is unguided in both modes.
    torch.testing.assert_close(
        guided.sample(z[:3], cfg=1.0, step=0, ar_num_iter=4, noise=ReplayNoise([start])),
        faithful.sample(z[:3], cfg=1.0, step=0, ar_num_iter=4, noise=ReplayNoise([start])),
        rtol=0,
        atol=0,
    )


def test_training_diffusion_is_faithful_by_default(tiny):
    assert _diffloss(tiny).train_diffusion.num_timesteps == 951  # MAR_DiSA: clip 950 applies to training too
    assert _diffloss(tiny, train_clip=None).train_diffusion.num_timesteps == 1000  # the original MAR


def test_training_loss_and_mask(tiny):
    loss = _diffloss(tiny).train()
    target, z = torch.randn(12, 16), torch.randn(12, 64)
    mask = torch.tensor([1.0, 0.0] * 6)
    torch.manual_seed(0)
    value = loss(target, z, mask)
    value.backward()
    assert torch.isfinite(value) and value.dim() == 0
    assert all(p.grad is not None for p in loss.net.parameters())
    # The mask keeps only the masked rows: the same draws with the other rows changed give the same loss.
    torch.manual_seed(0)
    changed = target.clone()
    changed[1::2] += 100.0
    torch.testing.assert_close(loss(changed, z, mask), value)


def test_training_losses_split_gradients():
    """The VLB term trains only the variance channels; the MSE term only the eps channels."""
    diffusion = GaussianDiffusion.from_spec("", clip=950)
    out = torch.randn(64, 8, requires_grad=True)  # (R, 2C) head output, C = 4
    x0, noise = torch.randn(64, 4).clamp(-1, 1), torch.randn(64, 4)
    t = torch.arange(64) * 15  # includes t = 0 (decoder NLL) and t = 945
    terms = diffusion.training_losses(lambda x, tt: out, x0, t, noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_vb[:, :4].abs().max() == 0 and grad_vb[:, 4:].abs().max() > 0
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


def test_mse_of_exact_predictor_matches_posterior_variance():
    """With the optimal eps for N(m, s^2) data, E[(eps - eps*)^2] = 1 - (1 - abar) / (abar s^2 + 1 - abar)."""
    diffusion = GaussianDiffusion.from_spec("", clip=950)
    rows, j, mean, std = 20000, 300, 0.7, 0.5
    gen = torch.Generator().manual_seed(0)
    x0 = mean + std * torch.randn(rows, 4, generator=gen)
    noise = torch.randn(rows, 4, generator=gen)
    abar = float(diffusion.alphas_cumprod[j])

    def head(x, t):
        eps = (1 - abar) ** 0.5 * (x - abar**0.5 * mean) / (abar * std**2 + 1 - abar)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)

    mse = diffusion.training_losses(head, x0, torch.full((rows,), j), noise)["mse"].mean()
    expected = 1 - (1 - abar) / (abar * std**2 + 1 - abar)
    assert abs(mse.item() - expected) < 0.02 * expected + 1e-3


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="unknown diff_sampler 'DDPM'; allowed: default, DiSA, DDIM"):
        _diffloss(tiny, "DDPM")
    with pytest.raises(ValueError, match="unknown diff_annealing_strategy 'exp'; allowed: linear"):
        _diffloss(tiny, strategy="exp")
    with pytest.raises(ValueError, match="need 1 <= diff_lower_steps <= diff_upper_steps"):
        _diffloss(tiny, upper=5, lower=10)
    with pytest.raises(ValueError, match="CFG sampling needs an even number of rows"):
        _diffloss(tiny).sample(torch.randn(3, 64), cfg=2.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        _diffloss(tiny).sample(torch.randn(2, 64), temperature=0.0)
    with pytest.raises(ValueError, match="does not use a respaced GaussianDiffusion"):
        _diffloss(tiny, "DPM_Solver").diffusion_for(5)


def test_sample_uses_global_rng_by_default(tiny):
    loss = _diffloss(tiny, "DiSA")
    z = torch.randn(2, 64)
    torch.manual_seed(3)
    a = loss.sample(z, step=3, ar_num_iter=4)
    torch.manual_seed(3)
    b = loss.sample(z, step=3, ar_num_iter=4)
    assert torch.equal(a, b) and a.shape == (2, 16)
    # ... which is the explicit sampler with the same draws.
    torch.manual_seed(3)
    x = torch.randn(2, 16)
    c = ddpm_sample(lambda xx, t: loss.net(xx, t, z), x, loss.diffusion_for(3), noise=TorchNoise())
    assert torch.equal(a, c)
