"""Shared test helpers: golden parity data copied from ``../shared/golden`` (see tests/fixtures/golden/README.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"


def load_golden(relpath: str) -> Any:
    """Load one golden file: ``.json`` as Python objects, ``.pt`` as plain dicts of CPU tensors."""
    path = GOLDEN_DIR / relpath
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def golden() -> Callable[[str], Any]:
    return load_golden
