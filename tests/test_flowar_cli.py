"""FlowAR command lines end to end (CPU, gloo): the official DiSA README commands and the original-sampler command
under ``torchrun --nproc_per_node=2`` with tiny checkpoints made here, training on a tiny ImageFolder, and bad input.

The README commands run as written except for the paths and flags appended at the end (argparse keeps the last
value): a few images (``--num_images``, ``--eval_bsz``, ``--class_num 4`` so that they stay class-balanced), the
tiny sizes (``--embed_dim 64 --depth 1 --num_heads 4`` for the AR transformer, ``--diffloss_d 1 --diffloss_w 64``
for the flow head, ``--vae_ch 32`` for the VAE), and ``--no_metrics`` or a tiny metrics setup (the offline
EfficientNet-Lite0 extractor against statistics written here; the Inception weights are not available offline).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from disa.evaluation import RESULTS_NAME, image_seed
from disa.metrics import FidStatistics
from disa.noise import PerImageNoise
from disa.vae import AutoencoderKL, load_vae, to_uint8, tokens_to_latent
from flowar_disa import eval as flowar_eval
from flowar_disa import main_flowar
from flowar_disa.engine_flowar import ModelConfig, SamplerConfig, describe_checkpoint
from flowar_disa.models import FlowAR

REPO = Path(__file__).resolve().parents[1]
FLOWAR_DIR = REPO / "FlowAR_DiSA"

# The FlowAR commands of the official DiSA README (§3.2), and the original FlowAR README's FlowAR-S evaluation and
# training commands, verbatim (line continuations joined).
DISA_README = {
    "S": "torchrun --nproc_per_node=4 eval.py --model flowar_small --diffloss_d 2 --diffloss_w 1024 --eval_bsz 256 "
         "--num_images 50000 --flow_upper_steps 25 --flow_lower_steps 15 --cfg 4.2 --guidance 0.9 "
         "--output_dir /path/to/output_dir --resume /path/to/FlowAR-S.pth --vae_path /path/to/MAR/kl16.ckpt "
         "--data_path /path/to/imagenet1k/ --evaluate",
    "L": "torchrun --nproc_per_node=4 eval.py --model flowar_large --diffloss_d 12 --diffloss_w 1024 --eval_bsz 256 "
         "--num_images 50000 --flow_upper_steps 25 --flow_lower_steps 15 --cfg 2.4 --guidance 0.9 "
         "--output_dir /path/to/output_dir --resume /path/to/FlowAR-L.pth --vae_path /path/to/MAR/kl16.ckpt "
         "--data_path /path/to/imagenet1k/ --evaluate",
    "H": "torchrun --nproc_per_node=4 eval.py --model flowar_huge --diffloss_d 12 --diffloss_w 1536 --eval_bsz 256 "
         "--num_images 50000 --flow_upper_steps 50 --flow_lower_steps 15 --cfg 2.4 --guidance 0.7 "
         "--output_dir /path/to/output_dir --resume /path/to/FlowAR-H.pth --vae_path /path/to/MAR/kl16.ckpt "
         "--data_path /path/to/imagenet1k/ --evaluate",
}
ORIGINAL_README_S = (
    "torchrun --nproc_per_node=8 eval.py --model flowar_small --diffloss_d 2 --diffloss_w 1024 --eval_bsz 256 "
    "--num_images 50000 --num_step 25 --cfg 4.3 --guidance 0.9 --output_dir /path/to/output_dir "
    "--resume /path/to/FlowAR-S.pth --vae_path /path/to/MAR/kl16.ckpt --data_path /path/to/imagenet1k/ --evaluate"
)
TRAIN_README_S = (
    "torchrun --nproc_per_node=8 --nnodes=4 --node_rank=$WORKER_ID --master_addr=$WORKER_0_HOST "
    "--master_port=$WORKER_0_PORT main_flowar.py --img_size 256 --vae_path /path/to/MAR/vae/kl16.ckpt "
    "--vae_embed_dim 16 --vae_stride 16 --patch_size 1 --model flowar_small --diffloss_d 2 --diffloss_w 1024 "
    "--epochs 400 --warmup_epochs 100 --batch_size 64 --blr 5e-5 --output_dir ./output_dir/ --resume ./output_dir/ "
    "--data_path /path/to/imagenet/ --cached_path /path/to/imagenet_feature/"
)
MODEL_OF = {"S": "flowar_small", "L": "flowar_large", "H": "flowar_huge"}

CLASSES = 4
TINY_AR = dict(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=1,
               decoder_num_heads=4, diffloss_d=1, diffloss_w=64, class_num=CLASSES)
TINY_FLAGS = ["--embed_dim", "64", "--depth", "1", "--num_heads", "4", "--diffloss_d", "1", "--diffloss_w", "64",
              "--vae_ch", "32", "--class_num", str(CLASSES), "--no_progress"]
TINY_VAE_CH = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # One thread per process everywhere, so that 1-process and 2-process runs use the same CPU kernels.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _as_torchrun(command: str, paths: dict[str, str], extra: list[str], *, script_dir: bool) -> list[str]:
    """The README command with our launcher (2 gloo processes), our paths, and ``extra`` appended. ``script_dir``:
    run the script file as the README does (``cd FlowAR_DiSA``); otherwise as ``-m flowar_disa.<script>``."""
    words = shlex.split(command)
    script = next(w for w in words if w.endswith(".py"))
    args = [paths.get(w, w) for w in words[words.index(script) + 1:]]
    target = [script] if script_dir else ["-m", f"flowar_disa.{script[:-3]}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
            *target, *args, *extra]


def _run(cmd: list[str], *, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert done.returncode == 0, (
        f"{shlex.join(cmd)}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            assert im.mode == "RGB"
            out[p.name] = np.asarray(im)
    return out


def _results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RESULTS_NAME).read_text())


def _tiny_flowar(cross: bool, seed: int) -> FlowAR:
    """A tiny FlowAR with every parameter random (the training init zeroes the AdaLN gates and the output layer,
    which would make the flow head predict 0 and hide most of the network)."""
    torch.manual_seed(seed)
    model = FlowAR(**TINY_AR, cross=cross)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny files in the official layouts: flat FlowAR state dicts (v1 head as S, v2 as L/H), a KL-16-shaped VAE
    ``{"model": state_dict}`` with encoder, FID statistics for the offline extractor, and a 4-class ImageFolder."""
    root = tmp_path_factory.mktemp("flowar_files")
    out = {"root": root}
    for name, cross, seed in (("S", False, 1), ("L", True, 2), ("H", True, 3)):
        out[name] = root / f"FlowAR-{name}.pth"
        torch.save(_tiny_flowar(cross, seed).state_dict(), out[name])
    torch.manual_seed(4)
    out["vae"] = root / "kl16.ckpt"
    torch.save({"model": AutoencoderKL(ch=TINY_VAE_CH).state_dict()}, out["vae"])
    out["stats"] = root / "tiny_stats.npz"  # a Gaussian reference: FD is a real distance to it, not a FID
    FidStatistics(np.zeros(1280), np.eye(1280)).save(out["stats"])
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for c, colour in enumerate(colours):
        folder = root / "imagenet" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (48, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flowar_out")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Run ``eval.py`` / ``main_flowar.py`` in this process: ``cli(module, *argv) -> (exit status, stderr)``. The
    CLIs configure the root logger and training seeds the global RNGs; both are restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def call(module: Any, *argv: str) -> tuple[int, str]:
        try:
            status = module.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
        return status, capsys.readouterr().err

    yield call
    root.handlers[:] = handlers
    root.setLevel(level)
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)


def _paths(files: dict[str, Path], size: str, out_dir: Path) -> dict[str, str]:
    return {"/path/to/output_dir": str(out_dir), f"/path/to/FlowAR-{size}.pth": str(files[size]),
            "/path/to/MAR/kl16.ckpt": str(files["vae"])}


@pytest.fixture(scope="module")
def disa_runs(files: dict[str, Path], out_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """The three DiSA README commands under torchrun (2 processes). S runs as written from FlowAR_DiSA/ (script
    file) with metrics; L and H as ``-m flowar_disa.eval`` without."""
    runs = {}
    metrics = ["--metrics_extractor", "effnet-lite0", "--fid_stats", str(files["stats"])]
    for size, command in DISA_README.items():
        as_script = size == "S"
        extra = ["--num_images", "12" if as_script else "8", "--eval_bsz", "2", *TINY_FLAGS,
                 *(metrics if as_script else ["--no_metrics"])]
        cmd = _as_torchrun(command, _paths(files, size, out_dir), extra, script_dir=as_script)
        runs[size] = _run(cmd, cwd=FLOWAR_DIR if as_script else REPO)
    return runs


# ---------------------------------------------------------------------------------------------- README commands

FOLDERS = {"S": "steps25-to-15-cfg4.2-image12_evaluate", "L": "steps25-to-15-cfg2.4-image8_evaluate",
           "H": "steps50-to-15-cfg2.4-image8_evaluate"}
NFE = {"S": [24, 22, 20, 16, 14], "L": [24, 22, 20, 16, 14], "H": [50, 40, 32, 22, 14]}


@pytest.mark.parametrize("size", ["S", "L", "H"])
def test_disa_readme_commands_write_images_and_results(disa_runs: dict, out_dir: Path, size: str) -> None:
    """Official folder name, every image once (RGB 256 x 256), results.json with the DiSA flow-step plan."""
    folder = out_dir / FOLDERS[size]
    n = 12 if size == "S" else 8
    pixels = _pixels(folder)
    assert sorted(pixels) == [f"{k:05d}.png" for k in range(n)]
    assert all(p.shape == (256, 256, 3) for p in pixels.values())
    assert len({p.tobytes() for p in pixels.values()}) == n  # every image its own noise
    results = _results(folder)
    assert results["world_size"] == 2
    assert results["nfe"]["per_ar_step"] == NFE[size] and results["nfe"]["per_image"] == sum(NFE[size])
    assert results["config"]["model"]["model"]["model"] == MODEL_OF[size]
    assert results["config"]["model"]["sampler"]["cfg"] == {"S": 4.2, "L": 2.4, "H": 2.4}[size]
    assert results["timing"]["sec_per_image"] > 0
    assert "flow-head calls per AR step (scale): " + str(NFE[size]) in disa_runs[size].stdout


def test_metrics_run_on_both_ranks_with_the_offline_extractor(disa_runs: dict, out_dir: Path) -> None:
    metrics = _results(out_dir / FOLDERS["S"])["metrics"]
    assert set(metrics) == {"FD_EffNet-Lite0", "IS_EffNet-Lite0", "IS_std_EffNet-Lite0"}
    assert metrics["FD_EffNet-Lite0"] > 0 and metrics["IS_EffNet-Lite0"] >= 1.0
    assert "metrics: FD_EffNet-Lite0" in disa_runs["S"].stdout


def test_cli_images_are_the_model_api_images_in_one_process(disa_runs: dict, files: dict[str, Path],
                                                            out_dir: Path) -> None:
    """The adapter's wiring, and 1 process = 2 processes: image k of the two-process H run equals, byte for byte,
    the decoded ``sample_tokens`` of class k // (N / classes) computed here in one process, with noise from seed
    ``seed * N + k`` and the command's steps (50 -> 15), cfg (2.4) and guidance (0.7), in the same batches of 2."""
    model = FlowAR(**TINY_AR, cross=True, use_checkpoint=True)
    model.load_state_dict(torch.load(files["H"], weights_only=True))
    vae = load_vae(files["vae"], decoder_only=True, ch=TINY_VAE_CH)
    n = 8
    written = _pixels(out_dir / FOLDERS["H"])
    for ids in ([0, 1], [2, 3], [4, 5], [6, 7]):
        labels = torch.tensor([k // (n // CLASSES) for k in ids])
        noise = PerImageNoise([image_seed(1, k, n) for k in ids])
        tokens = model.eval().sample_tokens(50, 15, 0.7, 2.4, labels, noise=noise)
        with torch.no_grad():
            expected = to_uint8(vae.decode(tokens_to_latent(tokens)))
        for k, image in zip(ids, expected):
            np.testing.assert_array_equal(written[f"{k:05d}.png"], image, err_msg=f"image {k}")


def test_original_sampler_command(files: dict[str, Path], out_dir: Path) -> None:
    """The original FlowAR README command (--num_step 25 at every scale, cfg 4.3) under torchrun."""
    cmd = _as_torchrun(ORIGINAL_README_S, _paths(files, "S", out_dir),
                       ["--num_images", "8", "--eval_bsz", "4", *TINY_FLAGS, "--no_metrics"], script_dir=False)
    _run(cmd)
    folder = out_dir / "ariter25cfg4.3-image8_evaluate"  # the original FlowAR's folder name
    assert sorted(_pixels(folder)) == [f"{k:05d}.png" for k in range(8)]
    results = _results(folder)
    assert results["nfe"]["per_ar_step"] == [24] * 5
    assert results["config"]["model"]["sampler"]["num_step"] == 25


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README FlowAR-S training command under torchrun on 8 tiny images: 8 epochs of 2 steps (batch 2 per
    process), lr 1e-3 without warm-up, online evaluation at the first and last epoch."""
    out = tmp_path_factory.mktemp("train")
    paths = {"/path/to/MAR/vae/kl16.ckpt": str(files["vae"]), "./output_dir/": str(out),
             "/path/to/imagenet/": str(files["root"] / "imagenet")}
    extra = ["--epochs", "8", "--warmup_epochs", "0", "--batch_size", "2", "--lr", "1e-3", "--num_workers", "0",
             "--online_eval", "--eval_freq", "100", "--num_images", "4", "--eval_bsz", "2", "--cfg", "2.0",
             *TINY_FLAGS, "--no_metrics"]
    done = _run(_as_torchrun(TRAIN_README_S, paths, extra, script_dir=True), cwd=FLOWAR_DIR)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return {"out": out, "log": log, "stdout": done.stdout}


def test_training_steps_reduce_the_loss(trained: dict[str, Any]) -> None:
    log = trained["log"]
    assert [r["epoch"] for r in log] == list(range(8)) and all(r["train_steps"] == 2 for r in log)
    losses = [r["train_loss"] for r in log]
    assert all(np.isfinite(losses))
    # measured: epoch 0 1.393, epochs 5-7 1.160 / 1.180 / 1.191 (mean 0.845 x the first); each epoch's loss is
    # noisy (2 steps of 2 images, random flow times), hence the mean of the last three
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    assert "epoch 7: loss" in trained["stdout"]


def test_training_writes_official_checkpoints_and_online_evaluations(trained: dict[str, Any]) -> None:
    out = trained["out"]
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint-0.pth", "checkpoint-7.pth",
                                                        "checkpoint-last.pth"]
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "model_ema", "optimizer", "epoch", "scaler", "args"} and ckpt["epoch"] == 7
    assert set(ckpt["model"]) == set(ckpt["model_ema"]) and "flownet.input_proj.weight" in ckpt["model_ema"]
    assert not torch.equal(ckpt["model"]["z_proj.weight"], ckpt["model_ema"]["z_proj.weight"])
    # upstream's online evaluation: cfg 1.0 and --cfg, at the first and the last epoch
    for epoch in (0, 7):
        for cfg in ("1.0", "2.0"):
            folder = out / f"ariter25cfg{cfg}-image4-epoch{epoch}"
            assert sorted(_pixels(folder)) == [f"{k:05d}.png" for k in range(4)]
    assert set(trained["log"][7]["online_eval"]) == {"cfg1.0", "cfg2.0"}


def test_training_checkpoint_loads_for_evaluation_and_resumes(trained: dict[str, Any], files: dict[str, Path],
                                                              tmp_path: Path, cli: Any) -> None:
    """eval.py evaluates checkpoint-last.pth (its EMA weights); main_flowar.py resumes it for one more epoch (both
    in this process: no torchrun)."""
    status, err = cli(flowar_eval, "--model", "flowar_small", "--resume", str(trained["out"] / "checkpoint-last.pth"),
                      "--vae_path", str(files["vae"]), "--output_dir", str(tmp_path), "--flow_upper_steps", "10",
                      "--flow_lower_steps", "4", "--cfg", "3.0", "--num_images", "4", "--eval_bsz", "4", *TINY_FLAGS,
                      "--no_metrics")
    assert status == 0, err
    results = _results(tmp_path / "steps10-to-4-cfg3.0-image4")
    assert results["nfe"]["per_ar_step"] == [10, 8, 6, 4, 4]  # official grid: odd counts lose a step
    assert len(_pixels(tmp_path / "steps10-to-4-cfg3.0-image4")) == 4
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    status, err = cli(main_flowar, "--model", "flowar_small", "--resume", str(out), "--output_dir", str(out),
                      "--vae_path", str(files["vae"]), "--data_path", str(files["root"] / "imagenet"), "--epochs",
                      "9", "--warmup_epochs", "0", "--batch_size", "4", "--lr", "1e-3", "--num_workers", "0",
                      *TINY_FLAGS)
    assert status == 0, err
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [*range(8), 8]
    assert torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)["epoch"] == 8


# ---------------------------------------------------------------------------------------------- bad input


def _eval_args(files: dict[str, Path], out: Path, size: str = "S", *extra: str) -> list[str]:
    return ["--model", MODEL_OF[size], "--resume", str(files[size]), "--vae_path", str(files["vae"]),
            "--output_dir", str(out), "--num_images", "4", "--eval_bsz", "2", *TINY_FLAGS, "--no_metrics", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--flow_upper_steps", "10", "--flow_lower_steps", "20"], "flow_lower_steps (20) must be <= flow_upper_steps"),
    (["--num_step", "25", "--flow_upper_steps", "25"], "use either --num_step"),
    (["--flow_upper_steps", "0"], "flow_upper_steps must be an integer >= 1"),
    (["--cfg", "nan"], "argument --cfg: expected a finite number"),
    (["--cfg", "-1"], "cfg must be a finite number >= 0"),
    (["--model", "flowar_xl"], "invalid choice: 'flowar_xl'"),
    (["--num_images", "6"], "num_images=6 is not a multiple of num_classes=4"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "mps"], "allowed are cuda, cuda:N and cpu"),
    (["--vae_ch", "20"], "--vae_ch must be a positive multiple of 32"),
    (["--img_size", "96"], "must be a power of two"),
    (["--embed_dim", "66"], "must be an integer head size divisible by 4"),
    (["--dist_on_itp"], "not supported; launch with torchrun"),
    (["--seed", "-1"], "EvalConfig.seed must be an integer in"),
    (["--cuda_graphs", "--device", "cpu"], "--cuda_graphs needs a CUDA device"),
])
def test_bad_flags_fail_at_parse_time(cli: Any, files: dict[str, Path], tmp_path: Path, extra: list[str],
                                      message: str) -> None:
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "S", *extra))
    assert status == 2 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_compile_head_flag_compiles_the_flow_head(cli: Any, files: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile_head`` hands the loaded model to compile_head before generating (real compilation is
    tested for equality in test_fast_paths.py); the images still come out."""
    calls = []
    monkeypatch.setattr(flowar_eval, "compile_head", lambda model, **kw: calls.append((type(model).__name__, kw)))
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "S", "--compile_head", "--device", "cpu"))
    assert status == 0, err
    assert calls == [("FlowAR", {"cuda_graphs": False})]
    assert len(list(tmp_path.rglob("*.png"))) == 4


def test_missing_or_mismatched_checkpoint_is_an_error(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    args = _eval_args(files, tmp_path)
    status, err = cli(flowar_eval, *[str(tmp_path / "nope.pth") if a == str(files["S"]) else a for a in args])
    assert status == 1 and "checkpoint not found" in err and "nope.pth" in err
    status, err = cli(flowar_eval, *args[:2], *args[4:])  # no --resume at all
    assert status == 2 and "--resume is required" in err
    # the v1 (FlowAR-S-like) file into a v2 model: cross-attention keys missing; the hint describes both
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "L", "--resume", str(files["S"])))
    assert status == 1 and "missing" in err and "crossattn" in err
    assert "The file holds: AR width 64, 1 + 1 blocks, 4 classes; flow head 1 x 64" in err and "type v1" in err
    # another head size (as the official default 12 x 1536 for FlowAR-S): names the released model's flags
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "S", "--diffloss_d", "2", "--diffloss_w", "128"))
    assert status == 1 and "missing" in err and "mis-shaped" in err and "flow head 2 x 128" in err
    assert "the released flowar_small uses --diffloss_d 2 --diffloss_w 1024" in err
    assert not list(tmp_path.rglob("*.png"))
    (tmp_path / "garbage.pth").write_bytes(b"<html>not found</html>")
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "S", "--resume", str(tmp_path / "garbage.pth")))
    assert status == 1 and "HTML" in err
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path, "S", "--vae_path", str(tmp_path / "none.ckpt")))
    assert status == 1 and "VAE checkpoint not found" in err


def test_checkpoint_with_corrupted_buffers_is_refused(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(files["S"], weights_only=True)
    state["mask"] = torch.zeros_like(state["mask"])  # right keys and shapes, wrong block-causal mask
    torch.save(state, tmp_path / "bad.pth")
    status, err = cli(flowar_eval, *_eval_args(files, tmp_path / "out", "S", "--resume", str(tmp_path / "bad.pth")))
    assert status == 1 and "buffers differ" in err and "mask" in err


def test_missing_metrics_inputs_fail_before_generation(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    args = [a for a in _eval_args(files, tmp_path) if a != "--no_metrics"]
    status, err = cli(flowar_eval, *args, "--metrics_extractor", "effnet-lite0", "--fid_stats",
                      str(tmp_path / "missing.npz"))
    assert status == 1 and "metrics cannot run" in err and "missing.npz" in err
    assert not list(tmp_path.rglob("*.png"))


def test_training_bad_input(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    base = ["--model", "flowar_small", "--vae_path", str(files["vae"]), "--output_dir", str(tmp_path / "o"),
            "--batch_size", "2", "--num_workers", "0", *TINY_FLAGS]
    status, err = cli(main_flowar, *base, "--data_path", str(tmp_path / "nowhere"))
    assert status == 1 and "training images not found" in err
    status, err = cli(main_flowar, *base, "--use_cached")
    assert status == 2 and "--use_cached is not supported" in err
    status, err = cli(main_flowar, *base, "--compile_head")
    assert status == 2 and "apply to --evaluate runs only" in err
    status, err = cli(main_flowar, *base, "--resume", str(tmp_path / "typo"), "--data_path",
                      str(files["root"] / "imagenet"))
    assert status == 1 and "checkpoint not found" in err
    status, err = cli(main_flowar, *base, "--evaluate", "--resume", str(tmp_path / "o"))
    assert status == 1 and "has no checkpoint-last.pth" in err


# ---------------------------------------------------------------------------------------------- configs


def test_sampler_defaults_and_folder_names(golden: Any) -> None:
    """eval.py defaults to DiSA 50 -> 15, main_flowar.py to the original 25 steps; folder names as upstream."""
    parse = flowar_eval.get_args_parser().parse_args
    assert flowar_eval.sampler_from_args(parse([]), training=False) == SamplerConfig(50, 15, None, 1.0, 0.9)
    train_args = main_flowar.get_args_parser().parse_args([])
    assert flowar_eval.sampler_from_args(train_args, training=True).num_step == 25
    assert (train_args.min_lr, train_args.lr_schedule, train_args.use_cached) == (1e-5, "cosine", False)
    assert (parse([]).min_lr, parse([]).lr_schedule, parse([]).use_cached) == (0.0, "constant", True)
    for c in golden("flowar/eval_protocol.json")["configs"]:
        sampler = SamplerConfig(c["flow_upper_steps"], c["flow_lower_steps"], cfg=c["cfg"])
        assert sampler.folder_name(c["num_images"], evaluate=True) == c["save_folder"]
    assert SamplerConfig(num_step=50, cfg=2.4).folder_name(50000, evaluate=False) == "ariter50cfg2.4-image50000"
    assert SamplerConfig(cfg=2.0, official_grid=False, heun=True).folder_name(8, evaluate=True) == \
        "steps50-to-15-cfg2.0-image8-uniformgrid-heun_evaluate"


def test_model_config_builds_the_official_sizes_unless_overridden() -> None:
    with torch.device("meta"):
        official = ModelConfig(model="flowar_small", diffloss_d=2, diffloss_w=1024).build()
        tiny = ModelConfig(model="flowar_large", embed_dim=64, depth=1, num_heads=4, diffloss_d=1,
                           diffloss_w=64).build()
    assert sum(p.numel() for p in official.parameters()) == 171_718_072  # FlowAR-S (specs §2.1)
    assert tiny.config.cross and tiny.config.encoder_depth == tiny.config.decoder_depth == 1
    assert describe_checkpoint(tiny.state_dict()).startswith("AR width 64, 1 + 1 blocks, 1000 classes; flow head "
                                                             "1 x 64 (--diffloss_d x --diffloss_w), type v2")


def test_benchmark_prints_both_settings_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark script end to end at its smallest (real FlowAR-S network, one scale, no FLOP count): one row
    per setting with the NFE of its plan. No timing is asserted."""
    from flowar_disa import benchmark

    assert benchmark.main(["--sizes", "small", "--num_scales", "1", "--warmup", "0", "--no_flops"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("original", "DiSA"))]
    assert [(r[0], r[-4]) for r in rows] == [("original", "24"), ("DiSA", "24")]  # 1 scale: 25 steps, 24 calls
    assert "flow-head calls per scale [24]" in out and "reduced: the real model generates 5 scales" in out
