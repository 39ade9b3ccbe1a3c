"""MAR_DiSA command lines: main_mar.py (evaluate and train), main_cache.py and benchmark.py.

The official DiSA README commands run as written under ``torchrun --nproc_per_node=2`` (gloo, CPU), with these
substitutions: paths; ``--eval_bsz`` / ``--num_images`` small; the diffusion head ``--diffloss_d 2 --diffloss_w 32``;
and the documented size flags that turn the factory into a tiny network (``--embed_dim 32 --depth 1 --num_heads 2
--buffer_size 4 --class_num 2 --img_size 64``, 16 tokens) with a tiny KL-16 VAE (``--vae_ch 32``). The checkpoints
are written here in the official layout (``model``, ``model_ema``, ``epoch``, ``args``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from disa.evaluation import image_seed
from disa.metrics import MetricsConfig, compute_fid_statistics
from disa.vae import AutoencoderKL
from mar_disa import benchmark as bench
from mar_disa import main_cache, main_mar
from mar_disa.engine_mar import CHECKPOINT_KEYS, MARGenerator, load_for_generation, order_seed, sample_folder_name
from mar_disa.models.mar import orders_from_seeds

MAR_DIR = Path(main_mar.__file__).parent

# The three MAR commands of the official DiSA README (torchrun prefix dropped: the tests launch 2 processes).
README = {
    "mar_base": """main_mar.py --model mar_base --diffloss_d 6 --diffloss_w 1024 --eval_bsz 256 --num_images 50000
        --num_iter 64 --cfg 2.9 --cfg_schedule linear --temperature 1.0
        --diff_upper_steps 50 --diff_lower_steps 5 --diff_annealing_strategy linear --diff_sampler DiSA
        --output_dir pretrained_models/mar/mar_base --resume pretrained_models/mar/mar_base
        --data_path ${IMAGENET_PATH} --evaluate""",
    "mar_large": """main_mar.py --model mar_large --diffloss_d 8 --diffloss_w 1280 --eval_bsz 256 --num_images 50000
        --num_iter 64 --cfg 3.0 --cfg_schedule linear --temperature 1.0
        --diff_upper_steps 50 --diff_lower_steps 5 --diff_annealing_strategy linear --diff_sampler DiSA
        --output_dir pretrained_models/mar/mar_large --resume pretrained_models/mar/mar_large
        --data_path ${IMAGENET_PATH} --evaluate""",
    "mar_huge": """main_mar.py --model mar_huge --diffloss_d 12 --diffloss_w 1536 --eval_bsz 128 --num_images 50000
        --num_iter 64 --cfg 3.3 --cfg_schedule linear --temperature 1.0
        --diff_upper_steps 50 --diff_lower_steps 5 --diff_annealing_strategy linear --diff_sampler DiSA
        --output_dir pretrained_models/mar/mar_huge --resume pretrained_models/mar/mar_huge
        --data_path ${IMAGENET_PATH} --evaluate""",
}
# "To revert to the original sampling settings, please use: ..." (same README)
ORIGINAL = {"--num_iter": "256", "--diff_upper_steps": "100", "--diff_sampler": "default"}
TINY_HEAD = {"--diffloss_d": "2", "--diffloss_w": "32"}
TINY = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--buffer_size", "4", "--class_num", "2",
        "--img_size", "64", "--vae_ch", "32", "--num_workers", "0", "--no_progress"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, subs: dict[str, str], extra: list[str]) -> list[str]:
    """The README command ``name`` with flag values replaced by ``subs`` (added when absent), then ``extra``."""
    argv = shlex.split(README[name].replace("\n", " "))[1:]
    for flag, value in subs.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv + extra


def torchrun(argv: list[str], *, module: bool = False, cwd: Path = MAR_DIR, script: str = "main_mar.py") -> str:
    """``python -m torch.distributed.run --nproc_per_node=2 <script> ...`` (from the model folder, as upstream) or
    ``... -m mar_disa.<script>``; returns the output, failing the test with it on a non-zero exit."""
    target = ["-m", f"mar_disa.{Path(script).stem}"] if module else [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           *target, *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def run_main(module: Any, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a CLI's ``main`` in this process; returns (exit status, stdout + stderr)."""
    try:
        module.main(argv)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def drop(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without the given ``--flag value`` pairs."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def tiny_model(argv: list[str]):  # type: ignore[no-untyped-def]
    args = main_mar.parse_args(argv)
    return main_mar.build_model(main_mar.model_config(args), main_mar.sampler_config(args))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MAR checkpoint in the official layout (EMA weights differ from the raw ones), a tiny KL-16 VAE with
    its encoder, a 2-class ImageFolder of 12 JPEGs, and effnet-lite0 statistics of those images."""
    root = tmp_path_factory.mktemp("mar_cli")
    torch.manual_seed(0)
    model = tiny_model(["--model", "mar_base", *TINY, *sum(TINY_HEAD.items(), ())])
    with torch.no_grad():  # the official init zeroes the head's output: perturb so that images depend on weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    raw = model.state_dict()
    ema = {k: v + 0.02 * torch.randn_like(v) for k, v in raw.items()}
    ckpt_dir = root / "ckpt"
    ckpt_dir.mkdir()
    torch.save({"model": raw, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(model="mar_base")},
               ckpt_dir / "checkpoint-last.pth")  # fmt: skip
    vae_path = root / "kl16_tiny.ckpt"
    torch.save({"model": AutoencoderKL(ch=32).state_dict()}, vae_path)

    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / "imagenet" / "train" / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            pixels = (rng.random((72, 88, 3)) * 80 + 40 + 100 * c).astype(np.uint8)  # (H, W, 3), class-coloured
            Image.fromarray(pixels).save(folder / f"n0{c}_{i}.JPEG", format="JPEG")
    stats = compute_fid_statistics(
        root / "imagenet" / "train" / "n00",
        MetricsConfig(extractor="effnet-lite0", reference_images=root / "imagenet" / "train" / "n00", isc=False,
                      num_workers=0, distributed=False),
    )  # fmt: skip
    return {"root": root, "ckpt": ckpt_dir, "vae": vae_path, "data": root / "imagenet",
            "stats": stats.save(root / "effnet_stats.npz")}  # fmt: skip


def readme_eval(name: str, files: dict[str, Path], out: Path, *, num_images: int = 2, eval_bsz: int = 1,
                subs: dict[str, str] | None = None, metrics: bool = False) -> list[str]:  # fmt: skip
    paths = {"--output_dir": str(out), "--resume": str(files["ckpt"]), "--data_path": str(files["root"] / "nowhere")}
    small = {"--num_images": str(num_images), "--eval_bsz": str(eval_bsz)}
    scoring = (["--metrics_extractor", "effnet-lite0", "--fid_stats", str(files["stats"])] if metrics
               else ["--no_metrics"])  # fmt: skip
    return command(name, {**paths, **small, **TINY_HEAD, **(subs or {})},
                   [*TINY, "--vae_path", str(files["vae"]), *scoring])  # fmt: skip


def expected_nfe(argv: list[str]) -> list[int]:
    model = tiny_model(argv)
    args = main_mar.parse_args(argv)
    return bench.expected_schedule(model.diffloss, model.seq_len, args.num_iter)[1]


# ---------------------------------------------------------------------------------------------- the flags


UPSTREAM_DEFAULTS = {  # specs/mar.md §6.2 (LTH14/mar main_mar.py) and §3.1 (MAR_DiSA's additions)
    "batch_size": 16, "epochs": 400, "model": "mar_large", "img_size": 256,
    "vae_path": "pretrained_models/vae/kl16.ckpt", "vae_embed_dim": 16, "vae_stride": 16, "patch_size": 1,
    "num_iter": 64, "num_images": 50000, "cfg": 1.0,
    "cfg_schedule": "linear", "label_drop_prob": 0.1, "eval_freq": 40, "save_last_freq": 5, "online_eval": False,
    "evaluate": False, "eval_bsz": 64, "weight_decay": 0.02, "grad_checkpointing": False, "lr": None, "blr": 1e-4,
    "min_lr": 0.0, "lr_schedule": "constant", "warmup_epochs": 100, "ema_rate": 0.9999, "mask_ratio_min": 0.7,
    "grad_clip": 3.0, "attn_dropout": 0.1, "proj_dropout": 0.1, "buffer_size": 64, "diffloss_d": 12,
    "diffloss_w": 1536, "diffusion_batch_mul": 1, "temperature": 1.0, "data_path": "./data/imagenet",
    "class_num": 1000, "output_dir": "./output_dir", "log_dir": "./output_dir", "device": "cuda", "seed": 1,
    "resume": "", "start_epoch": 0, "num_workers": 10, "pin_mem": True, "world_size": 1, "local_rank": -1,
    "dist_on_itp": False, "dist_url": "env://", "use_cached": False, "cached_path": "",
    "diff_upper_steps": 25, "diff_lower_steps": 5, "diff_annealing_strategy": "linear", "diff_sampler": "default",
}  # fmt: skip
CACHE_DEFAULTS = {
    "batch_size": 128, "img_size": 256, "vae_path": "pretrained_models/vae/kl16.ckpt", "vae_embed_dim": 16,
    "data_path": "./data/imagenet", "device": "cuda", "seed": 0, "num_workers": 10, "pin_mem": True, "world_size": 1,
    "local_rank": -1, "dist_on_itp": False, "dist_url": "env://", "cached_path": "",
}  # fmt: skip


def test_every_upstream_flag_with_its_default() -> None:
    defaults = vars(main_mar.parse_args([]))
    assert {k: defaults[k] for k in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS
    assert defaults["disa_clip"] == 950 and defaults["ddim_clip"] == 980 and defaults["train_clip"] == 950
    assert defaults["dpm_cfg"] is False and defaults["precision"] == "fp16"
    cache = vars(main_cache.build_parser().parse_args([]))
    assert {k: cache[k] for k in CACHE_DEFAULTS} == CACHE_DEFAULTS
    # --no_pin_mem and the original MAR's --num_sampling_steps are accepted too
    assert main_mar.parse_args(["--no_pin_mem"]).pin_mem is False


def test_help_documents_the_clips_unused_flags_and_deviations() -> None:
    text = " ".join(main_mar.build_parser().format_help().split())
    for needle in ("default: 950", "default: 980", "hidden default 950", "accepted, unused (as upstream)",
                   "--dpm_cfg", "per-image seeds", "--delete_images", "fp16 = upstream's fp16 autocast"):  # fmt: skip
        assert needle in text, needle
    assert "accepted, unused (as upstream)" in " ".join(main_cache.build_parser().format_help().split())


def test_clip_and_sampler_flags_reach_the_model() -> None:
    base = ["--model", "mar_base", *TINY, *sum(TINY_HEAD.items(), ())]
    model = tiny_model([*base, "--diff_sampler", "DiSA", "--diff_upper_steps", "50"])
    assert model.diffloss.diffusion_for(50).num_timesteps == 48  # the official 950 clip: 50 steps run 48
    assert int(model.diffloss.diffusion_for(50).timestep_map.max()) == 950
    model = tiny_model([*base, "--diff_sampler", "DiSA", "--diff_upper_steps", "50", "--disa_clip", "none"])
    assert model.diffloss.diffusion_for(50).num_timesteps == 50
    assert int(model.diffloss.diffusion_for(50).timestep_map.max()) == 999
    model = tiny_model([*base, "--diff_sampler", "DDIM", "--ddim_clip", "800", "--train_clip", "none",
                        "--dpm_cfg"])  # fmt: skip
    assert int(model.diffloss.diffusion_for(50).timestep_map.max()) == 800
    assert model.diffloss.train_diffusion.num_timesteps == 1000 and model.diffloss.dpm_cfg
    args = main_mar.parse_args([*base, "--num_sampling_steps", "100"])  # original MAR flag
    assert (args.diff_sampler, args.diff_upper_steps) == ("default", 100)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--evaluate"], "--evaluate needs --resume"),
        (["--diff_sampler", "Euler"], "invalid choice: 'Euler'"),
        (["--diff_annealing_strategy", "exp"], "choose from"),
        (["--diff_upper_steps", "5", "--diff_lower_steps", "6"], "need 1 <= diff_lower_steps <= diff_upper_steps"),
        (["--num_images", "999"], "not a multiple of num_classes=1000"),
        (["--cfg", "-1"], "cfg must be a finite number >= 0"),
        (["--temperature", "0"], "temperature must be a finite number > 0"),
        (["--disa_clip", "0"], "expected a timestep >= 1 or 'none'"),
        (["--eval_bsz", "0"], "expected an integer >= 1"),
        (["--dist_url", "tcp://1.2.3.4:5"], "only env://"),
        (["--dist_on_itp"], "launch with torchrun"),
        (["--vae_stride", "8"], "the KL-16 VAE downsamples by 16"),
        (["--num_sampling_steps", "100", "--diff_sampler", "DiSA"], "cannot be combined with --diff_sampler DiSA"),
        (["--num_sampling_steps", "ddim50"], "--num_sampling_steps must be an integer"),
        (["--embed_dim", "30", "--num_heads", "4"], "encoder_embed_dim (30) must be divisible by encoder_num_heads"),
        (["--label_drop_prob", "1.5"], "label_drop_prob must be a probability"),
        (["--lr_schedule", "cosine", "--warmup_epochs", "500"], "warmup_epochs < epochs"),
        (["--use_cached"], "--use_cached needs --cached_path"),
        (["--kid"], "KID and precision/recall need per-image reference features"),
        (["--cuda_graphs", "--device", "cpu"], "--cuda_graphs needs a CUDA device"),
    ],
)
def test_bad_flags_exit_2_naming_what_is_allowed(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main_mar.parse_args(argv)
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_sample_folder_names_are_the_official_ones() -> None:
    common = dict(temperature=1.0, cfg_schedule="linear", num_images=50000, diff_upper_steps=50, diff_lower_steps=5,
                  diff_annealing_strategy="linear")  # fmt: skip
    assert sample_folder_name(num_iter=64, cfg=2.9, **common) == (
        "ariter64-diffsteps-linear-50-to-5-temp1.0-linearcfg2.9-image50000_ema_evaluate"
    )
    assert sample_folder_name(num_iter=256, cfg=3, num_sampling_steps="100", use_ema=True, evaluate=False,
                              **common) == "ariter256-diffsteps100-temp1.0-linearcfg3.0-image50000_ema"  # fmt: skip


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def disa_b(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """The MAR-B DiSA README command from the model folder (``cd MAR_DiSA && torchrun main_mar.py``)."""
    out = tmp_path_factory.mktemp("disa_b")
    argv = readme_eval("mar_base", files, out)
    torchrun(argv)
    return argv, out / "ariter64-diffsteps-linear-50-to-5-temp1.0-linearcfg2.9-image2_ema_evaluate"


def test_readme_mar_b_command_under_torchrun(disa_b: tuple[list[str], Path]) -> None:
    argv, folder = disa_b
    assert sorted(pngs(folder)) == ["00000.png", "00001.png"]
    res = results(folder)
    assert res["world_size"] == 2 and res["metrics"] is None
    assert res["images"]["generated_this_run"] == 2
    expected = expected_nfe(argv)
    assert res["nfe"]["per_ar_step"] == expected and res["nfe"]["ar_steps"] == 64
    assert sum(expected) == res["nfe"]["per_image"] and expected[0] == 48  # 50 steps clipped at 950 run 48
    sampler = res["config"]["model"]["sampler"]
    assert (sampler["diff_sampler"], sampler["disa_clip"], sampler["cfg"]) == ("DiSA", 950, 2.9)
    assert res["config"]["model"]["weights"] == "model_ema"


def test_one_process_gives_the_same_bytes_and_resume_skips(
    disa_b: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, folder = disa_b
    single = [*argv]
    single[single.index("--output_dir") + 1] = str(tmp_path)
    code, out = run_main(main_mar, single, capsys)
    assert code == 0, out
    assert pngs(tmp_path / folder.name) == pngs(folder)  # 1 rank == 2 ranks, byte for byte
    code, out = run_main(main_mar, argv, capsys)  # again into the torchrun folder: everything is reused
    assert code == 0, out
    assert results(folder)["images"]["reused"] == 2 and results(folder)["images"]["generated_this_run"] == 0


def test_generation_uses_the_ema_weights(disa_b: tuple[list[str], Path], files: dict[str, Path]) -> None:
    argv, folder = disa_b
    ckpt = torch.load(files["ckpt"] / "checkpoint-last.pth", weights_only=False)
    args = main_mar.parse_args(argv)
    vae = main_mar.load_vae_from_args(args, torch.device("cpu"))
    first = Image.open(folder / "00000.png")
    for key, same in (("model_ema", True), ("model", False)):
        model = tiny_model(argv)
        model.load_state_dict(ckpt[key])
        gen = MARGenerator(model.eval(), vae, num_iter=64, cfg=2.9, precision="fp16")
        image = gen.generate(torch.tensor([0]), [image_seed(1, 0, 2)]).images[0]  # --seed 1, image 0, class 0
        assert np.array_equal(image, np.asarray(first)) == same, key


@pytest.mark.parametrize("name", ["mar_large", "mar_huge"])
def test_readme_mar_l_and_h_commands_under_torchrun(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    """MAR-L as a module (``torchrun -m mar_disa.main_mar``), scored with effnet-lite0; MAR-H from the folder."""
    metrics = name == "mar_large"
    num_images = 10 if metrics else 2  # IS uses 10 splits
    argv = readme_eval(name, files, tmp_path, num_images=num_images, eval_bsz=5 if metrics else 1, metrics=metrics)
    torchrun(argv, module=metrics, cwd=files["root"] if metrics else MAR_DIR)
    cfg = {"mar_large": "3.0", "mar_huge": "3.3"}[name]
    folder = tmp_path / f"ariter64-diffsteps-linear-50-to-5-temp1.0-linearcfg{cfg}-image{num_images}_ema_evaluate"
    assert len(pngs(folder)) == num_images
    res = results(folder)
    assert res["world_size"] == 2 and res["nfe"]["per_ar_step"] == expected_nfe(argv)
    if metrics:
        assert set(res["metrics"]) == {"FD_EffNet-Lite0", "IS_EffNet-Lite0", "IS_std_EffNet-Lite0"}
        assert res["metrics"]["FD_EffNet-Lite0"] > 0 and math.isfinite(res["metrics"]["FD_EffNet-Lite0"])
        assert res["metrics"]["IS_EffNet-Lite0"] >= 1.0
    else:
        assert res["metrics"] is None


def test_original_sampler_command_and_the_original_mar_flag(files: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv = readme_eval("mar_base", files, tmp_path / "disa_flags", subs=ORIGINAL)
    torchrun(argv)
    folder = tmp_path / "disa_flags" / "ariter256-diffsteps-linear-100-to-5-temp1.0-linearcfg2.9-image2_ema_evaluate"
    res = results(folder)
    assert res["nfe"]["per_ar_step"] == expected_nfe(argv)
    assert set(res["nfe"]["per_ar_step"]) == {0, 100} and res["nfe"]["per_image"] == 16 * 100  # no clip: 100 each
    # The original MAR command (--num_sampling_steps 100): same sampler, the original folder name, same images.
    legacy = drop(readme_eval("mar_base", files, tmp_path / "mar_flags", subs={"--num_iter": "256"}),
                  "--diff_upper_steps", "--diff_lower_steps", "--diff_annealing_strategy", "--diff_sampler")
    code, out = run_main(main_mar, [*legacy, "--num_sampling_steps", "100"], capsys)
    assert code == 0, out
    legacy_folder = tmp_path / "mar_flags" / "ariter256-diffsteps100-temp1.0-linearcfg2.9-image2_ema_evaluate"
    assert pngs(legacy_folder) == pngs(folder)


@pytest.mark.parametrize("extra", [["--diff_sampler", "DDIM"],
                                   ["--diff_sampler", "DPM_Solver++", "--dpm_cfg", "--precision", "bf16"]])
def test_other_samplers_with_guidance(extra: list[str], files: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv = readme_eval("mar_base", files, tmp_path, subs={"--num_iter": "8", "--diff_upper_steps": "10"}) + extra
    code, out = run_main(main_mar, argv, capsys)
    assert code == 0, out
    folder = tmp_path / "ariter8-diffsteps-linear-10-to-5-temp1.0-linearcfg2.9-image2_ema_evaluate"
    assert len(pngs(folder)) == 2 and results(folder)["nfe"]["per_ar_step"] == expected_nfe(argv)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_and_mismatched_checkpoints_are_errors(files: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv = readme_eval("mar_base", files, tmp_path)
    missing = [*argv]
    missing[missing.index("--resume") + 1] = str(tmp_path / "no_such_dir")
    code, out = run_main(main_mar, missing, capsys)
    assert code == 1 and "checkpoint not found" in out and "random weights" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    missing[missing.index("--resume") + 1] = str(empty)
    code, out = run_main(main_mar, missing, capsys)
    assert code == 1 and "has no checkpoint-last.pth" in out
    wrong = [*argv]
    wrong[wrong.index("--diffloss_w") + 1] = "48"
    code, out = run_main(main_mar, wrong, capsys)
    assert code == 1 and "mis-shaped" in out and "diffloss.net.input_proj.weight" in out
    no_vae = [*argv, "--vae_path", str(tmp_path / "kl16.ckpt")]
    code, out = run_main(main_mar, no_vae, capsys)
    assert code == 1 and "--vae_path" in out and "kl16.ckpt" in out
    assert not any(tmp_path.glob("ariter*"))  # nothing was generated by any of these


def test_metrics_inputs_are_checked_before_generating(files: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv = [a for a in readme_eval("mar_base", files, tmp_path) if a != "--no_metrics"]
    code, out = run_main(main_mar, [*argv, "--metrics_extractor", "effnet-lite0", "--fid_stats",
                                    str(tmp_path / "missing.npz")], capsys)  # fmt: skip
    assert code == 1 and "metrics cannot run" in out and "--no_metrics" in out
    assert not any(tmp_path.glob("ariter*/*.png"))


def test_resuming_into_a_folder_of_other_settings_is_refused(disa_b: tuple[list[str], Path],
                                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv, folder = disa_b
    before = pngs(folder)
    ddim = [*argv]
    ddim[ddim.index("--diff_sampler") + 1] = "DDIM"  # same folder name (upstream omits the sampler), other images
    code, out = run_main(main_mar, ddim, capsys)
    assert code == 1 and "generated with other settings" in out and "diff_sampler" in out
    assert pngs(folder) == before


# ---------------------------------------------------------------------------------------------- training


def test_cache_then_train_under_torchrun_then_evaluate_and_resume(files: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    cache_argv = ["--img_size", "64", "--vae_path", str(files["vae"]), "--vae_ch", "32", "--data_path",
                  str(files["data"]), "--cached_path", str(cache), "--batch_size", "5", "--num_workers", "0",
                  "--device", "cpu"]  # fmt: skip
    code, out = run_main(main_cache, cache_argv, capsys)
    assert code == 0 and "cached 12 image(s)" in out, out
    npz = np.load(cache / "n01" / "n01_3.JPEG.npz")  # upstream layout: <class>/<file name>.npz
    assert sorted(npz.files) == ["moments", "moments_flip"]
    assert npz["moments"].shape == npz["moments_flip"].shape == (32, 4, 4)  # 2 x 16 channels on the 4x4 grid
    assert not np.allclose(npz["moments"], npz["moments_flip"])
    code, out = run_main(main_cache, cache_argv, capsys)  # a second run finds everything cached
    assert code == 0 and "cached 0 image(s)" in out and "12 already there" in out

    out_dir = tmp_path / "train"
    train = ["--model", "mar_base", *TINY, *sum(TINY_HEAD.items(), ()), "--vae_path", str(files["vae"]),
             "--batch_size", "3", "--epochs", "6", "--warmup_epochs", "0", "--lr", "2e-3", "--diffusion_batch_mul",
             "4", "--use_cached", "--cached_path", str(cache), "--output_dir", str(out_dir), "--resume",
             str(out_dir), "--online_eval", "--eval_freq", "5", "--num_images", "2", "--eval_bsz", "2",
             "--num_iter", "4", "--cfg", "1.5", "--no_metrics"]  # fmt: skip
    torchrun(train)
    losses: dict[int, list[float]] = {}
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["tag"] == "train_loss":
            losses.setdefault(entry["step"] // 1000, []).append(entry["value"])  # step = 1000 * fractional epoch
    assert sorted(losses) == list(range(6)) and all(len(v) == 2 for v in losses.values())  # 12 / (2 x 3) steps
    assert np.mean(losses[5]) < 0.9 * np.mean(losses[0]), losses
    ckpt = torch.load(out_dir / "checkpoint-last.pth", weights_only=False)
    assert set(ckpt) == set(CHECKPOINT_KEYS) and ckpt["epoch"] == 5
    # Online evaluation (EMA weights) at epochs 0 and 5: cfg 1.0, then --cfg with half the batch, a folder each.
    online = sorted(p.name for p in out_dir.glob("ariter4-*"))
    assert online == [f"ariter4-diffsteps-linear-25-to-5-temp1.0-linearcfg{c}-image2_ema_epoch{e}"
                      for c in ("1.0", "1.5") for e in (0, 5)]  # fmt: skip
    for name in online:
        assert len(pngs(out_dir / name)) == 2 and results(out_dir / name)["config"]["model"]["weights"] == "ema"
    assert results(out_dir / online[1])["config"]["eval"]["batch_size"] == 2
    assert results(out_dir / online[3])["config"]["eval"]["batch_size"] == 1

    # The checkpoint written by training evaluates (EMA weights) ...
    evaluate = readme_eval("mar_base", files, out_dir, subs={"--resume": str(out_dir)})
    code, out = run_main(main_mar, evaluate, capsys)
    assert code == 0, out
    assert len(pngs(out_dir / "ariter64-diffsteps-linear-50-to-5-temp1.0-linearcfg2.9-image2_ema_evaluate")) == 2
    # ... and resumes: one more epoch starts at epoch 6 with the saved optimiser state.
    code, out = run_main(main_mar, [*train, "--epochs", "7"], capsys)
    assert code == 0 and "epoch 6:" in out and "epoch 5:" not in out, out
    assert torch.load(out_dir / "checkpoint-last.pth", weights_only=False)["epoch"] == 6


def test_training_from_images(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "mar_base", *TINY, *sum(TINY_HEAD.items(), ()), "--vae_path", str(files["vae"]),
            "--data_path", str(files["data"]), "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
            "--output_dir", str(tmp_path), "--device", "cpu"]  # fmt: skip
    code, out = run_main(main_mar, argv, capsys)
    assert code == 0 and "epoch 0: loss" in out and "(3 steps)" in out, out
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    load_for_generation(tiny_model(argv), tmp_path / "checkpoint-last.pth")  # strict: the layout matches
    assert state["args"].data_path == str(files["data"])
    code, out = run_main(main_mar, [*argv, "--data_path", str(tmp_path / "none")], capsys)
    assert code == 1 and "training images not found" in out and "--use_cached" in out


# ---------------------------------------------------------------------------------------------- benchmark


def _micro(sampler: str = "DiSA", **overrides: Any):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = main_mar.ModelConfig(model="mar_base", embed_dim=32, depth=2, num_heads=2, img_size=64, buffer_size=4,
                                  class_num=3, diffloss_d=2, diffloss_w=48)  # fmt: skip
    sampler_config = main_mar.SamplerConfig(num_iter=8, cfg=2.0, diff_sampler=sampler, diff_upper_steps=10,
                                            diff_lower_steps=3, **overrides)  # fmt: skip
    return main_mar.build_model(config, sampler_config).eval()


@pytest.mark.parametrize(("sampler", "cfg", "num_iter"), [("DiSA", 2.0, 8), ("default", 1.0, 5), ("DDIM", 3.0, 16),
                                                          ("DPM_Solver", 2.0, 6)])  # fmt: skip
def test_flop_formula_matches_the_flop_counter(sampler: str, cfg: float, num_iter: int) -> None:
    model = _micro(sampler)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math attention is countable
        model.sample_tokens(2, num_iter, cfg, labels=torch.tensor([0, 2]))
    stats = model.last_sample_stats
    formula = bench.mar_flops_per_image(model, stats.tokens_per_step, stats.head_calls_per_step, stats.guided)
    assert formula == counter.get_total_flops() / 2
    tokens, calls = bench.expected_schedule(model.diffloss, model.seq_len, num_iter)
    assert (tuple(tokens), tuple(calls)) == (stats.tokens_per_step, stats.head_calls_per_step)


def test_expected_costs_at_the_official_settings_match_the_spec() -> None:
    """specs/mar.md §7: NFE 25,600 / 3,200 / 1,681 (the clipped DiSA schedule) and FLOP ratio 4.33x for B, L, H."""
    for name, (depth, width) in bench.HEADS.items():
        with torch.device("meta"):
            model = main_mar.build_model(main_mar.ModelConfig(model=name, diffloss_d=depth, diffloss_w=width),
                                         main_mar.SamplerConfig())  # fmt: skip
        flops = []
        for setting, nfe in zip(bench.official_settings(), (25_600, 3_200, 1_681)):
            bench.use_sampler(model, setting)
            tokens, calls = bench.expected_schedule(model.diffloss, model.seq_len, setting.num_iter)
            assert sum(calls) == nfe and sum(tokens) == 256
            flops.append(bench.mar_flops_per_image(model, tokens, calls, guided=True))
        assert flops[0] / flops[2] == pytest.approx(4.33, abs=0.02), name
    table = bench.expected_table(["mar_base"], bench.official_settings())
    assert "MAR-B 64 AR / DiSA 50->5" in table and " 1681 " in table and "15.23x" in table


def test_benchmark_times_every_setting_on_one_model() -> None:
    model = _micro()
    vae = AutoencoderKL(ch=32, with_encoder=False).eval()
    settings = bench.official_settings(32)
    assert [s.num_iter for s in settings] == [8, 2, 2]
    results_ = bench.benchmark_model(model, vae, settings, cfg=2.9, batch_size=2, device=torch.device("cpu"),
                                     precision="fp32", warmup=0, repeats=1)  # fmt: skip
    assert [r.nfe_per_image for r in results_] == [800, 100, 48 + 5]  # 16 tokens; DiSA's 50 steps run 48
    assert all(r.seconds_per_image > 0 for r in results_)
    assert results_[0].tflops_per_image > results_[1].tflops_per_image > results_[2].tflops_per_image


def test_benchmark_fast_and_compile_knobs_switch_the_shared_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fast=off`` heads embed the condition at every step (more FLOPs by the formula, same NFE); ``compile=on``
    runs the head through the family's compile_head, built once and only for the settings that ask for it."""
    model = _micro()
    net = model.diffloss.net
    vae = AutoencoderKL(ch=32, with_encoder=False).eval()
    compiled_calls, builds = [0], []

    def fake_compile(m, *, cuda_graphs=False):  # type: ignore[no-untyped-def]
        builds.append(cuda_graphs)
        eager = type(m.diffloss.net).forward.__get__(m.diffloss.net)

        def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
            compiled_calls[0] += 1
            return eager(*args, **kwargs)

        m.diffloss.net.forward = forward

    monkeypatch.setattr(bench, "compile_head", fake_compile)
    base = bench.official_settings(32)[2]
    settings = [dataclasses.replace(base, name="off", fast=False), dataclasses.replace(base, name="on"),
                dataclasses.replace(base, name="compiled", compile="on")]  # fmt: skip
    results_ = bench.benchmark_model(model, vae, settings, cfg=2.9, batch_size=2, device=torch.device("cpu"),
                                     precision="fp32", warmup=1, repeats=2)  # fmt: skip
    assert [r.nfe_per_image for r in results_] == [53, 53, 53]
    assert results_[0].tflops_per_image > results_[1].tflops_per_image == results_[2].tflops_per_image
    assert builds == [False]  # one compilation for three calls of the compiled setting
    assert compiled_calls[0] == 3 * 53  # warm-up + 2 repeats, every head call of that setting and no other
    assert "forward" not in vars(net)  # the eager forward is back afterwards


def test_benchmark_rejects_a_divisor_that_breaks_the_schedule(capsys: pytest.CaptureFixture) -> None:
    code, out = run_main(bench, ["--ar_divisor", "64"], capsys)
    assert code == 2 and "ar_divisor must divide 64 and leave >= 2 AR steps" in out


def test_orders_come_from_their_own_stream() -> None:
    """An image's order is drawn from a seed derived from its image seed (numpy's RandomState and torch's CPU
    generator are both MT19937: seeded alike they would share raw bits with the image's diffusion noise)."""
    seeds = [image_seed(1, k, 50_000) for k in range(3)]
    derived = [order_seed(s) for s in seeds]
    assert derived == [order_seed(s) for s in seeds] and all(0 <= d < 2**32 for d in derived)
    assert len(set(derived) | set(seeds)) == 6
    assert not torch.equal(orders_from_seeds(derived, 16), orders_from_seeds(seeds, 16))
