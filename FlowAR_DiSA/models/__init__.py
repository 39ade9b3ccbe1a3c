"""FlowAR model files (upstream layout): ``flowar.py`` (the model and factories), ``flowmodel.py`` (the flow head),
``rope.py`` (2-D RoPE), ``layers.py`` (shared transformer pieces), ``sampler.py`` (adapter onto :mod:`disa.flow`)."""
from .flowar import FlowAR, FlowARConfig, flowar_huge, flowar_large, flowar_small

__all__ = ["FlowAR", "FlowARConfig", "flowar_small", "flowar_large", "flowar_huge"]
