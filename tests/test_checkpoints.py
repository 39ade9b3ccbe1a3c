"""disa.checkpoints: safe reading of official pickles, EMA selection, strict and loud loading, CLI exits."""
from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from disa.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    compare_state_dict,
    exit_on_error,
    load_checkpoint,
    load_state_dict_strict,
    read_checkpoint,
    resolve_checkpoint_path,
    select_state_dict,
)
from disa.vae import load_vae


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(proj=nn.Linear(4, 8), norm=nn.LayerNorm(8), head=nn.Linear(8, 2)))


def _mar_layout(path: Path) -> tuple[dict, dict]:
    """misc.save_model's dict: raw weights, EMA weights (same keys, other values), epoch, the saved args."""
    raw = _model().state_dict()
    ema = {k: v + 1.0 for k, v in raw.items()}
    args = argparse.Namespace(model="mar_base", diffloss_d=6, num_sampling_steps="100", resume="", lr=None)
    torch.save({"model": raw, "model_ema": ema, "epoch": 399, "args": args}, path)
    return raw, ema


@dataclass
class Settings:  # a class a third-party checkpoint might pickle
    depth: int


class Exploit:  # what a malicious pickle does: run a command while being unpickled
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------- paths


def test_missing_path_is_named_and_never_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "pretrained_models" / "mar" / "mar_base" / "checkpoint-last.pth"
    message = r"checkpoint not found: .*mar_base/checkpoint-last\.pth.*random weights"
    with pytest.raises(CheckpointNotFoundError, match=message):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # also an ordinary FileNotFoundError for callers that catch that
        load_checkpoint(path)


def test_resume_directory_maps_to_checkpoint_last(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"directory .* has no checkpoint-last\.pth"):
        resolve_checkpoint_path(tmp_path)  # upstream: "training from scratch" and random-weight evaluation
    _, ema = _mar_layout(tmp_path / "checkpoint-last.pth")
    assert resolve_checkpoint_path(tmp_path) == tmp_path / "checkpoint-last.pth"
    state = load_checkpoint(tmp_path)
    assert all(torch.equal(state[k], ema[k]) for k in ema)


# ---------------------------------------------------------------------------------------------- safe reading


def test_official_pickle_with_args_loads_without_loosening_safety(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-last.pth"
    raw, ema = _mar_layout(path)
    with pytest.raises(pickle.UnpicklingError):  # what torch >= 2.6 does with the official file by default
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert ckpt["args"] == argparse.Namespace(
        model="mar_base", diffloss_d=6, num_sampling_steps="100", resume="", lr=None
    )
    assert ckpt["epoch"] == 399
    # the allow-list was scoped: afterwards a plain weights_only load refuses the Namespace again
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    # EMA selection as the official evaluation: model_ema by default, the raw weights on request
    state = load_checkpoint(path)
    assert list(state) == list(ema) and all(torch.equal(state[k], ema[k]) for k in ema)
    state = load_checkpoint(path, key="model")
    assert all(torch.equal(state[k], raw[k]) for k in raw)


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _model().state_dict(), "args": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth.*system.*not on the allow-list"):
        load_checkpoint(path)
    assert not marker.exists()


def test_other_classes_need_an_explicit_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "third_party.pth"
    torch.save({"model": _model().state_dict(), "settings": Settings(depth=3)}, path)
    with pytest.raises(CheckpointError, match=r"Settings.*extra_safe_globals or load with weights_only=False"):
        load_checkpoint(path)
    assert read_checkpoint(path, extra_safe_globals=[Settings])["settings"] == Settings(depth=3)
    assert read_checkpoint(path, weights_only=False)["settings"] == Settings(depth=3)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "FlowAR-S.pth"
    path.write_text("<!DOCTYPE html><html>Hugging Face - 404</html>")  # what a failed download saves
    with pytest.raises(CheckpointError, match=r"FlowAR-S\.pth' is an HTML/XML page, not a checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04" + os.urandom(300))  # a truncated zip (torch.save's format)
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*FlowAR-S\.pth' \(RuntimeError: .*zip"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- selection


def test_flat_release_layout(tmp_path: Path) -> None:
    """FlowAR/xAR releases: a flat OrderedDict, pickled with Parameters (torch._utils._rebuild_parameter)."""
    model = _model()
    path = tmp_path / "xAR-B.pth"
    torch.save(OrderedDict((k, nn.Parameter(v.clone())) for k, v in model.state_dict().items()), path)
    for key in ("auto", None):
        state = load_checkpoint(path, key=key)
        assert list(state) == list(model.state_dict())
    with pytest.raises(CheckpointError, match=r"flat state dict with no 'model_ema' entry.*key=None"):
        load_checkpoint(path, key="model_ema")


def test_selection_errors_name_what_is_there() -> None:
    sd = _model().state_dict()
    with pytest.raises(CheckpointError, match=r"neither a flat state dict nor has a 'model_ema' or 'model' entry"):
        select_state_dict({"net": sd, "epoch": 1})
    with pytest.raises(CheckpointError, match=r"not a flat state dict \(entries: \['epoch', 'model'\]\); pass key="):
        select_state_dict({"model": sd, "epoch": 1}, None)
    with pytest.raises(CheckpointError, match=r"has no 'model_ema' entry; its entries are \['epoch', 'model'\]"):
        select_state_dict({"model": sd, "epoch": 1}, "model_ema")
    with pytest.raises(CheckpointError, match=r"\['model'\] is not a state dict \(non-tensor values at \['step'\]\)"):
        select_state_dict({"model": {**sd, "step": 3}}, "model")
    with pytest.raises(CheckpointError, match="holds list"):
        select_state_dict([1, 2])
    # auto falls back to the raw weights when there is no EMA entry
    assert select_state_dict({"model": sd, "epoch": 1}).keys() == sd.keys()


# ---------------------------------------------------------------------------------------------- strict loading


def test_wrong_model_report_lists_keys_with_counts_and_touches_nothing() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    other = nn.Sequential(OrderedDict(proj=nn.Linear(4, 16), blocks=blocks))  # 2 + 30 keys
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, other.state_dict(), what="checkpoint 'mar_huge.pth'")
    msg = str(err.value)
    assert msg.startswith("checkpoint 'mar_huge.pth' does not match Sequential (32 keys in the file, 6 in the model):")
    assert "\n  missing (4):\n    norm.weight\n    norm.bias\n    head.weight\n    head.bias" in msg
    assert "\n  unexpected (30):\n    blocks.0.weight\n" in msg and "\n    ... and 10 more" in msg
    assert "blocks.9.bias" in msg and "blocks.10.weight" not in msg  # 20 listed
    assert "\n  mis-shaped (2):\n    proj.weight: checkpoint (16, 4), model (8, 4)\n" in msg
    assert "\n    proj.bias: checkpoint (16,), model (8,)" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    good = {k: v + 1 for k, v in before.items()}
    load_state_dict_strict(model, good)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


def test_compare_state_dict_accepts_a_mapping_and_ignores_on_request() -> None:
    sd = _model().state_dict()
    extra = {**sd, "loss.logvar": torch.zeros(())}
    assert not compare_state_dict(sd, sd)
    assert compare_state_dict(sd, extra).unexpected == ["loss.logvar"]
    assert not compare_state_dict(sd, extra, ignore_unexpected=["loss.logvar"])


def test_vae_loader_reports_through_the_shared_error(tmp_path: Path) -> None:
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": _model().state_dict()}, path)
    message = r"VAE checkpoint .*kl16\.ckpt[\s\S]*missing \(312\)[\s\S]*unexpected \(6\):\s+proj.weight"
    with pytest.raises(CheckpointError, match=message):
        with torch.device("meta"):
            load_vae(path)


# ---------------------------------------------------------------------------------------------- CLI exit


def test_exit_on_error_prints_one_line_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_error(prog="main_mar.py"):
            load_checkpoint(tmp_path / "missing.pth")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("main_mar.py: error: checkpoint not found:") and "missing.pth" in err
    with pytest.raises(KeyError):  # other errors are not swallowed
        with exit_on_error(prog="x"):
            raise KeyError("bug")
