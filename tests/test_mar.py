"""mar_disa.models.mar: checkpoint schemas, tiny-model units and full sample_tokens replays against the official
MAR_DiSA golden data (tests/fixtures/golden/mar, see ../shared/golden/mar/README.md), plus generation behaviour."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from disa.guidance import mar_cfg_scale
from disa.noise import PerImageNoise, ReplayNoise
from mar_disa.models.diffloss import SAMPLERS
from mar_disa.models.mar import MAR, MAR_MODELS, mask_schedule, mask_steps, orders_from_seeds

SINGLE = dict(rtol=1e-5, atol=1e-5)  # one forward pass (README tolerances)
CHAIN = dict(rtol=1e-4, atol=1e-4)  # whole sampling chains


@pytest.fixture(scope="module")
def tiny_config(golden):
    return golden("mar/tiny_mar/config.json")


@pytest.fixture(scope="module")
def tiny(golden, tiny_config) -> MAR:
    model = MAR(**tiny_config["kwargs"], norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model.load_state_dict(golden("mar/tiny_mar/state_dict.pt"), strict=True)
    return model.eval()


def micro(**overrides) -> MAR:
    """A very small MAR over 16x16 tokens (the real sequence length) for schedule-level checks."""
    kwargs = dict(
        img_size=256, vae_stride=16, encoder_embed_dim=8, encoder_depth=1, encoder_num_heads=1,
        decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1, buffer_size=1, class_num=4,
        diffloss_d=1, diffloss_w=8,
    )  # fmt: skip
    kwargs.update(overrides)
    return MAR(**kwargs).eval()


# ---- checkpoint compatibility --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_full_size_state_dict_matches_official_schema(golden, name):
    schema = golden(f"mar/schemas/{name}.json")
    with torch.device("meta"):
        model = MAR_MODELS[name](**schema["kwargs"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(schema["keys"])  # same keys in the same order
    assert ours == schema["keys"]
    assert len(ours) == schema["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == schema["num_params"]
    assert len(list(model.buffers())) == schema["num_buffers"] == 0
    assert {str(v.dtype).replace("torch.", "") for v in model.state_dict().values()} == set(schema["dtypes"])


def test_tiny_state_dict_loads_strictly_with_official_key_order(golden, tiny, tiny_config):
    state = golden("mar/tiny_mar/state_dict.pt")
    assert list(tiny.state_dict()) == list(state)
    assert sum(p.numel() for p in tiny.parameters()) == tiny_config["num_params"]


# ---- single forward passes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["partial", "all_masked", "none_masked"])
def test_encoder_decoder(golden, tiny, case):
    unit = golden("mar/tiny_mar/units.pt")["encoder_decoder"][case]
    with torch.no_grad():
        enc = tiny.forward_mae_encoder(unit["x"], unit["mask"], unit["class_embedding"])
        torch.testing.assert_close(enc, unit["encoder_out"], **SINGLE)
        torch.testing.assert_close(tiny.forward_mae_decoder(enc, unit["mask"]), unit["decoder_out"], **SINGLE)


def test_decoder_on_random_input(golden, tiny):
    unit = golden("mar/tiny_mar/units.pt")["encoder_decoder"]["decoder_random_input"]
    with torch.no_grad():
        torch.testing.assert_close(tiny.forward_mae_decoder(unit["x"], unit["mask"]), unit["decoder_out"], **SINGLE)


def test_masked_token_values_are_ignored(golden, tiny):
    unit = golden("mar/tiny_mar/units.pt")["encoder_decoder"]["partial"]
    scrambled = torch.where(unit["mask"][..., None].bool(), torch.full_like(unit["x"], 1e3), unit["x"])
    with torch.no_grad():
        enc = tiny.forward_mae_encoder(scrambled, unit["mask"], unit["class_embedding"])
    torch.testing.assert_close(enc, unit["encoder_out"], **SINGLE)


def test_class_embedding_and_fake_latent(golden, tiny):
    units = golden("mar/tiny_mar/units.pt")
    emb = units["embeddings"]
    assert torch.equal(tiny.class_emb(emb["labels"]), emb["class_emb"])
    assert torch.equal(tiny.fake_latent.expand(4, -1), emb["fake_latent_repeated"])
    # the encoder cases' class embeddings: classes for all rows but the last, fake_latent (unconditional) last
    labels = units["labels_for_class_embedding"]
    cls = units["encoder_decoder"]["partial"]["class_embedding"]
    assert torch.equal(cls[:-1], tiny.class_emb(labels[:-1]))
    assert torch.equal(cls[-1], tiny.fake_latent[0])


def test_patchify_unpatchify(golden, tiny):
    unit = golden("mar/tiny_mar/units.pt")["patchify"]
    assert torch.equal(tiny.patchify(unit["latent"]), unit["patchified"])
    assert torch.equal(tiny.unpatchify(unit["patchified"]), unit["unpatchified"])


def test_patchify_roundtrip_with_patch_size_2():
    model = micro(img_size=64, vae_stride=8, patch_size=2)
    latent = torch.randn(2, 16, 8, 8)
    tokens = model.patchify(latent)
    assert tokens.shape == (2, 16, 64) and model.seq_len == 16 and model.token_embed_dim == 64
    assert torch.equal(tokens[0, 1], latent[0, :, 0:2, 2:4].reshape(-1))  # token (0, 1), channels (c, i, j)
    assert torch.equal(model.unpatchify(tokens), latent)


# ---- mask and guidance schedules -----------------------------------------------------------------------------


def test_mask_schedule_and_cfg_scales(golden):
    pairs = golden("mar/sampling/mask_schedule.json")["pairs"]
    assert len(pairs) == 7
    for pair in pairs:
        n, k = pair["seq_len"], pair["num_iter"]
        after = mask_schedule(n, k)
        before = [n] + after[:-1]
        predicted = [b - a for b, a in zip(before, after)]
        predicted[-1] = before[-1]  # the last step predicts everything left
        assert after == pair["mask_len_after_step"], (n, k)
        assert before == pair["masked_before_step"], (n, k)
        assert predicted == pair["num_predicted"] and sum(predicted) == n, (n, k)
        for key, cfg, schedule in (
            ("cfg_iter_linear_2.9", 2.9, "linear"),
            ("cfg_iter_linear_3.0", 3.0, "linear"),
            ("cfg_iter_constant_2.9", 2.9, "constant"),
        ):
            ours = [mar_cfg_scale(cfg, schedule, torch.tensor([float(m)]), n) for m in after]
            assert all(s.dtype == torch.float32 and s.shape == (1,) for s in ours)
            assert [s.item() for s in ours] == pair[key], (n, k, key)  # bit-identical float32


@pytest.mark.parametrize("num_iter", [4, 8])
def test_mask_steps_against_official_masks(golden, num_iter):
    data = golden("mar/sampling/mask_to_pred.pt")
    case, orders = data["cases"][str(num_iter)], data["order"]
    steps = list(mask_steps(orders, num_iter))
    assert [s.masked_after for s in steps] == case["mask_len_after_step"].tolist()
    step_of_position = torch.full_like(orders, -1)
    for k, st in enumerate(steps):
        assert torch.equal(st.mask, case["mask_before"][k])
        predicted = torch.zeros_like(st.mask, dtype=torch.bool).scatter(1, st.positions, True)
        assert torch.equal(predicted, case["mask_to_pred"][k])
        assert bool((st.positions.diff(dim=1) > 0).all())  # ascending
        step_of_position.scatter_(1, st.positions, k)
        cfg_iter = mar_cfg_scale(2.9, "linear", torch.tensor([float(st.masked_after)]), orders.shape[1])
        assert cfg_iter.item() == case["cfg_iter_linear_2_9"][k].item()
    assert torch.equal(step_of_position, case["step_of_position"])


def test_sample_orders_follow_numpy_global_rng(golden, tiny):
    run = golden("mar/sample_tokens/run_cfg.pt")
    np.random.seed(run["numpy_seed_for_orders"])
    assert torch.equal(tiny.sample_orders(2), run["orders"])
    # per-image seeds: image b's order is the batch-of-one order for its own seed
    assert torch.equal(orders_from_seeds([run["numpy_seed_for_orders"]], 16), run["orders"][:1])
    assert torch.equal(orders_from_seeds([3, 4], 16)[1], orders_from_seeds([4], 16)[0])


# ---- whole sample_tokens replays -----------------------------------------------------------------------------


def _token_major(draw: torch.Tensor, bsz: int, n: int) -> torch.Tensor:
    """Recorded rows are image-major (``[h][b][j]``); ours are token-major (``[h][j][b]``): same draw, permuted."""
    return draw.reshape(-1, bsz, n, draw.shape[-1]).transpose(1, 2).reshape(draw.shape)


@pytest.mark.parametrize("name", ["run_cfg", "run_nocfg"])
def test_sample_tokens_replays_official_run(golden, tiny, name):
    run = golden(f"mar/sample_tokens/{name}.pt")
    cfg = run["config"]
    bsz = cfg["bsz"]
    draws = []
    for step in run["steps"]:
        n = int(step["mask_to_pred"][0].sum())
        draws.append(_token_major(step["init_noise_drawn"], bsz, n))
        # the official loop's last draw is multiplied by 0; our ancestral sampler does not make it
        draws += [_token_major(d, bsz, n) for d in step["step_noise"][:-1]]
    noise = ReplayNoise(draws)
    out = tiny.sample_tokens(
        bsz, cfg["num_iter"], cfg["cfg"], cfg["cfg_schedule"], run["labels"], cfg["temperature"],
        noise=noise, orders=run["orders"],
    )  # fmt: skip
    torch.testing.assert_close(out, run["final_tokens"], **CHAIN)
    assert noise.remaining == 0
    stats = tiny.last_sample_stats
    assert stats.tokens_per_step == tuple(int(s["mask_to_pred"][0].sum()) for s in run["steps"])
    assert stats.head_calls_per_step == tuple(s["num_diffusion_steps"] for s in run["steps"])
    assert stats.guided == (cfg["cfg"] != 1.0) and stats.transformer_passes == cfg["num_iter"]


@pytest.mark.parametrize("cfg", [1.0, 2.9])
def test_image_depends_only_on_its_seed(tiny, cfg):
    """PerImageNoise + orders_from_seeds: image k is the same in any batch (up to batched-matmul round-off)."""

    def generate(seeds, labels):
        return tiny.sample_tokens(
            len(seeds), 4, cfg, "linear", torch.tensor(labels), 1.0,
            noise=PerImageNoise(seeds), orders=orders_from_seeds(seeds, tiny.seq_len),
        )  # fmt: skip

    batch = generate([5, 6, 7], [1, 2, 3])
    alone = generate([6], [2])
    reordered = generate([7, 6], [3, 2])
    torch.testing.assert_close(batch[1], alone[0], **CHAIN)
    torch.testing.assert_close(batch[1], reordered[1], **CHAIN)
    torch.testing.assert_close(batch[2], reordered[0], **CHAIN)
    other_seed = generate([8], [2])
    assert (other_seed[0] - alone[0]).abs().max() > 0.5  # the seed matters: the checks above can fail


# ---- NFE accounting on the real schedule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, golden_key, num_iter",
    [
        ("DiSA", "executed_steps_disa_clip950", 64),  # the paper's setting: 1681 head calls per image
        ("DiSA", "executed_steps_disa_clip950", 16),
        ("DDIM", "executed_steps_ddim_clip980", 16),
        ("default", "executed_steps_default_clip1001", 16),
        ("DPM_Solver", "nominal_steps", 16),
    ],
)
def test_head_calls_per_ar_step_for_50_to_5(golden, sampler, golden_key, num_iter):
    entry = next(
        e for e in golden("mar/disa/step_schedules.json")["schedules"]
        if (e["strategy"], e["num_iter"], e["upper"], e["lower"]) == ("linear", num_iter, 50, 5)
    )  # fmt: skip
    model = micro(diff_upper_steps=50, diff_lower_steps=5, diff_sampler=sampler)
    model.sample_tokens(1, num_iter, cfg=3.0, labels=torch.tensor([1]), orders=orders_from_seeds([0], 256))
    stats = model.last_sample_stats
    assert list(stats.tokens_per_step) == entry["tokens_per_step_seq256"]
    assert list(stats.head_calls_per_step) == entry[golden_key]
    nfe = entry[f"nfe_{golden_key}"]
    assert stats.head_calls == nfe["net_calls_per_image"]
    assert stats.token_evals_per_image == nfe["token_evals_per_image_seq256"]


def test_sampling_clip_is_an_explicit_option():
    clipped = micro(diff_upper_steps=50, diff_sampler="DiSA")
    unclipped = micro(diff_upper_steps=50, diff_sampler="DiSA", disa_clip=None)
    assert clipped.diffloss.diffusion_for(50).num_timesteps == 48  # the official hidden clip at 950
    assert unclipped.diffloss.diffusion_for(50).num_timesteps == 50
    assert int(unclipped.diffloss.diffusion_for(50).timestep_map[-1]) == 999
    with pytest.raises(ValueError, match="disa_clip"):
        micro(disa_clip=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_generates_with_cfg(tiny_config, golden, sampler):
    kwargs = {**tiny_config["kwargs"], "diff_sampler": sampler}
    model = MAR(**kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model.load_state_dict(golden("mar/tiny_mar/state_dict.pt"))
    torch.manual_seed(0)
    orders = orders_from_seeds([1, 2], 16)
    out = model.eval().sample_tokens(2, 4, cfg=2.9, labels=torch.tensor([1, 2]), temperature=0.9, orders=orders)
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all() and (out != 0).all()
    assert model.last_sample_stats.guided and sum(model.last_sample_stats.tokens_per_step) == 16


def test_more_ar_steps_than_tokens_still_fills_every_token(tiny):
    out = tiny.sample_tokens(1, 20, labels=torch.tensor([0]), orders=orders_from_seeds([3], 16))
    stats = tiny.last_sample_stats
    assert sum(stats.tokens_per_step) == 16 and 0 in stats.tokens_per_step  # clamped steps predict nothing
    assert all(c == 0 for n, c in zip(stats.tokens_per_step, stats.head_calls_per_step) if n == 0)
    assert (tiny.patchify(out) != 0).all(dim=-1).all()


def test_unconditional_generation_and_progress_bar(tiny, capsys):
    out = tiny.sample_tokens(2, 2, cfg=1.0, labels=None, progress=True, orders=orders_from_seeds([1, 2], 16))
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()
    assert "2/2" in capsys.readouterr().err


# ---- training-time pieces of the model -----------------------------------------------------------------------


def test_random_masking_masks_order_heads_at_the_truncated_ratio(tiny):
    np.random.seed(0)
    x = torch.zeros(3, 16, 16)
    orders = orders_from_seeds([1, 2, 3], 16)
    for _ in range(20):
        mask = tiny.random_masking(x, orders)
        m = int(mask[0].sum())
        assert math.ceil(0.7 * 16) <= m <= 16 and bool((mask.sum(1) == m).all())
        assert bool((mask.gather(1, orders[:, :m]) == 1).all())


def test_label_drop_uses_fake_latent(tiny_config, golden):
    kwargs = {**tiny_config["kwargs"], "label_drop_prob": 1.0, "attn_dropout": 0.0, "proj_dropout": 0.0}
    model = MAR(**kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model.load_state_dict(golden("mar/tiny_mar/state_dict.pt"))
    unit = golden("mar/tiny_mar/units.pt")["encoder_decoder"]["partial"]
    with torch.no_grad():
        dropped = model.train().forward_mae_encoder(unit["x"], unit["mask"], model.class_emb(torch.tensor([1, 2, 3])))
        fake = model.eval().forward_mae_encoder(unit["x"], unit["mask"], model.fake_latent.expand(3, -1))
    torch.testing.assert_close(dropped, fake, **SINGLE)


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bsz=0), "bsz"),
        (dict(num_iter=0), "num_iter"),
        (dict(cfg_schedule="cosine"), "cfg_schedule.*linear, constant"),
        (dict(cfg=-1.0), "cfg"),
        (dict(temperature=0.0), "temperature"),
        (dict(labels=torch.tensor([1, 2, 3])), r"shape \(2,\)"),
        (dict(labels=torch.tensor([1, 10])), r"\[0, 9\]"),
        (dict(orders=torch.zeros(2, 16, dtype=torch.int64)), "permutation"),
        (dict(orders=torch.arange(16).expand(3, -1)), r"shape \(2, 16\)"),
    ],
)
def test_bad_sampling_arguments(tiny, kwargs, match):
    args = dict(bsz=2, num_iter=2, labels=torch.tensor([1, 2]))
    args.update(kwargs)
    bsz = args.pop("bsz")
    with pytest.raises(ValueError, match=match):
        tiny.sample_tokens(bsz, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=250), "divisible by vae_stride"),
        (dict(encoder_num_heads=5), "divisible by encoder_num_heads"),
        (dict(buffer_size=0), "buffer_size"),
        (dict(label_drop_prob=1.5), "label_drop_prob"),
        (dict(mask_ratio_min=1.0), "mask_ratio_min"),
        (dict(diff_sampler="Euler"), "diff_sampler.*DiSA"),
        (dict(diff_annealing_strategy="exp"), "diff_annealing_strategy"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        micro(**kwargs)


def test_rows_with_different_visible_counts_are_refused(tiny):
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    with pytest.raises(ValueError, match="same number"):
        tiny.forward_mae_encoder(torch.zeros(2, 16, 16), mask, tiny.fake_latent.expand(2, -1))
