"""xAR model (xar_disa.models): full-size checkpoint schemas, the tiny official model's units, the cell KV-cache
protocol, the training forward and complete sampling runs against data recorded from the official code
(tests/fixtures/golden/xar, see ../shared/golden/xar/README.md), plus the per-image noise contract, the fixed
upstream bugs and argument validation."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from disa.noise import PerImageNoise, ReplayNoise, TorchNoise
from xar_disa.models import xar as xar_models
from xar_disa.models.rope import VisionRotaryEmbeddingFast, cell_order
from xar_disa.models.sampler import euler_maruyama_sampler
from xar_disa.models.xar import xAR

UNIT_TOL = dict(atol=1e-5, rtol=1e-5)  # README: single network forwards, float32
TRACE_ATOL = 1e-12  # README: sampler arithmetic given recorded velocities, float64
RUN_ATOL = 1e-3  # README: final tokens of a whole run


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def checkpoint(golden) -> dict[str, Any]:
    return golden("xar/tiny/model.pt")


@pytest.fixture(scope="module")
def tiny(checkpoint) -> xAR:
    model = xAR(**checkpoint["constructor_kwargs"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


class TimeIndexSpy:
    """Records what the time embedding receives (the integer time index of every row and cell)."""

    def __init__(self, model: xAR) -> None:
        self.seen: list[torch.Tensor] = []
        self._handle = model.time_embed.register_forward_hook(lambda mod, inp, out: self.seen.append(inp[0]))

    def __enter__(self) -> "TimeIndexSpy":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def official_noise_order(run: dict[str, Any]) -> list[torch.Tensor]:
    """Cell 0's initial noise, its step noises, cell 1's initial noise, ... (the official RNG call order)."""
    draws: list[torch.Tensor] = []
    for cell in run["cells"]:
        draws.append(cell["init_noise"])
        draws.extend(cell["step_noise"])
    return draws


# --------------------------------------------------------------------------------------------------------------
# Checkpoint compatibility


@pytest.mark.parametrize("name", ["xar_base", "xar_large", "xar_huge"])
def test_fullsize_state_dict_schema(golden, name):
    schema = golden("xar/schemas.json")[name]
    with torch.device("meta"):
        model = getattr(xar_models, name)(**schema["constructor_kwargs"])
    state = model.state_dict()
    # Same keys, same order, same shapes (strict loading of the released flat state dicts).
    assert [(k, list(v.shape)) for k, v in state.items()] == list(schema["state_dict"].items())
    assert len(state) == schema["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == schema["num_params"]
    persistent = [k for k, _ in model.named_buffers() if k in state]
    assert persistent == schema["buffer_keys"]
    assert sum(state[k].numel() for k in persistent) == schema["num_buffer_elements"]
    assert 4 * sum(v.numel() for v in state.values()) == schema["fp32_bytes"]
    assert all(v.dtype == torch.float32 for v in state.values()) and schema["dtype"] == "float32"


def test_tiny_checkpoint_loads_strictly_and_buffers_are_recomputed_exactly(golden, checkpoint):
    model = xAR(**checkpoint["constructor_kwargs"])
    fresh = model.state_dict()
    stored = checkpoint["state_dict"]
    assert list(fresh) == list(stored)
    assert sum(p.numel() for p in model.parameters()) == golden("xar/tiny/config.json")["num_params"]
    for key in [k for k in stored if k == "mask" or ".rope." in k]:
        assert torch.equal(fresh[key], stored[key]), key  # our tables are the official ones, bit for bit
    assert model.load_state_dict(stored, strict=True).missing_keys == []
    model.verify_buffers()


def test_verify_buffers_rejects_foreign_tables(checkpoint):
    state = dict(checkpoint["state_dict"])
    state["decoder_blocks.1.attn.rope.freqs_sin"] = state["decoder_blocks.1.attn.rope.freqs_sin"].flip(0)
    state["mask"] = torch.zeros_like(state["mask"])  # full attention: not xAR's block-causal mask
    model = xAR(**checkpoint["constructor_kwargs"])
    model.load_state_dict(state, strict=True)  # shapes fit, so only the value check can catch it
    with pytest.raises(ValueError, match=r"2 buffer\(s\) differ.*mask, decoder_blocks.1.attn.rope.freqs_sin"):
        model.verify_buffers()


def test_strict_load_reports_mismatched_checkpoint(checkpoint):
    state = dict(checkpoint["state_dict"])
    del state["pred.bias"]
    state["z_proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*pred\.bias.*size mismatch for z_proj\.weight"):
        xAR(**checkpoint["constructor_kwargs"]).load_state_dict(state, strict=True)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_fullsize_rope_tables(golden, head_dim):
    expected = golden("xar/fullsize_units.pt")["rope"][f"head_dim_{head_dim}"]
    rope = VisionRotaryEmbeddingFast(head_dim // 2).state_dict()
    assert set(rope) == set(expected)
    for key, value in expected.items():
        assert torch.equal(rope[key], value), key


def test_fullsize_mask_and_cell_order(golden, tiny):
    units = golden("xar/fullsize_units.pt")
    assert torch.equal(cell_order(16, 8), units["cell_order_raster_index"])
    assert torch.equal(tiny.cell_order, units["cell_order_raster_index"])
    mask = tiny.mask[0, 0]
    assert torch.equal(mask == 0, units["mask_allowed"])
    assert bool((mask[~units["mask_allowed"]] == float("-inf")).all())


# --------------------------------------------------------------------------------------------------------------
# Units of the tiny official model


def test_rope_units(golden, tiny):
    cases = golden("xar/tiny/units.pt")["rope"]
    assert {c["x"].shape[2] for c in cases} == {64, 128, 256}
    rope = tiny.encoder_blocks[0].attn.rope
    for case in cases:
        scale_index = None if case["scale_index_is_none"] else case["scale_index"]
        torch.testing.assert_close(rope(case["x"], scale_index), case["out"], **UNIT_TOL)


def test_time_embedding_units(golden, tiny):
    case = golden("xar/tiny/units.pt")["time_embed"]
    with torch.no_grad():
        torch.testing.assert_close(tiny.time_embed(case["t_index"]), case["out"], **UNIT_TOL)


def test_clusterify_and_unclusterify_units(golden, tiny):
    units = golden("xar/tiny/units.pt")
    cells = tiny.clusterify(units["clusterify"]["latent"])
    assert torch.equal(torch.stack(cells), units["clusterify"]["cells"])
    assert torch.equal(tiny.unclusterify(units["unclusterify"]["tokens"]), units["unclusterify"]["latent"])
    latent = units["clusterify"]["latent"]
    assert torch.equal(tiny.unclusterify(torch.cat(cells, dim=1)), latent)
    assert tiny.clusterify(latent[:1])[0].shape == (1, 64, 16)  # batch size 1 keeps its batch dimension


def test_cache_protocol_call_by_call(golden, tiny):
    protocol = golden("xar/tiny/units.pt")["cache_protocol"]
    assert [c["update_cache"] for c in protocol["calls"]] == [True, False] * 3
    tiny.reset_cache()
    with TimeIndexSpy(tiny) as spy, torch.no_grad():
        for i, call in enumerate(protocol["calls"]):
            size = call["mask_rows_cols"]
            mask = tiny.mask[:, :, :size, :size] if call["update_cache"] else None
            out = tiny.sample_inference(call["x"], protocol["y"], call["t"], call["update_cache"],
                                        call["scale_index"], mask)
            torch.testing.assert_close(out, call["out"], **UNIT_TOL, msg=f"call {i}")
            assert torch.equal(spy.seen[-1], call["t_index"]), f"call {i}"
            for block in [*tiny.encoder_blocks, *tiny.decoder_blocks]:
                assert block.attn.k.shape[2] == block.attn.v.shape[2] == call["cache_len_after"], f"call {i}"
    tiny.reset_cache()


def test_training_forward_unit(golden, checkpoint):
    case = golden("xar/tiny/units.pt")["forward_train"]
    model = xAR(**checkpoint["constructor_kwargs"])
    model.load_state_dict(checkpoint["state_dict"])
    model.train()
    model.label_drop_prob = 0.0  # the recording turned label dropout off
    loss, velocity = model(case["latent"], case["labels"], t=case["t"], noise=case["noise"], return_velocity=True)
    torch.testing.assert_close(velocity, case["velocity"], **UNIT_TOL)
    torch.testing.assert_close(loss, case["loss"], **UNIT_TOL)
    # The loss is the MSE against noise - x in cell order.
    target = torch.cat([n - c for n, c in zip(case["noise"], model.clusterify(case["latent"]))], dim=1)
    torch.testing.assert_close(loss, ((velocity - target) ** 2).mean(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Sampling: the adapter's protocol with scripted velocities, then the real network


class ScriptedInference:
    """Stands in for ``xAR.sample_inference``: evaluation e returns ``outputs[e]``; records every call."""

    def __init__(self, outputs: torch.Tensor) -> None:
        self.outputs = outputs
        self.calls: list[dict[str, Any]] = []

    def __call__(self, x, y, t, update_cache, scale_index, mask=None):
        self.calls.append(dict(x=x.clone(), y=y.clone(), t=t.clone(), update_cache=update_cache, mask=mask))
        return self.outputs[len(self.calls) - 1]


def test_sampler_adapter_matches_official_trace(golden):
    cases = golden("xar/sampler_trace.pt")["cases"]
    assert len(cases) == 3
    for n, case in enumerate(cases):
        net = ScriptedInference(case["model_out"])
        states: list[torch.Tensor] = []
        size = 64 * (case["scale_index"] + 1)
        out = euler_maruyama_sampler(
            net, case["latents"], case["y"], case["scale_index"],
            condition=case["context"] if case["has_context"] else None, num_steps=case["num_steps"],
            cfg_scale=case["cfg_scale"], mask=torch.zeros(1, 1, size, size), noise=ReplayNoise(case["noise"]),
            callback=lambda info: states.append(info["x"]),
        )
        assert len(net.calls) == case["num_steps"]
        for e, call in enumerate(net.calls):
            assert torch.equal(call["x"], case["model_x"][e]), (n, e)
            assert torch.equal(call["y"], case["model_y"][e]), (n, e)
            assert call["t"].dtype == case["model_t"][e].dtype and torch.equal(call["t"], case["model_t"][e]), (n, e)
            assert call["update_cache"] == case["update_cache"][e], (n, e)
            assert (list(call["mask"].shape) if call["mask"] is not None else []) == case["mask_shape"][e], (n, e)
        assert max_abs(torch.stack(states), case["states"]) <= TRACE_ATOL
        assert max_abs(out, case["out"]) <= TRACE_ATOL


def test_time_indices_seen_on_every_grid(golden, tiny):
    """Cell 0 sampled with the tiny model: the time index the network gets at each evaluation, for many step
    counts, including the N = 2 quirk (last evaluation on the first-evaluation path: 39 instead of 40)."""
    grids = golden("xar/sampler_grids.json")["grids"]
    checked = 0
    for entry in grids:
        n = entry["num_steps"]
        if entry.get("error"):
            with pytest.raises(ValueError, match="needs at least 2"):
                tiny.sampling_plan(n, n)
            continue
        tiny.reset_cache()
        with TimeIndexSpy(tiny) as spy:
            euler_maruyama_sampler(tiny.sample_inference, torch.randn(1, 64, 16), torch.tensor([1]), 0,
                                   num_steps=n, mask=tiny.mask[:, :, :64, :64], noise=TorchNoise())
        assert [int(t[0]) for t in spy.seen] == entry["t_index_as_seen"], f"N={n}"
        assert len(spy.seen) == entry["num_evals"]
        checked += 1
    assert checked >= 5 and any(e["num_steps"] == 2 for e in grids)
    tiny.reset_cache()


@pytest.mark.parametrize("run_name", ["disa", "base"])
def test_run_network_per_evaluation(golden, tiny, run_name):
    """Each evaluation of a recorded run, fed its recorded inputs in order (so the cache is built as in the run)."""
    run = golden("xar/tiny/runs.pt")[run_name]
    tiny.reset_cache()
    context = None
    worst = 0.0
    with TimeIndexSpy(tiny) as spy, torch.no_grad():
        for cell in run["cells"]:
            s = cell["scale_index"]
            assert cell["update_cache"] == [True] + [False] * (cell["num_evals"] - 1)
            for i in range(cell["num_evals"]):
                x = cell["states"][i]
                if i == 0 and context is not None:
                    x = torch.cat([context, x], dim=1)
                x = torch.cat([x, x]).to(torch.float32)  # (2B, N, C): both halves of the doubled batch
                mask = tiny.mask[:, :, : 64 * (s + 1), : 64 * (s + 1)] if i == 0 else None
                out = tiny.sample_inference(x, cell["model_y"], cell["model_t"][i], i == 0, s, mask)
                torch.testing.assert_close(out, cell["model_out"][i], **UNIT_TOL, msg=f"cell {s} eval {i}")
                assert torch.equal(spy.seen[-1], cell["t_index"][i]), f"cell {s} eval {i}"
                worst = max(worst, max_abs(out, cell["model_out"][i]))
            context = cell["sample"].float()
    assert worst > 0.0  # a real comparison (recorded on another CPU, so not bit-identical)
    tiny.reset_cache()


@pytest.mark.parametrize("run_name", ["disa", "base"])
def test_run_sampler_updates(golden, run_name):
    """The sampler side of each recorded cell, given the recorded velocities and noise: network inputs, times,
    labels and cache flags exactly; states and samples to float64 rounding."""
    run = golden("xar/tiny/runs.pt")[run_name]
    context = None
    for cell in run["cells"]:
        s = cell["scale_index"]
        assert cell["num_steps"] == cell["num_evals"] == len(cell["model_t"])
        net = ScriptedInference(cell["model_out"])
        states: list[torch.Tensor] = []
        sample = euler_maruyama_sampler(
            net, cell["init_noise"], run["labels"], s, condition=context, num_steps=cell["num_steps"],
            cfg_scale=cell["cfg_scale"], mask=torch.zeros(cell["mask_shape"]), noise=ReplayNoise(cell["step_noise"]),
            callback=lambda info: states.append(info["x"]),
        )
        for i, call in enumerate(net.calls):
            x = cell["states"][i] if i or context is None else torch.cat([context, cell["states"][i]], dim=1)
            assert torch.equal(call["x"], torch.cat([x, x]).float()), (s, i)
            assert call["t"].dtype == cell["model_t"][i].dtype and torch.equal(call["t"], cell["model_t"][i]), (s, i)
            assert torch.equal(call["y"], cell["model_y"]) and call["update_cache"] == cell["update_cache"][i]
        assert list(net.calls[0]["mask"].shape) == cell["mask_shape"]
        assert max_abs(torch.stack(states), cell["states"]) <= TRACE_ATOL
        assert max_abs(sample, cell["sample"]) <= TRACE_ATOL
        context = cell["sample"].float()


@pytest.mark.parametrize("run_name", ["disa", "base"])
def test_run_end_to_end(golden, tiny, run_name):
    run = golden("xar/tiny/runs.pt")[run_name]
    noise = ReplayNoise(official_noise_order(run))
    with TimeIndexSpy(tiny) as spy:
        tokens = tiny.sample_tokens(run["cfg"], run["labels"], run["flow_upper_steps"], run["flow_lower_steps"],
                                    noise=noise)
    assert noise.remaining == 0  # every recorded draw used, in the official order and shapes
    assert tokens.dtype == torch.float32 and tokens.shape == run["tokens"].shape == (2, 16, 16, 16)
    assert max_abs(tokens, run["tokens"]) <= RUN_ATOL
    recorded = [t for cell in run["cells"] for t in cell["t_index"]]
    assert len(spy.seen) == len(recorded) and all(torch.equal(a, b) for a, b in zip(spy.seen, recorded))
    plans = tiny.sampling_plan(run["flow_upper_steps"], run["flow_lower_steps"], run["cfg"])
    for plan, cell in zip(plans, run["cells"]):
        assert (plan.num_steps, plan.network_evals, plan.cfg_scale) == (cell["num_steps"], cell["num_evals"],
                                                                        cell["cfg_scale"])
        assert plan.tokens_per_eval[0] == cell["first_call_tokens"]
    assert all(block.attn.k is None for block in tiny.encoder_blocks)  # the cache is freed afterwards


def test_original_num_steps_equals_constant_disa(golden, tiny):
    # The original xAR's sample_tokens(num_steps=N) is the DiSA fork with U = L = N (README: bit-identical).
    run = golden("xar/tiny/runs.pt")["base"]
    assert run["flow_upper_steps"] == run["flow_lower_steps"]
    original = tiny.sample_tokens(cfg=run["cfg"], label=run["labels"], num_steps=run["flow_upper_steps"],
                                  noise=ReplayNoise(official_noise_order(run)))
    disa = tiny.sample_tokens(run["cfg"], run["labels"], run["flow_upper_steps"], run["flow_lower_steps"],
                              noise=ReplayNoise(official_noise_order(run)))
    assert torch.equal(original, disa)
    assert max_abs(original, run["tokens"]) <= RUN_ATOL
    with pytest.raises(ValueError, match="pass either num_steps"):
        tiny.sample_tokens(2.0, run["labels"], 20, 5, num_steps=8)


def test_sampling_plan_matches_official_schedules(golden, tiny):
    data = golden("xar/disa_schedules.json")
    for setting in data["settings"]:
        plans = tiny.sampling_plan(setting["flow_upper_steps"], setting["flow_lower_steps"], setting["cfg"])
        got = [
            dict(ar_step=p.ar_step, num_steps_arg=p.num_steps, network_evals=p.network_evals,
                 stochastic_steps=p.stochastic_steps, tokens_first_eval=p.tokens_per_eval[0],
                 tokens_later_evals=p.tokens_per_eval[1], cfg_scale=p.cfg_scale)
            for p in plans
        ]
        assert got == setting["per_ar_step"], setting["name"]
        assert sum(p.network_evals for p in plans) == setting["total_network_evals"]
        assert sum(sum(p.tokens_per_eval) for p in plans) == setting["total_token_evals_per_row"]
        assert tiny.nfe_per_ar_step(setting["flow_upper_steps"], setting["flow_lower_steps"]) == [
            s["network_evals"] for s in setting["per_ar_step"]
        ]
    assert tiny.nfe_per_ar_step(50, 15) == [50, 38, 26, 15]
    for key, expected in data["sweep"]["entries"].items():
        upper, lower = map(int, key.split(","))
        if min(expected) < 2:
            with pytest.raises(ValueError, match="needs at least 2"):
                tiny.sampling_plan(upper, lower, official_short_grids=False)
        else:
            assert [p.num_steps for p in tiny.sampling_plan(upper, lower, official_short_grids=False)] == expected


# --------------------------------------------------------------------------------------------------------------
# Contracts beyond the official code: per-image noise, unconditional sampling, short grids


def test_per_image_noise_is_independent_of_the_batch(tiny):
    labels, seeds = torch.tensor([3, 997, 42]), [11, 12, 13]
    full = tiny.sample_tokens(2.5, labels, 4, 3, noise=PerImageNoise(seeds))
    reordered = tiny.sample_tokens(2.5, labels[[2, 1, 0]], 4, 3, noise=PerImageNoise(seeds[::-1]))
    alone = tiny.sample_tokens(2.5, labels[1:2], 4, 3, noise=PerImageNoise(seeds[1:2]))
    # Same batch size: bit-identical whatever the other images are and where image k sits.
    assert torch.equal(full, reordered.flip(0))
    # Another batch size changes only the GEMM blocking: rounding-level differences (values reach ~10).
    assert max_abs(full[1], alone[0]) <= 1e-4
    other_seed = tiny.sample_tokens(2.5, labels[1:2], 4, 3, noise=PerImageNoise([99]))
    assert max_abs(alone, other_seed) > 0.5  # the seed, not the batch, decides the image


def test_unconditional_sampling(tiny):
    # The official sample_tokens(label=None) crashes; here it samples the null class for bsz images.
    null_labels = torch.full((2,), tiny.num_classes)
    uncond = tiny.sample_tokens(3.0, None, 4, 3, bsz=2, noise=PerImageNoise([5, 6]))
    explicit = tiny.sample_tokens(3.0, null_labels, 4, 3, noise=PerImageNoise([5, 6]))
    assert torch.equal(uncond, explicit)
    conditional = tiny.sample_tokens(3.0, torch.tensor([1, 2]), 4, 3, noise=PerImageNoise([5, 6]))
    assert max_abs(uncond, conditional) > 0.1
    with pytest.raises(ValueError, match="needs bsz >= 1"):
        tiny.sample_tokens(3.0, None, 4, 3)


def test_two_step_cells_official_quirk_and_fix(tiny):
    # U=5, L=2 -> 5, 4, 3, 2 steps: the official code can sample this (the 2-step cell is the last one).
    labels = torch.tensor([7, 8])
    official_plan = tiny.sampling_plan(5, 2, 2.0)
    fixed_plan = tiny.sampling_plan(5, 2, 2.0, official_short_grids=False)
    assert [p.num_steps for p in official_plan] == [5, 4, 3, 2]
    assert official_plan[3].tokens_per_eval == (128, 128) and fixed_plan[3].tokens_per_eval == (128, 64)
    results = {}
    for official in (True, False):
        with TimeIndexSpy(tiny) as spy:
            results[official] = tiny.sample_tokens(2.0, labels, 5, 2, noise=PerImageNoise([1, 2]),
                                                   official_short_grids=official)
        assert int(spy.seen[-1][-1]) == (39 if official else 40)  # last evaluation, t = 0.04
        assert len(spy.seen) == 5 + 4 + 3 + 2
    # Only the last cell (bottom-right 8x8 block of the latent) differs.
    diff = (results[True] - results[False]).abs().amax(dim=(0, 1))  # (16, 16)
    assert diff[:8].max() == 0 and diff[8:, :8].max() == 0 and diff[8:, 8:].max() > 1e-3
    # A 2-step cell followed by another cell crashes the official code: refused unless the fix is asked for.
    with pytest.raises(ValueError, match="cell 1 gets 2 flow step.*official_short_grids=False"):
        tiny.sample_tokens(2.0, labels, 2, 2)
    fixed = tiny.sample_tokens(2.0, labels, 2, 2, noise=PerImageNoise([1, 2]), official_short_grids=False)
    assert fixed.shape == (2, 16, 16, 16) and torch.isfinite(fixed).all()


def test_two_step_first_cell_differs_only_by_the_time_index(tiny):
    # Cell 0 with 2 steps has no context, so the official path differs from the fix only by the time index.
    latents = torch.randn(1, 64, 16)
    outs = []
    for official in (True, False):
        tiny.reset_cache()
        with TimeIndexSpy(tiny) as spy:
            step_noise = ReplayNoise([torch.zeros(1, 64, 16, dtype=torch.float64)])
            outs.append(euler_maruyama_sampler(tiny.sample_inference, latents, torch.tensor([4]), 0, num_steps=2,
                                               mask=tiny.mask[:, :, :64, :64], noise=step_noise,
                                               official_short_grid=official))
        assert [int(t[0]) for t in spy.seen] == [1000, 39 if official else 40]
    assert 0 < max_abs(outs[0], outs[1]) < 0.1
    tiny.reset_cache()


# --------------------------------------------------------------------------------------------------------------
# Training and bad input


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = xAR(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2, class_num=10).train()
    latents, labels = torch.randn(1, 16, 16, 16), torch.tensor([3])  # batch size 1 works (official: squeeze bug)
    t, noise = torch.rand(4), [torch.randn(1, 64, 16) for _ in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.96))
    losses = []
    for _ in range(15):
        loss = model(latents, labels, t=t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # Default draws (times, noise, label dropout) run too.
    assert torch.isfinite(model(torch.randn(2, 16, 16, 16), torch.tensor([1, 2])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=2), "patch_size must be 1"),
        (dict(clusters=3), "clusters must be a square"),
        (dict(img_size=250), "multiple of vae_stride"),
        (dict(decoder_embed_dim=48), "widths must be equal"),
        (dict(encoder_num_heads=5), "divisible by the number of heads"),
        (dict(label_drop_prob=1.5), "label_drop_prob must be in"),
    ],
)
def test_constructor_rejects_unsupported_layouts(kwargs, message):
    base = dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2)
    with pytest.raises(ValueError, match=message):
        xAR(**{**base, **kwargs})


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.sample_tokens(2.0, torch.tensor([0, 1001]), 4, 3), ValueError, r"in \[0, 999\]"),
        (lambda m: m.sample_tokens(2.0, torch.tensor([0.5]), 4, 3), ValueError, "integer tensor"),
        (lambda m: m.sample_tokens(2.0, torch.tensor([1, 2]), 4, 3, bsz=3), ValueError, "does not match"),
        (lambda m: m.sample_tokens(-1.0, torch.tensor([1]), 4, 3), ValueError, "cfg scale"),
        (lambda m: m.sample_tokens(2.0, torch.tensor([1]), 3, 4), ValueError, "must be <= upper"),
        (lambda m: m.sample_tokens(2.0, torch.tensor([1]), 1, 1), ValueError, "needs at least 2"),
        (lambda m: m.sample_tokens(2.0, torch.tensor([1]), 4.5, 3), TypeError, "must be an int"),
        (lambda m: m.sample_inference(torch.zeros(2, 64, 16), torch.tensor([1, 2]), torch.tensor([1, 1]), True, 0),
         TypeError, "floating tensor"),
        (lambda m: m.sample_inference(torch.zeros(2, 64, 16), torch.tensor([1, 2]), torch.ones(6), True, 0),
         ValueError, "need one per row"),
        (lambda m: m.sample_inference(torch.zeros(2, 128, 16), torch.tensor([1, 2]), torch.ones(4), True, 0),
         ValueError, "cannot end with cell 0"),
    ],
)
def test_bad_sampling_arguments(tiny, call: Callable[[xAR], Any], error: type, message: str):
    with pytest.raises(error, match=message):
        call(tiny)
    tiny.reset_cache()


def test_sampler_requires_context_exactly_for_later_cells(tiny):
    with pytest.raises(ValueError, match="required for cells >= 1"):
        euler_maruyama_sampler(tiny.sample_inference, torch.randn(1, 64, 16), torch.tensor([1]), 1, num_steps=3)
    with pytest.raises(ValueError, match="not allowed for cell 0"):
        euler_maruyama_sampler(tiny.sample_inference, torch.randn(1, 64, 16), torch.tensor([1]), 0,
                               condition=torch.zeros(1, 64, 16), num_steps=3)
