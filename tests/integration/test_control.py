"""Heartbeat and control channel through `python -m sidecar` against a real redis-server and real agents."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from sidecar.control import sign
from tests.helpers import REPO_ROOT, wait_until
from tests.integration import runs
from tests.redis_harness import RedisServer

SIGNALS = str(REPO_ROOT / "tests" / "agents" / "signals.py")
COUNTER = str(REPO_ROOT / "tests" / "agents" / "counter.py")
BUSY = "import time\nend = time.time() + 3\nwhile time.time() < end: pass\n"


def _start(start_sidecar: Any, url: str, run_id: str, *extra: str, agent: list[str]) -> Any:
    return start_sidecar(["--redis-url", url, "--run-id", run_id, "--agent-id", f"agent-{run_id}", "--no-echo",
                          "--kill-grace", "2", *extra, "--", *agent])


def _start_ready(start_sidecar: Any, client: Any, url: str, run_id: str, *extra: str) -> Any:
    """The signals agent under a sidecar, once it has printed "ready" (its handlers are set)."""
    proc = _start(start_sidecar, url, run_id, *extra, agent=[sys.executable, SIGNALS])
    wait_until(lambda: b"ready" in _out(client, run_id), timeout=10)
    return proc


def _pause(client: Any, run_id: str, agent_pid: int) -> None:
    client.publish(f"run:{run_id}:control", json.dumps({"cmd": "pause"}))
    wait_until(lambda: psutil.Process(agent_pid).status() == psutil.STATUS_STOPPED, timeout=5)


def _out(client: Any, run_id: str) -> bytes:
    return runs.stream_bytes(client, f"run:{run_id}:output:0")


def _states(client: Any, run_id: str) -> list[str]:
    return [m["status"] for m in runs.statuses(client, run_id)]


def test_heartbeat_cadence_and_fields_while_the_agent_is_cpu_bound(redis_server: RedisServer,
                                                                     start_sidecar: Any) -> None:
    sub = redis_server.client().pubsub()
    sub.subscribe("agent:agent-hb:heartbeat")
    sub.get_message(timeout=1)
    # a CPU-bound agent and, at the same time, a flood to ship
    agent = ["sh", "-c", f"{sys.executable} -c '{BUSY}' & {sys.executable} {COUNTER} --lines 300000 --rate 0; wait"]
    proc = _start(start_sidecar, redis_server.url, "hb", "--heartbeat-interval", "0.25", agent=agent)
    beats: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        m = sub.get_message(timeout=0.1)
        if m and m["type"] in ("message", b"message"):
            beats.append((time.monotonic(), orjson.loads(m["data"])))
    assert proc.finish(timeout=60).returncode == 0
    sub.close()
    assert len(beats) >= 7, f"{len(beats)} beats in 2.5 s at 0.25 s"
    gaps = [b[0] - a[0] for a, b in zip(beats, beats[1:], strict=False)]
    assert max(gaps) < 0.75, f"heartbeat lost its rhythm: gaps {gaps}"
    msg = beats[-1][1]
    for field in ("agent_id", "run_id", "variation_id", "timestamp", "pid", "uptime_s", "cpu_percent", "rss_bytes",
                  "num_procs", "records_shipped", "bytes_shipped", "records_waiting", "redis_connected",
                  "last_write_age_s"):
        assert field in msg, field
    assert msg["agent_id"] == "agent-hb" and msg["run_id"] == "hb"
    assert msg["num_procs"] >= 2 and msg["rss_bytes"] > 1_000_000
    assert any(b[1]["cpu_percent"] > 30 for b in beats), "the busy child's CPU shows in the tree's figure"
    assert msg["redis_connected"] is True


def test_alive_key_expires_after_the_sidecar_is_sigkilled(redis_server: RedisServer, start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start(start_sidecar, redis_server.url, "alive", "--heartbeat-interval", "0.3",
                  agent=["sleep", "30"])
    wait_until(lambda: client.exists("agent:agent-alive:alive") == 1, timeout=10)
    ttl = client.pttl("agent:agent-alive:alive")
    assert 0 < ttl <= 1000
    assert client.hget("run:alive:variation:0", "last_heartbeat")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: client.exists("agent:agent-alive:alive") == 0, timeout=5)
    proc.kill_tree()


def test_heartbeat_stops_when_the_sidecar_exits(redis_server: RedisServer, start_sidecar: Any) -> None:
    sub = redis_server.client().pubsub()
    sub.subscribe("agent:agent-end:heartbeat")
    sub.get_message(timeout=1)
    proc = _start(start_sidecar, redis_server.url, "end", "--heartbeat-interval", "0.2", agent=["sleep", "0.7"])
    assert proc.finish(timeout=30).returncode == 0
    time.sleep(0.1)
    while sub.get_message(timeout=0.05):
        pass
    late = sub.get_message(timeout=0.8)
    sub.close()
    assert late is None


def test_cancel_pause_resume_and_signal(redis_server: RedisServer, start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "ctl")
    agent_pid = int(client.hget("run:ctl:variation:0", "pid"))
    started_at = client.hget("run:ctl:variation:0", "started_at")

    _pause(client, "ctl", agent_pid)
    # the agent is stopped first, then the state is written
    wait_until(lambda: client.hget("run:ctl:variation:0", "status") == b"paused", timeout=5)
    client.publish("run:ctl:control", json.dumps({"cmd": "resume"}))
    wait_until(lambda: psutil.Process(agent_pid).status() != psutil.STATUS_STOPPED, timeout=5)
    wait_until(lambda: client.hget("run:ctl:variation:0", "status") == b"running", timeout=5)
    assert client.hget("run:ctl:variation:0", "started_at") == started_at  # a resume is no new start
    client.publish("run:ctl:control", json.dumps({"cmd": "signal", "signal": "SIGUSR1"}))
    wait_until(lambda: b"got SIGUSR1" in _out(client, "ctl"), timeout=5)
    client.publish("run:ctl:control", json.dumps({"cmd": "cancel"}))
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0  # the agent handles SIGTERM and exits 0
    assert _out(client, "ctl") == b"ready\ngot SIGUSR1\ngot SIGTERM\ncleaning up\n"
    states = _states(client, "ctl")
    assert states == ["starting", "running", "paused", "running", "cancelled"]
    running = [m["metadata"] for m in runs.statuses(client, "ctl") if m["status"] == "running"]
    assert running == [{"pid": agent_pid}, {"pid": agent_pid, "resumed": True}]
    assert client.hget("run:ctl:variation:0", "status") == b"cancelled"


def test_cancel_escalates_to_sigkill_and_reaches_a_paused_agent(redis_server: RedisServer,
                                                                start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start(start_sidecar, redis_server.url, "stub", agent=[sys.executable, SIGNALS, "--on-term", "ignore"])
    wait_until(lambda: b"ready" in _out(client, "stub"), timeout=10)
    client.publish("run:stub:control", json.dumps({"cmd": "pause"}))
    wait_until(lambda: "paused" in _states(client, "stub"), timeout=5)
    t0 = time.monotonic()
    client.publish("run:stub:control", json.dumps({"cmd": "cancel"}))
    cp = proc.finish(timeout=30)
    assert cp.returncode == 137
    assert 1.5 < time.monotonic() - t0 < 10  # --kill-grace 2, then SIGKILL
    final = runs.statuses(client, "stub")[-1]
    assert final["status"] == "cancelled" and final["metadata"]["signal"] == "SIGKILL"


def test_commands_for_other_agents_are_ignored_and_bad_ones_rejected(redis_server: RedisServer,
                                                                    start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "tgt")
    for bad in (b"not json", b"[1,2]", json.dumps({"cmd": "explode"}).encode(),
                json.dumps({"cmd": "signal", "signal": "SIGKILL"}).encode(),
                json.dumps({"cmd": "signal", "signal": 9}).encode(), json.dumps({"cmd": "signal"}).encode()):
        client.publish("run:tgt:control", bad)
    client.publish("run:tgt:control", json.dumps({"cmd": "signal", "signal": "SIGUSR2", "variation_id": "9"}))
    client.publish("run:tgt:control", json.dumps({"cmd": "signal", "signal": "SIGUSR2", "agent_id": "someone"}))
    client.publish("run:tgt:control", json.dumps({"cmd": "signal", "signal": "SIGHUP", "agent_id": "agent-tgt"}))
    wait_until(lambda: b"got SIGHUP" in _out(client, "tgt"), timeout=5)
    client.publish("run:tgt:control", json.dumps({"cmd": "cancel", "variation_id": "0"}))
    assert proc.finish(timeout=30).returncode == 0
    assert b"SIGUSR2" not in _out(client, "tgt")
    rejected = [m for m in runs.statuses(client, "tgt") if m["status"] == "control_rejected"]
    assert len(rejected) == 6
    assert all(m["metadata"]["reason"] for m in rejected)


def test_signed_control_commands(redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    secret = b"control-secret-for-tests"
    (tmp_path / "secret").write_bytes(secret + b"\n")
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "sig", "--control-secret-file",
                        str(tmp_path / "secret"))
    now = int(time.time())
    good = sign({"cmd": "signal", "signal": "SIGUSR1", "ts": now, "run_id": "sig"}, secret)
    client.publish("run:sig:control", json.dumps(good))
    wait_until(lambda: b"got SIGUSR1" in _out(client, "sig"), timeout=5)
    client.publish("run:sig:control", json.dumps(good))  # replayed
    client.publish("run:sig:control", json.dumps({"cmd": "signal", "signal": "SIGUSR2", "ts": now}))  # unsigned
    client.publish("run:sig:control", json.dumps(sign({"cmd": "signal", "signal": "SIGUSR2", "ts": now,
                                                       "run_id": "sig"}, b"wrong")))
    client.publish("run:sig:control", json.dumps(sign({"cmd": "signal", "signal": "SIGUSR2", "ts": now - 300,
                                                       "run_id": "sig"}, secret)))  # stale
    client.publish("run:sig:control", json.dumps(sign({"cmd": "signal", "signal": "SIGUSR2", "ts": now,
                                                       "run_id": "elsewhere"}, secret)))  # another run's
    client.publish("run:sig:control", json.dumps(sign({"cmd": "cancel", "ts": int(time.time()), "run_id": "sig"},
                                                      secret)))
    assert proc.finish(timeout=30).returncode == 0
    assert _out(client, "sig") == b"ready\ngot SIGUSR1\ngot SIGTERM\ncleaning up\n"
    rejected = [m for m in runs.statuses(client, "sig") if m["status"] == "control_rejected"]
    assert len(rejected) == 5
    assert rejected[-1]["metadata"]["reason"] == "signed for run 'elsewhere', not this one"
    assert b"not authenticated" not in proc.read_stderr()


def test_control_subscription_survives_a_redis_restart(redis_factory: Any, start_sidecar: Any) -> None:
    srv: RedisServer = redis_factory(("--appendonly", "yes", "--appendfsync", "always"))
    proc = _start_ready(start_sidecar, srv.client(), srv.url, "rs", "--socket-timeout", "1")
    srv.kill()
    time.sleep(0.5)
    srv.restart()

    def signalled() -> bool:
        client = srv.client()
        client.publish("run:rs:control", json.dumps({"cmd": "signal", "signal": "SIGWINCH"}))
        return b"got SIGWINCH" in _out(client, "rs")

    wait_until(signalled, timeout=20, interval=0.5)
    srv.client().publish("run:rs:control", json.dumps({"cmd": "cancel"}))
    assert proc.finish(timeout=30).returncode == 0


def test_sigterm_reaches_a_paused_agent_and_sigcont_by_signal_ends_the_pause(redis_server: RedisServer,
                                                                            start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "pz")
    agent_pid = int(client.hget("run:pz:variation:0", "pid"))
    _pause(client, "pz", agent_pid)
    # SIGCONT through the signal command ends the pause: a later pause works again
    client.publish("run:pz:control", json.dumps({"cmd": "signal", "signal": "SIGCONT"}))
    wait_until(lambda: _states(client, "pz")[-1] == "running", timeout=5)
    client.publish("run:pz:control", json.dumps({"cmd": "pause"}))
    wait_until(lambda: _states(client, "pz").count("paused") == 2, timeout=5)
    wait_until(lambda: psutil.Process(agent_pid).status() == psutil.STATUS_STOPPED, timeout=5)
    # a SIGTERM to the sidecar wakes the paused agent, whose handler runs (no SIGKILL)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0 and time.monotonic() - t0 < 1.5  # --kill-grace is 2 s
    assert _out(client, "pz") == b"ready\ngot SIGTERM\ncleaning up\n"
    # the stop's SIGCONT woke it: the status says it runs again before it exits
    assert _states(client, "pz") == ["starting", "running", "paused", "running", "paused", "running", "exited"]


def test_a_pause_during_a_stop_is_ignored(redis_server: RedisServer, start_sidecar: Any) -> None:
    """After a SIGTERM to the sidecar the agent cleans up; a pause must not freeze it half way."""
    client = redis_server.client()
    proc = _start(start_sidecar, redis_server.url, "pt", agent=[sys.executable, SIGNALS, "--on-term", "ignore"])
    wait_until(lambda: b"ready" in _out(client, "pt"), timeout=10)
    agent_pid = int(client.hget("run:pt:variation:0", "pid"))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert client.publish("run:pt:control", json.dumps({"cmd": "pause"})) == 1
    time.sleep(0.5)
    assert psutil.Process(agent_pid).status() != psutil.STATUS_STOPPED
    cp = proc.finish(timeout=30)
    assert cp.returncode == 137  # it ignores SIGTERM: SIGKILL after --kill-grace
    assert "paused" not in _states(client, "pt")
    assert b"control command ignored: the agent is being stopped" in proc.read_stderr()


def test_a_command_too_deep_to_report_is_still_rejected_in_order(redis_server: RedisServer,
                                                                start_sidecar: Any) -> None:
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "dp")
    deep = b'{"cmd":"nope","x":' + b"[" * 300 + b"]" * 300 + b"}"
    client.publish("run:dp:control", deep)
    client.publish("run:dp:control", json.dumps({"cmd": "cancel"}))
    assert proc.finish(timeout=30).returncode == 0
    statuses = runs.statuses(client, "dp")
    assert [m["seq"] for m in statuses] == list(range(1, len(statuses) + 1))
    rejected = [m for m in statuses if m["status"] == "control_rejected"]
    assert len(rejected) == 1 and rejected[0]["metadata"] == {"reason": "nested deeper than 32 levels"}
    assert statuses[-1]["status"] == "cancelled"


def test_statuses_of_commands_and_rejections_keep_the_order_the_commands_came_in(redis_server: RedisServer,
                                                                                   start_sidecar: Any) -> None:
    """A rejection is reported by the thread that carries out commands, after what came before it."""
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "ord")
    with client.pipeline(transaction=False) as pipe:  # one write: the sidecar reads them together
        for payload in ({"cmd": "pause"}, {"cmd": "bogus-1"}, {"cmd": "resume"}, {"cmd": "bogus-2"}):
            pipe.publish("run:ord:control", json.dumps(payload))
        assert pipe.execute() == [1, 1, 1, 1]
    wait_until(lambda: len(_states(client, "ord")) >= 6, timeout=5)
    client.publish("run:ord:control", json.dumps({"cmd": "cancel"}))
    assert proc.finish(timeout=30).returncode == 0
    statuses = runs.statuses(client, "ord")
    told = [(m["status"], m["metadata"].get("command", {}).get("cmd")) for m in statuses[2:-1]]
    assert told == [("paused", None), ("control_rejected", "bogus-1"), ("running", None),
                    ("control_rejected", "bogus-2")], told
    assert [m["metadata"]["command"]["cmd"] for m in statuses if m["status"] == "control_rejected"] == \
        ["bogus-1", "bogus-2"]


def test_heartbeat_counts_the_agents_orphans(redis_server: RedisServer, start_sidecar: Any) -> None:
    """Processes the agent left behind (re-parented to the sidecar) still count as the agent's."""
    sub = redis_server.client().pubsub()
    sub.subscribe("agent:agent-orph:heartbeat")
    sub.get_message(timeout=1)
    agent = ["sh", "-c", "(sleep 4 &); (sleep 4 &); (sleep 4 &); sleep 2.5"]
    proc = _start(start_sidecar, redis_server.url, "orph", "--heartbeat-interval", "0.25", agent=agent)
    counts: list[int] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        m = sub.get_message(timeout=0.1)
        if m and m["type"] in ("message", b"message"):
            counts.append(orjson.loads(m["data"])["num_procs"])
    proc.finish(timeout=30)
    sub.close()
    assert max(counts) >= 5, counts  # sh, its sleep and the three orphaned sleeps


def test_a_flood_of_commands_is_carried_out_but_logged_and_reported_within_budget(redis_server: RedisServer,
                                                                                  start_sidecar: Any) -> None:
    """Anyone who may publish on the control channel could otherwise fill the sidecar's log
    (one INFO line per command) and the status stream (one control_rejected per bad one)."""
    client = redis_server.client()
    proc = _start_ready(start_sidecar, client, redis_server.url, "fld")
    agent_pid = int(client.hget("run:fld:variation:0", "pid"))
    for _ in range(60):
        client.publish("run:fld:control", b"not json")
    for _ in range(150):
        client.publish("run:fld:control", json.dumps({"cmd": "resume"}))
    _pause(client, "fld", agent_pid)  # still carried out after the flood
    wait_until(lambda: client.hget("run:fld:variation:0", "status") == b"paused", timeout=5)
    client.publish("run:fld:control", json.dumps({"cmd": "cancel"}))
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0  # woken by the cancel, the agent handles SIGTERM
    assert _out(client, "fld") == b"ready\ngot SIGTERM\ncleaning up\n"
    rejected = [m for m in runs.statuses(client, "fld") if m["status"] == "control_rejected"]
    assert len(rejected) == 20
    assert _states(client, "fld")[-2:] == ["paused", "cancelled"]
    err = cp.stderr.decode()
    assert err.count("WARNING control command rejected") == 20
    assert err.count("more than 20 control commands rejected this minute") == 1
    # 152 commands: 20 logged, then the warning; the cancel, the run's end, is always logged
    assert err.count("INFO control command cmd=") == 21
    assert err.count("more than 20 control commands this minute; not logging each") == 1
    assert "INFO control command cmd=cancel\n" in err  # no signal field for a command without one


def test_a_rejected_command_that_quotes_a_secret_is_masked_in_the_log_too(redis_server: RedisServer,
                                                                         start_sidecar: Any) -> None:
    secret = "supersecretvalue123"
    client = redis_server.client()
    proc = start_sidecar(["--redis-url", redis_server.url, "--run-id", "rlog", "--no-echo", "--", sys.executable,
                          SIGNALS], env={"API_TOKEN": secret})
    wait_until(lambda: b"ready" in _out(client, "rlog"), timeout=10)
    client.publish("run:rlog:control", json.dumps({"cmd": secret}))
    wait_until(lambda: "control_rejected" in _states(client, "rlog"), timeout=5)
    client.publish("run:rlog:control", json.dumps({"cmd": "cancel"}))
    assert proc.finish(timeout=30).returncode == 0
    stderr = proc.read_stderr()
    assert b"control command rejected" in stderr and b"[REDACTED]" in stderr
    assert secret.encode() not in stderr
    assert secret.encode() not in b"".join(runs.raw_payloads(client, "run:rlog:status"))
