"""Spawning the agent: pipe sizes."""

from __future__ import annotations

import os
import sys
import time

from agent_wrapper.events import SpawnFailed
from agent_wrapper.process import PIPE_BUFFER_BYTES, spawn


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    os.close(fd)
    return bytes(out)


def test_the_agent_writes_its_first_mebibyte_before_anything_is_read() -> None:
    # 900 KiB fit in the enlarged pipe: the agent finishes although nobody reads yet.
    size = 900 * 1024
    agent = spawn([sys.executable, "-c", f"import os; os.write(1, b'x' * {size})"])
    assert not isinstance(agent, SpawnFailed)
    deadline = time.monotonic() + 30
    while True:
        pid, status = os.waitpid(agent.pid, os.WNOHANG)
        if pid:
            break
        assert time.monotonic() < deadline, "the agent blocked on a full pipe"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _read_all(agent.stdout_fd) == b"x" * size
    assert _read_all(agent.stderr_fd) == b""


def test_a_pipe_size_the_kernel_refuses_leaves_the_default() -> None:
    agent = spawn([sys.executable, "-c", "print('ok')"], pipe_buffer=PIPE_BUFFER_BYTES * 4096)
    assert not isinstance(agent, SpawnFailed)
    assert _read_all(agent.stdout_fd) == b"ok\n"
    os.waitpid(agent.pid, 0)


def test_every_forwarded_signal_starts_the_agent_with_its_default_disposition() -> None:
    from agent_wrapper import process, signals

    assert signals.FORWARDED <= set(process._RESET_SIGNALS)


def test_a_repeated_stop_does_not_postpone_the_sigkill() -> None:
    import signal

    from agent_wrapper.process import Agent
    from agent_wrapper.signals import Supervisor

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # as the sidecar's main thread has it
    try:
        agent = spawn(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
        assert isinstance(agent, Agent)
        assert os.read(agent.stdout_fd, 16) == b"ready\n"  # the trap is set
        sup = Supervisor(agent, 0.5)
        sup.stop()
        first = sup._kill_at
        time.sleep(0.1)
        sup.stop()  # a second cancel
        assert sup._kill_at == first
        exited = sup.wait()
        assert exited.signal == signal.SIGKILL and sup.killed_after_grace
        os.close(agent.stdout_fd)
        os.close(agent.stderr_fd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def test_a_wake_from_another_thread_runs_the_tick_before_its_period() -> None:
    # The control thread queues a command and wakes the waiting main thread: the command must
    # not wait for the supervisor's periodic tick (here a minute away). Wake-ups sent before
    # the wait began are not lost either, and a flood of them merges into one.
    import signal
    import threading

    from agent_wrapper import signals
    from agent_wrapper.process import Agent
    from agent_wrapper.signals import Supervisor

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # as signals.block() leaves it
    try:
        agent = spawn(["sleep", "120"])
        assert isinstance(agent, Agent)
        sup = Supervisor(agent, 5.0)
        ticks: list[float] = []

        def tick() -> None:
            ticks.append(time.monotonic())
            ticked.set()
            if len(ticks) == 2:
                sup.stop()  # as a cancel command does

        main = threading.get_ident()
        for _ in range(10_000):
            signals.wake(main)  # before the wait: one pending SIGCHLD, not 10,000 queued signals

        def wake_after_the_first_tick() -> None:
            if ticked.wait(60):
                signals.wake(main)

        ticked = threading.Event()
        threading.Thread(target=wake_after_the_first_tick, daemon=True).start()
        started = time.monotonic()
        exited = sup.wait(tick=tick, tick_s=60.0)
        assert len(ticks) == 2, "the early wake-ups merged into one tick, the later one ran the second"
        assert ticks[1] - started < 30, "a wake-up was lost: the tick came from its period"
        assert exited.signal == signal.SIGTERM
        os.close(agent.stdout_fd)
        os.close(agent.stderr_fd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def test_the_wait_sees_the_exit_when_another_thread_takes_the_sigchld() -> None:
    """In a process with a thread that does not block SIGCHLD (one embedding the supervisor,
    or this test run), the kernel may hand the signal to that thread: the wait still finds the
    exit, at its next quiet period, instead of waiting forever."""
    import signal
    import threading

    from agent_wrapper.process import Agent
    from agent_wrapper.signals import Supervisor

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # started before SIGCHLD is blocked
    other.start()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        agent = spawn(["sh", "-c", "exit 3"])
        assert isinstance(agent, Agent)
        time.sleep(0.3)  # it exits before the wait: blocked here, its SIGCHLD goes to the other thread
        exited = Supervisor(agent, 5).wait(tick_s=0.2)
        assert exited.code == 3
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        stop.set()
        other.join()
