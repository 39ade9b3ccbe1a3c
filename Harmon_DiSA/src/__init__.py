"""Harmon's source tree (upstream layout: ``src/models/harmon.py``); the MAR parts come from :mod:`mar_disa`."""
