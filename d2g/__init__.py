"""d2g's shared foundations: what pairgen and distill both use lives here, below both of them.

- `d2g.teacher`: loading a diffusers teacher, its pinned ODE solvers and schedulers, per-sample
  noise, the VAE's latent <-> pixel mapping and latent shapes.
- `d2g.shapes`: the embedded shapes world, its teachers, evaluator and LatentLPIPS data builders.
- `d2g.cli`: option parsing (YAML < flags), one-line errors, starting or joining Ray.
- `d2g.testing`: tiny offline teachers of the real architectures (tests, benchmarks, smoke runs).
- `d2g.demo`: the end-to-end demo; the one module above pairgen and distill.

Only `d2g.demo` may import pairgen or distill; everything else here imports `store` at most.
"""
