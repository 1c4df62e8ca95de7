"""Spawning the agent in its own session and process group, and signalling that group."""

from __future__ import annotations

import _signal as signal  # `signal` without its enum wrappers (see sidecar/__main__.py)
import errno
import fcntl
import os
import time
from collections.abc import Mapping, Sequence

from .events import SpawnFailed, Started
from .exitcodes import NOT_EXECUTABLE, NOT_FOUND
from .values import Value

# The agent starts with the default disposition of the signals Python ignores (SIGPIPE,
# SIGXFSZ) and of those the sidecar forwards (signals.FORWARDED): a forwarded signal must take
# effect even where the sidecar's own parent left it ignored (a shell's background job starts
# with SIGINT and SIGQUIT ignored).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


# Each pipe holds this much of the agent's output before its writes block: enough to cover
# the sidecar's own start-up and a burst, within Linux's default per-user pipe allowance
# (/proc/sys/fs/pipe-max-size, 1 MiB). Where the kernel refuses, the default (64 KiB) stays.
PIPE_BUFFER_BYTES = 1 << 20


class Agent(Value):
    __slots__ = ("pid", "stdout_fd", "stderr_fd", "started")

    def __init__(self, pid: int, stdout_fd: int, stderr_fd: int, started: Started) -> None:
        self.pid = pid
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.started = started

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the agent's process group. False when the group is gone."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except (PermissionError, OSError):
            return False


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None,
          pipe_buffer: int = PIPE_BUFFER_BYTES) -> Agent | SpawnFailed:
    """Start ``argv`` with stdout and stderr on fresh pipes of ``pipe_buffer`` bytes, stdin inherited.

    The agent leads a new session (so its group can be signalled as a whole), with an
    empty signal mask and default dispositions, whatever this process had.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (out_w, err_w):
        _grow(fd, pipe_buffer)
    actions = [
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
        (os.POSIX_SPAWN_CLOSE, out_r),
        (os.POSIX_SPAWN_CLOSE, err_r),
    ]
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            dict(os.environ if env is None else env),
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_RESET_SIGNALS,
        )
    except (OSError, ValueError) as exc:  # ValueError: an empty command name
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        return _failure(argv[0], exc)
    os.close(out_w)
    os.close(err_w)
    return Agent(pid=pid, stdout_fd=out_r, stderr_fd=err_r, started=Started(pid=pid, ts=time.time()))


def _grow(fd: int, size: int) -> None:
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass  # over the per-user limit or the maximum: keep what the kernel gave


def _failure(cmd: str, exc: OSError | ValueError) -> SpawnFailed:
    if not isinstance(exc, OSError):
        return SpawnFailed(NOT_FOUND, f"{cmd!r}: command not found")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return SpawnFailed(NOT_FOUND, f"{cmd}: command not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR):
        return SpawnFailed(NOT_EXECUTABLE, f"{cmd}: not executable ({os.strerror(exc.errno)})")
    return SpawnFailed(NOT_EXECUTABLE, f"{cmd}: cannot start ({exc.strerror or exc})")
