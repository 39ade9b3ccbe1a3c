"""Reading ``results.json`` files written by :func:`disa.evaluation.run_evaluation` into flat run summaries.

Used by ``scripts/reproduce_tables.py`` (markdown tables) and ``scripts/plot_tradeoff.py`` (speed–quality plots,
:func:`plot_tradeoff`, also drawn by the Fashion-MNIST demo and ablation).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluation import RESULTS_NAME

__all__ = ["RunSummary", "load_run", "load_runs", "metric_keys", "plot_tradeoff"]


@dataclass(frozen=True)
class RunSummary:
    """One evaluation run: its label, seconds per image (rank 0, as upstream prints it), NFE and metrics."""

    label: str
    path: Path
    sec_per_image: float | None
    images_per_second: float | None
    nfe_per_image: float | None
    num_images: int
    world_size: int
    metrics: dict[str, float] = field(default_factory=dict)


def _results_path(path: Path) -> Path:
    return path / RESULTS_NAME if path.is_dir() else path


def load_run(spec: str | Path) -> RunSummary:
    """Load ``LABEL=PATH`` or ``PATH`` (a results.json or the sample folder holding it).

    Without a label, the sample folder's name is used: the official save-folder names encode the setting
    (e.g. ``ariter64-diffsteps-linear-50-to-5-...``).
    """
    text = str(spec)
    label, _, raw = text.rpartition("=") if "=" in text else ("", "", text)
    path = _results_path(Path(raw))
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_NAME} at {path} (pass a results.json or the sample folder holding it)")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        timing, nfe, images = data["timing"], data["nfe"], data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results.json written by disa.evaluation: {err}") from err
    metrics = {k: float(v) for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return RunSummary(
        label=label or path.parent.name,
        path=path,
        sec_per_image=timing.get("sec_per_image"),
        images_per_second=timing.get("images_per_second"),
        nfe_per_image=nfe.get("per_image"),
        num_images=int(images["num_images"]),
        world_size=int(data.get("world_size", 1)),
        metrics=metrics,
    )


def load_runs(specs: Sequence[str | Path]) -> list[RunSummary]:
    if not specs:
        raise ValueError("give at least one results.json (or LABEL=PATH)")
    return [load_run(s) for s in specs]


def metric_keys(runs: Sequence[RunSummary]) -> list[str]:
    """Metric names present in any run, in first-seen order."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.metrics if k not in keys]
    return keys


def plot_tradeoff(runs: Sequence[RunSummary], metric: str | None, out: Path, *,
                  xlabel: str = "seconds per image (rank 0)") -> Path:  # fmt: skip
    """Time per image vs ``metric`` (default: the first metric found), one point per run, written to ``out``.

    Runs whose labels share a prefix before ``:`` (``MAR-B:original``, ``MAR-B:DiSA``) are one connected series;
    each point is annotated with the part after the ``:``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (CI, clusters)
    import matplotlib.pyplot as plt

    keys = metric_keys(runs)
    if metric is None:
        if not keys:
            raise ValueError("no run has metrics; evaluate with metrics first")
        metric = keys[0]
    usable = [r for r in runs if r.sec_per_image is not None and metric in r.metrics]
    if not usable:
        raise ValueError(f"no run has both a timing and the metric {metric!r} (available: {', '.join(keys) or 'none'})")
    series: dict[str, list[RunSummary]] = {}
    for r in usable:
        series.setdefault(r.label.split(":")[0] if ":" in r.label else "", []).append(r)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, members in series.items():
        members = sorted(members, key=lambda r: r.sec_per_image or 0.0)
        xs, ys = [r.sec_per_image for r in members], [r.metrics[metric] for r in members]
        ax.plot(xs, ys, marker="o", label=name or None, linestyle="-" if name else "none")
        for r, x, y in zip(members, xs, ys):
            ax.annotate(r.label.split(":")[-1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out
