"""Upstream-layout helpers of FlowAR (``util/download.py``); everything shared lives in :mod:`disa`."""
