"""Start or join Ray, one way for every d2g command.

With RAY_ADDRESS set (a cluster, or `ray job submit`), join it. Otherwise start a local Ray that
exists only for this command, whose workers are the work: they run at niceness 0, because Ray's
default of 15 lets the driver, the daemons and the storage client preempt them (bench/pairgen_bench.py:
0.91-0.95 of a bare loop at 15, 0.97-1.02 at 0). Worker output reaches the driver (unless the caller
asks otherwise: `distill train` forwards it only with -v), so the cause of a failed actor or training
worker is visible where the command was typed. When stderr is not a terminal (CI logs, files, pipes),
Ray prints the forwarded lines without its ANSI colour prefix.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

# Ray's driver colours each forwarded worker line's "(name pid=...)" prefix unless this is "0"
# (ray/_private/worker.py, print_worker_logs); read when each line is printed, in the driver only.
RAY_COLOR_PREFIX_ENV = "RAY_COLOR_PREFIX"


def plain_ray_output_unless_tty() -> None:
    """Make Ray's forwarded worker lines plain text (no ANSI colour codes) when stderr is not a
    terminal; a user's own RAY_COLOR_PREFIX wins."""
    if not sys.stderr.isatty():
        os.environ.setdefault(RAY_COLOR_PREFIX_ENV, "0")


class RayAddressError(RuntimeError):
    """RAY_ADDRESS names something this command cannot join; the message says what to set instead."""


def check_ray_address(address: str) -> None:
    """RayAddressError for a RAY_ADDRESS that `ray.init` cannot join: the job server's http(s)://
    URL, which users export for `ray job submit` (jobs/README.md) and then run a command outside
    a job with it still set."""
    if address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={address} is a Ray job server; submit this command with `ray job submit "
            "--working-dir . -- ...`, or set RAY_ADDRESS to the cluster's GCS address (HEAD_NODE:6379), "
            "or unset it to run on this machine")


def ensure_ray(num_cpus: int | None = None, worker_logs: bool = True) -> ModuleType:
    """The `ray` module, initialised: joined to RAY_ADDRESS if set, else a local Ray with
    `num_cpus` (default: all) CPUs and no dashboard. A Ray already initialised is used as it is.

    Args:
        num_cpus: CPUs of a local Ray (ignored when joining a cluster).
        worker_logs: forward the stdout/stderr of this job's workers to this process (Ray's
            `log_to_driver`). They stay in the session's log files either way.
    """
    import logging

    import ray

    from d2g.cli.quiet import is_verbose

    plain_ray_output_unless_tty()
    if ray.is_initialized():
        return ray
    # Ray's own start-up notices (token auth, "Started a local Ray instance") only with -v.
    level = logging.INFO if is_verbose() else logging.ERROR
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=worker_logs, logging_level=level)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": always a new Ray of our own. A bare ray.init() would instead join any
        # cluster it finds running on this machine (`ray start` on a head node), and then refuse
        # num_cpus with a traceback; joining a cluster is what RAY_ADDRESS says.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=worker_logs, logging_level=level)
    return ray
