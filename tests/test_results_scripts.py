"""scripts/reproduce_tables.py and scripts/plot_tradeoff.py on results.json files written by the real loop."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from _toy_eval import ToyGenerator
from disa.evaluation import ClassBalancedLabels, EvalConfig, run_evaluation
from disa.results import load_run

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real evaluation runs of the toy model, with made-up metric values passed through the metrics hook."""
    out = {}
    for name, fd in [("orig", 12.5), ("disa", 13.0)]:
        folder = tmp_path_factory.mktemp("runs") / name
        run_evaluation(
            ToyGenerator(num_classes=4).eval(),
            EvalConfig(sample_dir=folder, num_images=8, batch_size=4, progress=False),
            conditions=ClassBalancedLabels(8, 4),
            metrics_fn=lambda d, fd=fd: {"FD_EffNet-Lite0": fd},
            device=torch.device("cpu"),
        )
        out[name] = folder
    return out


def test_load_run_reads_timing_nfe_and_metrics(runs):
    r = load_run(f"MAR:orig={runs['orig']}")
    assert r.label == "MAR:orig" and r.nfe_per_image == 9 and r.num_images == 8
    assert r.metrics == {"FD_EffNet-Lite0": 12.5} and r.sec_per_image > 0
    assert load_run(runs["disa"] / "results.json").label == "disa"  # default label: the sample folder's name


def test_markdown_table(runs, capsys):
    tables = _script("reproduce_tables")
    assert tables.main([f"a={runs['orig']}", f"b={runs['disa']}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | FD_EffNet-Lite0 | NFE/img | s/img")
    assert lines[2].startswith("| a | 12.500 | 9 |") and "1.00x" in lines[2]
    assert lines[3].startswith("| b | 13.000 | 9 |")
    assert tables.main([f"a={runs['orig']}", "--baseline", "5"]) == 2
    assert "--baseline must index one of the 1 runs" in capsys.readouterr().err


def test_plot_and_bad_inputs(runs, tmp_path, capsys):
    plot = _script("plot_tradeoff")
    out = tmp_path / "plot.png"
    assert plot.main([f"MAR:orig={runs['orig']}", f"MAR:disa={runs['disa']}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(runs["orig"]), "--metric", "FID", "--out", str(out)]) == 2
    assert "no run has both a timing and the metric 'FID' (available: FD_EffNet-Lite0)" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "no results.json at" in capsys.readouterr().err
