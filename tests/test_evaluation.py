"""The shared generation loop (disa.evaluation) and the distributed helpers, on the CPU.

The toy model of ``_toy_eval.py`` draws its noise through PerImageNoise and colours by label; the torchrun runs use
gloo with 2 ranks. Reference = one in-process run with another batch size.
"""
from __future__ import annotations

import argparse
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

import _toy_eval
from disa import distributed as dist_utils
from disa.evaluation import (
    MANIFEST_NAME,
    RESULTS_NAME,
    ClassBalancedLabels,
    EvalConfig,
    EvaluationError,
    GeneratedBatch,
    ImageGenerator,
    image_filename,
    image_seed,
    png_is_valid,
    run_evaluation,
    shard_batches,
    write_png,
)
from disa.vae import to_uint8, tokens_to_latent

TOY_SCRIPT = Path(_toy_eval.__file__).resolve()
N, CLASSES = 24, 4  # 24 images, 4 classes of 6


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_toy_ckpt(path: Path) -> None:
    """The official MAR layout: raw weights, different EMA weights, and the pickled command line."""
    gen = torch.Generator().manual_seed(0)
    raw = {"class_color.weight": torch.randn(CLASSES, 3, generator=gen) * 0.5, "gain": torch.ones(3)}
    ema = {k: v * 0.9 + 0.05 for k, v in raw.items()}
    torch.save({"model": raw, "model_ema": ema, "epoch": 7, "args": argparse.Namespace(model="toy", lr=1e-4)}, path)


def _toy(ckpt: Path, **hooks: Any) -> _toy_eval.ToyGenerator:
    from disa.checkpoints import load_checkpoint, load_state_dict_strict

    model = _toy_eval.ToyGenerator(num_classes=CLASSES)
    load_state_dict_strict(model, load_checkpoint(ckpt))
    for name, value in hooks.items():
        setattr(model, name, value)
    return model


def _run_inprocess(ckpt: Path, sample_dir: Path, *, batch_size: int = 3, model: Any = None, **cfg: Any) -> dict:
    """What the toy script does, in this process (no process group: a single rank)."""
    model = model if model is not None else _toy(ckpt)
    config = EvalConfig(sample_dir=sample_dir, num_images=N, batch_size=batch_size, progress=False, **cfg)
    return run_evaluation(
        model, config, conditions=ClassBalancedLabels(N, CLASSES),
        model_config={"model": "toy", "num_classes": CLASSES}, metrics_fn=_toy_eval.pixel_sums,
    )


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(TOY_SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _logged_ids(log_dir: Path, seed: int = 0) -> list[int]:
    seeds = [int(line) for f in sorted(log_dir.glob("*.log")) for line in f.read_text().split()]
    return [s - image_seed(seed, 0, N) for s in seeds]


def _results(folder: Path) -> dict:
    return json.loads((folder / RESULTS_NAME).read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "toy.pth"
    _write_toy_ckpt(path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 3, with the npz: the image set every other run must reproduce byte for byte."""
    folder = tmp_path_factory.mktemp("ref") / "toy-image24"
    _run_inprocess(ckpt, folder, save_npz=True)
    return folder


# ---------------------------------------------------------------------------------------------- golden protocol


def _run_lengths(labels: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for label in labels:
        if out and out[-1][0] == label:
            out[-1][1] += 1
        else:
            out.append([label, 1])
    return out


@pytest.mark.parametrize("family", ["flowar", "xar"])
def test_official_label_assignment_and_saved_ids(golden: Any, family: str) -> None:
    """labels[rank][batch] and saved ids of the official engine, for the README 50k/256/4-rank run and a padded one."""
    configs = golden(f"{family}/eval_protocol.json")["configs"]
    assert len(configs) == 2
    for c in configs:
        n, bs, ws = c["num_images"], c["batch_size"], c["world_size"]
        labels = ClassBalancedLabels(n, 1000)
        padded = range(c["num_batches_per_rank"] * ws * bs)  # the official global list, zero-padded
        pairs = set()
        for r in range(ws):
            official = shard_batches(padded, bs, ws, r)
            assert len(official) == c["num_batches_per_rank"]
            for i, ids in enumerate(official):
                assert _run_lengths(labels(ids).tolist()) == c["labels"][r][i], (family, n, r, i)
                saved = [k for k in ids if k < n]
                assert [saved[0] if saved else None, len(saved)] == c["saved_ids"][r][i], (family, n, r, i)
                pairs |= {(k, int(lab)) for k, lab in zip(saved, labels(saved))}
            # The loop shards the ids it has to generate with the same function: a fresh run gives every rank the
            # official batches, minus the padding (no batch wholly beyond num_images, the last one short).
            plan = shard_batches(range(n), bs, ws, r)
            expected = [[first + j for j in range(count)] for first, count in c["saved_ids"][r] if count]
            assert plan == expected
        # every image written once, with the class the official run gives it
        assert sorted(pairs) == [(k, k // (n // 1000)) for k in range(n)]


@pytest.mark.parametrize("family", ["flowar", "xar"])
def test_official_decode_scaling_and_png_pixels(golden: Any, family: str, tmp_path: Path) -> None:
    """decode input = tokens / 0.2325; PNG on disk = the official uint8 array with BGR flipped back to RGB."""
    data = golden(f"{family}/eval_protocol.pt")
    for case in data["decode_cases"]:
        assert torch.equal(tokens_to_latent(case["tokens"]), case["decode_in"])
    for case in data["postprocess_cases"]:
        ids = shard_batches(range(10**6), len(case["file_names"]), 4, case["rank"])[case["batch"]]
        names = [image_filename(k) for k in ids]
        assert names == case["file_names"]
        for name, image, bgr in zip(names, to_uint8(case["images"]), case["png_bgr_hwc"].numpy()):
            write_png(tmp_path / name, image)
            with Image.open(tmp_path / name) as im:
                assert im.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(im), bgr[..., ::-1])


# ---------------------------------------------------------------------------------------------- world-size invariance


@pytest.fixture(scope="module")
def two_rank_run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("two")
    (root / "logs").mkdir()
    folder = root / "toy-image24"
    done = _torchrun("--ckpt", str(ckpt), "--sample_dir", str(folder), "--num_images", str(N), "--batch_size", "2",
                     "--npz", "--log_dir", str(root / "logs"), "--selftest_out", str(root / "selftest.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder, "logs": root / "logs", "selftest": json.loads((root / "selftest.json").read_text())}


def test_two_ranks_and_one_process_write_identical_images(reference: Path, two_rank_run: dict[str, Any]) -> None:
    folder = two_rank_run["folder"]
    ref, got = _pngs(reference), _pngs(folder)
    assert list(ref) == [image_filename(k) for k in range(N)]
    assert got == ref  # same names, same bytes (batch 3 on 1 rank vs batch 2 on 2 ranks)
    ref_npz, got_npz = np.load(f"{reference}.npz"), np.load(f"{folder}.npz")
    assert ref_npz["arr_0"].shape == (N, 8, 8, 3) and ref_npz["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(got_npz["arr_0"], ref_npz["arr_0"])
    with Image.open(reference / "00005.png") as im:
        np.testing.assert_array_equal(ref_npz["arr_0"][5], np.asarray(im))
    # each image generated exactly once across the two ranks
    assert sorted(_logged_ids(two_rank_run["logs"])) == list(range(N))

    one, two = _results(reference), _results(folder)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["environment"]["backend"] == "gloo"
    assert one["metrics"] == two["metrics"]  # the metric shards its work over the ranks and reduces
    assert two["metrics"]["num_images"] == N and two["metrics"]["pixel_sum"] > 0
    for res in (one, two):
        assert res["nfe"] == {"per_ar_step": [4, 3, 2], "ar_steps": 3, "per_image": 9}
        assert res["images"]["generated_this_run"] == N and res["images"]["reused"] == 0
        assert res["timing"]["sec_per_image"] > 0 and res["timing"]["images_per_second"] > 0
    # 24 images in batches of 2 on 2 ranks: 6 batches each, the first untimed
    assert len(two["timing"]["sec_per_image_per_rank"]) == 2 and two["timing"]["timed_images"] == 20
    assert one["timing"]["timed_images"] == N - 3
    assert two["config"]["eval"]["batch_size"] == 2 and two["config"]["model"] == {"model": "toy", "num_classes": 4}
    assert two["git"]["commit"] is None or len(two["git"]["commit"]) == 40


def test_collective_helpers_under_torchrun(two_rank_run: dict[str, Any]) -> None:
    # rank r contributed r + 1 rows of value r: uneven all_gather, then a float64 sum of 0.5 + 1.5
    assert two_rank_run["selftest"] == {"gathered": [0.0, 1.0, 1.0], "summed": [2.0]}


def test_images_depend_on_their_seed_and_label_only(ckpt: Path, reference: Path) -> None:
    model = _toy(ckpt)
    labels = ClassBalancedLabels(N, CLASSES)
    for k in (0, 7, 23):  # alone in a batch of one: same pixels as in the batch of three
        out = model.generate(labels([k]), [image_seed(0, k, N)])
        with Image.open(reference / image_filename(k)) as im:
            np.testing.assert_array_equal(out.images[0], np.asarray(im))
    seeds = [image_seed(0, 5, N), image_seed(1, 5, N), image_seed(0, 5, N)]
    a = model.generate(torch.tensor([1, 1, 2]), seeds).images
    assert not np.array_equal(a[0], a[1])  # another seed, another image
    assert not np.array_equal(a[0], a[2])  # another label, another image
    # different base seeds share no image seed; all stay within torch's 32-bit seed range
    assert len({image_seed(s, k, N) for s in range(3) for k in range(N)}) == 3 * N
    assert image_seed(2**32 // N - 1, N - 1, N) < 2**32
    with pytest.raises(ValueError, match=r"\(seed \+ 1\) \* num_images <= 2\*\*32"):
        image_seed(2**32 // N, 0, N)


# ---------------------------------------------------------------------------------------------- resume


def test_killed_torchrun_resumes_to_the_identical_set(ckpt: Path, reference: Path, tmp_path: Path) -> None:
    folder, log1, log2 = tmp_path / "toy-image24", tmp_path / "log1", tmp_path / "log2"
    log1.mkdir(), log2.mkdir()
    common = ["--ckpt", str(ckpt), "--sample_dir", str(folder), "--num_images", str(N), "--batch_size", "2"]
    # rank 1 SIGKILLs itself in its 3rd batch, like a pre-empted job; torchrun then stops rank 0
    crashed = _torchrun(*common, "--log_dir", str(log1), "--stop_after", "5", "--stop_rank", "1", "--stop_how", "kill")
    assert crashed.returncode != 0
    assert "SIGKILL" in crashed.stderr
    after_crash = _pngs(folder)
    assert 0 < len(after_crash) < N
    assert all(after_crash[name] == data for name, data in _pngs(reference).items() if name in after_crash)

    resumed = _torchrun(*common, "--log_dir", str(log2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _pngs(folder) == _pngs(reference)
    missing = sorted(k for k in range(N) if image_filename(k) not in after_crash)
    assert sorted(_logged_ids(log2)) == missing  # only the lost images, each once
    res = _results(folder)
    assert res["images"]["reused"] == len(after_crash) and res["images"]["generated_this_run"] == len(missing)
    assert not list(folder.glob("*.tmp"))


def test_crash_midway_in_process_then_resume(ckpt: Path, reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "toy-image24"
    crashing = _toy(ckpt, stop_after=10, log_path=tmp_path / "first.log")
    with pytest.raises(RuntimeError, match="toy crash after 12 images"):
        _run_inprocess(ckpt, folder, batch_size=4, model=crashing)
    first = _pngs(folder)
    assert list(first) == [image_filename(k) for k in range(8)]  # two full batches of 4 written, the third lost
    assert not (folder / RESULTS_NAME).exists()

    second = _toy(ckpt, log_path=tmp_path / "second.log")
    res = _run_inprocess(ckpt, folder, batch_size=5, model=second)
    assert _pngs(folder) == _pngs(reference)
    seeds = [int(s) for s in (tmp_path / "second.log").read_text().split()]
    assert seeds == [image_seed(0, k, N) for k in range(8, N)]
    assert res["images"]["reused"] == 8 and res["images"]["generated_this_run"] == N - 8

    # nothing left to do: no generation, no timing, results rewritten with the metrics
    again = _run_inprocess(ckpt, folder, model=_toy(ckpt, stop_after=0))  # would crash if asked to generate
    assert again["images"]["generated_this_run"] == 0 and again["timing"]["sec_per_image"] is None
    assert again["nfe"]["per_ar_step"] is None
    assert _results(folder)["metrics"] == _results(reference)["metrics"]


def test_corrupted_and_partial_pngs_are_regenerated(ckpt: Path, reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    data = (folder / "00005.png").read_bytes()
    (folder / "00005.png").write_bytes(data[: len(data) // 2])  # partial write
    (folder / "00007.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # garbage after the signature
    flipped = bytearray((folder / "00011.png").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one corrupted byte inside the image data
    (folder / "00011.png").write_bytes(bytes(flipped))
    (folder / "00010.png").unlink()
    (folder / "00009.png.tmp").write_bytes(b"half")  # a crash between write and rename
    assert not any(png_is_valid(folder / f"000{k:02d}.png") for k in (5, 7, 11))
    assert png_is_valid(folder / "00004.png")

    model = _toy(ckpt, log_path=tmp_path / "regen.log")
    res = _run_inprocess(ckpt, folder, model=model)
    assert res["images"]["regenerated_corrupt"] == [5, 7, 11]
    regenerated = sorted(int(s) - image_seed(0, 0, N) for s in (tmp_path / "regen.log").read_text().split())
    assert regenerated == [5, 7, 10, 11]
    assert _pngs(folder) == _pngs(reference)
    assert not list(folder.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- bad input


def test_unwritable_output_folder_is_a_clear_error(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("keep me")
    with pytest.raises(EvaluationError, match=r"cannot write samples to .*not_a_folder.*writable output folder"):
        _run_inprocess(ckpt, blocker / "samples")
    # the CLI shape: message on stderr, exit status 1, nothing touched
    with pytest.raises(SystemExit) as exit_info:
        _toy_eval.main(["--ckpt", str(ckpt), "--sample_dir", str(blocker / "samples")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot write samples to" in err and "Traceback" not in err
    assert blocker.read_text() == "keep me"


def test_cli_missing_checkpoint_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _toy_eval.main(["--ckpt", str(tmp_path / "nowhere.pth"), "--sample_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: checkpoint not found" in err and str(tmp_path / "nowhere.pth") in err
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_resume_refuses_images_of_other_settings(ckpt: Path, reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    before = _pngs(folder)
    with pytest.raises(EvaluationError, match=r"seed: folder has 0, this run 1[\s\S]*nothing was overwritten"):
        _run_inprocess(ckpt, folder, seed=1)
    with pytest.raises(EvaluationError, match="resume is off"):
        _run_inprocess(ckpt, folder, resume=False)
    (folder / MANIFEST_NAME).unlink()  # e.g. a folder written by the official code
    with pytest.raises(EvaluationError, match=f"no {MANIFEST_NAME}"):
        _run_inprocess(ckpt, folder)
    shutil.copy(folder / "00000.png", folder / "050000.png")  # an id outside 0..N-1
    with pytest.raises(EvaluationError, match=r"1 PNG file\(s\) that are not images 0\.\.23"):
        _run_inprocess(ckpt, folder)
    (folder / "050000.png").unlink()
    assert _pngs(folder) == before


def test_bad_model_output_is_named(tmp_path: Path) -> None:
    class Wrong:
        def __init__(self, make: Any) -> None:
            self.make = make

        def generate(self, conditions: torch.Tensor, seeds: list[int]) -> Any:
            return self.make(len(seeds))

    cases = [
        (lambda b: np.zeros((b, 4, 4, 3), np.uint8), "returned ndarray; it must return a .*GeneratedBatch"),
        (lambda b: GeneratedBatch(np.zeros((b, 4, 4, 3), np.float32)), r"uint8 array \(2, H, W, 3\).*float32"),
        (lambda b: GeneratedBatch(np.zeros((b + 1, 4, 4, 3), np.uint8)), r"got uint8 \(3, 4, 4, 3\)"),
        (lambda b: GeneratedBatch(np.zeros((b, 3, 4, 4), np.uint8)), r"\(2, H, W, 3\)"),
        (lambda b: GeneratedBatch(np.zeros((b, 4, 4, 3), np.uint8), (3, -1)), "non-negative integers"),
    ]
    for i, (make, message) in enumerate(cases):
        cfg = EvalConfig(sample_dir=tmp_path / f"s{i}", num_images=4, batch_size=2, progress=False)
        with pytest.raises(EvaluationError, match=message):
            run_evaluation(Wrong(make), cfg, conditions=ClassBalancedLabels(4, 2))
        assert not list((tmp_path / f"s{i}").glob("*.png"))
    assert isinstance(Wrong(None), ImageGenerator)


def test_config_validation_says_what_is_allowed(tmp_path: Path) -> None:
    bad = [
        ({"num_images": 0}, r"num_images must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be an integer >= 1"),
        ({"batch_size": True}, r"batch_size must be an integer >= 1"),
        ({"seed": -1}, r"seed must be an integer in \[0, 85899\) for num_images=50000"),
        ({"seed": 85899}, r"seed must be an integer in \[0, 85899\)"),
        ({"warmup_batches": -1}, r"warmup_batches must be an integer >= 0"),
        ({"resume": "yes"}, r"resume must be True or False"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            EvalConfig(sample_dir=tmp_path / "s", **kwargs)
    with pytest.raises(ValueError, match="must name a folder"):
        EvalConfig(sample_dir=Path("."))
    with pytest.raises(ValueError, match="num_images=1001 is not a multiple of num_classes=1000"):
        ClassBalancedLabels(1001, 1000)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_batches(range(10), 2, 2, 2)
    assert EvalConfig(sample_dir=str(tmp_path / "s")).sample_dir == tmp_path / "s"


def test_metrics_must_be_json_and_npz_without_pngs(ckpt: Path, reference: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(sample_dir=tmp_path / "a", num_images=N, batch_size=6, progress=False)
    with pytest.raises(EvaluationError, match="metrics_fn returned a value that is not a JSON-able dict"):
        run_evaluation(_toy(ckpt), cfg, conditions=ClassBalancedLabels(N, CLASSES),
                       model_config={"model": "toy", "num_classes": CLASSES}, metrics_fn=lambda p: {"x": object()})
    assert _results(tmp_path / "a")["metrics"] is None  # timing was written before the metrics ran
    assert _results(tmp_path / "a")["timing"]["timed_images"] == N - 6

    res = _run_inprocess(ckpt, tmp_path / "b", save_npz=True, keep_pngs=False)
    assert not list((tmp_path / "b").glob("*.png")) and res["images"]["pngs_kept"] is False
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["arr_0"], np.load(f"{reference}.npz")["arr_0"])
    assert _results(tmp_path / "b")["metrics"] == _results(reference)["metrics"]  # computed before the deletion


# ---------------------------------------------------------------------------------------------- distributed helpers


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = dist_utils.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    assert not dist_utils.is_distributed() and dist_utils.get_world_size() == 1
    t = torch.arange(3.0)
    assert dist_utils.all_reduce(t) is t and torch.equal(dist_utils.all_gather_tensor(t), t)
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}] and dist_utils.broadcast_object(5) == 5
    assert dist_utils.run_on_main(lambda: 42) == 42
    with pytest.raises(ValueError, match="unknown reduce op 'mean'"):
        dist_utils.all_reduce(t, op="mean")  # type: ignore[arg-type]
    dist_utils.barrier()
    dist_utils.synchronize("cpu")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is outside \[0, WORLD_SIZE=2\)"):
        dist_utils.init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        dist_utils.init_distributed(device="cpu")
