"""FlowAR with annealed flow steps (import name ``flowar_disa``): models in ``models/``, weights via ``util/download.py``."""
