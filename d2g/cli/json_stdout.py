"""`--json` keeps stdout to the one JSON document, whatever Ray prints meanwhile.

Ray's driver prints `(raylet) A worker died ...`, forwarded `(pid=...)` worker lines and
`(autoscaler)` lines to `sys.stdout` from its own threads (ray/_private/worker.py,
print_to_stdstream), and a local Ray started by the command inherits file descriptor 1. While a
command with `--json` runs, both go to stderr; the JSON is printed after.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_own_ray(was_running: bool) -> None:
    """Stop a Ray the command started (one already running, as in tests, is left alone): Ray
    flushes its last de-duplicated log lines while it shuts down, and they must land on stderr too."""
    if not was_running and _ray_running():
        sys.modules["ray"].shutdown()


@contextlib.contextmanager
def stdout_kept_for_json(enabled: bool = True) -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr, at both levels (Python's sys.stdout
    and file descriptor 1), when `enabled` (the command's --json)."""
    if not enabled:
        yield
        return
    was_running = _ray_running()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            try:
                yield
            finally:
                _shutdown_own_ray(was_running)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
