"""MAR with Diffusion Step Annealing (import name ``mar_disa``).

Model files keep the upstream layout (``models/diffloss.py``, ...); everything shared lives in :mod:`disa`.
"""
