"""Harmon text-to-image with DiSA (import name ``harmon_disa``).

The model, typed configs and strict loading are in ``src/models``, the configs in ``configs/models/*.py``, and the
scripts are ``scripts/{text2image,batch_text2image,benchmark}.py``. See Harmon_DiSA/README.md.
"""
