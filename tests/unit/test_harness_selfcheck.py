"""The test harness itself, without a Redis server: ports, environment, process handling."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import process_registry
from tests.helpers import (
    REPO_ROOT,
    SCRUBBED_ENV_VARS,
    child_env,
    run_process,
    sidecar_command,
    start_process,
    wait_until,
)
from tests.redis_harness import RedisServer, find_free_port

PY = sys.executable
# Prints the pid of a grandchild that would outlive its parent, then hangs.
SPAWN_GRANDCHILD = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def _alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (an orphan nobody reaped yet is still dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def test_free_port_is_bindable_on_loopback() -> None:
    port = find_free_port()
    assert 1024 <= port <= 65535
    assert port != 6379
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_fixture(free_port: int) -> None:
    assert isinstance(free_port, int) and free_port > 0


def test_child_env_scrubs_sidecar_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SCRUBBED_ENV_VARS:
        monkeypatch.setenv(name, "leaked-from-shell")
    monkeypatch.setenv("KEEP_ME", "1")
    env = child_env({"RUN_ID": "run-42", "EXTRA": "x", "KEEP_ME": None})
    assert env["RUN_ID"] == "run-42"
    assert env["EXTRA"] == "x"
    assert "KEEP_ME" not in env
    for name in set(SCRUBBED_ENV_VARS) - {"RUN_ID"}:
        assert name not in env
    assert env["PATH"]


def test_run_process_sees_scrubbed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    code = "import os; print(os.environ.get('REDIS_URL'), os.environ.get('AGENT_ID'))"
    res = run_process([PY, "-c", code], env={"AGENT_ID": "a1"})
    assert res.returncode == 0
    assert res.stdout == b"None a1\n"


def test_sidecar_command_uses_this_interpreter() -> None:
    assert sidecar_command(["--x", "--", "echo"]) == [PY, "-m", "sidecar", "--x", "--", "echo"]


def test_run_process_captures_output_exit_code_and_input() -> None:
    code = (
        "import sys\n"
        "data = sys.stdin.buffer.read()\n"
        "sys.stdout.buffer.write(data[::-1])\n"
        "sys.stderr.write('err line\\n')\n"
        "sys.exit(3)\n"
    )
    res = run_process([PY, "-c", code], input=b"abc\x00\xff")
    assert res.returncode == 3
    assert res.stdout == b"\xff\x00cba"
    assert res.stderr == b"err line\n"
    assert res.args[0] == PY


def test_run_process_default_cwd_is_repo_root() -> None:
    res = run_process([PY, "-c", "import os; print(os.getcwd())"])
    assert Path(res.stdout.decode().strip()) == REPO_ROOT


def test_run_process_large_output_on_both_streams() -> None:
    code = (
        "import sys\n"
        "chunk = b'x' * 65536\n"
        "for _ in range(64):\n"
        "    sys.stderr.buffer.write(chunk); sys.stdout.buffer.write(chunk)\n"
    )
    res = run_process([PY, "-c", code], timeout=30)
    assert res.returncode == 0
    assert len(res.stdout) == len(res.stderr) == 64 * 65536


def test_run_process_timeout_kills_the_tree() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_process([PY, "-c", SPAWN_GRANDCHILD], timeout=2)
    grandchild = int(info.value.output.split()[0])
    # SIGKILL is delivered asynchronously; give the kernel a moment.
    wait_until(lambda: not _alive(grandchild), timeout=5, message="grandchild to die")
    assert process_registry.live() == []


def test_start_process_writes_to_files_without_blocking(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.buffer.write(b'y' * (8 << 20)); sys.stderr.write('done\\n')"
    proc = start_process([PY, "-c", code], output_dir=tmp_path)
    res = proc.finish(timeout=30)
    assert res.returncode == 0
    assert len(res.stdout) == 8 << 20
    assert res.stderr == b"done\n"
    assert proc.stdout_path.parent == tmp_path
    assert proc.read_stderr() == b"done\n"


def test_start_process_stdin_pipe_and_wait_for_output() -> None:
    code = (
        "import sys\n"
        "print('ready', file=sys.stderr, flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line.strip().upper(), flush=True)\n"
    )
    proc = start_process([PY, "-u", "-c", code], stdin=subprocess.PIPE)
    proc.wait_for_output("ready", stream="stderr")
    assert proc.stdin is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    proc.wait_for_output(b"HELLO", stream="stdout")
    res = proc.finish(timeout=10)
    assert res.returncode == 0
    assert res.stdout == b"HELLO\n"


def test_wait_for_output_reports_early_exit() -> None:
    proc = start_process([PY, "-c", "print('bye')"])
    with pytest.raises(AssertionError, match="exited with 0"):
        proc.wait_for_output("never printed", stream="stdout", timeout=10)


def test_cleanup_kills_running_process_and_grandchild() -> None:
    proc = start_process([PY, "-c", SPAWN_GRANDCHILD])
    grandchild = int(proc.wait_for_output(b"\n", stream="stdout").split()[0])
    own_dir = proc.stdout_path.parent
    assert _alive(grandchild)
    assert any(p is proc for p in process_registry.live())

    assert process_registry.cleanup_all() == []

    assert proc.returncode is not None
    wait_until(lambda: not _alive(grandchild), timeout=5, message="grandchild to die")
    assert not own_dir.exists()
    assert process_registry.live() == []


def test_finish_timeout_kills_and_raises() -> None:
    proc = start_process([PY, "-c", "import time; print('x', flush=True); time.sleep(300)"])
    proc.wait_for_output("x", stream="stdout")
    with pytest.raises(subprocess.TimeoutExpired) as info:
        proc.finish(timeout=0.5)
    assert info.value.output == b"x\n"
    assert proc.returncode is not None


def test_redis_server_address_without_starting(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, port=23456)
    assert server.port == 23456
    assert server.url == "redis://127.0.0.1:23456/0"
    assert not server.running
    server.shutdown()
    server.shutdown()

    auto = RedisServer(tmp_path)
    assert auto.url == f"redis://127.0.0.1:{auto.port}/0"
