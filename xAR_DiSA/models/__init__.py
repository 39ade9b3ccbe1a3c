"""xAR model files (upstream layout): ``xar.py`` (network, factories, ``sample_tokens``), ``rope.py`` (cell-ordered
2-D RoPE), ``sampler.py`` (adapter from the cache protocol to :mod:`disa.flow`)."""
