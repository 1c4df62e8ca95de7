"""Signal forwarding, zombie reaping and the agent's lifetime, the way tini does it.

All signals of interest are blocked in every thread (call ``block()`` before starting any
thread) and taken synchronously with ``sigtimedwait`` in the main thread, so there are no
handlers running at awkward moments and no lost SIGCHLD.
"""

from __future__ import annotations

import _signal as signal  # `signal` without its enum wrappers (see sidecar/__main__.py)
import os
import time
from collections.abc import Callable

from .events import Exited
from .exitcodes import from_wait_status
from .process import Agent

FORWARDED = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    }
)
STOPPING = frozenset({signal.SIGTERM, signal.SIGINT})
WAITED = FORWARDED | {signal.SIGCHLD}
PR_SET_CHILD_SUBREAPER = 36


def block() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)


def wake(thread_id: int) -> None:
    """From any thread: have ``Supervisor.wait`` in thread ``thread_id`` run its tick now.

    The wake-up is a SIGCHLD to that thread: the wait takes it already, and a SIGCHLD that
    did not come from the agent's exit only runs the tick. A standard signal is never refused
    (a real-time one is, once the user's queue of pending signals is full) and repeats merge
    into one, so a flood of commands queues nothing. Sent before the wait begins, it stays
    pending (blocked) and is taken by the first look; where it is not blocked, its default
    action is to be ignored."""
    signal.pthread_kill(thread_id, signal.SIGCHLD)


def become_subreaper(prctl: Callable[[], bool] | None = None) -> bool:
    """Orphans of the agent are re-parented to us, so we can reap them (not needed as PID 1).
    ``prctl``, when given, makes the call (PR_SET_CHILD_SUBREAPER) natively; else ctypes."""
    if os.getpid() == 1:
        return True
    if prctl is not None:
        return prctl()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap(agent_pid: int) -> int | None:
    """Reap every exited child without blocking; the agent's wait status if it was among them."""
    status_of_agent = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status_of_agent
        if pid == 0:
            return status_of_agent
        if pid == agent_pid:
            status_of_agent = status


class Supervisor:
    """Waits for the agent, forwarding signals and escalating a stop to SIGKILL after a grace."""

    def __init__(
        self,
        agent: Agent,
        kill_grace_s: float,
        *,
        on_signal: Callable[[int], None] | None = None,
        on_kill: Callable[[], None] | None = None,
    ) -> None:
        self.agent = agent
        self.kill_grace_s = kill_grace_s
        self._on_signal = on_signal
        self._on_kill = on_kill
        self._kill_at: float | None = None
        self.killed_after_grace = False

    @property
    def stopping(self) -> bool:
        """Whether a graceful stop is under way (a stopping signal or ``stop``)."""
        return self._kill_at is not None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Graceful stop: ``sig`` now (and SIGCONT, so that a stopped group sees it), SIGKILL to
        the group after the grace period."""
        self.agent.signal_group(sig)
        self.agent.signal_group(signal.SIGCONT)
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self.kill_grace_s

    def wait(self, tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> Exited:
        """Block until the agent exits. ``tick`` runs on every ``wake`` of this thread (and
        every SIGCHLD) and at least every ``tick_s`` (control commands); an idle wait wakes no
        more often than that."""
        while True:
            timeout = tick_s
            if self._kill_at is not None:
                timeout = max(0.0, min(timeout, self._kill_at - time.monotonic()))
            info = signal.sigtimedwait(WAITED, timeout)
            if info is not None and info.si_signo not in WAITED:
                info = None  # a debugger attaching (ptrace) can wake us with no signal of ours
            if info is None or info.si_signo == signal.SIGCHLD:
                # Also after a quiet period: a SIGCHLD taken by a thread that does not block it
                # (in a process that embeds this) must not leave the exit unseen.
                status = reap(self.agent.pid)
                if status is not None:
                    if self._kill_at is not None:
                        # stopped, and the leader is gone: so is the rest of its group
                        self.agent.signal_group(signal.SIGKILL)
                    code, sig = from_wait_status(status)
                    return Exited(self.agent.pid, code, sig, time.time())
            if info is not None and info.si_signo != signal.SIGCHLD:  # (else an orphan reaped, or a wake-up)
                if info.si_signo in STOPPING:
                    self.stop(info.si_signo)
                else:
                    self.agent.signal_group(info.si_signo)
                if self._on_signal is not None:
                    self._on_signal(info.si_signo)  # after forwarding: logging may be slow
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                self._kill_at = float("inf")
                self.killed_after_grace = True
                self.agent.signal_group(signal.SIGKILL)
                if self._on_kill is not None:
                    self._on_kill()
            if tick is not None:
                tick()


def next_signal(timeout_s: float) -> int | None:
    """After the agent is gone: the next stopping signal within ``timeout_s`` (reaping on the way)."""
    info = signal.sigtimedwait(WAITED, max(0.0, timeout_s))
    if info is None or info.si_signo not in WAITED:
        return None
    if info.si_signo == signal.SIGCHLD:
        reap(-1)
        return None
    return int(info.si_signo)
