"""DiSA shared library (import name ``disa``).

Everything the four model families share lives here: step-count schedules and time grids
(:mod:`disa.schedules`), explicit noise sources (:mod:`disa.noise`), the Gaussian diffusion used by the
MAR/Harmon heads (:mod:`disa.diffusion`), flow samplers for FlowAR/xAR (:mod:`disa.flow`),
classifier-free guidance wrappers (:mod:`disa.guidance`) and the KL-16 VAE (:mod:`disa.vae`).
"""
