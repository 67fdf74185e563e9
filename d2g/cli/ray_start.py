"""Start or join Ray, one way for every d2g command.

With RAY_ADDRESS set (a cluster, or `ray job submit`), join it. Otherwise start a local Ray that
exists only for this command, whose workers are the work: they run at niceness 0, because Ray's
default of 15 lets the driver, the daemons and the storage client preempt them (bench/pairgen_bench.py:
0.91-0.95 of a bare loop at 15, 0.97-1.02 at 0). Worker output reaches the driver, so the cause of
a failed actor or training worker is visible where the command was typed.
"""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None):
    """The `ray` module, initialised: joined to RAY_ADDRESS if set, else a local Ray with
    `num_cpus` (default: all) CPUs and no dashboard. A Ray already initialised is used as it is."""
    import logging

    import ray

    from d2g.cli.quiet import VERBOSE_ENV

    if ray.is_initialized():
        return ray
    # Ray's own start-up notices (token auth, "Started a local Ray instance") only with -v.
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    level = logging.INFO if verbose else logging.ERROR
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=level)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 logging_level=level)
    return ray
