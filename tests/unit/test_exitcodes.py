"""Exit status mapping from real wait statuses of real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from agent_wrapper.exitcodes import NOT_EXECUTABLE, NOT_FOUND, from_wait_status, signal_name


def _spawn(code: str) -> int:
    return os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ)


def _wait(pid: int, options: int = 0) -> int:
    got, status = os.waitpid(pid, options)
    assert got == pid
    return status


def status_of(code: str) -> int:
    return _wait(_spawn(code))


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_normal_exit_codes(code: int) -> None:
    status = status_of(f"import os; os._exit({code})")
    assert os.WIFEXITED(status)
    assert from_wait_status(status) == (code, None)


def test_sys_exit_one() -> None:
    assert from_wait_status(status_of("import sys; sys.exit(1)")) == (1, None)


def test_uncaught_exception_exits_one() -> None:
    assert from_wait_status(status_of("raise SystemExit(3)")) == (3, None)


@pytest.mark.parametrize(
    ("sig", "expected_code"),
    [(signal.SIGKILL, 137), (signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
)
def test_child_killing_itself(sig: signal.Signals, expected_code: int) -> None:
    # Restore the default disposition first: Python maps SIGINT to KeyboardInterrupt.
    code = (
        "import os, signal\n"
        f"if {int(sig)} != signal.SIGKILL: signal.signal({int(sig)}, signal.SIG_DFL)\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "import time; time.sleep(30)\n"
    )
    status = status_of(code)
    assert os.WIFSIGNALED(status)
    assert from_wait_status(status) == (expected_code, int(sig))


@pytest.mark.parametrize(("sig", "expected_code"), [(signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_child_killed_from_outside(sig: signal.Signals, expected_code: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        os.kill(proc.pid, sig)
        status = _wait(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert from_wait_status(status) == (expected_code, int(sig))
    code, sig_out = from_wait_status(status)
    assert code == 128 + sig_out  # type: ignore[operator]


def test_stopped_child_status_maps_to_one() -> None:
    pid = _spawn("import time; time.sleep(30)")
    try:
        os.kill(pid, signal.SIGSTOP)
        status = _wait(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert from_wait_status(status) == (1, None)
    finally:
        os.kill(pid, signal.SIGKILL)
        final = _wait(pid)
    assert from_wait_status(final) == (137, signal.SIGKILL)


def test_agrees_with_waitstatus_to_exitcode_for_exits() -> None:
    for code in (0, 1, 3):
        status = status_of(f"import os; os._exit({code})")
        assert from_wait_status(status)[0] == os.waitstatus_to_exitcode(status) == code


def test_shell_conventions() -> None:
    assert NOT_EXECUTABLE == 126
    assert NOT_FOUND == 127


@pytest.mark.parametrize(
    ("sig", "name"),
    [
        (signal.SIGKILL, "SIGKILL"),
        (signal.SIGTERM, "SIGTERM"),
        (signal.SIGINT, "SIGINT"),
        (signal.SIGHUP, "SIGHUP"),
        (signal.SIGSEGV, "SIGSEGV"),
        (9, "SIGKILL"),
        (15, "SIGTERM"),
    ],
)
def test_signal_name_known(sig: int, name: str) -> None:
    assert signal_name(sig) == name


@pytest.mark.parametrize(("sig", "name"), [(0, "SIG0"), (999, "SIG999"), (-1, "SIG-1")])
def test_signal_name_unknown(sig: int, name: str) -> None:
    assert signal_name(sig) == name


def test_the_signals_blocked_at_start_up_are_those_the_run_command_waits_for() -> None:
    import sidecar.__main__ as entry
    from agent_wrapper import signals

    assert entry.EARLY_BLOCKED == signals.WAITED
