"""The speed-only paths produce the same samples as the reference paths for the same noise (issue 9).

Bit-exact (``torch.equal``) wherever the arithmetic is unchanged: per-step coefficient views instead of per-row
gathers, cached time-embedding frequencies, RoPE tables and flow-head condition, device-side guidance-interval
test, sync-free MAR masking. The one approximate path is ``torch.compile`` of a head, checked against a stated
tolerance. Host synchronisations (``aten::_local_scalar_dense``) are counted with the profiler: the fast paths
must not make more of them when the number of AR or diffusion steps grows.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from disa.diffusion import GaussianDiffusion, ddim_sample, ddpm_sample
from disa.flow import euler_maruyama_sample, euler_sample
from disa.guidance import eps_cfg, interval_velocity_cfg, mar_cfg_is_guided, mar_cfg_scale
from disa.layers import TimestepEmbedder
from disa.noise import PerImageNoise, TorchNoise
from disa.schedules import flowar_time_grid, xar_time_grid
from flowar_disa.models.flowar import FlowAR
from flowar_disa.models.rope import GridRotaryEmbedding
from mar_disa.models.diffloss import DiffLoss, SimpleMLPAdaLN
from mar_disa.models.mar import MAR, compile_head
from xar_disa.models.xar import xAR


def host_syncs(fn) -> int:
    """Number of device-to-host scalar reads (``aten::_local_scalar_dense``) while running ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the zero-init AdaLN heads would make every path trivially equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def tiny_head(channels: int = 4, z_dim: int = 16) -> SimpleMLPAdaLN:
    return randomised(SimpleMLPAdaLN(channels, 32, 2 * channels, z_dim, 2))


def tiny_mar(**kw) -> MAR:
    model = MAR(img_size=64, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, buffer_size=4, diffloss_d=1, diffloss_w=32, class_num=10,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)  # fmt: skip
    return randomised(model)


# ---- diffusion samplers: one shared 0-d coefficient view per step == per-row gathers ---------------------------


def reference_ddpm(model_fn, x, diffusion, noise, temperature):
    """The ancestral loop written on the public per-row API (p_mean_variance with a (R,) index tensor)."""
    for j in range(diffusion.num_timesteps - 1, -1, -1):
        out = diffusion.p_mean_variance(model_fn, x, torch.full((x.shape[0],), j, dtype=torch.int64))
        x = out.mean + torch.exp(0.5 * out.log_variance) * noise(x.shape, dtype=x.dtype, device=x.device) * temperature \
            if j > 0 else out.mean
    return x


def reference_ddim(model_fn, x, diffusion):
    tab = diffusion.tables(x.device)
    for j in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((x.shape[0],), j, dtype=torch.int64)
        x0 = diffusion.p_mean_variance(model_fn, x, t).pred_xstart
        eps = (tab.sqrt_recip_alphas_cumprod[t][:, None] * x - x0) / tab.sqrt_recipm1_alphas_cumprod[t][:, None]
        prev = tab.alphas_cumprod_prev[t][:, None]
        x = x0 * torch.sqrt(prev) + torch.sqrt(1 - prev) * eps
    return x


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ddpm_ddim_match_per_row_reference(cfg):
    net, z = tiny_head(), torch.randn(6, 16)
    fn = (lambda x, t: net(x, t, z)) if cfg == 1.0 else eps_cfg(lambda x, t: net(x, t, z), cfg, eps_channels=4)
    x = torch.randn(6, 4)
    for spec, clip in (("25", 950), ("7", None)):
        diffusion = GaussianDiffusion.from_spec(spec, clip=clip)
        fast = ddpm_sample(fn, x, diffusion, noise=TorchNoise(torch.Generator().manual_seed(1)), temperature=0.9)
        ref = reference_ddpm(fn, x, diffusion, TorchNoise(torch.Generator().manual_seed(1)), 0.9)
        assert torch.equal(fast, ref)
        ddim = GaussianDiffusion.from_spec(f"ddim{spec}", clip=980)
        assert torch.equal(ddim_sample(fn, x, ddim), reference_ddim(fn, x, ddim))


def test_timestep_embedder_cached_frequencies_are_exact():
    emb = randomised(TimestepEmbedder(32))
    t = torch.tensor([0, 1, 17, 999])
    direct = emb.mlp(TimestepEmbedder.timestep_embedding(t, emb.frequency_embedding_size))
    assert torch.equal(emb(t), direct) and torch.equal(emb(t), direct)  # first call fills the cache, second uses it
    assert list(emb.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


# ---- MAR: no per-step host reads, same tokens -------------------------------------------------------------------


def test_mar_cfg_guided_decision_on_host_matches_device_value():
    for cfg in (0.0, 0.5, 1.0, 1.0 + 1e-9, 1.0 + 1e-6, 1.5, 3.0, 4.0):
        for schedule in ("linear", "constant"):
            for seq_len, masked in ((256, 255), (256, 1), (16, 15), (16, 3)):
                value = mar_cfg_scale(cfg, schedule, torch.full((1,), float(masked)), seq_len)
                assert mar_cfg_is_guided(cfg, schedule, masked, seq_len) == bool(value != 1.0), (cfg, schedule, masked)


def test_mar_visible_gather_equals_boolean_indexing():
    model = tiny_mar()
    gen = torch.Generator().manual_seed(3)
    x, cls = torch.randn(3, 16, 16, generator=gen), torch.randn(3, 32, generator=gen)
    orders = torch.stack([torch.randperm(16, generator=gen) for _ in range(3)])
    for masked in (16, 9, 1):
        mask = torch.zeros(3, 16).scatter(1, orders[:, :masked], 1.0)
        visible = model.buffer_size + 16 - masked
        with torch.no_grad():
            ref = model.forward_mae_encoder(x, mask, cls)
            fast = model.forward_mae_encoder(x, mask, cls, visible=visible)
            assert torch.equal(fast, ref)
            assert torch.equal(model.forward_mae_decoder(ref, mask, visible=visible), model.forward_mae_decoder(ref, mask))


@pytest.mark.parametrize("sampler", ["DiSA", "DDIM", "DPM_Solver++"])
def test_diffloss_cached_condition_and_host_guided_flag_are_exact(sampler):
    head = DiffLoss(4, 16, 1, 32, diff_sampler=sampler, dpm_cfg=True)
    randomised(head.net)
    z, cfg = torch.randn(6, 16), torch.tensor([2.5])

    def sample(fast: bool) -> torch.Tensor:
        head.cache_condition = fast
        return head.sample(z, 0.8, cfg, step=1, ar_num_iter=4, noise=TorchNoise(torch.Generator().manual_seed(2)),
                           guided=True if fast else None)  # fmt: skip

    assert torch.equal(sample(True), sample(False))


@pytest.mark.parametrize("sampler", ["DiSA", "DDIM", "DPM_Solver++"])
def test_mar_sampling_makes_no_per_step_host_syncs(sampler):
    model = tiny_mar(diff_sampler=sampler, diff_upper_steps=12, diff_lower_steps=4)
    labels = torch.tensor([1, 2])
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])

    def run(num_iter: int) -> None:
        model.sample_tokens(2, num_iter, 3.0, "linear", labels, noise=PerImageNoise([0, 1]), orders=orders)

    run(2)  # warm-up: builds the cached schedules (their one-off host work is not per step)
    few, many = host_syncs(lambda: run(2)), host_syncs(lambda: run(8))
    # The only read left is the label range check, once per call (it was ~4 per AR step plus one per head call).
    assert few == many <= 1, (few, many)


# ---- flow samplers and guidance ---------------------------------------------------------------------------------


def _row_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Row-wise nonlinear velocity with a distinct second half (the unconditional rows see other "conditions").
    scale = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)[:, None, None]
    return torch.tanh(x * scale + t.to(x.dtype)) - 0.3 * x


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.7), (0.0, 0.25), (0.5, 0.9)])
def test_interval_cfg_device_test_equals_host_branching(interval):
    x = torch.randn(4, 5, 3, dtype=torch.float32)
    outs = []
    for branch_on_host in (False, True):
        fn = interval_velocity_cfg(_row_net, 3.0, interval=interval, branch_on_host=branch_on_host)
        outs.append(euler_sample(fn, x, flowar_time_grid(20)))
    assert torch.equal(outs[0], outs[1])


def test_precomputed_flow_step_tables_are_exact():
    x, grid = torch.randn(3, 4, 2), xar_time_grid(9)
    out = euler_maruyama_sample(_row_net, x, grid, noise=TorchNoise(torch.Generator().manual_seed(4)))
    # The step-by-step formulas the samplers used before precomputing their per-step coefficients.
    gen, ref, g = torch.Generator().manual_seed(4), x.double(), grid.double()
    for i in range(len(g) - 1):
        t, dt = g[i], g[i + 1] - g[i]
        ref = ref + ((2 - t) * _row_net(ref.float(), t).double() + ref) * dt
        if i < len(g) - 2:
            ref = ref + torch.sqrt(2 * t) * torch.sqrt(dt.abs()) * torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    assert torch.equal(out, ref)
    ref = x.double()
    for i in range(len(g) - 1):
        ref = ref + (g[i + 1] - g[i]) * _row_net(ref.float(), g[i]).double()
    assert torch.equal(euler_sample(_row_net, x, grid), ref)


# ---- FlowAR: condition cached per scale, RoPE tables cached -----------------------------------------------------


@pytest.mark.parametrize("cross", [False, True])
def test_flowar_cached_condition_and_sync_free_guidance_are_exact(cross):
    model = randomised(FlowAR(img_size=64, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_d=2, diffloss_w=64,
                              scale=(1, 2, 4), cross=cross, class_num=10))  # fmt: skip

    def run(fast: bool, upper: int = 8) -> torch.Tensor:
        for module in model.modules():
            if isinstance(module, GridRotaryEmbedding):
                module.cache_tables = fast
        return model.sample_tokens(upper, 4, 0.7, 3.0, [1, 2], noise=PerImageNoise([5, 6]), cache_condition=fast,
                                   sync_free_guidance=fast)  # fmt: skip

    with torch.no_grad():
        assert torch.equal(run(True), run(False))
        few, many = host_syncs(lambda: run(True, 4)), host_syncs(lambda: run(True, 12))
    assert few == many <= 2, (few, many)  # the label range check only (was one per flow step under guidance)


def test_rope_table_cache_follows_the_frequencies():
    rope = GridRotaryEmbedding(8)
    x = torch.randn(1, 2, 16, 8)
    first = rope(x)
    with torch.no_grad():
        rope.freqs.mul_(2.0)  # e.g. load_state_dict copying other frequencies in place
    assert not torch.equal(rope(x), first)
    rope.cache_tables = False
    uncached = rope(x)
    rope.cache_tables = True
    assert torch.equal(rope(x), uncached)


def test_xar_sampling_makes_no_per_step_host_syncs():
    model = randomised(xAR(img_size=64, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10))  # fmt: skip

    def run(steps: int) -> None:
        model.sample_tokens(bsz=1, flow_upper_steps=steps, flow_lower_steps=3, cfg=2.0, label=torch.tensor([1]),
                            noise=PerImageNoise([0]))  # fmt: skip

    with torch.no_grad():
        few, many = host_syncs(lambda: run(4)), host_syncs(lambda: run(12))
    assert few == many <= 2, (few, many)


# ---- torch.compile of the per-token head (approximate: fused kernels) -------------------------------------------

COMPILE_ATOL = 1e-5  # measured on CPU (inductor + gcc): max abs diff 9.5e-7 on a head output, see the report


def test_compiled_head_matches_eager_within_tolerance():
    model = tiny_mar(diff_sampler="DDIM", diff_upper_steps=6, diff_lower_steps=6)
    head = model.diffloss
    z, cfg = torch.randn(8, 32, generator=torch.Generator().manual_seed(7)), torch.tensor([2.0])
    keys = list(model.state_dict())

    def sample() -> torch.Tensor:
        return head.sample(z, 1.0, cfg, step=0, ar_num_iter=4, noise=TorchNoise(torch.Generator().manual_seed(8)))

    eager = sample()
    try:
        compile_head(model)
        compiled = sample()
        assert list(model.state_dict()) == keys  # checkpoints load as before
    finally:
        compile_head(model, enabled=False)
    assert torch.equal(sample(), eager)  # the reference path is back, bit for bit
    torch.testing.assert_close(compiled, eager, rtol=0.0, atol=COMPILE_ATOL)


def test_cuda_graphs_are_refused_off_cuda():
    model = tiny_mar()
    with pytest.raises(ValueError, match="CUDA device"):
        compile_head(model, cuda_graphs=True)
    assert "forward" not in vars(model.diffloss.net)  # nothing was replaced
