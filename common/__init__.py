"""DiSA shared library (import name ``disa``).

Everything the four model families share lives here:

* sampling: step-count schedules and time grids (:mod:`disa.schedules`), explicit noise sources
  (:mod:`disa.noise`), the Gaussian diffusion of the MAR/Harmon heads (:mod:`disa.diffusion`), flow samplers for
  FlowAR/xAR (:mod:`disa.flow`), classifier-free guidance wrappers (:mod:`disa.guidance`);
* networks: the KL-16 VAE (:mod:`disa.vae`) and building blocks with the official key names (:mod:`disa.layers`);
* evaluation: torchrun helpers (:mod:`disa.distributed`), the generation loop (:mod:`disa.evaluation`), metrics
  (:mod:`disa.metrics`), checkpoint loading (:mod:`disa.checkpoints`), downloads (:mod:`disa.download`),
  results files (:mod:`disa.results`) and speed benchmarks (:mod:`disa.benchmark`).
"""
