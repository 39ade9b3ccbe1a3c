"""Number checks shared by the command lines and the typed configs (one implementation each).

* :func:`int_at_least`, :func:`finite_float` — argparse ``type=`` callables: a bad value ends the program at parse
  time with ``<prog>: error: argument --x: expected ...`` and exit status 2, before anything is loaded or written;
* :func:`check_int_at_least` — the same rule for a config field set from Python (``ValueError`` naming the field);
* :class:`UsageError` — bad input found at run time (a missing data folder, a missing checkpoint to resume), which
  the command lines print as one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

__all__ = ["int_at_least", "finite_float", "check_int_at_least", "UsageError"]


class UsageError(RuntimeError):
    """Bad input found at run time (missing data folder, missing checkpoint to resume): a one-line CLI error."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"  # what argparse and the benchmark knobs print for the type
    return parse


def finite_float(low: float | None = None, *, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers (NaN and infinities refused), ``>= low`` (``> low`` when not
    ``inclusive``) when ``low`` is given."""
    bound = "" if low is None else f" {'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value >= low if inclusive else value > low))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = f"number{bound.replace(' ', '')}"
    return parse


def check_int_at_least(name: str, value: Any, low: int = 1) -> int:
    """``value`` when it is an integer >= ``low`` (``bool`` is refused); otherwise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
