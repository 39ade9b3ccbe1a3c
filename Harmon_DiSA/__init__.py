"""Harmon text-to-image with DiSA (import name ``harmon_disa``). The model lands with its own issue."""
