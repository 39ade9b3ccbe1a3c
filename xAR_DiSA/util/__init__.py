"""Upstream-layout helpers of xAR (``util/download.py``); everything shared lives in :mod:`disa`."""
