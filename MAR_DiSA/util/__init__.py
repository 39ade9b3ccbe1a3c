"""Upstream-layout helpers of MAR (``util/download.py``); everything shared lives in :mod:`disa`."""
