"""Edges of the run command: how it was started (closed descriptors, ignored signals), what it
was given (ids that are not UTF-8, an empty command name, a sub-second retention), and a
resume for an agent that stopped itself."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import REPO_ROOT, ManagedProcess, run_process, run_sidecar, sidecar_command, wait_until
from tests.integration import runs
from tests.redis_harness import RedisServer


def _args(url: str, run_id: str, *extra: str) -> list[str]:
    return ["--redis-url", url, "--run-id", run_id, *extra]


def test_ids_that_are_not_utf8_are_usage_errors_and_the_agent_never_starts(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    for args, env in ((["--run-id", "qa\udcff"], {}), (["--agent-id", "\udcc3"], {}),
                      (["--variation-id", "v\udcc3"], {}), ([], {"RUN_ID": "r\udcff"}),
                      (["--run-id", "a\tb"], {}), (["--run-id", "a\x1bb"], {})):
        cp = run_sidecar([*args, "--", "touch", str(marker)], env=env)
        lines = cp.stderr.decode(errors="replace").strip().splitlines()
        assert cp.returncode == 2, (args, env, cp.stderr)
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert not marker.exists()


def test_with_its_stdout_or_stderr_closed_nothing_is_lost_and_the_code_is_the_agents(
        redis_server: RedisServer) -> None:
    client = redis_server.client()
    agent = "echo to-stdout; echo to-stderr >&2; exit 3"
    for i, (closing, echo) in enumerate((("1", True), ("1", False), ("2", True), ("1 2", True))):
        run_id = f"closed{i}"
        argv = " ".join(f"'{a}'" for a in sidecar_command(_args(redis_server.url, run_id)))
        if not echo:
            argv += " --no-echo"
        closes = " ".join(f"{fd}>&-" for fd in closing.split())
        cp = run_process(["sh", "-c", f"exec {argv} -- sh -c '{agent}' {closes}"], cwd=REPO_ROOT)
        assert cp.returncode == 3, (closing, echo, cp.stderr)
        keys = runs.keys(run_id)
        assert runs.stream_bytes(client, keys["stdout"]) == b"to-stdout\n", (closing, echo)
        assert runs.stream_bytes(client, keys["stderr"]) == b"to-stderr\n", (closing, echo)
        assert runs.statuses(client, run_id)[-1]["status"] == "exited"


def test_an_empty_command_name_is_not_found(redis_server: RedisServer) -> None:
    cp = run_sidecar([*_args(redis_server.url, "empty"), "--", ""])
    assert cp.returncode == 127
    assert b"Traceback" not in cp.stderr and b"command not found" in cp.stderr
    final = runs.statuses(redis_server.client(), "empty")[-1]
    assert final["status"] == "failed" and final["metadata"]["exit_code"] == 127


def test_a_retention_under_a_second_still_expires_the_keys(redis_server: RedisServer) -> None:
    cp = run_sidecar([*_args(redis_server.url, "short", "--retention", "0.4", "--heartbeat-interval", "0"),
                      "--", "echo", "hi"])
    assert cp.returncode == 0
    client = redis_server.client()
    # EXPIRE takes whole seconds: 0.4 s becomes 1 s, never "no TTL" (-1). Gone within ~1 s.
    ttls = {k: client.pttl(k) for k in client.scan_iter("run:short:*")}
    assert ttls and all(ttl == -2 or 0 < ttl <= 1000 for ttl in ttls.values()), ttls
    wait_until(lambda: not list(client.scan_iter("run:short:*")), timeout=5)


def test_a_forwarded_signal_takes_effect_even_if_the_sidecar_was_started_with_it_ignored(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """A shell's background job starts with SIGINT and SIGQUIT ignored; the agent gets defaults."""
    cmd = sidecar_command([*_args(redis_server.url, "ignq", "--no-echo"), "--", "sleep", "30"])
    proc = ManagedProcess(["sh", "-c", "trap '' QUIT; exec \"$@\"", "sh", *cmd], output_dir=tmp_path, name="sidecar")
    client = redis_server.client()
    wait_until(lambda: client.hget("run:ignq:variation:0", "status") == b"running", timeout=10)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGQUIT)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 128 + signal.SIGQUIT
    assert time.monotonic() - t0 < 10


def test_resume_wakes_an_agent_that_stopped_itself(redis_server: RedisServer, start_sidecar: Any) -> None:
    client = redis_server.client()
    agent = [sys.executable, "-c", "import os, signal; print('stopping', flush=True); "
             "os.kill(os.getpid(), signal.SIGSTOP); print('resumed', flush=True)"]
    proc = start_sidecar([*_args(redis_server.url, "selfstop", "--no-echo"), "--", *agent])
    out = runs.keys("selfstop")["stdout"]
    wait_until(lambda: runs.stream_bytes(client, out) == b"stopping\n", timeout=10)
    pid = int(client.hget("run:selfstop:variation:0", "pid"))
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=5)
    client.publish("run:selfstop:control", json.dumps({"cmd": "resume"}))
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0
    assert runs.stream_bytes(client, out) == b"stopping\nresumed\n"
    assert "paused" not in [m["status"] for m in runs.statuses(client, "selfstop")]
