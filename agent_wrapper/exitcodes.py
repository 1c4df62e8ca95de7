"""Exit status mapping, as a shell and tini do it."""

from __future__ import annotations

import os

NOT_EXECUTABLE = 126
NOT_FOUND = 127


def from_wait_status(status: int) -> tuple[int, int | None]:
    """(exit code, terminating signal or None): 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return 1, None


def signal_name(sig: int) -> str:
    import signal  # its enum, only when a name is needed (not before the agent starts)

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"
