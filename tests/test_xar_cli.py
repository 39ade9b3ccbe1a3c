"""xAR command lines (xar_disa.eval, xar_disa.main_xar), the evaluation adapter and the benchmark's FLOP count.

End to end: the three xAR commands of the official DiSA README and the original-sampler command of
xAR_DiSA/README.md, as written apart from paths and the tiny sizes (``--embed_dim 64 --depth 2 --num_heads 4
--class_num 2``: the token layout is the official one, only the transformer shrinks), run under ``torchrun
--nproc_per_node=2`` (gloo, CPU) on checkpoints in the official flat layout that this module writes, with the real
KL-16 decoder architecture (random weights) and 2 images. Training runs the README's training command on cached
latents and must lower the loss; its checkpoint must evaluate to the images its online evaluation produced.
Golden data (tests/fixtures/golden/xar/eval_protocol.*) pin folder names, the label/id layout and the
decode / uint8 path of the official engine.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from disa.checkpoints import read_checkpoint
from disa.evaluation import RESULTS_NAME, ClassBalancedLabels, EvalConfig, shard_batches
from disa.vae import AutoencoderKL
from xar_disa import eval as xar_eval
from xar_disa import main_xar
from xar_disa.benchmark import sampling_flops
from xar_disa.engine_xar import (
    ModelConfig,
    SamplerConfig,
    UsageError,
    XARGenerator,
    build_train_dataset,
    evaluate,
)

REPO = Path(__file__).resolve().parents[1]
EVAL_SCRIPT = REPO / "xAR_DiSA" / "eval.py"
TRAIN_SCRIPT = REPO / "xAR_DiSA" / "main_xar.py"
TINY = ["--embed_dim", "64", "--depth", "2", "--num_heads", "4", "--class_num", "2", "--vae_ch", "32"]
SMALL = ["--num_images", "2", "--eval_bsz", "1", "--no_metrics"]
CKPT_NAMES = {"xar_base": "xAR-B.pth", "xar_large": "xAR-L.pth", "xar_huge": "xAR-H.pth"}
README_CFG = {"xar_base": "2.7", "xar_large": "2.3", "xar_huge": "2.2"}


def readme_command(model: str, root: Path) -> list[str]:
    """The official DiSA README command for ``model`` (section 3.3), with its placeholder paths under ``root``.
    ``--resume ../ckpt/xAR-*.pth`` and ``--data_path /path/to/imagenet1k/`` stay as written (run from root/work)."""
    return [
        "--model", model,
        "--eval_bsz", "256", "--num_images", "50000",
        "--flow_upper_steps", "50", "--flow_lower_steps", "15", "--cfg", README_CFG[model],
        "--output_dir", f"{root}/out_sample/",
        "--resume", f"../ckpt/{CKPT_NAMES[model]}", "--vae_path", f"{root}/vae/kl16.ckpt",
        "--data_path", "/path/to/imagenet1k/", "--evaluate",
    ]


def original_command(root: Path) -> list[str]:
    """xAR_DiSA/README.md's xAR-B evaluation (the original sampler: 40 flow steps for every cell)."""
    return [
        "--model", "xar_base",
        "--eval_bsz", "256", "--num_images", "50000",
        "--num_iter", "256", "--num_steps", "40", "--cfg", "2.7",
        "--output_dir", f"{root}/out_sample/",
        "--resume", "../ckpt/xAR-B.pth", "--vae_path", f"{root}/vae/kl16.ckpt",
        "--data_path", "/path/to/imagenet1k/", "--evaluate",
    ]


def training_command(root: Path) -> list[str]:
    """xAR_DiSA/README.md's xAR-B training command (there named main_mar.py), paths under ``root``."""
    return [
        "--img_size", "256", "--vae_path", f"{root}/vae/kl16.ckpt", "--vae_embed_dim", "16", "--vae_stride", "16",
        "--patch_size", "1",
        "--model", "xar_base",
        "--epochs", "800", "--warmup_epochs", "100", "--batch_size", "64", "--blr", "5e-5",
        "--output_dir", "./output_dir/", "--resume", "./output_dir/",
        "--data_path", "/path/to/imagenet1k/", "--use_cached", "--cached_path", f"{root}/imagenet_feature/",
    ]


TRAIN_TINY = ["--epochs", "15", "--warmup_epochs", "0", "--batch_size", "4", "--blr", "1e-2", "--num_workers", "0",
              "--save_last_freq", "100", "--online_eval", "--eval_freq", "100", "--cfg", "2.0",
              "--flow_upper_steps", "6", "--flow_lower_steps", "3", *TINY, *SMALL]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RESULTS_NAME).read_text())


def write_cache(root: Path, per_class: int = 8) -> None:
    """Posterior moments as MAR's main_cache.py stores them: a class-dependent mean, tiny log-variance."""
    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(2, 16, 16, 16)).astype(np.float32) * 3
    for c in range(2):
        folder = root / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            mean = patterns[c] + 0.3 * rng.normal(size=(16, 16, 16)).astype(np.float32)
            logvar = np.full((16, 16, 16), -8.0, np.float32)
            np.savez(folder / f"img{i}.npz", moments=np.concatenate([mean, logvar]),
                     moments_flip=np.concatenate([np.ascontiguousarray(mean[:, :, ::-1]), logvar]))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/ckpt/xAR-{B,L,H}.pth (tiny, flat official layout), root/vae/kl16.ckpt (KL-16 decoder, width 32, random),
    root/imagenet_feature/ (cached latents), root/work/ (the working directory: ``../ckpt`` resolves)."""
    root = tmp_path_factory.mktemp("xar_cli")
    (root / "ckpt").mkdir()
    for seed, (model, name) in enumerate(CKPT_NAMES.items()):
        torch.manual_seed(seed)
        net = ModelConfig(model=model, class_num=2, embed_dim=64, depth=2, num_heads=4).build()
        torch.save(net.state_dict(), root / "ckpt" / name)
    (root / "vae").mkdir()
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL(with_encoder=False, ch=32).state_dict()}, root / "vae" / "kl16.ckpt")
    write_cache(root / "imagenet_feature")
    (root / "work").mkdir()
    return root


@pytest.fixture(scope="module")
def readme_runs(root: Path) -> dict[str, subprocess.CompletedProcess]:
    """The three README commands, ``cd xAR_DiSA && torchrun eval.py ...`` style (the script by path)."""
    return {model: torchrun([str(EVAL_SCRIPT)], readme_command(model, root) + TINY + SMALL, root / "work")
            for model in CKPT_NAMES}


@pytest.fixture(scope="module")
def trained(root: Path) -> Path:
    """The README training command (torchrun, 2 ranks) for 15 tiny epochs, online evaluation at the end."""
    torchrun([str(TRAIN_SCRIPT)], training_command(root) + TRAIN_TINY, root / "work")
    return root / "work" / "output_dir"


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI ``main`` in this process; returns (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------- README commands


def test_readme_disa_commands_run_under_torchrun(readme_runs, root):
    for model, proc in readme_runs.items():
        folder = root / "out_sample" / f"step50-to-15-cfg{README_CFG[model]}-image2_evaluate"
        images = pngs(folder)
        assert sorted(images) == ["00000.png", "00001.png"], model
        with Image.open(folder / "00000.png") as im:
            assert im.size == (256, 256) and im.mode == "RGB"
        res = results(folder)
        assert res["nfe"]["per_ar_step"] == [50, 38, 26, 15] and res["nfe"]["per_image"] == 129
        assert res["world_size"] == 2 and res["metrics"] is None
        assert res["config"]["model"]["model"]["model"] == model
        assert res["config"]["model"]["sampler"]["cfg"] == float(README_CFG[model])
        assert res["config"]["model"]["checkpoint"] == f"../ckpt/{CKPT_NAMES[model]}"
        assert "NFE per AR step: [50, 38, 26, 15]" in proc.stdout
    # Different checkpoints (seeds 0, 1, 2) and cfgs give different images.
    folders = [root / "out_sample" / f"step50-to-15-cfg{README_CFG[m]}-image2_evaluate" for m in CKPT_NAMES]
    assert len({pngs(f)["00000.png"] for f in folders}) == 3


def test_one_process_gives_the_images_of_two_ranks(readme_runs, root, monkeypatch, capsys):
    monkeypatch.chdir(root / "work")
    argv = readme_command("xar_base", root) + TINY + SMALL + ["--output_dir", str(root / "single")]
    code, out, err = run_main(xar_eval.main, argv, capsys)
    assert code == 0, err
    single = pngs(root / "single" / "step50-to-15-cfg2.7-image2_evaluate")
    assert single == pngs(root / "out_sample" / "step50-to-15-cfg2.7-image2_evaluate")
    assert "world size 1" in out


def test_rerun_resumes_and_a_mismatched_rerun_loses_nothing(readme_runs, root, monkeypatch, capsys):
    monkeypatch.chdir(root / "work")
    folder = root / "out_sample" / "step50-to-15-cfg2.7-image2_evaluate"
    before = pngs(folder)
    code, _, err = run_main(xar_eval.main, readme_command("xar_base", root) + TINY + SMALL, capsys)
    assert code == 0, err
    res = results(folder)
    assert res["images"]["generated_this_run"] == 0 and res["images"]["reused"] == 2
    # Same folder, other weights: refused before anything is overwritten.
    argv = readme_command("xar_base", root) + TINY + SMALL + ["--resume", "../ckpt/xAR-L.pth"]
    code, _, err = run_main(xar_eval.main, argv, capsys)
    assert code == 1 and "cannot resume" in err and "nothing was overwritten" in err
    assert pngs(folder) == before


def test_original_sampler_command_runs_as_a_module(root):
    proc = torchrun(["-m", "xar_disa.eval"], original_command(root) + TINY + SMALL, root / "work")
    folder = root / "out_sample" / "iter256-cfg2.7-image2_evaluate"
    assert sorted(pngs(folder)) == ["00000.png", "00001.png"]
    res = results(folder)
    assert res["nfe"]["per_ar_step"] == [40, 40, 40, 40]
    assert res["config"]["model"]["sampler"]["num_steps"] == 40
    assert "160 network evaluations per image" in proc.stdout


def test_unconditional_and_two_step_grids_through_the_cli(root, tmp_path, capsys):
    common = ["--model", "xar_base", *TINY, "--resume", str(root / "ckpt" / "xAR-B.pth"),
              "--vae_path", str(root / "vae" / "kl16.ckpt"), "--output_dir", str(tmp_path), "--no_metrics",
              "--num_images", "1", "--eval_bsz", "1"]
    # Upstream crashes on both; the official 2-step grid is refused at parse time with the flag that fixes it.
    code, _, err = run_main(xar_eval.main, common + ["--num_steps", "2", "--unconditional"], capsys)
    assert code == 2 and "--fixed_short_grids" in err
    code, out, err = run_main(xar_eval.main, common + ["--num_steps", "2", "--fixed_short_grids", "--unconditional"],
                              capsys)
    assert code == 0, err
    folder = tmp_path / "iter64-cfg1.0-image1-fixedgrids-uncond"
    assert sorted(pngs(folder)) == ["00000.png"]
    res = results(folder)
    assert res["nfe"]["per_ar_step"] == [2, 2, 2, 2]
    assert res["config"]["conditions"]["type"].endswith("NullLabels")


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_writes_the_official_layout(trained):
    log = [json.loads(line) for line in (trained / main_xar.LOG_NAME).read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(15))
    losses = [e["train_loss"] for e in log]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert all(e["train_lr"] == pytest.approx(1e-2 * 4 * 2 / 256) for e in log)  # blr * batch * world / 256
    ckpt = read_checkpoint(trained / "checkpoint-last.pth")
    assert set(ckpt) == {"model", "model_ema", "optimizer", "epoch", "scaler", "args"}
    assert ckpt["epoch"] == 14 and ckpt["args"].model == "xar_base"
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.96)
    # EMA 0.9999 over 30 steps stays close to the start; the raw weights moved.
    moved = max((ckpt["model"][k] - ckpt["model_ema"][k]).abs().max().item() for k in ckpt["model"])
    assert moved > 1e-3


def test_trained_checkpoint_evaluates_to_the_online_evaluation(trained, root, monkeypatch, capsys):
    online = trained / "step6-to-3-cfg2.0-image2-epoch14"
    assert sorted(pngs(online)) == ["00000.png", "00001.png"]
    monkeypatch.chdir(root / "work")
    argv = ["--model", "xar_base", *TINY, *SMALL, "--resume", str(trained),
            "--vae_path", str(root / "vae/kl16.ckpt"), "--cfg", "2.0", "--flow_upper_steps", "6",
            "--flow_lower_steps", "3", "--output_dir", str(root / "fromckpt")]
    code, _, err = run_main(xar_eval.main, argv, capsys)
    assert code == 0, err
    # The folder form of --resume picks checkpoint-last.pth and its EMA weights: the online evaluation's images.
    assert pngs(root / "fromckpt" / "step6-to-3-cfg2.0-image2") == pngs(online)


def test_training_resumes_from_the_output_folder(trained, root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(trained, work / "output_dir")
    monkeypatch.chdir(work)
    argv = training_command(root) + [a for a in TRAIN_TINY if a != "--online_eval"] + ["--epochs", "17"]
    code, out, err = run_main(main_xar.main, argv, capsys)
    assert code == 0, err
    log = [json.loads(line) for line in (work / "output_dir" / main_xar.LOG_NAME).read_text().splitlines()]
    assert [e["epoch"] for e in log] == [*range(15), 15, 16]
    assert read_checkpoint(work / "output_dir" / "checkpoint-last.pth")["epoch"] == 16
    assert "trained to epoch 17" in out


def test_training_data_from_the_latent_cache(root):
    data = build_train_dataset(use_cached=True, cached_path=root / "imagenet_feature", data_path="unused",
                               img_size=256, class_num=2)
    assert len(data) == 16 and data.classes == ["n00000000", "n00000001"]
    moments, label = data[9]
    assert moments.shape == (32, 16, 16) and moments.dtype == torch.float32 and label == 1
    with np.load(data.samples[9][0]) as f:
        assert any(torch.equal(moments, torch.from_numpy(f[k])) for k in ("moments", "moments_flip"))
    with pytest.raises(UsageError, match="2 classes but --class_num is 1"):
        build_train_dataset(use_cached=True, cached_path=root / "imagenet_feature", data_path="", img_size=256,
                            class_num=1)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["--flow_upper_steps", "10", "--flow_lower_steps", "20"], "must be <= flow_upper_steps"),
    (["--num_steps", "40", "--flow_upper_steps", "50"], "exclude each other"),
    (["--num_step", "1"], "needs at least 2"),
    (["--unconditional", "--cfg", "2.0"], "needs cfg 1.0"),
    (["--num_images", "3"], "multiple of --class_num"),
    (["--num_images", "4", "--fid_stats", "x.npz"], "--num_images must be >= 10"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--model", "xar_giant"], "invalid choice: 'xar_giant'"),
    (["--cfg", "-1"], "finite number >= 0"),
    (["--eval_bsz", "0"], "integer >= 1"),
    (["--num_heads", "5"], "divisible"),
    (["--vae_ch", "48"], "multiple of 32"),
    (["--num_images", "10", "--kid"], "need per-image reference features"),
])
def test_bad_settings_fail_at_parse_time(extra, message, capsys):
    code, _, err = run_main(xar_eval.main, ["--model", "xar_base", *TINY, "--num_images", "2", *extra], capsys)
    assert code == 2 and message in err, err


def test_bad_files_are_clear_errors(root, tmp_path, capsys):
    vae = str(root / "vae" / "kl16.ckpt")
    common = ["--model", "xar_base", *TINY, *SMALL, "--output_dir", str(tmp_path / "out")]
    cases = {
        "nothing": ([], "no checkpoint given"),
        "missing": (["--resume", str(tmp_path / "nope.pth"), "--vae_path", vae], "checkpoint not found"),
        "size": (["--resume", str(root / "ckpt/xAR-B.pth"), "--vae_path", vae, "--depth", "3"],
                 "The file holds: width 64, 2 + 2 blocks, 2 classes"),
        "vae": (["--resume", str(root / "ckpt/xAR-B.pth"), "--vae_path", str(tmp_path / "kl16.ckpt")],
                "VAE checkpoint not found"),
    }
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    cases["garbage"] = (["--resume", str(garbage), "--vae_path", vae], "could not read checkpoint")
    state = torch.load(root / "ckpt" / "xAR-B.pth", weights_only=True)
    state["mask"] = torch.zeros_like(state["mask"])  # a non-causal mask: same shapes, other model
    torch.save(state, tmp_path / "bad_mask.pth")
    cases["buffers"] = (["--resume", str(tmp_path / "bad_mask.pth"), "--vae_path", vae], "differ from the tables")
    for name, (extra, message) in cases.items():
        code, _, err = run_main(xar_eval.main, common + extra, capsys)
        assert code == 1 and message in err, (name, err)
    assert not list(tmp_path.glob("out/*/*.png"))


def test_missing_fid_stats_fail_before_any_image(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default fid_stats/adm_in256_stats.npz is relative, as upstream
    argv = ["--model", "xar_base", *TINY, "--num_images", "10", "--resume", str(root / "ckpt/xAR-B.pth"),
            "--vae_path", str(root / "vae/kl16.ckpt"), "--output_dir", "out"]
    code, _, err = run_main(xar_eval.main, argv, capsys)
    assert code == 1 and "metrics cannot run" in err and "adm_in256_stats.npz" in err and "--no_metrics" in err
    assert not list(tmp_path.glob("out/*/*.png"))


def test_training_needs_its_data(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = training_command(root) + TINY + ["--cached_path", str(tmp_path / "none")]
    code, _, err = run_main(main_xar.main, argv, capsys)
    assert code == 1 and "cached latents" in err and "is not a folder" in err
    argv = [a for a in training_command(root) if a != "--use_cached"] + TINY
    code, _, err = run_main(main_xar.main, argv, capsys)
    assert code == 1 and "/path/to/imagenet1k/train" in err
    argv = training_command(root) + TINY + ["--lr_schedule", "cosine", "--warmup_epochs", "900"]
    code, _, err = run_main(main_xar.main, argv, capsys)
    assert code == 2 and "warmup_epochs < epochs" in err


# ---------------------------------------------------------------------------------------------- the adapter


def test_folder_names_follow_the_official_engine(golden):
    for c in golden("xar/eval_protocol.json")["configs"]:
        sampler = SamplerConfig(c["flow_upper_steps"], c["flow_lower_steps"], cfg=c["cfg"])
        assert sampler.folder_name(c["num_images"], num_iter=64, evaluate=True) == c["save_folder"]
    assert SamplerConfig(num_steps=40, cfg=2.7).folder_name(50000, num_iter=256, evaluate=True) == \
        "iter256-cfg2.7-image50000_evaluate"  # the original xAR's naming


def test_labels_and_ids_follow_the_official_engine(golden):
    """The shared loop's sharding + class-balanced labels give each rank the official ids and labels (without the
    padding batch, whose ids are all >= num_images)."""
    for c in golden("xar/eval_protocol.json")["configs"]:
        n, bsz, world = c["num_images"], c["batch_size"], c["world_size"]
        labels = ClassBalancedLabels(n, 1000)
        for rank in range(world):
            ours = shard_batches(range(n), bsz, world, rank)
            official = [(first, count) for first, count in c["saved_ids"][rank] if count]
            assert [(b[0], len(b)) for b in ours] == official
            for batch, runs in zip(ours, c["labels"][rank]):
                expanded = [label for label, count in runs for _ in range(count)]
                assert labels(batch).tolist() == expanded[: len(batch)]


class _RecordingVAE(torch.nn.Module):
    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.seen = images, []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z)
        return self.images


def test_generator_calls_decode_and_postprocess_as_the_official_engine(golden, monkeypatch):
    protocol, config = golden("xar/eval_protocol.pt"), golden("xar/eval_protocol.json")["configs"][0]
    case, post = protocol["decode_cases"][0], protocol["postprocess_cases"][0]
    model = ModelConfig(model="xar_base", embed_dim=64, depth=2, num_heads=4).build().eval()
    calls = []

    def fake_sample_tokens(cfg, label, **kwargs):
        calls.append(dict(cfg=cfg, label=label, **kwargs))
        return case["tokens"]

    monkeypatch.setattr(model, "sample_tokens", fake_sample_tokens)
    vae = _RecordingVAE(post["images"])
    sampler = SamplerConfig(config["flow_upper_steps"], config["flow_lower_steps"], cfg=config["cfg"])
    gen = XARGenerator(model, vae, sampler, device="cpu")
    labels = torch.arange(96) // 50
    out = gen.generate(labels, list(range(96)))
    (call,) = calls
    assert {k: call[k] for k in config["other_kwargs"]} == config["other_kwargs"]
    assert torch.equal(call["label"], labels) and call["bsz"] == 96
    assert torch.equal(vae.seen[0], case["decode_in"])  # tokens / 0.2325, bit for bit
    assert np.array_equal(out.images, post["png_bgr_hwc"].numpy()[..., ::-1])  # the PNG holds RGB
    assert out.nfe_per_ar_step == (50, 38, 26, 15)


class _FakeGenerator:
    """Duck-typed XARGenerator for the metrics wiring: random-texture images, no model."""

    def __init__(self) -> None:
        self.model, self.device = torch.nn.Identity(), torch.device("cpu")

    def generate(self, labels: torch.Tensor, seeds: list[int]):
        from disa.evaluation import GeneratedBatch

        images = np.stack([np.random.default_rng(s).integers(0, 256, (32, 32, 3), dtype=np.uint8) for s in seeds])
        return GeneratedBatch(images=images, nfe_per_ar_step=(1,))


def test_evaluate_runs_the_metrics_on_the_samples(tmp_path):
    from disa.metrics import MetricsConfig, compute_fid_statistics

    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(10):
        Image.fromarray(np.random.default_rng(100 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            ref / f"{i}.png")
    stats_cfg = MetricsConfig(extractor="effnet-lite0", reference_images=ref, isc=False, num_workers=0)
    compute_fid_statistics(ref, stats_cfg).save(tmp_path / "stats.npz")
    metrics = MetricsConfig(extractor="effnet-lite0", fid_stats=tmp_path / "stats.npz", num_workers=0)
    config = EvalConfig(sample_dir=tmp_path / "samples", num_images=10, batch_size=5, progress=False)
    res = evaluate(_FakeGenerator(), config, ClassBalancedLabels(10, 2), model_config={"fake": True},
                   metrics=metrics)
    assert set(res["metrics"]) == {"FD_EffNet-Lite0", "IS_EffNet-Lite0", "IS_std_EffNet-Lite0"}
    assert res["metrics"]["FD_EffNet-Lite0"] > 0
    assert results(tmp_path / "samples")["metrics"] == res["metrics"]


# ---------------------------------------------------------------------------------------------- benchmark


@pytest.mark.parametrize("sampler", [
    # 5, 4, 3, 2 steps, guided: the official 2-step grid's last evaluation re-encodes the context
    SamplerConfig(5, 2, cfg=2.0),
    SamplerConfig(num_steps=2, official_short_grids=False),
])
def test_benchmark_flop_count_follows_sample_tokens(sampler):
    torch.manual_seed(0)
    config = ModelConfig(model="xar_base", class_num=4, embed_dim=32, depth=1, num_heads=2)
    model = config.build().eval()
    steps = dict(num_steps=sampler.num_steps) if sampler.original else dict(
        flow_upper_steps=sampler.flow_upper_steps, flow_lower_steps=sampler.flow_lower_steps)
    with FlopCounterMode(display=False) as counter:
        model.sample_tokens(sampler.cfg, torch.tensor([1, 2]), official_short_grids=sampler.official_short_grids,
                            **steps)
    # Same network calls: identical counts on the CPU (whose fused attention kernel the counter does not see) ...
    assert sampling_flops(model, sampler, 2) == counter.get_total_flops()
    # ... and on meta the attention matmuls come on top: QK^T and AV over cache + input keys, 2 FLOPs per
    # multiply-add, 2B rows, width 32 (heads x head_dim), in each of the 2 blocks (encoder + decoder depth 1).
    attention, cell = 0, model.cell_len
    for plan in sampler.plan(model):
        s = plan.ar_step
        for i, tokens in enumerate(plan.tokens_per_eval):
            cache = max(cell * (s - 1), 0) if i == 0 else cell * s  # what the first evaluation leaves: cells < s
            attention += 2 * 2 * 4 * tokens * (cache + tokens) * 32
    meta = config.probe()
    assert sampling_flops(meta, sampler, 2) == counter.get_total_flops() + 2 * attention
    # Per-cell costs memoised from another plan compose to the same count (plans without the official 2-step path).
    memo: dict = {}
    sampling_flops(meta, SamplerConfig(num_steps=3), 2, memo=memo)
    assert sampling_flops(meta, sampler, 2, memo=memo) == sampling_flops(meta, sampler, 2)
