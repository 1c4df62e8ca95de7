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
