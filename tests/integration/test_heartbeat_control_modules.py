"""Heartbeat and Control threads against a real redis-server: cadence, contents, outages."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psutil
import pytest
import redis

from sidecar import config, control, heartbeat, transport
from sidecar.control import Command, Control, Rejection
from sidecar.heartbeat import Heartbeat
from tests.redis_harness import RedisServer

INTERVAL = 0.2
STATS = {"records_shipped": 5, "bytes_shipped": 50, "records_waiting": 1, "spool_bytes": 0,
         "redis_connected": True, "last_write_age_s": 0.5}


def make_settings(url: str, **overrides: Any) -> config.Settings:
    values = {"redis_url": url, "run_id": "r1", "agent_id": "a1", "heartbeat_interval_s": str(INTERVAL)}
    s = config.build(values, {}, ("true",))
    return s.replace(**overrides) if overrides else s


def connector(s: config.Settings) -> Callable[[], Any]:
    return lambda: transport.open_connection(s, "test")


def ts_of(msg: dict[str, Any]) -> float:
    return datetime.strptime(msg["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def subscribe(client: redis.Redis, channel: str) -> Any:
    ps = client.pubsub()  # type: ignore[no-untyped-call]
    ps.subscribe(channel)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        if m is not None and m["type"] == "subscribe":
            return ps
    ps.close()
    raise AssertionError("no subscribe confirmation")


def drain(ps: Any, duration: float) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, message) for every message within ``duration`` seconds."""
    out: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        m = ps.get_message(timeout=min(left, 0.05))
        if m is not None and m["type"] == "message":
            out.append((time.monotonic(), orjson.loads(m["data"])))
    return out


@pytest.fixture
def agent_tree() -> Iterator[subprocess.Popen[bytes]]:
    """A shell with a background child: a process tree of two (or three) processes."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(psutil.Process(proc.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield proc
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_heartbeat_cadence_contents_and_stop(redis_server: RedisServer,
                                             agent_tree: subprocess.Popen[bytes]) -> None:
    s = make_settings(redis_server.url)
    client = redis_server.client()
    ps = subscribe(client, "agent:a1:heartbeat")
    started_at = time.time()
    hb = Heartbeat(s, connect=connector(s), pid=lambda: agent_tree.pid, stats=lambda: dict(STATS),
                   started_at=started_at)
    t0 = time.monotonic()
    hb.start()
    try:
        beats = drain(ps, 1.2)
    finally:
        hb.stop()
    stopped_at = time.monotonic()
    late = [b for b in drain(ps, 0.7) if b[0] > stopped_at]
    ps.close()

    assert late == [], "a beat after stop()"
    assert not hb._thread or not hb._thread.is_alive()
    assert 5 <= len(beats) <= 8, [round(t - t0, 3) for t, _ in beats]
    assert heartbeat.FIRST_BEAT_S <= beats[0][0] - t0 < heartbeat.FIRST_BEAT_S + 0.1, "the first beat goes at once"
    stamps = [ts_of(m) for _, m in beats]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(0.15 <= g <= 0.3 for g in gaps), gaps
    arrivals = [t for t, _ in beats]
    agaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(0.1 <= g <= 0.35 for g in agaps), agaps
    # No drift: the n-th beat is due n intervals after the first.
    assert abs((stamps[-1] - stamps[0]) - INTERVAL * (len(stamps) - 1)) < 0.05

    for _, m in beats:
        assert m["agent_id"] == "a1" and m["run_id"] == "r1" and m["variation_id"] == "0"
        assert m["timestamp"].endswith("Z")
        assert m["pid"] == agent_tree.pid
        assert m["num_procs"] >= 2
        assert isinstance(m["rss_bytes"], int) and m["rss_bytes"] > 0
        assert isinstance(m["cpu_percent"], float) and m["cpu_percent"] >= 0.0
        assert isinstance(m["uptime_s"], float) and 0 <= m["uptime_s"] < 5
        for key, value in STATS.items():
            assert m[key] == value
    assert beats[-1][1]["uptime_s"] > beats[0][1]["uptime_s"]

    alive = client.get("agent:a1:alive")
    assert alive is not None and orjson.loads(alive) == beats[-1][1]
    ttl_ms = client.pttl("agent:a1:alive")
    assert 0 < ttl_ms <= heartbeat.alive_ttl(INTERVAL) * 1000
    assert heartbeat.alive_ttl(INTERVAL) <= max(1, 3 * INTERVAL + 1)
    vhash: dict[bytes, bytes] = client.hgetall("run:r1:variation:0")  # type: ignore[assignment]
    assert vhash[b"agent_id"] == b"a1"
    assert vhash[b"last_heartbeat"].decode() == beats[-1][1]["timestamp"]
    assert 0 < client.ttl("run:r1:variation:0") <= 86400
    assert hb.beats == len(beats) and hb.failures == 0


def test_heartbeat_keeps_rhythm_while_the_main_thread_is_busy(redis_server: RedisServer) -> None:
    s = make_settings(redis_server.url)
    client = redis_server.client()
    ps = subscribe(client, "agent:a1:heartbeat")
    hb = Heartbeat(s, connect=connector(s), pid=lambda: None, stats=dict, started_at=time.time())
    hb.start()
    try:
        end = time.monotonic() + 1.0
        n = 0
        while time.monotonic() < end:  # pure Python, holding the GIL between switch intervals
            n += sum(i * i for i in range(200))
    finally:
        hb.stop()
    beats = drain(ps, 0.5)
    ps.close()
    stamps = [ts_of(m) for _, m in beats]
    assert len(stamps) >= 4, stamps
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) <= 3 * INTERVAL, gaps
    assert all(m["pid"] is None and m["num_procs"] == 0 for _, m in beats)


def test_heartbeat_disabled_with_interval_zero(redis_server: RedisServer) -> None:
    s = make_settings(redis_server.url, heartbeat_interval_s=0.0)
    client = redis_server.client()
    ps = subscribe(client, "agent:a1:heartbeat")
    hb = Heartbeat(s, connect=connector(s), pid=lambda: None, stats=dict, started_at=time.time())
    hb.start()
    beats = drain(ps, 0.5)
    hb.stop()
    ps.close()
    assert beats == [] and hb._thread is None
    assert client.exists("agent:a1:alive") == 0


def test_heartbeat_survives_a_redis_outage(redis_server: RedisServer,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    s = make_settings(redis_server.url, socket_timeout_s=1.0)
    hb = Heartbeat(s, connect=connector(s), pid=lambda: None, stats=dict, started_at=time.time())
    hb.start()
    try:
        deadline = time.monotonic() + 5
        while hb.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hb.beats >= 2
        redis_server.kill()
        time.sleep(1.0)
        assert hb.failures >= 3 and hb._thread is not None and hb._thread.is_alive()
        redis_server.restart()
        client = redis_server.client()
        deadline = time.monotonic() + 5
        while client.get("agent:a1:alive") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("agent:a1:alive") is not None
    finally:
        hb.stop()
    err = capfd.readouterr().err
    assert err.count("heartbeat not delivered") == 1, err
    assert err.count("heartbeat delivered again") == 1, err


# -- control -------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.commands: queue.Queue[Command] = queue.Queue()
        self.rejects: queue.Queue[Rejection] = queue.Queue()
        self.threads: set[str] = set()

    def on_command(self, cmd: Command) -> None:
        self.threads.add(threading.current_thread().name)
        self.commands.put(cmd)

    def on_reject(self, rej: Rejection) -> None:
        self.threads.add(threading.current_thread().name)
        self.rejects.put(rej)


def started_control(s: config.Settings, rec: Recorder) -> Control:
    ctl = Control(s, connect=connector(s), on_command=rec.on_command, on_reject=rec.on_reject)
    ctl.start()
    assert ctl.subscribed.wait(5), "not subscribed"
    return ctl


def test_control_commands_rejections_and_resubscription(redis_server: RedisServer,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    s = make_settings(redis_server.url, socket_timeout_s=1.0)
    rec = Recorder()
    ctl = started_control(s, rec)
    try:
        client = redis_server.client()
        assert client.publish("run:r1:control", b'{"cmd": "signal", "signal": "usr1"}') == 1
        cmd = rec.commands.get(timeout=5)
        assert cmd.cmd == "signal" and cmd.signal == 10 and cmd.raw["signal"] == "usr1"
        assert rec.threads == {"control"}

        client.publish("run:r1:control", b'{"cmd": "cancel", "agent_id": "someone-else"}')
        client.publish("run:r1:control", b"not json")
        client.publish("run:r1:control", b'{"cmd": "signal", "signal": "SIGKILL"}')
        client.publish("run:r1:control", b'{"cmd": "pause", "variation_id": "0"}')
        first, second = rec.rejects.get(timeout=5), rec.rejects.get(timeout=5)
        assert first.reason == "malformed JSON" and first.raw is None
        assert "cancel" in second.reason and second.raw == {"cmd": "signal", "signal": "SIGKILL"}
        assert rec.commands.get(timeout=5).cmd == "pause"  # the one for someone else was skipped
        assert rec.commands.empty() and rec.rejects.empty()

        redis_server.kill()
        redis_server.restart()
        client = redis_server.client()
        deadline = time.monotonic() + 10
        got: Command | None = None
        while got is None and time.monotonic() < deadline:
            try:
                client.publish("run:r1:control", b'{"cmd": "resume"}')
            except redis.ConnectionError:
                pass
            try:
                got = rec.commands.get(timeout=0.2)
            except queue.Empty:
                pass
        assert got is not None and got.cmd == "resume", "no command received after the restart"
        assert ctl.subscriptions >= 2
    finally:
        t0 = time.monotonic()
        ctl.stop()
        assert time.monotonic() - t0 < 1.0
    assert ctl._thread is not None and not ctl._thread.is_alive()
    err = capfd.readouterr().err
    assert err.count("control channel unavailable") == 1, err
    assert err.count("control channel subscribed again") == 1, err


def test_control_with_a_secret(redis_server: RedisServer) -> None:
    secret = b"k" * 32
    s = make_settings(redis_server.url, control_secret=secret)
    rec = Recorder()
    ctl = started_control(s, rec)
    try:
        client = redis_server.client()
        signed = control.sign({"cmd": "cancel", "ts": time.time(), "run_id": "r1"}, secret)
        client.publish("run:r1:control", orjson.dumps(signed))
        assert rec.commands.get(timeout=5).cmd == "cancel"
        client.publish("run:r1:control", orjson.dumps(signed))  # replayed
        client.publish("run:r1:control", b'{"cmd": "cancel"}')  # unsigned
        forged = control.sign({"cmd": "cancel", "ts": time.time(), "run_id": "r1"}, b"not the secret")
        client.publish("run:r1:control", orjson.dumps(forged))
        reasons = [rec.rejects.get(timeout=5).reason for _ in range(3)]
        assert "replayed" in reasons[0]
        assert reasons[1:] == ["missing signature", "bad signature"]
        assert rec.commands.empty()
    finally:
        ctl.stop()


def test_control_starts_while_redis_is_down(redis_server: RedisServer) -> None:
    s = make_settings(redis_server.url, socket_timeout_s=1.0)
    redis_server.kill()
    rec = Recorder()
    ctl = Control(s, connect=connector(s), on_command=rec.on_command, on_reject=rec.on_reject)
    ctl.start()
    try:
        time.sleep(0.5)
        assert not ctl.subscribed.is_set() and ctl._thread is not None and ctl._thread.is_alive()
        redis_server.restart()
        assert ctl.subscribed.wait(8)
        redis_server.client().publish("run:r1:control", b'{"cmd": "cancel"}')
        assert rec.commands.get(timeout=5).cmd == "cancel"
    finally:
        t0 = time.monotonic()
        ctl.stop()
        assert time.monotonic() - t0 < 1.0


def test_a_frozen_server_is_found_by_the_health_check_and_left(redis_server: RedisServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A silent control connection PINGs after HEALTH_CHECK_S; a server that does not answer
    # within the socket timeout is given up, and the listener subscribes again once it is back.
    monkeypatch.setattr(control, "HEALTH_CHECK_S", 0.5)
    s = make_settings(redis_server.url, socket_timeout_s=1.0)
    rec = Recorder()
    ctl = started_control(s, rec)
    try:
        redis_server.stop()
        try:
            deadline = time.monotonic() + 10
            while ctl.subscribed.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not ctl.subscribed.is_set(), "the frozen server was not noticed"
        finally:
            redis_server.cont()
        assert ctl.subscribed.wait(10), "not subscribed again"
        assert ctl.subscriptions == 2
        redis_server.client().publish("run:r1:control", b'{"cmd": "cancel"}')
        assert rec.commands.get(timeout=5).cmd == "cancel"
    finally:
        ctl.stop()


def test_stop_is_prompt_while_redis_hangs(redis_server: RedisServer) -> None:
    """SIGSTOPped server: the heartbeat is stuck in a pipeline, the listener in a read."""
    s = make_settings(redis_server.url, socket_timeout_s=30.0)
    rec = Recorder()
    ctl = started_control(s, rec)
    hb = Heartbeat(s, connect=connector(s), pid=lambda: None, stats=dict, started_at=time.time())
    hb.start()
    deadline = time.monotonic() + 5
    while hb.beats < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    redis_server.stop()
    try:
        time.sleep(0.5)  # the next beat is now waiting for a reply that does not come
        t0 = time.monotonic()
        hb.stop()
        ctl.stop()
        assert time.monotonic() - t0 < 2.0
        assert hb._thread is not None and not hb._thread.is_alive()
        assert ctl._thread is not None and not ctl._thread.is_alive()
    finally:
        redis_server.cont()
