"""Child processes that a test interrupts with SIGINT, as a terminal's Ctrl-C would."""

from __future__ import annotations

import signal


def sigint_as_a_terminal_gives_it() -> None:
    """A Popen preexec_fn: SIGINT back to its default in the child. A suite started as a background
    job of a non-interactive shell inherits SIGINT ignored, and a Python child then keeps it ignored
    (no KeyboardInterrupt): the Ctrl-C tests would test the harness, not the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
