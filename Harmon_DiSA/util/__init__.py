"""Helpers of Harmon (``util/download.py``); everything shared lives in :mod:`disa`."""
