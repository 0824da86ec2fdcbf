"""fastmil on Ray: hyper-parameter sweeps with Ray Tune (:mod:`ray_jobs.sweep`) and data-parallel training with
Ray Train (:mod:`ray_jobs.ddp`). Both run fastmil's own ``fit``; install with ``pip install -e ".[ray]"``."""
