"""Harmon command lines on the CPU with the golden tiny model and a tiny tokenizer made here: the official DiSA
command as written (paths aside), seeds, bad input, and the GenEval batch script under torchrun (1 vs 2 ranks)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "Harmon_DiSA" / "scripts"
PROMPT = "a dog on the left and a cat on the right."

# The tiny stand-in for configs/models/qwen2_5_1_5b_kl16_mar_h_disa_50_5.py: the same file shape and DiSA settings,
# the golden tiny sizes (LLM architecture from the local directory's config.json, as for the real Qwen2.5).
TINY_CONFIG = '''"""Tiny Harmon with DiSA 50 -> 5 (test stand-in for qwen2_5_1_5b_kl16_mar_h_disa_50_5.py)."""
from harmon_disa.src.models.prompts import QWEN_CHAT_TEMPLATE

llm_name_or_path = {llm!r}
prompt_template = dict(QWEN_CHAT_TEMPLATE)
tokenizer = dict(pretrained_model_name_or_path=llm_name_or_path, padding_side="right")

model = dict(
    tokenizer=tokenizer,
    prompt_template=prompt_template,
    vae=dict(embed_dim=16, ch=32, ch_mult=(1, 2), num_res_blocks=2, ckpt_path="checkpoints/kl16.ckpt",
             with_encoder=False),
    vae_scale=0.2325,
    llm=dict(pretrained_model_name_or_path=llm_name_or_path, torch_dtype="bfloat16", attn_implementation="sdpa"),
    mar=dict(type="MAR", {mar}, diff_upper_steps=50, diff_lower_steps=5, diff_annealing_strategy="linear",
             disa_clip=950),
)
'''


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE with Qwen's three special tokens (eos <|im_end|>, pad <|endoftext|>), ids < 1000."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"<|im_start|>user\nGenerate an image: {p}<|im_end|>\n<|im_start|>assistant\n"
              for p in (PROMPT, "a photo of a bench.", "two cats.", "Generate an image.")]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def workdir(golden, tmp_path_factory) -> Path:
    """A Harmon_DiSA-like folder: configs/models/, checkpoints/ (Harmon .pth + kl16.ckpt), a Qwen-like directory."""
    from transformers import Qwen2Config

    root = tmp_path_factory.mktemp("harmon_cli")
    cfg = golden("harmon/config.json")
    qwen = root / "Qwen2.5-tiny-Instruct"
    write_tokenizer(qwen)
    Qwen2Config(**cfg["llm_qwen2_config"]).save_pretrained(qwen)
    state = golden("harmon/tiny_state_dict.pt")
    (root / "checkpoints").mkdir()
    torch.save({k: v for k, v in state.items() if not k.startswith("vae.")}, root / "checkpoints" / "harmon_tiny.pth")
    vae = {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}
    torch.save({"model": vae}, root / "checkpoints" / "kl16.ckpt")
    mar = ", ".join(f"{k}={v!r}" for k, v in cfg["mar"].items())
    (root / "configs" / "models").mkdir(parents=True)
    (root / "configs" / "models" / "tiny_disa_50_5.py").write_text(TINY_CONFIG.format(llm=str(qwen), mar=mar))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args: list[str], cwd: Path, *, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH="./", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                f"--master_port={free_port()}"] if torchrun else [sys.executable]  # fmt: skip
    return subprocess.run(launcher + [str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_official_disa_command_runs_as_written(workdir):
    # The official DiSA README's command, with the tiny config/checkpoint in place of the 1.5B ones and 96 px
    # (a 6 x 6 token grid: the position embeddings are interpolated from the tiny model's native 4 x 4).
    out = run_script("text2image.py", ["configs/models/tiny_disa_50_5.py", "--checkpoint",
                                       "checkpoints/harmon_tiny.pth", "--image_size", "96", "--prompt", PROMPT,
                                       "--output", "output.jpg"], workdir)  # fmt: skip
    assert out.returncode == 0, out.stderr
    with Image.open(workdir / "output.jpg") as im:
        assert im.format == "JPEG" and im.size == (24, 24)  # 2 x 2 grid of 12 px images (the tiny VAE upsamples x2)
    assert "wrote output.jpg: 4 image(s) of 96px (8 rows, cpu, float32)" in out.stdout
    assert "diffusion-head calls" in out.stdout


def in_process(workdir: Path, monkeypatch, argv: list[str]) -> int:
    from harmon_disa.scripts import text2image

    monkeypatch.chdir(workdir)
    return text2image.main(["configs/models/tiny_disa_50_5.py", "--checkpoint", "checkpoints/harmon_tiny.pth",
                            "--image_size", "64", "--num_iter", "4", *argv])  # fmt: skip


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_seeded_runs_are_reproducible(workdir, monkeypatch, capsys):
    assert in_process(workdir, monkeypatch, ["--seed", "3", "--output", "a.png"]) == 0
    assert in_process(workdir, monkeypatch, ["--seed", "3", "--output", "b.png"]) == 0
    assert in_process(workdir, monkeypatch, ["--seed", "4", "--output", "c.png"]) == 0
    a, b, c = (read_image(workdir / f"{n}.png") for n in "abc")
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    # the clamp switch changes the DiSA schedule: 50 -> 48 head calls at the first AR step become 50
    assert in_process(workdir, monkeypatch, ["--seed", "3", "--no_disa_clip", "--output", "d.png"]) == 0
    calls = [int(line.rsplit(" ", 3)[-3]) for line in capsys.readouterr().out.splitlines() if "head calls" in line]
    assert calls[0] == calls[1] == calls[2] and calls[3] > calls[0]


def test_compile_head_gives_the_eager_images(workdir, monkeypatch, capsys):
    """``--compile_head`` (real torch.compile of the head on the CPU): the same grid to uint8 rounding."""
    from harmon_disa.scripts import text2image

    compiled_heads, real_compile = [], text2image.compile_head

    def spy(model, **kwargs):  # type: ignore[no-untyped-def]
        real_compile(model, **kwargs)
        compiled_heads.append(model.mar.diffloss.net)

    monkeypatch.setattr(text2image, "compile_head", spy)
    assert in_process(workdir, monkeypatch, ["--seed", "5", "--output", "eager.png"]) == 0
    assert not compiled_heads
    assert in_process(workdir, monkeypatch, ["--seed", "5", "--compile_head", "--output", "compiled.png"]) == 0
    assert len(compiled_heads) == 1 and "forward" in vars(compiled_heads[0])  # the compiled forward ran
    eager, compiled = (read_image(workdir / n).astype(int) for n in ("eager.png", "compiled.png"))
    assert np.abs(eager - compiled).max() <= 1


def test_bad_input_fails_clearly_and_keeps_existing_output(workdir, monkeypatch, capsys):
    (workdir / "keep.jpg").write_bytes(b"old image")
    assert in_process(workdir, monkeypatch, ["--checkpoint", "checkpoints/nothere.pth", "--output", "keep.jpg"]) == 1
    assert "checkpoint not found: 'checkpoints/nothere.pth'" in capsys.readouterr().err
    state = torch.load(workdir / "checkpoints" / "harmon_tiny.pth", weights_only=True)
    del state["proj_out.2.bias"]
    torch.save(state, workdir / "checkpoints" / "broken.pth")
    assert in_process(workdir, monkeypatch, ["--checkpoint", "checkpoints/broken.pth", "--output", "keep.jpg"]) == 1
    assert "missing (1):\n    proj_out.2.bias" in capsys.readouterr().err
    assert (workdir / "keep.jpg").read_bytes() == b"old image"
    for argv, message in (
        (["--image_size", "100"], "--image_size must be a multiple of 16"),
        (["--cfg", "-1"], "expected a finite number >= 0"),
        (["--cfg_schedule", "cosine"], "invalid choice: 'cosine'"),
        (["--attn_implementation", "flash"], "invalid choice: 'flash'"),
        (["--cuda_graphs", "--device", "cpu"], "--cuda_graphs needs a CUDA device"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            in_process(workdir, monkeypatch, argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        from harmon_disa.scripts import text2image

        text2image.main(["configs/models/tiny_disa_50_5.py"])  # no --checkpoint
    assert "--checkpoint is required" in capsys.readouterr().err


def batch_in_process(workdir: Path, monkeypatch, argv: list[str]) -> int:
    from harmon_disa.scripts import batch_text2image

    monkeypatch.chdir(workdir)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a single process, no process group
        monkeypatch.delenv(name, raising=False)
    return batch_text2image.main(argv)


def test_batch_script_geneval_layout_same_images_on_one_and_two_ranks(workdir, monkeypatch, capsys):
    data = workdir / "metadata.jsonl"
    entries = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
               {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"},
               {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": " a dog "}]  # fmt: skip
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    common = ["configs/models/tiny_disa_50_5.py", "--checkpoint", "checkpoints/harmon_tiny.pth", "--data",
              str(data), "--image_size", "64", "--num_iter", "4", "--batch_size", "2"]  # fmt: skip
    two = run_script("batch_text2image.py", [*common, "--output", "out2"], workdir, torchrun=2)
    assert two.returncode == 0, two.stderr
    assert "generated 3 prompt(s) x 4 image(s) on 2 rank(s)" in two.stdout
    assert batch_in_process(workdir, monkeypatch, [*common, "--output", "out1"]) == 0
    assert "generated 3 prompt(s) x 4 image(s) on 1 rank(s)" in capsys.readouterr().out
    for i, entry in enumerate(entries):
        for root in ("out1", "out2"):
            folder = workdir / root / f"{i:05d}"
            assert json.loads((folder / "metadata.jsonl").read_text()) == entry
            assert sorted(p.name for p in (folder / "samples").iterdir()) == [f"{k:04d}.png" for k in range(4)]
        for name in ("samples/0000.png", "samples/0001.png", "samples/0002.png", "samples/0003.png", "grid.png"):
            one, two = (workdir / root / f"{i:05d}" / name for root in ("out1", "out2"))
            assert one.read_bytes() == two.read_bytes(), (i, name)
    with Image.open(workdir / "out1" / "00000" / "samples" / "0000.png") as im:
        assert im.size == (8, 8) and im.mode == "RGB"
    # resume: everything complete, nothing regenerated or rewritten
    sample = workdir / "out1" / "00001" / "samples" / "0002.png"
    before = sample.stat().st_mtime_ns
    assert batch_in_process(workdir, monkeypatch, [*common, "--output", "out1"]) == 0
    assert "generated 0 prompt(s)" in capsys.readouterr().out
    assert sample.stat().st_mtime_ns == before
    # a lost sample: only its batch (prompts 0 and 1) is generated again, to the same bytes
    reference = sample.read_bytes()
    sample.unlink()
    assert batch_in_process(workdir, monkeypatch, [*common, "--output", "out1"]) == 0
    assert "generated 2 prompt(s)" in capsys.readouterr().out
    assert sample.read_bytes() == reference
    # another prompt file into the same folder is refused, nothing is touched
    data.write_text("".join(json.dumps(dict(e, prompt=e["prompt"] + "!")) + "\n" for e in entries))
    assert batch_in_process(workdir, monkeypatch, [*common, "--output", "out1"]) == 1
    assert "holds images of another prompt" in capsys.readouterr().err
    assert sample.read_bytes() == reference
