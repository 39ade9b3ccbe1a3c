"""FlowAR with annealed flow steps (import name ``flowar_disa``). The model lands with its own issue."""
