"""Redis Cluster and Sentinel: real topologies on loopback ports, a master killed mid-run, counted."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar import protocol
from sidecar.consumer import RunReader
from sidecar.protocol import Record
from tests.helpers import REPO_ROOT, run_process, wait_until
from tests.integration import runs
from tests.integration.faults import counter_bytes

COUNTER = str(REPO_ROOT / "tests" / "agents" / "counter.py")


def _args(url: str, run_id: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--redis-url", url, "--run-id", run_id, "--no-echo", "--socket-timeout", "1", "--retry-max-backoff",
            "0.5", "--spool-dir", str(tmp_path / "spool"), "--drain-timeout", "60", *extra]


def _counter(n: int, rate: float) -> list[str]:
    return [sys.executable, COUNTER, "--lines", str(n), "--rate", str(rate)]


def _seqs(client: Any, key: str) -> list[int]:
    out: list[int] = []
    for _id, fields in client.xrange(key, "-", "+"):
        msg = protocol.decode(fields[b"d"])
        if msg.get("type") == "batch":
            out.extend(range(msg["seq"], msg["seq"] + msg["n"]))
    return out


def _assert_exactly_once(client: Any, key: str, n: int) -> None:
    seqs = _seqs(client, key)
    assert len(seqs) == n, f"{len(seqs)} of {n} records in the stream"
    assert seqs == list(range(1, n + 1))
    data = b"".join(r.data for r in RunReader(client, [key]).stored() if isinstance(r, Record))
    assert data == counter_bytes(1, n)


def test_cluster_master_killed_mid_run(redis_cluster: Any, start_sidecar: Any, tmp_path: Path) -> None:
    n = 8000
    key = "run:clf:output:0"
    proc = start_sidecar([*_args(redis_cluster.url, "clf", tmp_path, "--min-replicas-ack", "1"), "--",
                          *_counter(n, 2000)])
    client = redis_cluster.client()
    wait_until(lambda: client.exists(key) == 1, timeout=15)
    old = redis_cluster.kill_master_of(key)
    redis_cluster.wait_for_failover(key, old)
    # the old master comes back as a replica of the promoted one, so WAIT 1 can succeed again
    old.restart()
    cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    client = redis_cluster.client()
    _assert_exactly_once(client, key, n)
    assert b"Cluster detected" in cp.stderr


def test_cluster_heartbeat_renews_the_ttl_of_keys_on_every_shard(redis_cluster: Any, tmp_path: Path) -> None:
    """Without a hash tag the run's keys are spread over the shards: the heartbeat's renewal
    reaches each of them, so a stderr written once outlives a --retention shorter than the run."""
    agent = "import os, time\nos.write(2, b'early\\n'); os.write(1, b'a\\n'); time.sleep(6); os.write(1, b'b\\n')"
    cp = run_process([sys.executable, "-m", "sidecar", *_args(redis_cluster.url, "clq", tmp_path, "--retention", "3",
                                                              "--heartbeat-interval", "0.5"),
                      "--", sys.executable, "-c", agent], timeout=60)
    assert cp.returncode == 0, cp.stderr
    client = redis_cluster.client()
    keys = runs.keys("clq")
    assert len({redis_cluster.node_for_key(k).port for k in keys.values()}) > 1, "keys on more than one shard"
    assert runs.stream_bytes(client, keys["stderr"]) == b"early\n"
    for key in (keys["stderr"], "{" + keys["stderr"] + "}:idem", keys["stdout"], keys["status"]):
        assert 0 < client.pttl(key) <= 3000, key


def test_cluster_tail_and_consumer_read_a_run(redis_cluster: Any, tmp_path: Path) -> None:
    for extra, run_id in (((), "cl-plain"), (("--cluster-hash-tag", "--pubsub", "sharded"), "cl-tag")):
        cmd = ["sh", "-c", "for i in $(seq 1 300); do echo out $i; echo err $i >&2; done"]
        cp = run_process([sys.executable, "-m", "sidecar", *_args(redis_cluster.url, run_id, tmp_path, *extra),
                          "--", *cmd], timeout=60)
        assert cp.returncode == 0, cp.stderr
        out = run_process([sys.executable, "-m", "sidecar", "tail", run_id, "--redis-url", redis_cluster.url,
                           "--raw", *extra[:1]], timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"".join(b"out %d\n" % i for i in range(1, 301))
        assert out.stderr == b"".join(b"err %d\n" % i for i in range(1, 301))
    client = redis_cluster.client()
    # with the hash tag every key of the run is on one slot
    slots = {client.keyslot(k) for k in ("run:{cl-tag}:output:0", "run:{cl-tag}:logs:0", "run:{cl-tag}:status",
                                          "run:{cl-tag}:variation:0")}
    assert len(slots) == 1
    assert client.hget("run:{cl-tag}:variation:0", "status") == b"exited"
    recs = [r for r in RunReader(client, ["run:cl-plain:output:0", "run:cl-plain:logs:0"]).stored()
            if isinstance(r, Record)]
    assert len(recs) == 600


def test_any_node_of_a_cluster_will_do_for_any_run(redis_cluster: Any, tmp_path: Path) -> None:
    """Auto mode pointed at one node: whichever slots a run's keys fall in, the cluster is
    detected (a redirection or a CROSSSLOT refusal) and everything is delivered."""
    from sidecar.topology import key_slot

    client = redis_cluster.client()
    seed = redis_cluster.seed.port
    on_seed = [(a, b) for a, b, master, _r in redis_cluster.slot_map() if master.port == seed]
    run_ids = [f"any-{i}" for i in range(12)]
    # some runs have every single-key write on the seed node: no redirection ever comes
    assert any(a <= key_slot(f"run:{r}:variation:0") <= b for r in run_ids for a, b in on_seed)
    for run_id in run_ids:
        cp = run_process([sys.executable, "-m", "sidecar", *_args(redis_cluster.url, run_id, tmp_path),
                          "--drain-timeout", "10", "--", "echo", run_id], timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert b"stays in the spool" not in cp.stderr, (run_id, key_slot(f"run:{run_id}:variation:0"))
        # finding a cluster is routine, not a refused write: the commands are built again with
        # the cluster's :idem key names (sent as they were, they are refused as CROSSSLOT)
        assert b"refused a write" not in cp.stderr, cp.stderr
    for run_id in run_ids:
        recs = [r for r in RunReader(client, [f"run:{run_id}:output:0"]).stored() if isinstance(r, Record)]
        assert [r.data for r in recs] == [run_id.encode() + b"\n"]


def test_cluster_sharded_pubsub_reaches_ssubscribers(redis_cluster: Any, tmp_path: Path) -> None:
    from sidecar.consumer import subscribe

    client = redis_cluster.client()
    channel = "run:{shp}:output:0"
    node = redis_cluster.node_for_key(channel)
    direct = node.client()
    ps = subscribe(direct, [channel], sharded=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = ps.get_sharded_message(timeout=0.2)
        if m and m["type"] in ("ssubscribe", b"ssubscribe"):
            break
    cp = run_process([sys.executable, "-m", "sidecar", *_args(redis_cluster.url, "shp", tmp_path,
                      "--cluster-hash-tag", "--pubsub", "sharded"), "--", "sh", "-c", "echo one; echo two"],
                     timeout=60)
    assert cp.returncode == 0, cp.stderr
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and data.count(b"\n") < 2:
        m = ps.get_sharded_message(timeout=0.2)
        if m and m["type"] in ("smessage", b"smessage"):
            data += b"".join(r.data for r in protocol.iter_records(protocol.decode(m["data"])))
    ps.close()
    assert data == b"one\ntwo\n"
    assert client.exists(channel) == 1


def test_sentinel_failover_loses_nothing_acknowledged(redis_sentinel: Any, start_sidecar: Any,
                                                      tmp_path: Path) -> None:
    n = 8000
    key = "run:snt:output:0"
    proc = start_sidecar([*_args(redis_sentinel.url, "snt", tmp_path, "--min-replicas-ack", "1"), "--",
                          *_counter(n, 2000)])
    master = redis_sentinel.master
    wait_until(lambda: master.client().exists(key) == 1, timeout=15)
    old_addr = redis_sentinel.current_master_addr()
    redis_sentinel.kill_master()
    redis_sentinel.wait_for_failover(old_addr)
    master.restart()  # sentinels turn it into a replica of the new master; WAIT 1 works again
    cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    # whichever node the sentinels name now holds every line, once, in order
    _assert_exactly_once(redis_sentinel.current_master().client(), key, n)


def test_sentinel_url_for_tail(redis_sentinel: Any, tmp_path: Path) -> None:
    cp = run_process([sys.executable, "-m", "sidecar", *_args(redis_sentinel.url, "snt-tail", tmp_path), "--",
                      "echo", "via sentinel"], timeout=60)
    assert cp.returncode == 0, cp.stderr
    out = run_process([sys.executable, "-m", "sidecar", "tail", "snt-tail", "--redis-url", redis_sentinel.url,
                       "--raw"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"via sentinel\n"


@pytest.mark.parametrize("args", [["--redis-url", "redis+sentinel://127.0.0.1:1"],
                                  ["--redis-url", "redis+sentinel:///mymaster"],
                                  ["--redis-url", "redis://127.0.0.1:26379/0", "--redis-mode", "sentinel"]])
def test_bad_sentinel_url_is_usage_error(args: list[str]) -> None:
    for cmd in (["--run-id", "x", *args, "--", "true"], ["tail", "x", *args], ["replay", *args]):
        cp = run_process([sys.executable, "-m", "sidecar", *cmd], timeout=30)
        assert cp.returncode == 2, (cmd, cp.stderr)
        assert len(cp.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in cp.stderr


def test_a_manual_sentinel_failover_is_followed_within_seconds(redis_sentinel: Any, start_sidecar: Any,
                                                               tmp_path: Path) -> None:
    """SENTINEL FAILOVER leaves the old master taking writes until the sentinels demote it,
    seconds later, and its resync then discards them: the sidecar asks the sentinels every
    second whom they name, and writes to the new master from then on."""
    n = 4000
    key = "run:mfo:output:0"
    proc = start_sidecar([*_args(redis_sentinel.url, "mfo", tmp_path), "--", *_counter(n, 400)])
    wait_until(lambda: redis_sentinel.master.client().exists(key) == 1, timeout=15)
    old_addr = redis_sentinel.current_master_addr()
    sentinel = redis_sentinel.sentinel_servers[0].client()
    sentinel.execute_command("SENTINEL", "FAILOVER", redis_sentinel.master_name)
    redis_sentinel.wait_for_failover(old_addr)
    cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert b"the sentinels name another master" in cp.stderr
    seqs = _seqs(redis_sentinel.current_master().client(), key)
    # the run takes 10 s and the failover happens in its first seconds: all but what the old
    # master took in about a second before the switch is on the new master, in order
    assert seqs == sorted(set(seqs)) and seqs[-1] == n
    assert len(seqs) >= n - 1000, f"{n - len(seqs)} of {n} lines lost"


def test_auto_mode_follows_the_failover_of_the_urls_own_node(redis_cluster: Any, start_sidecar: Any,
                                                              tmp_path: Path) -> None:
    """With --cluster-hash-tag every key of a run may live on the node of the URL, so no MOVED
    ever says it is a cluster: the sidecar asks (CLUSTER INFO) on connecting. Heartbeats and
    the control channel come back too."""
    run = "own"
    key = f"run:{{{run}}}:output:0"
    node = redis_cluster.node_for_key(key)
    url = f"redis://127.0.0.1:{node.port}/0"
    n = 3000
    proc = start_sidecar([*_args(url, run, tmp_path, "--cluster-hash-tag", "--heartbeat-interval", "0.5",
                                 "--agent-id", "agent-own"), "--", *_counter(n, 300)])
    client = redis_cluster.client()
    alive = "agent:agent-own:alive"
    wait_until(lambda: client.exists(key) == 1 and client.exists(alive) == 1, timeout=15)
    redis_cluster.kill_master_of(key)
    redis_cluster.wait_for_failover(key, node)
    client = redis_cluster.client()
    client.delete(alive)
    wait_until(lambda: client.exists(alive) == 1 and client.pttl(alive) > 1000, timeout=20, message="heartbeats")
    wait_until(lambda: len(_seqs(client, key)) > 1000, timeout=20, message="output after the failover")
    client.publish(f"run:{{{run}}}:control", '{"cmd": "cancel"}')
    cp = proc.finish(timeout=120)
    assert cp.returncode == 143, cp.stderr  # cancelled: the control channel was subscribed again
    assert b"Cluster detected" in cp.stderr
    seqs = _seqs(client, key)
    assert seqs == sorted(set(seqs)), "in order, none repeated"
    # Replication is asynchronous (no --min-replicas-ack here): what the killed master had
    # acknowledged and not yet passed on is lost with it, one stretch of at most about a second
    # of output; everything written after the failover is there.
    missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
    if missing:
        assert missing == list(range(missing[0], missing[-1] + 1)), missing
    assert len(missing) <= 300, f"{len(missing)} lines lost"


def test_a_url_naming_several_nodes_reaches_the_cluster_when_the_first_is_down(redis_cluster: Any,
                                                                              start_sidecar: Any,
                                                                              tmp_path: Path) -> None:
    """redis://NODE,NODE/0 names seed nodes: the first one is down from the start, and the
    output, the heartbeat, the control channel and tail all find the cluster through the next."""
    from tests.redis_harness import find_free_port

    url = f"redis://127.0.0.1:{find_free_port('127.0.0.1')},127.0.0.1:{redis_cluster.seed.port}/0"
    n = 2000
    proc = start_sidecar([*_args(url, "seeds", tmp_path, "--heartbeat-interval", "0.3", "--agent-id", "agent-seeds"),
                          "--", "sh", "-c", f"{' '.join(_counter(n, 2000))} && exec sleep 60"])
    client = redis_cluster.client()
    key = "run:seeds:output:0"
    wait_until(lambda: len(_seqs(client, key)) == n and client.exists("agent:agent-seeds:alive") == 1, timeout=30)

    def cancelled() -> bool:  # the control subscription tries the dead node first
        client.publish("run:seeds:control", '{"cmd": "cancel"}')
        return proc.poll() is not None

    wait_until(cancelled, timeout=30, interval=0.5)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 143, cp.stderr
    _assert_exactly_once(client, key, n)
    assert [m["status"] for m in runs.statuses(client, "seeds")][-1] == "cancelled"
    out = run_process([sys.executable, "-m", "sidecar", "tail", "seeds", "--redis-url", url, "--raw"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == counter_bytes(1, n)
    for mode in ("standalone", "sentinel"):
        bad = run_process([sys.executable, "-m", "sidecar", "--redis-url", url, "--redis-mode", mode, "--", "true"],
                          timeout=30)
        assert bad.returncode == 2 and b"several hosts" in bad.stderr, bad.stderr


def test_a_standalone_server_among_the_seeds_does_not_take_the_control_channel(redis_cluster: Any,
                                                                               redis_server: Any,
                                                                               start_sidecar: Any,
                                                                               tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis_server.port},127.0.0.1:{redis_cluster.seed.port}/0"
    proc = start_sidecar([*_args(url, "sa", tmp_path), "--", "sleep", "60"])
    client = redis_cluster.client()
    stray = redis_server.client()

    def cancelled() -> bool:
        assert stray.pubsub_channels() == []  # never subscribed outside the cluster
        client.publish("run:sa:control", '{"cmd": "cancel"}')
        return proc.poll() is not None

    wait_until(cancelled, timeout=30, interval=0.5)
    cp = proc.finish(timeout=60)
    assert cp.returncode == 143, cp.stderr
    assert b"is not a node of the cluster" in cp.stderr
    assert [m["status"] for m in runs.statuses(client, "sa")][-1] == "cancelled"


def test_tail_follow_reads_on_after_the_failover_of_its_default_node(redis_cluster: Any, start_sidecar: Any,
                                                                      tmp_path: Path) -> None:
    """The master killed is the one a redis-py cluster client asks which keys a command names
    (its default node, the first master of the slot map) and also serves the run's output: both
    ways of following (one XREAD for a single key, one XREAD per key on different slots) print
    what is written after the failover."""
    from sidecar.topology import key_slot
    from tests.helpers import start_process

    seed = redis_cluster.seed
    assert redis_cluster.masters()[0] is seed  # the master of slot 0: a new client's default node
    run = next(r for r in (f"fo-{i}" for i in range(1000)) if redis_cluster.node_for_key(f"run:{r}:output:0") is seed)
    assert len({key_slot(f"run:{run}:{k}") for k in ("output:0", "logs:0", "status")}) == 3
    n = 3000
    proc = start_sidecar([*_args(redis_cluster.url, run, tmp_path), "--", *_counter(n, 300)])
    tails = {mode: start_process([sys.executable, "-m", "sidecar", "tail", run, "--follow", "--raw", "--redis-url",
                                  redis_cluster.url, *extra], output_dir=tmp_path / "tail")
             for mode, extra in (("split", []), ("one key", ["--stream", "stdout"]))}

    def lines(mode: str) -> int:
        return tails[mode].read_stdout().count(b"\n")

    for mode in tails:
        wait_until(lambda m=mode: lines(m) >= 300, timeout=20, message="output before the failover")
    seed.kill()
    redis_cluster.wait_for_failover(f"run:{run}:output:0", seed)
    at_failover = {mode: lines(mode) for mode in tails}
    cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    for mode, tail in tails.items():
        wait_until(lambda m=mode: lines(m) >= n, timeout=30,
                   message=lambda m=mode: f"{m}: {lines(m)} of {n} lines, {at_failover[m]} at the failover")
        assert tail.read_stdout() == counter_bytes(1, n), mode
        assert tail.poll() is None, tail.describe_output()  # still following


def test_tail_follow_reads_on_when_the_master_of_the_output_hangs(redis_cluster: Any, start_sidecar: Any,
                                                                   tmp_path: Path) -> None:
    """The master serving the output stops answering without closing its connections (SIGSTOP:
    a partition, a frozen node). Its replica takes over; tail --follow, blocked in a read on the
    hung master, gives up after --socket-timeout and prints everything written after the
    failover."""
    from tests.helpers import start_process

    run = "hang-1"
    key = f"run:{run}:output:0"
    master = redis_cluster.node_for_key(key)
    n = 3000
    proc = start_sidecar([*_args(redis_cluster.url, run, tmp_path), "--", *_counter(n, 300)])
    tail = start_process([sys.executable, "-m", "sidecar", "tail", run, "--follow", "--raw", "--stream", "stdout",
                          "--socket-timeout", "1", "--redis-url", redis_cluster.url], output_dir=tmp_path / "tail")

    def lines() -> int:
        return tail.read_stdout().count(b"\n")

    wait_until(lambda: lines() >= 300, timeout=20, message="output before the master hung")
    master.stop()
    try:
        at_hang = lines()
        wait_until(lambda: redis_cluster.node_for_key(key) is not master, timeout=30,
                   message="a replica taking over the output's slot")
        cp = proc.finish(timeout=120)
        assert cp.returncode == 0, cp.stderr
        wait_until(lambda: lines() >= n, timeout=30, message=lambda: f"{lines()} of {n} lines, {at_hang} at the hang")
        assert tail.read_stdout() == counter_bytes(1, n)
        assert tail.poll() is None, tail.describe_output()  # still following
    finally:
        master.cont()


def test_tail_follow_reads_on_after_the_whole_cluster_restarts(redis_cluster: Any, start_sidecar: Any,
                                                                tmp_path: Path) -> None:
    """Every node of the cluster down at once, then back (their AOF reloaded): tail --follow
    waits, as it does for a standalone server, and prints what the sidecar delivers after."""
    from tests.helpers import start_process

    run = "all-down-1"
    n = 3000
    proc = start_sidecar([*_args(redis_cluster.url, run, tmp_path), "--", *_counter(n, 300)])
    tail = start_process([sys.executable, "-m", "sidecar", "tail", run, "--follow", "--raw", "--stream", "stdout",
                          "--socket-timeout", "1", "--redis-url", redis_cluster.url], output_dir=tmp_path / "tail")

    def lines() -> int:
        return tail.read_stdout().count(b"\n")

    wait_until(lambda: lines() >= 300, timeout=20, message="output before the outage")
    for node in redis_cluster.nodes:
        node.kill()
    time.sleep(2)
    assert tail.poll() is None, tail.describe_output()  # waiting, not failed
    for node in redis_cluster.nodes:
        node.restart()
    redis_cluster.wait_state_ok()
    cp = proc.finish(timeout=120)
    assert cp.returncode == 0, cp.stderr
    wait_until(lambda: lines() >= n, timeout=30, message=lambda: f"{lines()} of {n} lines")
    assert tail.read_stdout() == counter_bytes(1, n)
    assert tail.poll() is None, tail.describe_output()


def test_the_control_subscription_follows_a_manual_sentinel_failover(redis_sentinel: Any, start_sidecar: Any,
                                                                     tmp_path: Path) -> None:
    """The old master keeps its subscribers until the sentinels demote it, seconds after a
    SENTINEL FAILOVER: meanwhile a command PUBLISHed on the new master would reach no one. The
    control subscription moves to the new master with the data path, within about a second."""
    proc = start_sidecar([*_args(redis_sentinel.url, "cfo", tmp_path), "--", *_counter(100_000, 2000)])
    channel = "run:cfo:control"
    wait_until(lambda: redis_sentinel.master.client().pubsub_numsub(channel)[0][1] == 1, timeout=15)
    old_addr = redis_sentinel.current_master_addr()
    sentinel = redis_sentinel.sentinel_servers[0].client()
    sentinel.execute_command("SENTINEL", "FAILOVER", redis_sentinel.master_name)
    redis_sentinel.wait_for_failover(old_addr)
    new = redis_sentinel.current_master().client()
    # well before the sentinels demote the old master (about 8-10 s)
    wait_until(lambda: new.pubsub_numsub(channel)[0][1] == 1, timeout=4)
    assert new.publish(channel, b'{"cmd": "cancel"}') == 1
    cp = proc.finish(timeout=60)
    assert cp.returncode == 143, cp.stderr
    assert b"moving the control subscription" in cp.stderr
    assert b"control channel unavailable" not in cp.stderr
