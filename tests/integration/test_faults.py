"""Fault injection with real redis-server processes: every test counts what arrived and in which order."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.helpers import REPO_ROOT, run_process, run_sidecar, wait_until
from tests.integration import runs
from tests.integration.faults import ReplyDroppingProxy, ThrottlingProxy, counter_bytes, raw_seqs
from tests.redis_harness import RedisServer, find_free_port

COUNTER = str(REPO_ROOT / "tests" / "agents" / "counter.py")
SIGNALS = str(REPO_ROOT / "tests" / "agents" / "signals.py")
AOF = ("--appendonly", "yes", "--appendfsync", "always")


def counter(lines: int, rate: float, *extra: str) -> list[str]:
    return [sys.executable, COUNTER, "--lines", str(lines), "--rate", str(rate), *extra]


def sidecar_args(url: str, run_id: str, spool: Path, *extra: str) -> list[str]:
    return ["--redis-url", url, "--run-id", run_id, "--no-echo", "--socket-timeout", "1",
            "--retry-max-backoff", "0.5", "--spool-dir", str(spool), *extra]


def assert_exactly_once(client: redis.Redis, key: str, n: int) -> None:
    seqs = raw_seqs(client, key)
    assert len(seqs) == n, f"{len(seqs)} records in the stream, {n} written"
    assert seqs == list(range(1, n + 1)), "records out of order or repeated"
    assert runs.stream_bytes(client, key) == counter_bytes(1, n)


def replay(url: str, spool: Path) -> Any:
    return run_process([sys.executable, "-m", "sidecar", "replay", "--spool-dir", str(spool), "--redis-url", url,
                        "--timeout", "30"], timeout=60)


def test_redis_killed_and_restarted_mid_run(redis_factory: Any, start_sidecar: Any, tmp_path: Path) -> None:
    srv: RedisServer = redis_factory(AOF)
    client = srv.client()
    n = 6000
    proc = start_sidecar([*sidecar_args(srv.url, "kill", tmp_path / "spool"), "--", *counter(n, 2000)])
    key = runs.keys("kill")["stdout"]
    wait_until(lambda: client.exists(key) == 1, timeout=10)
    srv.kill()
    time.sleep(1.0)
    srv.restart()
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    client = srv.client()
    assert_exactly_once(client, key, n)
    states = [m["status"] for m in runs.statuses(client, "kill")]
    assert states[:2] == ["starting", "running"] and states[-1] == "exited"
    assert "degraded" in states and "recovered" in states
    degraded = next(m for m in runs.statuses(client, "kill") if m["status"] == "degraded")
    assert {"since", "waiting_records", "waiting_bytes"} <= set(degraded["metadata"])
    recovered = next(m for m in runs.statuses(client, "kill") if m["status"] == "recovered")
    assert recovered["metadata"]["down_s"] > 0.5


def test_redis_down_at_start_then_started(redis_factory: Any, start_sidecar: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    n = 3000
    proc = start_sidecar([*sidecar_args(url, "late", tmp_path / "spool"), "--", *counter(n, 1500)])
    time.sleep(1.5)
    srv: RedisServer = redis_factory(port=port)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    client = srv.client()
    assert_exactly_once(client, runs.keys("late")["stdout"], n)
    states = [m["status"] for m in runs.statuses(client, "late")]
    assert states[0] == "starting" and states[-1] == "exited" and "degraded" in states


def test_redis_stalled_by_sigstop(redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    n = 6000
    key = runs.keys("stall")["stdout"]
    client = redis_server.client()
    proc = start_sidecar([*sidecar_args(redis_server.url, "stall", tmp_path / "spool"), "--", *counter(n, 1500)])
    wait_until(lambda: client.exists(key) == 1, timeout=10)
    redis_server.stop()
    time.sleep(3.0)
    assert proc.poll() is None  # the agent kept running; nothing crashed
    redis_server.cont()
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert_exactly_once(redis_server.client(), key, n)
    assert "degraded" in [m["status"] for m in runs.statuses(redis_server.client(), "stall")]


def test_a_stalled_redis_counts_as_down_after_one_socket_timeout(redis_server: RedisServer, start_sidecar: Any,
                                                                 tmp_path: Path) -> None:
    """From then on the backlog is on disk: a sidecar SIGKILLed during the stall loses only
    what was still in its pipe (before, the stall went unnoticed for two timeouts and the
    output of those seconds was in memory only)."""
    key = runs.keys("stk")["stdout"]
    spool = tmp_path / "spool"
    client = redis_server.client()
    proc = start_sidecar([*sidecar_args(redis_server.url, "stk", spool), "--socket-timeout", "2", "--",
                          *counter(100_000, 1000)])
    wait_until(lambda: client.exists(key) == 1, timeout=10)
    started = time.monotonic()
    redis_server.stop()
    wait_until(lambda: any(spool.rglob("*.seg")), timeout=3.5, message="spooling within ~1 socket timeout")
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    proc.kill_tree()
    redis_server.cont()
    assert replay(redis_server.url, spool).returncode == 0
    seqs = raw_seqs(redis_server.client(), key)
    assert seqs == list(range(1, len(seqs) + 1)), "a prefix, in order, each once"
    assert len(seqs) >= 1000 * (killed - started) * 0.6, f"{len(seqs)} lines: the stall's output was lost"


def test_reply_lost_after_write_is_not_duplicated(redis_server: RedisServer, tmp_path: Path) -> None:
    with ReplyDroppingProxy(redis_server.port) as proxy:
        cp = run_sidecar([*sidecar_args(proxy.url, "dup", tmp_path / "spool"), "--", *counter(2000, 0)])
        assert proxy.fired.is_set()
    assert cp.returncode == 0, cp.stderr
    assert_exactly_once(redis_server.client(), runs.keys("dup")["stdout"], 2000)
    statuses = runs.statuses(redis_server.client(), "dup")
    seqs = [m["seq"] for m in statuses]
    assert seqs == sorted(set(seqs))


def test_client_kill_storm(redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    n = 8000
    admin = redis_server.client()
    proc = start_sidecar([*sidecar_args(redis_server.url, "ck", tmp_path / "spool"), "--", *counter(n, 4000)])
    kills = 0
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline and proc.poll() is None:
        for c in admin.client_list():
            if c.get("cmd") in ("evalsha", "eval", "exec", "xadd") or c.get("name") == "":
                if int(c["id"]) != admin.client_id():
                    try:
                        admin.client_kill_filter(_id=c["id"])
                        kills += 1
                    except redis.ResponseError:
                        pass
        time.sleep(0.02)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert kills > 0
    assert_exactly_once(redis_server.client(), runs.keys("ck")["stdout"], n)


def test_down_for_whole_run_then_replay(redis_factory: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    n = 5000
    cp = run_sidecar([*sidecar_args(url, "down", spool), "--drain-timeout", "1", "--", *counter(n, 0)])
    assert cp.returncode == 0
    assert b"stays in the spool" in cp.stderr
    assert any(spool.rglob("*.seg"))
    srv: RedisServer = redis_factory(port=port)
    rp = replay(url, spool)
    assert rp.returncode == 0, rp.stderr
    client = srv.client()
    assert_exactly_once(client, runs.keys("down")["stdout"], n)
    states = [m["status"] for m in runs.statuses(client, "down")]
    assert states[0] == "starting" and states[-1] == "exited"
    # a second replay finds nothing and writes nothing twice
    rp = replay(url, spool)
    assert rp.returncode == 0
    assert_exactly_once(client, runs.keys("down")["stdout"], n)
    assert not any(spool.rglob("*.seg"))


def test_a_full_spool_at_exit_keeps_the_final_status_and_marks_the_rest(redis_factory: Any, start_sidecar: Any,
                                                                        tmp_path: Path) -> None:
    """Redis down, buffer and spool full, the agent blocked on write, then SIGTERM: what the
    spool holds is kept, what waited in memory becomes one gap marker, and the final status
    still follows, past the spool's limit."""
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    proc = start_sidecar([*sidecar_args(url, "fullsp", spool), "--spool-max-bytes", "64KiB", "--buffer-max-bytes",
                          "64KiB", "--compress-threshold", "-1", "--drain-timeout", "1", "--", *counter(10**7, 0)])
    proc.wait_for_output("buffer and spool are full", timeout=30)
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 128 + signal.SIGTERM, cp.stderr
    assert b"gap markers in the spool say what is missing" in cp.stderr, cp.stderr
    assert b"stopped reading the agent's stdout (a stop signal, Redis unreachable" in cp.stderr, cp.stderr
    srv: RedisServer = redis_factory(port=port)
    rp = replay(url, spool)
    assert rp.returncode == 0, rp.stderr
    client = srv.client()
    key = runs.keys("fullsp")["stdout"]
    seqs = raw_seqs(client, key)
    kept = len(seqs)
    assert kept > 0 and seqs == list(range(1, kept + 1))
    assert runs.stream_bytes(client, key) == counter_bytes(1, kept)
    final = runs.statuses(client, "fullsp")[-1]
    assert final["status"] == "killed", final
    captured = final["metadata"]["records"]
    assert captured > kept
    assert [(g.first, g.last, g.reason) for g in runs.gaps(client, key)] == [(kept + 1, captured, "dropped")]
    assert f"records={captured - kept}".encode() in cp.stderr, cp.stderr
    assert client.hget("run:fullsp:variation:0", "status") == b"killed"
    out, _err, rc = runs.tail(url, "fullsp", "--raw")
    assert rc == 3
    assert out == counter_bytes(1, kept)


def test_next_sidecar_of_the_run_delivers_old_spool_first(redis_factory: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    cp = run_sidecar([*sidecar_args(url, "first", spool), "--drain-timeout", "0.5", "--", *counter(1000, 0)])
    assert cp.returncode == 0
    srv: RedisServer = redis_factory(port=port)
    client = srv.client()
    # a sidecar of another run leaves that output where it is
    cp = run_sidecar([*sidecar_args(url, "other", spool), "--", *counter(10, 0)])
    assert cp.returncode == 0, cp.stderr
    assert b"output of other runs" in cp.stderr
    assert client.xlen(runs.keys("first")["stdout"]) == 0 and any(spool.rglob("*.seg"))
    assert_exactly_once(client, runs.keys("other")["stdout"], 10)
    # the run's next sidecar (a restarted container) delivers it before its own
    cp = run_sidecar([*sidecar_args(url, "first", spool), "--", *counter(10, 0)])
    assert cp.returncode == 0, cp.stderr
    recs = runs.records(client, runs.keys("first")["stdout"])
    assert len(recs) == 1010
    assert [r.producer for r in recs[:1000]] == [recs[0].producer] * 1000
    assert recs[1000].producer != recs[0].producer
    assert b"".join(r.data for r in recs[:1000]) == counter_bytes(1, 1000)
    assert not any(spool.rglob("*.seg"))


def test_sidecar_sigkilled_with_spool_then_replay(redis_factory: Any, start_sidecar: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    proc = start_sidecar([*sidecar_args(url, "crash", spool), "--", *counter(100_000, 2000)])
    time.sleep(2.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.kill_tree()
    segs = sorted(spool.rglob("*.seg"))
    assert segs
    # a torn tail, as a crash in the middle of an append leaves it
    with open(segs[-1], "ab") as fh:
        fh.write(b"ASP1\x00\x10\x00\x00garbage")
    srv: RedisServer = redis_factory(port=port)
    rp = replay(url, spool)
    assert rp.returncode == 0, rp.stderr
    assert b"torn" in rp.stderr or b"corrupt" in rp.stderr
    assert b"Traceback" not in rp.stderr
    client = srv.client()
    seqs = raw_seqs(client, runs.keys("crash")["stdout"])
    assert len(seqs) >= 1000, "most of what was written before the kill was spooled"
    assert seqs == list(range(1, len(seqs) + 1)), "a prefix, in order, each once"
    assert runs.stream_bytes(client, runs.keys("crash")["stdout"]) == counter_bytes(1, len(seqs))
    assert replay(url, spool).returncode == 0
    assert raw_seqs(client, runs.keys("crash")["stdout"]) == seqs


def _frame_offsets(data: bytes) -> list[int]:
    """Where each frame of an intact spool segment starts."""
    from sidecar.spool import _HEAD, MAGIC

    out, pos = [], 0
    while pos < len(data):
        magic, blen, _crc = _HEAD.unpack_from(data, pos)
        assert magic == MAGIC
        out.append(pos)
        pos += _HEAD.size + blen
    return out


def test_replay_exits_1_when_a_spool_frame_was_damaged(redis_factory: Any, tmp_path: Path) -> None:
    """A frame changed on disk in the middle of a segment: replay delivers every other frame,
    in order, and exits 1 naming the damage, instead of reporting success."""
    from sidecar.spool import _HEAD

    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    cp = run_sidecar([*sidecar_args(url, "damaged", spool, "--drain-timeout", "0.5", "--batch-max-records", "50",
                                    "--compress-threshold", "-1"), "--", *counter(500, 0)])
    assert cp.returncode == 0, cp.stderr
    [seg] = list(spool.rglob("*.seg"))
    data = bytearray(seg.read_bytes())
    frames = _frame_offsets(bytes(data))
    assert len(frames) > 5
    victim = frames[len(frames) // 2]
    data[victim + _HEAD.size + 8] ^= 0x01  # one bit of a frame's body: its checksum fails
    seg.write_bytes(bytes(data))
    srv: RedisServer = redis_factory(port=port)
    rp = replay(url, spool)
    assert rp.returncode == 1, rp.stderr
    assert b"damaged" in rp.stderr and b"Traceback" not in rp.stderr
    seqs = raw_seqs(srv.client(), runs.keys("damaged")["stdout"])
    assert 400 <= len(seqs) < 500 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # the segment is kept for inspection, under a name no sidecar reads again
    kept = spool / ".damaged" / f"{seg.parent.name}-{seg.name}"
    assert not seg.parent.exists() and kept.read_bytes() == bytes(data)
    again = replay(url, spool)
    assert again.returncode == 0 and b"kept for inspection" in again.stderr, again.stderr
    assert raw_seqs(srv.client(), runs.keys("damaged")["stdout"]) == seqs


def test_the_next_sidecar_of_a_run_reports_damaged_spool_frames_it_adopts(redis_factory: Any,
                                                                           tmp_path: Path) -> None:
    from sidecar.spool import _HEAD

    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    args = sidecar_args(url, "adopt-damaged", spool, "--drain-timeout", "0.5", "--batch-max-records", "50",
                        "--compress-threshold", "-1")
    assert run_sidecar([*args, "--", *counter(300, 0)]).returncode == 0
    [seg] = list(spool.rglob("*.seg"))
    data = bytearray(seg.read_bytes())
    frames = _frame_offsets(bytes(data))
    data[frames[len(frames) // 2] + _HEAD.size + 8] ^= 0x01  # a frame's body, in the middle: output
    seg.write_bytes(bytes(data))
    srv: RedisServer = redis_factory(port=port)
    cp = run_sidecar([*args, "--", *counter(10, 0)])
    assert cp.returncode == 0 and b"Traceback" not in cp.stderr
    assert b"output lost: spool frames left by an earlier sidecar were damaged" in cp.stderr, cp.stderr
    assert (spool / ".damaged" / f"{seg.parent.name}-{seg.name}").exists() and not seg.parent.exists()
    recs = runs.records(srv.client(), runs.keys("adopt-damaged")["stdout"])
    assert 250 <= len(recs) < 310


def test_when_full_block_pauses_the_agent_and_loses_nothing(
    redis_factory: Any, start_sidecar: Any, tmp_path: Path
) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    marker = tmp_path / "agent-done"
    n = 400_000  # about 4.6 MB: more than the pipe (1 MiB), the reader's batch and the buffer together
    cmd = ["sh", "-c", f"{sys.executable} {COUNTER} --lines {n} --rate 0 && touch {marker}"]
    proc = start_sidecar([*sidecar_args(url, "block", tmp_path / "spool"), "--buffer-max-bytes", "256KiB",
                          "--spool-max-bytes", "0", "--compress-threshold", "-1", "--", *cmd])
    time.sleep(3.0)
    assert not marker.exists(), "the agent should be blocked on write while everything is full"
    assert proc.poll() is None
    srv: RedisServer = redis_factory(port=port)
    cp = proc.finish(timeout=90)
    assert cp.returncode == 0, cp.stderr
    assert marker.exists()
    assert_exactly_once(srv.client(), runs.keys("block")["stdout"], n)


def test_when_full_drop_never_blocks_and_marks_gaps(redis_factory: Any, start_sidecar: Any, tmp_path: Path) -> None:
    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    marker = tmp_path / "agent-done"
    n = 100_000
    cmd = ["sh", "-c", f"{sys.executable} {COUNTER} --lines {n} --rate 0 && touch {marker}"]
    proc = start_sidecar([*sidecar_args(url, "drop", tmp_path / "spool"), "--buffer-max-bytes", "256KiB",
                          "--spool-max-bytes", "0", "--compress-threshold", "-1", "--when-full", "drop",
                          "--drain-timeout", "30", "--", *cmd])
    wait_until(marker.exists, timeout=30, message="the agent must never block under --when-full drop")
    srv: RedisServer = redis_factory(port=port)
    cp = proc.finish(timeout=90)
    assert cp.returncode == 0, cp.stderr
    client = srv.client()
    key = runs.keys("drop")["stdout"]
    recs = runs.records(client, key)
    gaps = runs.gaps(client, key)
    assert gaps, "something must have been dropped"
    covered = sorted([r.seq for r in recs] + [s for g in gaps for s in range(g.first, g.last + 1)])
    assert covered == list(range(1, n + 1)), "records and gap markers account for every sequence number once"
    for r in recs:
        assert r.data == b"line %d\n" % r.seq
    assert all(g.reason == "dropped" for g in gaps)
    err = cp.stderr.decode()
    assert err.count("dropping the oldest waiting output") == 1, err
    dropped = sum(g.last - g.first + 1 for g in gaps)
    assert f"output dropped while the buffer was full (--when-full drop) records={dropped}" in err, err  # no spool
    # 256 KiB of buffer, no spool: room for one batch, told at start
    assert err.count("--when-full drop with room for fewer than 4 batches") == 1, err


def test_when_full_drop_with_the_default_room_is_not_warned_about(redis_server: RedisServer) -> None:
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "droproom", "--when-full", "drop",
                      "--", "echo", "hi"])
    assert cp.returncode == 0
    assert b"room for fewer than" not in cp.stderr, cp.stderr


def test_sigterm_to_sidecar_with_agent_that_traps_it(redis_server: RedisServer, start_sidecar: Any,
                                                     tmp_path: Path) -> None:
    proc = start_sidecar([*sidecar_args(redis_server.url, "trap", tmp_path / "spool"), "--", sys.executable,
                          SIGNALS, "--on-term", "exit"])
    wait_until(lambda: b"ready" in runs.stream_bytes(redis_server.client(), runs.keys("trap")["stdout"]), timeout=10)
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0, cp.stderr
    out = runs.stream_bytes(redis_server.client(), runs.keys("trap")["stdout"])
    assert out == b"ready\ngot SIGTERM\ncleaning up\n"
    assert runs.statuses(redis_server.client(), "trap")[-1]["status"] == "exited"


def test_sigterm_to_sidecar_with_agent_that_ignores_it(redis_server: RedisServer, start_sidecar: Any,
                                                       tmp_path: Path) -> None:
    proc = start_sidecar([*sidecar_args(redis_server.url, "ign", tmp_path / "spool"), "--kill-grace", "1", "--",
                          sys.executable, SIGNALS, "--on-term", "ignore"])
    wait_until(lambda: b"ready" in runs.stream_bytes(redis_server.client(), runs.keys("ign")["stdout"]), timeout=10)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 137
    assert 0.9 <= time.monotonic() - t0 < 10
    final = runs.statuses(redis_server.client(), "ign")[-1]
    assert final["status"] == "killed" and final["metadata"]["signal"] == "SIGKILL"
    assert b"SIGKILL" in cp.stderr


def test_signals_are_forwarded_to_the_agent(redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    client = redis_server.client()
    key = runs.keys("fwd")["stdout"]
    proc = start_sidecar([*sidecar_args(redis_server.url, "fwd", tmp_path / "spool"), "--", sys.executable, SIGNALS])
    wait_until(lambda: b"ready" in runs.stream_bytes(client, key), timeout=10)
    sent = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT, signal.SIGINT]
    for sig in sent:
        proc.send_signal(sig)
        name = signal.Signals(sig).name
        wait_until(lambda n=name: f"got {n}".encode() in runs.stream_bytes(client, key), timeout=10)
    proc.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=30).returncode == 0
    expected = b"ready\n" + b"".join(b"got %s\n" % signal.Signals(s).name.encode() for s in sent)
    assert runs.stream_bytes(client, key) == expected + b"got SIGTERM\ncleaning up\n"


def test_second_sigterm_during_drain_says_what_it_waits_for(free_port: int, start_sidecar: Any,
                                                            tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port}/0"
    proc = start_sidecar([*sidecar_args(url, "drain", tmp_path / "spool"), "--drain-timeout", "20", "--",
                          "echo", "x"])
    wait_until(lambda: b"cannot write to Redis" in proc.read_stderr(), timeout=10)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: b"waiting for its output to reach Redis" in proc.read_stderr(), timeout=10)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=10)
    assert cp.returncode == 0
    assert b"leaving the rest in the spool" in cp.stderr
    assert any((tmp_path / "spool").rglob("*.seg"))


def test_a_stop_signal_does_not_cut_reading_while_a_slow_redis_answers(redis_server: RedisServer,
                                                                         start_sidecar: Any, tmp_path: Path) -> None:
    """Redis reachable through a 300 KB/s link, buffer and spool full, SIGTERM to an agent that
    ignores it and writes on: the pipe is read to its end (Redis is slow, not away), and every
    line arrives."""
    n = 100_000
    spool = tmp_path / "spool"
    with ThrottlingProxy(redis_server.port, 300_000) as proxy:
        proc = start_sidecar([*sidecar_args(proxy.url, "slowr", spool), "--spool-max-bytes", "64KiB",
                              "--buffer-max-bytes", "64KiB", "--compress-threshold", "-1", "--socket-timeout", "10",
                              "--drain-timeout", "1", "--kill-grace", "120", "--", "sh", "-c",
                              f"trap '' TERM; exec {sys.executable} {COUNTER} --lines {n} --rate 0"])
        proc.wait_for_output("buffer and spool are full", timeout=30)
        proc.send_signal(signal.SIGTERM)
        cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert b"stopped reading" not in cp.stderr, cp.stderr
    assert replay(redis_server.url, spool).returncode == 0
    assert_exactly_once(redis_server.client(), runs.keys("slowr")["stdout"], n)


def test_stop_signals_after_exit_end_reading_but_not_the_drain_to_a_healthy_redis(
        redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    """A grandchild in a session of its own holds the pipe after the agent exits: the first
    stop signal reports, the second ends the reading; the drain still delivers everything and
    the final status to a healthy Redis."""
    n = 50_000
    proc = start_sidecar([*sidecar_args(redis_server.url, "hold2", tmp_path / "spool"), "--pipe-grace", "60",
                          "--drain-timeout", "30", "--", "sh", "-c",
                          f"{sys.executable} {COUNTER} --lines {n} --rate 0; setsid sleep 60 & exit 0"])
    client = redis_server.client()
    holders: list[psutil.Process] = []
    try:
        wait_until(lambda: any(m["status"] == "running" for m in runs.statuses(client, "hold2")), timeout=15)
        [running] = [m for m in runs.statuses(client, "hold2") if m["status"] == "running"]
        agent_pid = running["metadata"]["pid"]
        wait_until(lambda: not psutil.pid_exists(agent_pid)
                   or psutil.Process(agent_pid).status() == psutil.STATUS_ZOMBIE, timeout=30)
        holders += psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_output("agent has exited; still reading its pipes", timeout=10)
        proc.send_signal(signal.SIGTERM)
        cp = proc.finish(timeout=30)
    finally:
        for p in holders:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert cp.returncode == 0, cp.stderr
    assert b"held open by a process" in cp.stderr, cp.stderr
    assert_exactly_once(client, runs.keys("hold2")["stdout"], n)
    assert runs.statuses(client, "hold2")[-1]["status"] == "exited"
    assert client.hget("run:hold2:variation:0", "status") == b"exited"


def test_stop_signals_end_reading_held_up_by_a_full_buffer(start_sidecar: Any, tmp_path: Path) -> None:
    """Redis down, buffer and spool full, the agent blocked on write: SIGTERM ends the agent;
    after its exit the first stop signal reports, the second ends the reading of its full pipe
    at once (no --drain-timeout wait), the third ends the drain, leaving the final status in
    the spool."""
    url = f"redis://127.0.0.1:{find_free_port()}/0"
    spool = tmp_path / "spool"
    proc = start_sidecar([*sidecar_args(url, "stops", spool), "--spool-max-bytes", "64KiB", "--buffer-max-bytes",
                          "64KiB", "--compress-threshold", "-1", "--drain-timeout", "600", "--",
                          *counter(10**7, 0)])
    proc.wait_for_output("buffer and spool are full", timeout=30)
    agent = psutil.Process(proc.pid).children()[0]
    proc.send_signal(signal.SIGTERM)
    agent.wait(timeout=10)
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("agent has exited; still reading its pipes", timeout=10)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("stopped reading the agent's stdout (a second stop signal)", timeout=10)
    assert proc.poll() is None  # draining
    proc.send_signal(signal.SIGTERM)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 128 + signal.SIGTERM, cp.stderr
    assert b"second stop signal during drain: leaving the rest in the spool" in cp.stderr, cp.stderr
    assert b"gap markers in the spool say what is missing" in cp.stderr, cp.stderr
    statuses = [it for it in _spooled(spool) if it.kind == "status"]
    assert b'"killed"' in statuses[-1].payload


def _spooled(spool: Path) -> list[Any]:
    from sidecar.spool import _HEAD, decode_body

    items = []
    for seg in sorted(spool.rglob("*.seg")):
        data = seg.read_bytes()
        for pos in _frame_offsets(data):
            (blen,) = _HEAD.unpack_from(data, pos)[1:2]
            items.append(decode_body(data[pos + _HEAD.size : pos + _HEAD.size + blen]))
    return items


def test_grandchild_holding_the_pipe_does_not_hang(redis_server: RedisServer, tmp_path: Path) -> None:
    t0 = time.monotonic()
    cp = run_sidecar([*sidecar_args(redis_server.url, "held", tmp_path / "spool"), "--pipe-grace", "0.5", "--",
                      "sh", "-c", "sleep 60 & echo done"], timeout=30)
    assert cp.returncode == 0
    assert time.monotonic() - t0 < 15
    assert runs.stream_bytes(redis_server.client(), runs.keys("held")["stdout"]) == b"done\n"
    assert b"held open" in cp.stderr


def test_orphans_are_reaped(redis_server: RedisServer, start_sidecar: Any, tmp_path: Path) -> None:
    import psutil

    proc = start_sidecar([*sidecar_args(redis_server.url, "orph", tmp_path / "spool"), "--", "sh", "-c",
                          "(sleep 0.2 >/dev/null 2>&1 &); sleep 2; echo end"])
    time.sleep(1.2)
    me = psutil.Process(proc.pid)
    zombies = [c for c in me.children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    assert proc.finish(timeout=30).returncode == 0


def test_a_batch_never_lands_past_an_earlier_one_that_failed(redis_server: RedisServer) -> None:
    """In one pipeline, A fails (here: its script is refused) and B, next on the same key, must
    not land: otherwise the high-water mark passes A and A's retry is skipped as a repeat."""
    from sidecar.transport import APPEND_SCRIPT

    client = redis_server.client()
    sha = client.script_load(APPEND_SCRIPT)
    key, idem = "run:sg:output:0", "run:sg:output:0:idem"

    def append(first: int, last: int, payload: bytes, prev: int) -> Any:
        return client.evalsha(sha, 2, key, idem, "p1", first, last, payload, 0, 0, 0, prev)

    # B (seq 11-20) arrives while A (1-10) has not landed: refused, nothing written
    try:
        append(11, 20, b"B", prev=10)
        raise AssertionError("B was written before A")
    except redis.ResponseError as exc:
        assert str(exc).startswith("SEQGAP")
    assert client.xlen(key) == 0
    # the retry of the whole pipeline: A, then B; a third retry writes nothing twice
    for _ in range(2):
        assert append(1, 10, b"A", prev=0) in (0, 1)
        assert append(11, 20, b"B", prev=10) in (0, 1)
    assert [f[b"d"] for _id, f in client.xrange(key)] == [b"A", b"B"]
    # another producer's items are not held back by p1's
    assert client.evalsha(sha, 2, key, idem, "p2", 1, 5, b"C", 0, 0, 0, 0) == 1


def test_each_append_names_the_batch_before_it_in_the_pipeline() -> None:
    """The ``prev`` argument: the last seq of the previous item of the same key and producer in
    this pipeline, 0 for the first one."""
    from sidecar.config import build
    from sidecar.items import Item
    from sidecar.outbox import Outbox
    from sidecar.transport import Sender

    sent: list[tuple[Any, ...]] = []

    class FakeTarget:
        def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[int]:
            sent.extend(cmds)
            return [1] * len(cmds)

    settings = build({"run_id": "pv"}, {}, ("x",))
    sender = Sender(settings, Outbox(1 << 20, None, "block", lambda k, a, b: Item(k, "p", a, b, b"")), None)
    sender._target = FakeTarget()  # type: ignore[assignment]
    items = [Item("k1", "p", 1, 10, b"a", 10, 1), Item("k1", "p", 11, 12, b"b", 2, 1),
             Item("k2", "p", 1, 3, b"c", 3, 1), Item("k1", "q", 1, 1, b"d", 1, 1), Item("k1", "p", 13, 13, b"e", 1, 1)]
    sender._send(items)
    appends = [c for c in sent if c[0] == "EVALSHA"]
    assert [(c[3], c[5], c[6], c[12]) for c in appends] == [
        ("k1", "p", 1, 0), ("k1", "p", 11, 10), ("k2", "p", 1, 0), ("k1", "q", 1, 0), ("k1", "p", 13, 12)]


def test_a_gap_marker_lands_unless_its_whole_range_did(redis_server: RedisServer) -> None:
    """A marker made at exit can cover batches sent before a lost reply: it is written unless
    every record it names already landed, and then names only the rest."""
    from sidecar import protocol
    from sidecar.config import build
    from sidecar.items import Item
    from sidecar.outbox import Outbox
    from sidecar.transport import APPEND_SCRIPT, Sender

    client = redis_server.client()
    client.script_load(APPEND_SCRIPT)

    class RealTarget:
        def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[Any]:
            return [client.execute_command(*c) for c in cmds]

    key = runs.keys("gl")["stdout"]
    settings = build({"run_id": "gl", "redis_url": redis_server.url}, {}, ("x",))

    def gap(first: int, last: int) -> Item:
        msg = {"v": 1, "type": "gap", "channel": key, "stream": "stdout", "producer": "p", "seq": first,
               "n": last - first + 1, "from": first, "to": last}
        return Item(key, "p", first, last, protocol.encode_object(msg), kind="gap")

    sender = Sender(settings, Outbox(1 << 20, None, "block", lambda k, a, b: gap(a, b)), None)
    sender._target = RealTarget()  # type: ignore[assignment]
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(key)
    wait_until(lambda: client.pubsub_numsub(key)[0][1] == 1, timeout=5)
    batch = protocol.encode_object({"v": 1, "type": "batch", "channel": key, "stream": "stdout", "producer": "p",
                                    "seq": 1, "n": 5, "lines": ["l1", "l2", "l3", "l4", "l5"]})
    sender._send([Item(key, "p", 1, 5, batch, 5, 15)])
    sender._send([gap(1, 5)])  # all of it landed: nothing to write
    sender._send([gap(3, 10)])  # 3..5 landed, 6..10 did not
    sender._send([gap(3, 10)])  # a retry writes nothing twice
    assert [protocol.decode(f[b"d"])["type"] for _id, f in client.xrange(key)] == ["batch", "gap"]
    # the marker as written names only what did not land, for readers without the batch before it
    written = protocol.decode(client.xrange(key)[-1][1][b"d"])
    assert (written["from"], written["to"], written["seq"], written["n"]) == (6, 10, 6, 5)
    assert all(type(written[f]) is int for f in ("from", "to", "seq", "n", "v"))
    assert written["producer"] == "p" and written["channel"] == key
    assert [(g.first, g.last) for g in runs.gaps(client, key)] == [(6, 10)]
    assert runs.stream_bytes(client, key) == b"l1\nl2\nl3\nl4\nl5\n"
    published = []
    deadline = time.monotonic() + 1  # long enough for a repeat to show up too
    while time.monotonic() < deadline:
        if (m := sub.get_message(timeout=0.2)) is not None:
            published.append(protocol.decode(m["data"]))
    sub.close()
    assert [(p["type"], p["seq"], p["n"]) for p in published] == [("batch", 1, 5), ("gap", 6, 5)]


def test_exit_keeps_to_the_drain_timeout_while_redis_hangs(redis_factory: Any, start_sidecar: Any,
                                                           tmp_path: Path) -> None:
    """Redis frozen (SIGSTOP) while the sidecar drains: it leaves within --drain-timeout plus a
    short margin (not the 5 s socket timeout, nor the waits for its threads), with what was
    not acknowledged in the spool for replay."""
    srv: RedisServer = redis_factory()
    spool = tmp_path / "spool"
    agent = [sys.executable, "-c", "import sys, time\nprint('first', flush=True)\ntime.sleep(1.5)\n"
             "sys.stdout.write(''.join(f'line {i}\\n' for i in range(300)))"]
    proc = start_sidecar([*sidecar_args(srv.url, "hang", spool, "--drain-timeout", "1", "--socket-timeout", "5"),
                          "--", *agent])
    wait_until(lambda: srv.client().xlen(runs.keys("hang")["stdout"]) > 0, timeout=10)
    srv.stop()
    try:
        wait_until(lambda: proc.poll() is not None or not psutil.Process(proc.pid).children(), timeout=15)
        t_agent_gone = time.monotonic()
        cp = proc.finish(timeout=30)
        elapsed = time.monotonic() - t_agent_gone
    finally:
        srv.cont()
    assert cp.returncode == 0, cp.stderr
    assert elapsed < 2.8, (elapsed, cp.stderr)  # --drain-timeout 1, then at most ~0.5 s for the threads
    rp = replay(srv.url, spool)
    assert rp.returncode == 0, rp.stderr
    recs = runs.records(srv.client(), runs.keys("hang")["stdout"])
    assert b"".join(r.data for r in recs) == b"first\n" + b"".join(b"line %d\n" % i for i in range(300))


def test_a_frozen_redis_does_not_hold_up_the_pipe_reader(redis_factory: Any, start_sidecar: Any,
                                                         tmp_path: Path) -> None:
    """Lone lines are delivered by the pipe reader itself while Redis answers promptly. When
    Redis stops answering (SIGSTOP), the reader gives up on the reply within a few tens of
    milliseconds and goes on reading: the echo keeps up with the agent all through the
    freeze (a reader waiting out the 5 s socket timeout would echo nothing). Every line is
    in Redis once afterwards, in order."""
    srv: RedisServer = redis_factory()
    client = srv.client()
    n = 80
    args = ["--redis-url", srv.url, "--run-id", "frz", "--socket-timeout", "5", "--retry-max-backoff", "0.5",
            "--spool-dir", str(tmp_path / "spool")]
    proc = start_sidecar([*args, "--", *counter(n, 20)])
    key = runs.keys("frz")["stdout"]
    wait_until(lambda: client.xlen(key) >= 10, timeout=15)
    srv.stop()
    try:
        t_stop = time.monotonic()
        echoed_at_stop = proc.read_stdout().count(b"\n")
        time.sleep(1.5)
        echoed_in_freeze = proc.read_stdout().count(b"\n") - echoed_at_stop
    finally:
        srv.cont()
    frozen_s = time.monotonic() - t_stop
    cp = proc.finish(timeout=60)
    assert cp.returncode == 0, cp.stderr
    # 20 lines/s for ~1.5 s: ~30 lines; well over half must have been read and echoed
    assert echoed_in_freeze >= 15, (echoed_in_freeze, frozen_s, cp.stderr)
    assert cp.stdout == counter_bytes(1, n)
    assert_exactly_once(client, key, n)


def test_without_a_usable_spool_the_exit_says_the_rest_is_lost(free_port: int, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cp = run_sidecar([*sidecar_args(f"redis://127.0.0.1:{free_port}/0", "nosp", blocker / "spool"),
                      "--drain-timeout", "1", "--", "sh", "-c", "echo one; echo two"])
    assert cp.returncode == 0
    err = cp.stderr.decode()
    assert "disk spool unavailable" in err
    assert "output waits in the memory buffer (no spool)" in err, err
    assert "stays in the spool" not in err and "replay" not in err, err
    assert "there is no usable spool: lost" in err and "records=2" in err, err
