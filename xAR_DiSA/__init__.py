"""xAR with annealed flow steps (import name ``xar_disa``): models in ``models/``, weights via ``util/download.py``."""
