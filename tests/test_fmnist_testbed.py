"""The embedded Fashion-MNIST testbed: pixel tokenizer, dataset, training through main_mar.py, the shipped checkpoint,
the demo and the ablation script. Needs the Debian package ``dataset-fashion-mnist`` (the Makefile installs it)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from disa.fashion_mnist import FashionMNIST, load_fashion_mnist, to_rgb
from disa.features import EFFNET_LITE0
from disa.schedules import respaced_timesteps
from disa.metrics import (
    MetricsConfig,
    TensorImages,
    compute_metrics,
    extract_features,
    metrics_from_features,
)
from disa.vae import PixelTokenizer, latent_to_tokens, tokens_to_latent
from mar_disa import main_mar
from mar_disa.main_mar import SamplerConfig
from mar_disa.testbed import (
    SHIPPED_CHECKPOINT,
    balanced_labels,
    class_grid,
    export_checkpoint,
    load_testbed_model,
    read_model_config,
    sample_images,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PIXEL_FLAGS = ["--dataset", "fashion-mnist", "--tokenizer", "pixels", "--img_size", "28", "--vae_stride", "1",
               "--vae_embed_dim", "1", "--patch_size", "4", "--class_num", "10"]  # fmt: skip


def _script(name: str) -> dict:
    return runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name=name)


# ---------------------------------------------------------------------------------------------- tokenizer, data


def test_pixel_tokenizer_tokens_are_the_pixels() -> None:
    x = torch.rand(2, 1, 28, 28) * 2 - 1  # (B, 1, H, W) in [-1, 1]
    tok = PixelTokenizer(1)
    tokens = latent_to_tokens(tok.encode(x).sample(lambda *a, **k: pytest.fail("a point posterior draws no noise")))
    torch.testing.assert_close(tokens, x, rtol=0, atol=2e-7)  # /0.2325 then *0.2325: the last float bit at most
    images = tok.decode(tokens_to_latent(tokens))  # (B, 3, H, W)
    assert images.shape == (2, 3, 28, 28)
    torch.testing.assert_close(images, x.expand(-1, 3, -1, -1), rtol=0, atol=2e-7)
    with pytest.raises(ValueError, match=r"encodes \(B, 1, H, W\) images, got \(2, 3, 28, 28\)"):
        tok.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        PixelTokenizer(2)


def test_fashion_mnist_dataset_items() -> None:
    data = FashionMNIST("test")
    images, labels = load_fashion_mnist("test")
    x, y = data[7]
    assert len(data) == 10_000 and x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[7]
    torch.testing.assert_close(x[0], torch.from_numpy(images[7]).float() / 127.5 - 1)
    flipping = FashionMNIST("test", random_flip=True)
    torch.manual_seed(0)
    seen = {bool(torch.equal(flipping[7][0], x.flip(-1))) for _ in range(20)}
    assert seen == {True, False}  # mirrored about half the time, otherwise untouched


@pytest.mark.parametrize(("extra", "message"), [
    (["--tokenizer", "kl16", "--vae_stride", "16"], "--dataset fashion-mnist needs --tokenizer pixels"),
    (["--vae_stride", "16"], "--tokenizer pixels needs --vae_stride 1"),
    (["--class_num", "1000"], "10 classes"),
])  # fmt: skip
def test_bad_testbed_flags_exit_2(extra: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main_mar.parse_args([*PIXEL_FLAGS, *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_training_on_fashion_mnist_then_export_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """main_mar.py trains on the real 60k images (one epoch of 14 huge batches of a micro model), the export loads
    back strictly and samples images of the requested shape."""
    argv = [*PIXEL_FLAGS, "--model", "mar_base", "--embed_dim", "16", "--depth", "1", "--num_heads", "2",
            "--buffer_size", "2", "--diffloss_d", "1", "--diffloss_w", "32", "--batch_size", "4096", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path)]
    main_mar.main(argv)
    assert "epoch 0: loss" in capsys.readouterr().out
    args = main_mar.parse_args(argv)
    out = export_checkpoint(tmp_path / "checkpoint-last.pth", tmp_path / "tiny.pth", main_mar.model_config(args),
                            {"command": "test"})  # fmt: skip
    assert read_model_config(out) == main_mar.model_config(args)
    model = load_testbed_model(out, sampler=SamplerConfig(num_iter=4, diff_upper_steps=3, diff_lower_steps=3))
    run = sample_images(model, [0, 9], [11, 12], num_iter=4, batch_size=2)
    assert run.images.shape == (2, 28, 28, 3) and run.images.dtype == np.uint8
    assert run.nfe_per_ar_step == (3, 3, 3, 3) and sum(run.tokens_per_ar_step) == 49


# ---------------------------------------------------------------------------------------------- the shipped model


def _class_mean_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Nearest-class-mean classification of generated images against the real test-set class means."""
    real, real_labels = load_fashion_mnist("test")
    means = np.stack([real[real_labels == c].mean(0) for c in range(10)]).reshape(10, -1)  # (10, 784)
    flat = images[..., 0].reshape(len(images), -1).astype(np.float64)  # (N, 784)
    predicted = ((flat[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == labels).mean())


def test_shipped_checkpoint_loads_strictly_and_makes_garments() -> None:
    """The shipped EMA weights load strictly; with DiSA 50->5 the samples are recognisably of their class: a
    nearest-class-mean classifier (61% accurate on the real test set) labels most of them correctly."""
    model = load_testbed_model(SHIPPED_CHECKPOINT, sampler=SamplerConfig(
        num_iter=8, diff_sampler="DiSA", diff_upper_steps=50, diff_lower_steps=5))  # fmt: skip
    labels, seeds = balanced_labels(30)
    run = sample_images(model, labels, seeds, num_iter=8, batch_size=30)
    assert run.images.shape == (30, 28, 28, 3)
    assert run.nfe_per_ar_step[0] > run.nfe_per_ar_step[-1]  # annealed
    assert 40 < run.images.mean() < 120  # garments on a black background, not blank and not noise
    assert _class_mean_accuracy(run.images, labels) >= 0.6
    assert class_grid(run.images, labels, per_class=3, scale=1).size == (3 * 28, 10 * 28)


def test_metrics_from_features_match_compute_metrics(tmp_path: Path) -> None:
    """Scoring from cached features gives compute_metrics' numbers (FD to float rounding, precision/recall exactly)."""
    images, _ = load_fashion_mnist("test")
    gen, ref = to_rgb(images[:24]), to_rgb(images[100:130])  # (N, 3, 28, 28) uint8
    np.savez(tmp_path / "ref.npz", arr_0=ref.permute(0, 2, 3, 1).numpy())  # ADM layout (N, H, W, 3)
    cfg = MetricsConfig(extractor=EFFNET_LITE0, fid=False, isc=True, num_workers=0, distributed=False)
    ours = metrics_from_features(extract_features(TensorImages(gen), cfg), extract_features(TensorImages(ref), cfg),
                                 EFFNET_LITE0)  # fmt: skip
    direct = compute_metrics(TensorImages(gen), MetricsConfig(
        extractor=EFFNET_LITE0, reference_images=tmp_path / "ref.npz", isc=False, prc=True, num_workers=0,
        distributed=False))  # fmt: skip
    assert set(ours) == set(direct) == {"FD_EffNet-Lite0", "precision_EffNet-Lite0", "recall_EffNet-Lite0"}
    assert ours["FD_EffNet-Lite0"] == pytest.approx(direct["FD_EffNet-Lite0"], rel=1e-6)
    assert ours["precision_EffNet-Lite0"] == direct["precision_EffNet-Lite0"]
    assert ours["recall_EffNet-Lite0"] == direct["recall_EffNet-Lite0"]
    with pytest.raises(ValueError, match="same D"):
        metrics_from_features(torch.zeros(3, 4), torch.zeros(3, 5), EFFNET_LITE0)


# ---------------------------------------------------------------------------------------------- the scripts


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo = _script("demo")
    out = tmp_path / "demo"
    code = demo["main"](["--num_images", "100", "--num_iter", "4", "--upper", "6", "--lower", "2", "--batch_size",
                         "50", "--reference_images", "40", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fixed" in printed and "DiSA" in printed and "speed-up over 6 fixed steps" in printed
    results = json.loads((out / "results.json").read_text())
    original, fixed, disa = results["rows"]
    assert original["nfe_per_image"] == 4 * 6 and original["steps_per_token"] == 6  # no clip: 6 steps run 6
    assert len(set(fixed["nfe_per_ar_step"])) == 1 and fixed["nfe_per_image"] <= 24  # the 950 clip may drop one
    assert disa["nfe_per_ar_step"][0] == fixed["nfe_per_ar_step"][0] > disa["nfe_per_ar_step"][-1]
    for row in results["rows"]:
        assert np.isfinite(row["metrics"]["FD_EffNet-Lite0"]) and 0 <= row["metrics"]["recall_EffNet-Lite0"] <= 1
        assert Path(row["grid"]).is_file()
    assert (out / "tradeoff.png").is_file()
    assert list((tmp_path / "cache").glob("*.pt"))  # the reference features were cached ...
    with pytest.raises(SystemExit):  # ... and bad input is refused before any work
        demo["main"](["--num_images", "55"])
    assert "multiple of 10" in capsys.readouterr().err


def test_ablation_settings_and_a_short_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ablation = _script("fmnist_ablation")
    settings = ablation["all_settings"](16, 50)
    labels = [s.label for s in settings]
    for expected in ("DiSA linear:50->1", "DiSA linear:50->10", "DiSA linear:25->5", "DiSA cosine:50->5",
                     "DiSA two-stage:50->5", "DiSA constant:50->5", "fixed:50", "fixed:5", "original:50"):
        assert expected in labels
    matched = ablation["matched_fixed"](settings[0], 16)  # linear 50->5 over 16 AR steps: 427 calls, 26.7 per step
    runs = len(respaced_timesteps(str(matched.upper), clip=950))
    assert matched.sampler == "fixed" and abs(runs - 427 / 16) <= 0.5
    code = ablation["main"](["--num_images", "20", "--num_iter", "4", "--reference_images", "30", "--cache_dir",
                             str(tmp_path / "cache"), "--out", str(tmp_path / "abl"), "--only", "fixed:5",
                             "DiSA constant:50->5"])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "abl" / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["real (held-out test images)", "DiSA constant:50->5", "fixed:5"]
    assert rows[1]["nfe_per_image"] == rows[2]["nfe_per_image"]  # the same sampler, clip and 5 steps
    assert (tmp_path / "abl" / "table.md").read_text().count("\n") == 5
    with pytest.raises(SystemExit):
        ablation["main"](["--only", "nonsense"])
    assert "unknown setting" in capsys.readouterr().err
