"""scripts/fmnist_evidence.py: the paper's three measurements on a tiny random testbed model, and their maths.

Needs the real Fashion-MNIST (``make data``); a missing data set fails these tests, it does not skip them.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from disa.diffusion import GaussianDiffusion
from mar_disa.main_mar import ModelConfig, SamplerConfig, build_model
from mar_disa.testbed import export_checkpoint
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fmnist_evidence.py"
NUM_ITER = 4
PER_STEP = {
    "variance": ("sampled", "sampled_sem", "real_given_class_position", "sampled_over_real",
                 "contexts_per_step"),
    "straightness": ("chord_over_arc", "chord_over_arc_sem", "rf_straightness", "rf_straightness_sem",
                     "contexts_per_step"),
    "mlp": ("mse", "mse_sem", "baseline_variance", "one_minus_r2", "class_position_mean_one_minus_r2"),
}  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("fmnist_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmnist_evidence"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


ev = _load_script()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random testbed-format checkpoint: the Fashion-MNIST token layout with a tiny network."""
    folder = tmp_path_factory.mktemp("tiny_testbed")
    cfg = ModelConfig(model="mar_base", img_size=28, vae_stride=1, patch_size=4, vae_embed_dim=1, class_num=10,
                      buffer_size=2, embed_dim=16, depth=1, num_heads=2, diffloss_w=32, diffloss_d=1)  # fmt: skip
    model = build_model(cfg, SamplerConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the init zeroes the head's output layers; perturb everything so the head does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    training = folder / "checkpoint-last.pth"
    torch.save({"model_ema": model.state_dict()}, training)
    return export_checkpoint(training, folder / "tiny.pth", cfg, {"command": "random weights (test)"})


def _tiny_args(checkpoint: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--out-dir", str(out), "--num-iter", str(NUM_ITER), "--num-images", "4",
            "--samples", "3", "--variance-positions", "2", "--head-steps", "4", "--ddim-steps", "5",
            "--train-images", "40", "--mlp-width", "8", "--mlp-epochs", "2", "--mlp-batch-size", "32"]  # fmt: skip


def test_main_writes_per_step_numbers_and_plot(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "evidence"
    rc = ev.main(_tiny_args(tiny_checkpoint, out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err  # a missing Fashion-MNIST lands here, loudly
    results = json.loads((out / "evidence.json").read_text())

    assert results["ar_step"] == list(range(NUM_ITER))
    assert sum(results["tokens_per_step"]) == 49  # every token of the 7x7 grid is predicted exactly once
    for part, keys in PER_STEP.items():
        for key in keys:
            values = results[part][key]
            assert len(values) == NUM_ITER, (part, key)
            assert all(math.isfinite(v) for v in values), (part, key, values)
    assert results["straightness"]["contexts_per_step"] == [4 * n for n in results["tokens_per_step"]]
    assert results["variance"]["contexts_per_step"] == [4 * min(2, n) for n in results["tokens_per_step"]]
    assert all(0 < r <= 1 + 1e-6 for r in results["straightness"]["chord_over_arc"])
    assert all(v >= 0 for v in results["variance"]["sampled"])
    # The checkpoint was trained (here: claims to be) with train_clip 950, so --clip auto starts both samplers there.
    assert results["samplers"]["variance"]["top_timestep"] == 950
    ddim = GaussianDiffusion.from_spec("ddim5", clip=950)  # stride 200: 0..800, below the clip
    assert results["samplers"]["ddim"] == {"steps_run": 5, "top_timestep": int(ddim.timestep_map[-1])}
    assert results["mlp"]["train_contexts"] == 40 * 49
    for name in ("variance", "straightness", "mlp"):
        verdict = results["verdicts"][name]
        assert isinstance(verdict["supported"], bool)
        assert verdict["verdict"] in captured.out  # the CLI states every verdict

    with Image.open(out / "evidence.png") as png:
        png.load()
        assert png.width > 2 * png.height  # three panels side by side

    # Seeded end to end: a second run gives the same numbers (timings aside).
    rc = ev.main(_tiny_args(tiny_checkpoint, tmp_path / "again"))
    assert rc == 0
    again = json.loads((tmp_path / "again" / "evidence.json").read_text())
    for r in (results, again):
        r.pop("seconds")
    assert again == results


def test_clip_none_uses_the_official_top_timesteps(tiny_checkpoint, tmp_path):
    assert ev.main(_tiny_args(tiny_checkpoint, tmp_path) + ["--clip", "none"]) == 0
    samplers = json.loads((tmp_path / "evidence.json").read_text())["samplers"]
    assert samplers["variance"] == {"kind": "default", "steps_run": 4, "top_timestep": 999}
    official_ddim = GaussianDiffusion.from_spec("ddim5", clip=980)  # MAR_DiSA's --diff_sampler DDIM respacing
    assert samplers["ddim"] == {"steps_run": official_ddim.num_timesteps,
                                "top_timestep": int(official_ddim.timestep_map[-1])}


def test_straightness_of_straight_and_bent_paths():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    times = torch.tensor([0.0, 0.1, 0.5, 1.0])
    straight = torch.stack([a + t * (b - a) for t in times])[:, None]  # (4, 1, 2), constant speed
    assert ev.chord_arc_ratio(straight).item() == pytest.approx(1.0, abs=1e-7)
    assert ev.rf_straightness(straight, times).item() == pytest.approx(0.0, abs=1e-7)

    # An L: (0,0) -> (1,0) -> (1,1). chord sqrt 2, arc 2; velocities (2,0), (0,2) vs the mean (1,1): |dev|^2 = 2,
    # per channel 1, over the whole time span.
    bent = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])[:, None]  # (3, 1, 2)
    half = torch.tensor([0.0, 0.5, 1.0])
    assert ev.chord_arc_ratio(bent).item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert ev.rf_straightness(bent, half).item() == pytest.approx(1.0, rel=1e-6)

    # Straight but at changing speed (80% of the way in the first half): chord/arc ignores speed, RF does not:
    # velocities 1.6 and 0.4 vs the mean 1 along x: 0.36 each, per channel 0.18.
    uneven = torch.stack([a, a + 0.8 * (b - a), b])[:, None]
    assert ev.chord_arc_ratio(uneven).item() == pytest.approx(1.0, abs=1e-7)
    assert ev.rf_straightness(uneven, half).item() == pytest.approx(0.18, rel=1e-6)

    # Rows are independent; a path that never moves counts as straight.
    both = torch.cat([straight[[0, 2, 3]], bent, torch.zeros(3, 1, 2)], dim=1)  # (3, 3, 2)
    assert ev.chord_arc_ratio(both).tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 1.0], rel=1e-6)
    with pytest.raises(ValueError, match="strictly increasing"):
        ev.rf_straightness(bent, torch.tensor([0.0, 0.5, 0.5]))


def test_ddim_path_of_a_point_mass_is_straight_in_flow_coordinates():
    """A head that knows the token exactly (x0 = c at every t) gives a straight, constant-speed path in the flow
    coordinates the script measures in, ending at c; a head that changes its mind mid-way does not."""
    base = GaussianDiffusion.from_spec("", clip=None)  # the original 1000-step schedule, indexed by the model's t
    abar = base.alphas_cumprod.float()
    c = torch.tensor([[0.5, -0.3, 0.8], [-1.0, 0.2, 0.0]])  # (R, C)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))

    def oracle(target):
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = abar[t][:, None]
            x0 = target(t)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # (R, 2C) [eps, variance value]

        return model_fn

    ddim = GaussianDiffusion.from_spec("ddim20", clip=950)
    path, times = ev.ddim_flow_path(oracle(lambda t: c), noise, ddim)
    assert path.shape == (21, 2, 3) and times.shape == (21,)
    assert times[-1].item() == pytest.approx(1.0) and times[0].item() < 0.1
    torch.testing.assert_close(path[-1], c, atol=1e-5, rtol=0)
    assert ev.chord_arc_ratio(path).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ev.rf_straightness(path, times).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)

    path, _ = ev.ddim_flow_path(oracle(lambda t: torch.where(t[:, None] > 500, c, -c)), noise, ddim)
    assert all(r < 0.95 for r in ev.chord_arc_ratio(path).tolist())


def test_trend_verdict():
    values, sems = [1.0, 0.8, 0.9, 0.5, 0.4, 0.3, 0.35, 0.2], [0.1] * 8
    falling = ev.trend_verdict(values, sems, "decrease", "x falls")
    assert falling["supported"] and falling["spearman_rho"] < -0.5
    assert falling["first_quarter_mean"] == pytest.approx(0.9) and falling["last_quarter_mean"] == pytest.approx(0.275)
    assert falling["difference_se"] == pytest.approx(0.1)  # sqrt(4 * 0.01) / 2
    assert not ev.trend_verdict(values, sems, "increase", "x rises")["supported"]
    # The same trend inside its error bars (change 0.625 < 2 x 0.4) is not evidence.
    noisy = ev.trend_verdict(values, [0.4] * 8, "decrease", "x falls")
    assert not noisy["supported"] and "NOT supported" in noisy["verdict"]
    flat = ev.trend_verdict([0.5] * 8, [0.0] * 8, "decrease", "x falls")
    assert not flat["supported"] and "NOT supported" in flat["verdict"]
    with pytest.raises(ValueError, match="direction"):
        ev.trend_verdict([1.0, 2.0], [0.0, 0.0], "down", "x")


def test_bad_input_fails_clearly_and_keeps_earlier_results(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--samples", "1"])
    assert exc.value.code == 2 and "--samples must be an integer >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--clip", "soon"])
    assert "expected 'auto', 'none' or a timestep" in capsys.readouterr().err

    out = tmp_path / "evidence"
    out.mkdir()
    (out / "evidence.json").write_text('{"earlier": true}')
    rc = ev.main(["--checkpoint", str(tmp_path / "missing.pth"), "--out-dir", str(out)])
    assert rc == 1 and "missing.pth" in capsys.readouterr().err
    assert (out / "evidence.json").read_text() == '{"earlier": true}'
    assert sorted(p.name for p in out.iterdir()) == ["evidence.json"]

    rc = ev.main(_tiny_args(tiny_checkpoint, out) + ["--num-iter", "50"])  # more AR steps than tokens
    assert rc == 1 and "num_iter must be <= the model's 49 tokens" in capsys.readouterr().err
