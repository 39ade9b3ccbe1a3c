"""disa.benchmark: FLOP counting and the side-by-side table (no timing assertions)."""
from __future__ import annotations

import pytest
import torch

from disa.benchmark import Measurement, Setting, count_flops, format_table, run_settings


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_table_ratios_are_relative_to_the_first_row():
    table = format_table([Measurement("orig", 2.0, 100, 4.0), Measurement("disa", 0.5, 25, 1.0)])
    lines = table.splitlines()
    assert lines[1].split()[-2:] == ["1.00x", "1.00x"]
    assert lines[2].split()[-2:] == ["4.00x", "4.00x"]
    with pytest.raises(ValueError, match="no measurements"):
        format_table([])


def test_run_settings_reports_nfe_and_flops_per_image():
    w = torch.randn(32, 32)

    def generate() -> float:
        x = torch.randn(4, 32)
        for _ in range(3):
            x = x @ w
        return 3.0

    (m,) = run_settings([Setting("three matmuls", generate, batch_size=4)], torch.device("cpu"))
    assert m.nfe_per_image == 3.0 and m.seconds_per_image > 0
    assert m.tflops_per_image == pytest.approx(3 * 2 * 4 * 32 * 32 / 4 / 1e12)
