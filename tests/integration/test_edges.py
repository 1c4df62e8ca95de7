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
from tests.redis_harness import RedisServer, find_free_port


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


def test_a_pause_after_cancel_does_not_freeze_the_agents_clean_up(redis_server: RedisServer,
                                                                   start_sidecar: Any) -> None:
    client = redis_server.client()
    agent = [sys.executable, "-c",
             "import signal, sys, time\n"
             "def term(*_):\n"
             "    for i in range(6):\n"
             "        print('cleanup', i, flush=True); time.sleep(0.25)\n"
             "    sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, term)\n"
             "print('ready', flush=True)\n"
             "while True: time.sleep(1)\n"]
    proc = start_sidecar([*_args(redis_server.url, "cxl", "--no-echo", "--kill-grace", "5"), "--", *agent])
    out = runs.keys("cxl")["stdout"]
    wait_until(lambda: runs.stream_bytes(client, out) == b"ready\n", timeout=10)
    client.publish("run:cxl:control", json.dumps({"cmd": "cancel"}))
    wait_until(lambda: b"cleanup 0" in runs.stream_bytes(client, out), timeout=5)
    for cmd in ("pause", "resume", "pause"):
        client.publish("run:cxl:control", json.dumps({"cmd": cmd}))
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0
    assert runs.stream_bytes(client, out) == b"ready\n" + b"".join(b"cleanup %d\n" % i for i in range(6))
    assert [m["status"] for m in runs.statuses(client, "cxl")] == ["starting", "running", "cancelled"]


def test_a_deeply_nested_command_is_rejected_with_its_reason(redis_server: RedisServer,
                                                             start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = start_sidecar([*_args(redis_server.url, "rej", "--no-echo"), "--", "sleep", "30"])
    wait_until(lambda: client.hget("run:rej:variation:0", "status") == b"running", timeout=10)
    client.publish("run:rej:control", b'{"cmd":"cancel","x":' + b"[" * 300 + b"]" * 300 + b"}")
    wait_until(lambda: runs.statuses(client, "rej")[-1]["status"] == "control_rejected", timeout=5)
    assert runs.statuses(client, "rej")[-1]["metadata"] == {"reason": "nested deeper than 32 levels"}
    assert proc.poll() is None  # the agent was not cancelled
    client.publish("run:rej:control", json.dumps({"cmd": "cancel"}))
    assert proc.finish(timeout=30).returncode == 143


def test_a_token_report_that_would_overflow_a_total_is_not_counted_and_is_logged(
        redis_server: RedisServer) -> None:
    big = 2**53
    agent = [sys.executable, "-c",
             "import json\n"
             f"for _ in range(1100): print(json.dumps({{'sidecar_event': 'tokens', 'input_tokens': {big}, "
             "'output_tokens': 1}))\n"
             "for _ in range(50): print(json.dumps({'sidecar_event': 'tokens', 'input_tokens': 1, "
             "'output_tokens': 1}))\n"]
    cp = run_sidecar([*_args(redis_server.url, "tok", "--no-echo"), "--", *agent])
    assert cp.returncode == 0
    totals = {k.decode(): int(v) for k, v in redis_server.client().hgetall("run:tok:tokens").items()}
    counted = int(9e18 // big)  # 999 reports of 2**53 fit below 9e18; the rest of them do not
    assert totals["input_tokens"] == counted * big + 50
    assert totals["output_tokens"] == totals["reports"] == counted + 50
    assert totals["variation:0:reports"] == counted + 50
    # 101 reports not counted: 20 logged a minute, then one warning
    assert 1100 - counted > 20
    assert cp.stderr.count(b"token report not added to the run's totals") == 20
    assert cp.stderr.count(b"more than 20 token reports not added to the totals this minute") == 1


def test_output_left_in_the_pipe_by_an_agent_that_exited_is_read_however_long_reading_was_held_up(
        redis_factory: Any, start_sidecar: Any) -> None:
    """Back-pressure (no spool, a small buffer, Redis away) holds the reader up past
    --pipe-grace; the agent has exited and nobody holds its pipe: every byte still arrives."""
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    agent = [sys.executable, "-c", "import sys\nfor i in range(8000): sys.stdout.write('%05d %s\\n' % (i, 'x' * 60))"]
    expected = b"".join(b"%05d %s\n" % (i, b"x" * 60) for i in range(8000))
    proc = start_sidecar([*_args(url, "held", "--no-echo", "--spool-max-bytes", "0", "--buffer-max-bytes", "32k",
                                 "--compress-threshold", "-1", "--pipe-grace", "0.5", "--drain-timeout", "20"),
                          "--", *agent])
    time.sleep(3.0)  # the agent is long gone, the reader waits for room
    srv: RedisServer = redis_factory(port=port)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert b"still held open" not in cp.stderr
    assert runs.stream_bytes(srv.client(), runs.keys("held")["stdout"]) == expected


def test_a_user_refused_publish_still_gets_every_key_expiring_and_one_warning(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "nopub", "on", ">pw-nopub", "~*", "&*", "+@all", "-publish")
    cp = run_sidecar([*_args(redis_server.url, "nopub", "--redis-username", "nopub", "--heartbeat-interval", "0",
                             "--no-echo"), "--", "sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.1; done"],
                     env={"REDIS_PASSWORD": "pw-nopub"})
    assert cp.returncode == 0, cp.stderr
    assert runs.stream_bytes(client, runs.keys("nopub")["stdout"]) == b"line 1\nline 2\nline 3\n"
    ttls = {k: client.ttl(k) for k in client.scan_iter("run:nopub:*")}
    assert ttls and all(ttl > 0 for ttl in ttls.values()), ttls
    assert cp.stderr.count(b"Redis refused a write") == 1, cp.stderr


def test_a_spool_replayed_without_its_hash_tag_flag_keeps_the_runs_keys_together(
        redis_factory: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    cp = run_sidecar([*_args(url, "ht", "--cluster-hash-tag", "--spool-dir", str(spool), "--drain-timeout", "0.5",
                             "--socket-timeout", "1", "--heartbeat-interval", "0"), "--", "echo", "hi"])
    assert cp.returncode == 0
    srv: RedisServer = redis_factory(port=port)
    rp = run_process([sys.executable, "-m", "sidecar", "replay", "--spool-dir", str(spool), "--redis-url", url,
                      "--timeout", "30"])
    assert rp.returncode == 0, rp.stderr
    client = srv.client()
    names = sorted(k.decode() for k in client.scan_iter("run:*"))
    assert "run:{ht}:variation:0" in names
    assert all(name.startswith("run:{ht}:") for name in names), names


def test_with_its_stdin_closed_the_agent_still_gets_a_stdin(redis_server: RedisServer) -> None:
    argv = " ".join(f"'{a}'" for a in sidecar_command(_args(redis_server.url, "nostdin", "--no-echo")))
    agent = f"{sys.executable} -c 'import os; os.fstat(0); print(os.read(0, 10) == b\"\")'"
    cp = run_process(["sh", "-c", f"exec {argv} -- {agent} 0<&-"], cwd=REPO_ROOT)
    assert cp.returncode == 0, cp.stderr
    assert runs.stream_bytes(redis_server.client(), runs.keys("nostdin")["stdout"]) == b"True\n"


def test_a_misspelt_sidecar_variable_is_warned_about_and_the_run_goes_on(redis_server: RedisServer) -> None:
    cp = run_sidecar([*_args(redis_server.url, "typo", "--no-echo"), "--", "echo", "secret-ish"],
                     env={"SIDECAR_REDACT_PATTERN": "secret-\\w+"})
    assert cp.returncode == 0
    assert (b"WARNING unknown SIDECAR_ environment variables, ignored: SIDECAR_REDACT_PATTERN "
            b"(did you mean SIDECAR_REDACT_PATTERNS?)") in cp.stderr
    assert runs.stream_bytes(redis_server.client(), "run:typo:output:0") == b"secret-ish\n"  # not masked


def test_an_agent_id_that_is_not_ascii_still_connects_and_delivers_live(redis_server: RedisServer) -> None:
    """Redis refuses a CLIENT SETNAME that is not printable ASCII: the connections' names
    escape the id, and every connection (data, control, heartbeat) comes up."""
    client = redis_server.client()
    cp = run_sidecar([*_args(redis_server.url, "nonascii", "--agent-id", "agent-ü", "--heartbeat-interval", "0.2"),
                      "--", sys.executable, "-c",
                      "import time; print('hi', flush=True); time.sleep(1.0)"])
    assert cp.returncode == 0, cp.stderr
    warnings = [ln for ln in cp.stderr.splitlines() if b"WARNING" in ln and b"not authenticated" not in ln]
    assert warnings == [], cp.stderr.decode()
    assert runs.stream_bytes(client, runs.keys("nonascii")["stdout"]) == b"hi\n"
    statuses = runs.statuses(client, "nonascii")
    assert [m["status"] for m in statuses] == ["starting", "running", "exited"]
    assert {m["agent_id"] for m in statuses} == {"agent-ü"}
    assert client.hget("run:nonascii:variation:0", "last_heartbeat") is not None


def test_settings_that_do_less_than_they_seem_are_warned_about(redis_server: RedisServer) -> None:
    client = redis_server.client()
    cp = run_sidecar([*_args(redis_server.url, "plj", "--transport", "stream", "--wire", "per-line-json"),
                      "--", "echo", "x"])
    assert cp.returncode == 0 and b"--wire per-line-json shapes the pub/sub messages" in cp.stderr, cp.stderr
    assert runs.stream_bytes(client, runs.keys("plj")["stdout"]) == b"x\n"  # batches, as always
    cp = run_sidecar([*_args(redis_server.url, "tplid", "--output-channel", "out:{run_id}:{agent_id}"),
                      "--", "echo", "y"], env={"AGENT_ID": None, "POD_NAME": None})
    assert cp.returncode == 0, cp.stderr
    line = next(ln for ln in cp.stderr.decode().splitlines() if "uses {agent_id}" in ln)
    agent_id = line.rsplit("agent_id=", 1)[1]
    assert runs.stream_bytes(client, f"out:tplid:{agent_id}") == b"y\n"
    cp = run_sidecar([*_args(redis_server.url, "tplid2", "--output-channel", "out:{run_id}:{agent_id}",
                             "--agent-id", "a1"), "--", "echo", "z"])
    assert cp.returncode == 0 and b"uses {agent_id}" not in cp.stderr, cp.stderr
