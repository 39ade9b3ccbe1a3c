"""Reading official checkpoints safely, choosing the EMA weights as the official code does, loading strictly.

Layouts (see ``specs/mar.md`` §5 and ``specs/flowar_xar.md`` §5):

* MAR (``misc.save_model``): ``{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}`` where ``args`` is an
  ``argparse.Namespace``; official generation always uses ``model_ema`` (``evaluate(use_ema=True)`` and the demo
  notebook both load it), training resumes from ``model``.
* FlowAR / xAR released files: a flat ``state_dict`` (``OrderedDict`` of fp32 tensors, FlowAR-S pickled with
  ``torch._utils._rebuild_parameter``); their training checkpoints have MAR's layout.

So ``load_checkpoint(path)`` (``key="auto"``) returns a flat file as is, else ``model_ema``, else ``model``.
(FlowAR/xAR's ``eval.py`` only loads flat files — a training checkpoint fails its strict load — whereas ``auto``
picks such a file's EMA weights; pass ``key=None`` to insist on the flat release layout.)
``--resume`` in MAR takes a *directory*: :func:`resolve_checkpoint_path` maps it to ``<dir>/checkpoint-last.pth``
as upstream does — but where upstream silently generated with random weights when that file was absent, here a
missing file is an error that names the path.

Loading is loud: :func:`load_state_dict_strict` raises :class:`CheckpointError` listing the missing, unexpected and
mis-shaped keys (with counts, long lists truncated) before touching the model, and :func:`exit_on_error` turns
that into a one-paragraph message and exit status 1 in a CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "AUTO",
    "CheckpointError",
    "CheckpointNotFoundError",
    "KeyMismatch",
    "compare_state_dict",
    "resolve_checkpoint_path",
    "read_checkpoint",
    "select_state_dict",
    "load_checkpoint",
    "load_state_dict_strict",
    "exit_on_error",
]

AUTO = "auto"
"""``key`` value of :func:`load_checkpoint`: a flat state dict as is, else ``model_ema``, else ``model``."""

# The file name that MAR's --resume DIR (and misc.save_model) uses inside the directory.
_RESUME_FILE = "checkpoint-last.pth"

# What the official pickles hold besides tensors and plain containers: the saved command line.
_DEFAULT_SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of the wrong layout, or not matching the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class KeyMismatch:
    """How a state dict differs from what a model expects. Falsy when it matches."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def report(self, limit: int = 20) -> str:
        """Indented sections ``missing (N):`` / ``unexpected (N):`` / ``mis-shaped (N):``, each listing at most
        ``limit`` keys followed by ``... and K more``. Mis-shaped entries read ``key: checkpoint (..), model (..)``."""
        sections = [
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", [f"{k}: checkpoint {got}, model {want}" for k, got, want in self.misshaped]),
        ]
        out = []
        for title, keys in sections:
            if not keys:
                continue
            shown = "\n    ".join(keys[:limit])
            more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
            out.append(f"\n  {title} ({len(keys)}):\n    {shown}{more}")
        return "".join(out)


def compare_state_dict(
    expected: nn.Module | Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    ignore_unexpected: Sequence[str] = (),
) -> KeyMismatch:
    """Compare ``state`` with a model's ``state_dict()`` (or any ``{key: tensor}``): keys and shapes, in the
    model's key order. Keys in ``ignore_unexpected`` are not reported as unexpected."""
    reference = expected.state_dict() if isinstance(expected, nn.Module) else expected
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    ignored = set(ignore_unexpected)
    return KeyMismatch(
        missing=[k for k in shapes if k not in state],
        unexpected=[k for k in state if k not in shapes and k not in ignored],
        misshaped=[
            (k, tuple(state[k].shape), s) for k, s in shapes.items() if k in state and tuple(state[k].shape) != s
        ],
    )


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file; ``<path>/checkpoint-last.pth`` if it is a directory (MAR's ``--resume``);
    :class:`CheckpointNotFoundError` naming what was looked for otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / _RESUME_FILE
        if candidate.is_file():
            return candidate
        raise CheckpointNotFoundError(
            f"checkpoint directory {os.fspath(p)!r} has no {_RESUME_FILE} (a --resume directory must hold the "
            "file that training wrote there; pass the .pth file itself otherwise)"
        )
    if not p.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint not found: {os.fspath(p)!r} (refusing to go on with random weights; check the path, "
            "or fetch the official files with util/download.py)"
        )
    return p


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    weights_only: bool = True,
    extra_safe_globals: Sequence[Any] = (),
    map_location: str | torch.device = "cpu",
) -> Any:
    """Unpickle a checkpoint file (or ``<dir>/checkpoint-last.pth``) on ``map_location``.

    Why an allow-list and not ``weights_only=False``: the official MAR checkpoints also pickle the training command
    line as an ``argparse.Namespace``, which torch >= 2.6's default ``weights_only=True`` refuses. Turning
    ``weights_only`` off would let any pickled object run code on load; adding ``Namespace`` with
    ``torch.serialization.add_safe_globals`` would widen the allow-list of the whole process (every later
    ``torch.load`` anywhere). So the file is read with ``weights_only=True`` inside the scoped
    ``torch.serialization.safe_globals([argparse.Namespace, *extra_safe_globals])`` context, and the allow-list is
    restored on exit. ``Namespace`` is safe to allow: it only receives attributes, it runs no code of the pickle's
    choosing. Anything else (a custom class in a third-party checkpoint) is refused with the name of the offending
    global; pass it in ``extra_safe_globals`` or, for a file you trust, ``weights_only=False``.
    """
    p = resolve_checkpoint_path(path)
    allowed = [*_DEFAULT_SAFE_GLOBALS, *extra_safe_globals]
    scope = (
        torch.serialization.safe_globals(allowed)
        if weights_only and hasattr(torch.serialization, "safe_globals")  # torch >= 2.5
        else contextlib.nullcontext()
    )
    try:
        with scope:
            return torch.load(p, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        # torch names the refused class or function ("... GLOBAL posix.system ..."); other failures (an HTML page,
        # a truncated file) also say "Weights only load failed" but name no global.
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) if weights_only else None
        if found:
            raise CheckpointError(
                f"refusing to unpickle {os.fspath(p)!r}: it contains {found.group(1)}, which is not on the "
                f"allow-list (tensors, plain containers, {', '.join(_qualname(g) for g in allowed)}). If you trust "
                "the file, add that class to extra_safe_globals or load with weights_only=False."
            ) from err
        with open(p, "rb") as f:
            head = f.read(256).lstrip()
        if head.startswith(b"<"):  # upstream's downloader saves a failed request's error page under the .pth name
            raise CheckpointError(
                f"{os.fspath(p)!r} is an HTML/XML page, not a checkpoint (a failed download?); fetch it again"
            ) from err
        raise CheckpointError(
            f"could not read checkpoint {os.fspath(p)!r} ({type(err).__name__}: {_cause_line(str(err))}). "
            "Is it a truncated or corrupted download?"
        ) from err


def _cause_line(message: str) -> str:
    """The informative line of a torch.load error (its weights-only variant opens with generic advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Weights only load failed" in message:
        boilerplate = ("Weights only load failed", "Please file", "Check the")
        lines = [line for line in lines if not line.startswith(boilerplate)]
    return lines[0] if lines else "no details"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(ckpt: Any, key: str | None = AUTO, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the state dict out of an unpickled checkpoint.

    ``key``: ``"auto"`` — a flat state dict as is, else ``ckpt["model_ema"]`` (the weights the official evaluation
    generates with), else ``ckpt["model"]``; ``None`` — the file must be a flat state dict (FlowAR / xAR releases);
    any other string — that entry (``"model"`` for the raw training weights). ``source`` names the file in errors.
    """
    if not isinstance(ckpt, Mapping) or len(ckpt) == 0:
        raise CheckpointError(f"{source} holds {type(ckpt).__name__}, not a state dict or a dict of them")
    flat = _is_state_dict(ckpt)
    entries = sorted(map(str, ckpt))[:12]
    if key == AUTO:
        if flat:
            return dict(ckpt)
        for candidate in ("model_ema", "model"):
            if candidate in ckpt:
                return select_state_dict(ckpt, candidate, source=source)
        raise CheckpointError(
            f"{source} is neither a flat state dict nor has a 'model_ema' or 'model' entry (entries: {entries})"
        )
    if key is None:
        if not flat:
            raise CheckpointError(
                f"{source} is not a flat state dict (entries: {entries}); pass key='model_ema' or key='model'"
            )
        return dict(ckpt)
    if flat:
        raise CheckpointError(
            f"{source} is a flat state dict with no {key!r} entry (the FlowAR/xAR release layout); load it with "
            "key=None or key='auto'"
        )
    if key not in ckpt:
        raise CheckpointError(f"{source} has no {key!r} entry; its entries are {entries}")
    state = ckpt[key]
    if not _is_state_dict(state):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] if isinstance(state, Mapping) else []
        bad = sorted(bad)[:5]
        detail = f"non-tensor values at {bad}" if bad else f"a {type(state).__name__}"
        raise CheckpointError(f"{source}[{key!r}] is not a state dict ({detail})")
    return dict(state)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str | None = AUTO,
    weights_only: bool = True,
    extra_safe_globals: Sequence[Any] = (),
) -> dict[str, torch.Tensor]:
    """The state dict to load from ``path`` (a file, or a ``--resume`` directory holding ``checkpoint-last.pth``),
    on the CPU. ``key`` selects as :func:`select_state_dict` does — by default the EMA weights when the file has
    them, as the official evaluation does; the reading is :func:`read_checkpoint`'s (safe, scoped allow-list)."""
    p = resolve_checkpoint_path(path)
    ckpt = read_checkpoint(p, weights_only=weights_only, extra_safe_globals=extra_safe_globals)
    return select_state_dict(ckpt, key, source=f"checkpoint {os.fspath(p)!r}")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)``, but checked first: any missing, unexpected or mis-shaped key
    raises :class:`CheckpointError` with a readable report and leaves the model untouched. ``what`` names the
    source in the message (e.g. the path)."""
    mismatch = compare_state_dict(model, state)
    if mismatch:
        raise CheckpointError(
            f"{what} does not match {type(model).__name__} ({len(state)} keys in the file, "
            f"{len(model.state_dict())} in the model):{mismatch.report()}\n"
            "  Is it a checkpoint of another model or size (check --model and the size flags)?"
        )
    model.load_state_dict(state, strict=True)


@contextlib.contextmanager
def exit_on_error(*errors: type[BaseException], prog: str | None = None) -> Iterator[None]:
    """For CLIs: turn ``errors`` (default: :class:`CheckpointError`) raised in the block into
    ``<prog>: error: <message>`` on stderr and exit status 1, instead of a traceback::

        with exit_on_error(CheckpointError, EvaluationError):
            main(args)
    """
    caught = errors or (CheckpointError,)
    try:
        yield
    except caught as err:
        name = prog or Path(sys.argv[0]).name or "disa"
        print(f"{name}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
