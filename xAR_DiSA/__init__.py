"""xAR with annealed flow steps (import name ``xar_disa``). The model lands with its own issue."""
