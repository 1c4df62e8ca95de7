"""Cluster routing: the slot map."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest


def test_a_cluster_slot_map_with_a_hole_is_read_again() -> None:
    """A slot not served when the map was read is looked up afresh on the next write."""
    import pytest

    from sidecar.resp import Endpoint, ReplyError
    from sidecar.topology import ClusterTarget, key_slot

    key = "run:cd1:output:0"
    hole = key_slot(key)
    maps = [[[0, hole - 1, [b"127.0.0.1", 7000]], [hole + 1, 16383, [b"127.0.0.1", 7000]]],
            [[0, 16383, [b"127.0.0.1", 7000]]]]

    class FakeConn:
        def __init__(self, _ep: Endpoint) -> None:
            pass

        def connect(self) -> None:
            pass

        def call(self, *args: Any) -> Any:
            return maps[0] if len(maps) == 1 else maps.pop(0)

        def pipeline(self, cmds: list[tuple[Any, ...]], timeout: float | None = None) -> list[Any]:
            return [b"OK" for _ in cmds]

        def close(self) -> None:
            pass

    target = ClusterTarget(Endpoint("127.0.0.1", 7000), FakeConn, lambda _c: None)  # type: ignore[arg-type]
    with pytest.raises(ReplyError, match="CLUSTERDOWN"):
        target.execute([("SET", key, "v")])
    assert target.execute([("SET", key, "v")]) == [b"OK"]  # the slot is served by now


# -- interrupting a connection that is being set up ------------------------------------------


class MuteServer:
    """Accepts TCP connections and reads what comes, never answering: a Redis that hangs
    (after answering the first ``answers`` reads of each connection with +OK)."""

    def __init__(self, answers: int = 0) -> None:
        import socket
        import threading

        self.answers = answers
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = threading.Event()
        self.conns: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: Any) -> None:
        answered = 0
        try:
            while conn.recv(4096):
                if answered < self.answers:
                    answered += 1
                    conn.sendall(b"+OK\r\n")
                    continue
                self.received.set()
        except OSError:
            pass
        finally:
            conn.close()  # also one accepted while close() ran: no socket is left to the collector

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _blocked_then_interrupted(make_target: Any, call: Any, servers: int = 1) -> tuple[BaseException | None, float]:
    """Start ``call(target)`` in a thread, wait until it has sent to a mute server, interrupt
    the target, and return (what the call raised, seconds it took to end after the interrupt).
    With ``servers`` > 1, make_target gets that many ports."""
    import threading
    import time

    mutes = [MuteServer() for _ in range(servers)]
    try:
        target = make_target(*[m.port for m in mutes])
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call(target)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not any(m.received.is_set() for m in mutes):
            assert time.monotonic() < deadline, "the client never sent anything"
            time.sleep(0.01)
        time.sleep(0.1)
        assert thread.is_alive()  # blocked on the mute server (socket timeout 30 s)
        t0 = time.monotonic()
        target.interrupt()
        thread.join(10)
        took = time.monotonic() - t0
        assert not thread.is_alive()
        return outcome[0], took
    finally:
        for m in mutes:
            m.close()


def _factory(name: str) -> Any:
    from functools import partial

    from sidecar.resp import Connection

    return partial(Connection, socket_timeout=30.0, connect_timeout=30.0, client_name=name)


def test_interrupt_reaches_a_connection_still_being_set_up() -> None:
    """CLIENT SETNAME (sent while connecting) gets no answer: interrupt() ends the wait at once,
    instead of the socket timeout."""
    from sidecar.resp import Endpoint
    from sidecar.topology import Target

    exc, took = _blocked_then_interrupted(
        lambda port: Target(Endpoint("127.0.0.1", port), _factory("t"), lambda _c: None),
        lambda t: t.execute([("PING",)]),
    )
    assert isinstance(exc, OSError)
    assert took < 2.0


def test_interrupt_reaches_a_cluster_node_being_set_up() -> None:
    from sidecar.resp import Endpoint
    from sidecar.topology import ClusterTarget

    exc, took = _blocked_then_interrupted(
        lambda port: ClusterTarget(Endpoint("127.0.0.1", port), _factory("c"), lambda _c: None),
        lambda t: t.execute([("SET", "k", "v")]),
    )
    assert exc is not None  # the slot map could not be read
    assert took < 2.0


def test_interrupt_reaches_a_sentinel_probe() -> None:
    from sidecar.topology import SentinelSpec, SentinelTarget

    def make(port: int) -> SentinelTarget:
        spec = SentinelSpec(sentinels=(("127.0.0.1", port),), master_name="m", db=0, username=None, password=None)
        return SentinelTarget(spec, _factory("s"), lambda _c: None)

    exc, took = _blocked_then_interrupted(make, lambda t: t.execute([("PING",)]))
    assert isinstance(exc, ConnectionError)  # no sentinel named a master
    assert took < 2.0


def test_a_connection_interrupted_before_its_socket_exists_does_not_connect() -> None:
    import pytest

    from sidecar.resp import Connection, Endpoint

    server = MuteServer()
    try:
        conn = Connection(Endpoint("127.0.0.1", server.port), socket_timeout=30.0, client_name="x")
        conn.interrupt()
        with pytest.raises(ConnectionAbortedError):
            conn.connect()
        assert not conn.connected
    finally:
        server.close()


def test_interrupt_also_stops_the_next_sentinel_and_cluster_seed() -> None:
    """After an interrupt the target opens nothing more: the second sentinel, or the second
    seed of a cluster, is not tried (each would hang for the socket timeout)."""
    from sidecar.resp import Endpoint
    from sidecar.topology import ClusterTarget, SentinelSpec, SentinelTarget

    def sentinels(p1: int, p2: int) -> SentinelTarget:
        spec = SentinelSpec(sentinels=(("127.0.0.1", p1), ("127.0.0.1", p2)), master_name="m", db=0,
                            username=None, password=None)
        return SentinelTarget(spec, _factory("s"), lambda _c: None)

    def cluster(p1: int, p2: int) -> ClusterTarget:
        t = ClusterTarget(Endpoint("127.0.0.1", p1), _factory("c"), lambda _c: None)
        t.seeds.append(("127.0.0.1", p2))
        return t

    for make, call in ((sentinels, lambda t: t.execute([("PING",)])),
                       (cluster, lambda t: t.execute([("SET", "k", "v")]))):
        exc, took = _blocked_then_interrupted(make, call, servers=2)
        assert exc is not None
        assert took < 2.0


def test_an_interrupted_target_opens_no_connection() -> None:
    import pytest

    from sidecar.resp import Endpoint
    from sidecar.topology import Target

    server = MuteServer()
    try:
        target = Target(Endpoint("127.0.0.1", server.port), _factory("t"), lambda _c: None)
        target.interrupt()
        with pytest.raises(ConnectionAbortedError):
            target.execute([("PING",)])
        assert not server.received.is_set() and server.conns == []
    finally:
        server.close()


def test_interrupt_reaches_a_connection_between_set_up_and_use() -> None:
    """The connection is stored where interrupt() finds it before it leaves the list of those
    being set up: an interrupt in between (here: inside that list's remove) still wakes it."""
    import threading
    import time

    from sidecar.resp import Endpoint
    from sidecar.topology import Target

    server = MuteServer(answers=1)  # CLIENT SETNAME is answered, then nothing
    try:
        target = Target(Endpoint("127.0.0.1", server.port), _factory("t"), lambda _c: None)

        class Hooked(list):  # type: ignore[type-arg]
            def remove(self, item: Any) -> None:
                super().remove(item)
                threading.Thread(target=target.interrupt).start()
                time.sleep(0.2)  # the interrupt lands before the caller goes on

        target._connecting = Hooked()
        t0 = time.monotonic()
        try:
            target.execute([("PING",)])
        except OSError:
            pass
        assert time.monotonic() - t0 < 5.0  # not the 30 s socket timeout
    finally:
        server.close()


def _sentinel_target(master: Callable[[], list[bytes]], used: list[int]) -> Any:
    """A SentinelTarget over fake connections: sentinels answer ``master()``, data nodes say
    they are masters and record their port in ``used`` for each pipeline."""
    from sidecar.resp import Endpoint
    from sidecar.topology import SentinelSpec, SentinelTarget

    class FakeConn:
        connected = True

        def __init__(self, ep: Endpoint) -> None:
            self.ep = ep

        def connect(self) -> None:
            pass

        def call(self, *args: Any) -> Any:
            return master() if args[0] == "SENTINEL" else [b"master"]

        def pipeline(self, cmds: list[tuple[Any, ...]], timeout: float | None = None) -> list[Any]:
            used.append(self.ep.port)
            return [b"OK" for _ in cmds]

        def close(self) -> None:
            pass

        def interrupt(self) -> None:
            pass

    spec = SentinelSpec(sentinels=(("127.0.0.1", 26379),), master_name="m", db=0, username=None, password=None)
    return SentinelTarget(spec, FakeConn, lambda _c: None)  # type: ignore[arg-type]


@pytest.fixture
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar import topology

    monkeypatch.setattr(topology, "MASTER_CHECK_S", 0.05)


def test_slow_sentinels_hold_up_the_watcher_not_the_writes(quick_checks: None) -> None:
    """The master is asked about every second by a watcher thread: a sentinel that takes
    seconds to answer delays no write (before, each write waited for the lookup)."""
    slow = threading.Event()
    lookups: list[float] = []

    def master() -> list[bytes]:
        lookups.append(time.monotonic())
        if slow.is_set():
            time.sleep(1.5)
        return [b"127.0.0.1", b"6390"]

    target = _sentinel_target(master, [])
    try:
        assert target.execute([("PING",)]) == [b"OK"]
        slow.set()
        t0 = time.monotonic()
        for _ in range(20):
            assert target.execute([("PING",)]) == [b"OK"]
            time.sleep(0.01)
        assert time.monotonic() - t0 < 1.0
        assert target.ready()
        assert len(lookups) >= 2  # the watcher asked meanwhile
    finally:
        target.interrupt()


def test_the_watcher_moves_writes_to_the_master_the_sentinels_name(quick_checks: None) -> None:
    named = [b"127.0.0.1", b"6390"]
    used: list[int] = []
    target = _sentinel_target(lambda: list(named), used)
    try:
        target.execute([("SET", "k", "v")])
        named[1] = b"6391"  # a failover
        deadline = time.monotonic() + 5
        while target.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not target.ready()
        target.execute([("SET", "k", "v")])
        assert used[0] == 6390 and used[-1] == 6391
    finally:
        target.interrupt()


@pytest.mark.parametrize("answer", [[b"127.0.0.1", b"x"], [b"127.0.0.1"], [42, b"6379"], [b"h", b"99999"], b"junk"])
def test_a_sentinel_answering_no_address_is_reported_not_raised(answer: Any) -> None:
    target = _sentinel_target(lambda: answer, [])
    try:
        with pytest.raises(ConnectionError, match="not a master's address"):
            target.execute([("PING",)])
    finally:
        target.interrupt()
