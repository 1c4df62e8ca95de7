"""Sender.deliver_here: a lone line delivered by the calling thread, and when it must decline."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar import _native
from sidecar.config import build
from sidecar.items import Item
from sidecar.outbox import Outbox
from sidecar.resp import Connection, Endpoint, ReplyError, pack_many
from sidecar.topology import Target
from sidecar.transport import DIRECT_TIMEOUT_S, Sender


class FakeTarget:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[int, float | None, int]] = []  # (commands, timeout, thread id)

    def ready(self) -> bool:
        return True

    def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[int]:
        self.calls.append((len(cmds), timeout, threading.get_ident()))
        if self.fail:
            raise ConnectionResetError("connection closed by Redis")
        return [1] * len(cmds)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        pass


def sender_with(target: FakeTarget, **settings: Any) -> Sender:
    s = build({"run_id": "dh"}, {}, ("x",)).replace(**settings)
    outbox = Outbox(1 << 20, None, "block", lambda k, a, b: Item(k, "p", a, b, b""))
    sender = Sender(s, outbox, None)
    sender._target = target  # type: ignore[assignment]
    return sender


def lone_line(seq: int) -> Item:
    return Item("run:dh:output:0", "p", seq, seq, b'{"type":"batch"}', 1, 6)


def test_delivers_from_the_calling_thread_within_the_short_timeout() -> None:
    target = FakeTarget()
    sender = sender_with(target)
    sender.outbox.put(lone_line(1), wake=False)
    assert sender.deliver_here() is True
    assert target.calls == [(2, DIRECT_TIMEOUT_S, threading.get_ident())]  # PING and the append
    assert sender.outbox.empty()
    assert sender.stats.records_shipped == 1


def test_declines_while_the_sender_thread_is_sending() -> None:
    target = FakeTarget()
    sender = sender_with(target)
    sender.outbox.put(lone_line(1), wake=False)
    with sender._turn:
        assert sender.deliver_here() is False
    assert target.calls == []
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1]  # still there for the sender thread


def test_declines_when_replicas_must_acknowledge() -> None:
    """--min-replicas-ack adds a WAIT of up to a second: never on the reader's time."""
    target = FakeTarget()
    sender = sender_with(target, min_replicas_ack=1)
    sender.outbox.put(lone_line(1), wake=False)
    assert sender.deliver_here() is False
    assert target.calls == []
    assert len(sender.outbox) == 1


def test_a_failure_leaves_the_items_and_the_next_lines_to_the_sender_thread() -> None:
    target = FakeTarget(fail=True)
    sender = sender_with(target)
    sender.outbox.put(lone_line(1), wake=False)
    assert sender.deliver_here() is False
    assert len(target.calls) == 1
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1]  # not acknowledged, not in flight
    sender.outbox.release_inflight()
    target.fail = False
    sender.outbox.put(lone_line(2), wake=False)
    assert sender.deliver_here() is False  # paused after the failure
    assert len(target.calls) == 1
    assert len(sender.outbox) == 2


def test_replies_are_matched_to_items_behind_the_leading_ping() -> None:
    """A pipeline to one server starts with a PING (the sidecar's own reply is then queued
    before the consumers' messages); its reply is not taken for an item's."""
    from sidecar.resp import ReplyError

    sent: list[list[tuple[Any, ...]]] = []

    class Target(FakeTarget):
        def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[Any]:
            sent.append(cmds)
            return [b"PONG", 1, ReplyError("SEQGAP the batch before this one was not written")]

    sender = sender_with(Target())
    try:
        sender._send([lone_line(1), lone_line(2)])
    except ReplyError as exc:
        assert exc.code == "SEQGAP"
    else:
        raise AssertionError("the error reply of the second item was not raised")
    assert sent[0][0] == ("PING",)
    assert [c[0] for c in sent[0][1:]] == ["EVALSHA", "EVALSHA"]


def test_an_unexpected_error_after_sending_leaves_the_items_to_the_sender_thread() -> None:
    """A bug in the bookkeeping of a direct delivery neither escapes into the pipe reader nor
    strands the items in flight: they are handed out again."""
    target = FakeTarget()
    sender = sender_with(target)

    def broken(_items: list[Item]) -> None:
        raise RuntimeError("bug")

    sender._delivered = broken  # type: ignore[method-assign]
    sender.outbox.put(lone_line(1), wake=False)
    assert sender.deliver_here() is False
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1]
    assert not sender._turn.locked()


def test_an_error_names_the_cluster_node_that_failed_and_no_password() -> None:
    from sidecar.transport import describe_error

    exc = ConnectionRefusedError(111, "Connection refused")
    assert describe_error(exc, "redis://u:pw@seed:7000/0") == \
        "ConnectionRefusedError: [Errno 111] Connection refused (redis://u:***@seed:7000/0)"
    exc.redis_node = "10.0.0.7:7002"  # type: ignore[attr-defined]  # as ClusterTarget.execute sets it
    assert describe_error(exc, "redis://u:pw@seed:7000/0") == \
        "ConnectionRefusedError: [Errno 111] Connection refused (node 10.0.0.7:7002 of the cluster at redis://u:***@seed:7000/0)"


def test_a_replayed_status_names_its_variation_hash_as_its_own_key_was_named() -> None:
    from sidecar.transport import status_key_tagged

    plain = build({"run_id": "r"}, {}, ("x",))
    tagged = build({"run_id": "r", "cluster_hash_tag": "1"}, {}, ("x",))
    msg = {"run_id": "7", "variation_id": "0", "agent_id": "worker-7"}
    for s in (plain, tagged):
        assert status_key_tagged(s, "run:{7}:status", msg) is True
        assert status_key_tagged(s, "run:7:status", msg) is False
    # a template without the run id cannot tell: the setting decides
    custom = plain.replace(status_channel="agent:{agent_id}:status")
    assert status_key_tagged(custom, "agent:worker-7:status", msg) is False
    assert status_key_tagged(custom.replace(cluster_hash_tag=True), "agent:worker-7:status", msg) is True


# -- send_lone: the same, for a batch the reader has not queued yet (here the connection's own
#    round trip, as with TLS; the native one is tested below) --------------------------------

class FakeConn:
    plain_fd = -1  # no socket for the native module: the connection's own round trip
    connected = True

    def __init__(self, replies: list[Any] | None = None, fail: bool = False) -> None:
        self.replies = [b"PONG", 1] if replies is None else replies
        self.fail = fail
        self.calls: list[tuple[bytes, int, float | None, int]] = []

    def exchange(self, packed: bytes, count: int, timeout: float | None = None) -> list[Any]:
        self.calls.append((packed, count, timeout, threading.get_ident()))
        if self.fail:
            raise ConnectionResetError("connection closed by Redis")
        return self.replies


def lone_sender(conn: FakeConn, **settings: Any) -> Sender:
    target = FakeTarget()
    target.conn = conn  # type: ignore[attr-defined]
    return sender_with(target, **settings)


def send(sender: Sender, item: Item) -> None:
    sender.send_lone(item.key, item.producer, item.first, item.records, item.raw_bytes, item.payload)


def test_send_lone_sends_the_append_from_the_calling_thread() -> None:
    from sidecar.resp import pack_py
    from sidecar.transport import APPEND_SHA

    conn = FakeConn()
    sender = lone_sender(conn)
    item = lone_line(7)
    send(sender, item)
    s = sender.settings
    expected = pack_py(("PING",)) + pack_py(("EVALSHA", APPEND_SHA, 2, item.key, item.key + ":idem", "p", 7, 7,
                                             item.payload, s.max_stream_len, 1, s.ttl_s, 0, 0))
    assert conn.calls == [(expected, 2, DIRECT_TIMEOUT_S, threading.get_ident())]
    assert sender.outbox.empty() and sender.outbox.waiting_records == 0 and sender.outbox.mem_bytes == 0
    assert (sender.stats.records_shipped, sender.stats.bytes_shipped, sender.stats.items_shipped) == (1, 6, 1)


def test_send_lone_sends_what_the_usual_path_sends() -> None:
    """The append of send_lone is the command _send builds for the same item, behind the
    same PING, for each publishing mode."""
    from sidecar.resp import pack_many

    sent: list[list[tuple[Any, ...]]] = []

    class Recording(FakeTarget):
        def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[int]:
            sent.append(cmds)
            return [b"PONG"] + [1] * (len(cmds) - 1)

    for settings in ({}, {"pubsub": "sharded"}, {"transport": "stream"}):
        conn = FakeConn()
        sender = lone_sender(conn, **settings)
        usual = sender_with(Recording(), **settings)
        send(sender, lone_line(3))
        usual._send([lone_line(3)])
        assert conn.calls[0][0] == pack_many(sent.pop()), settings


def test_send_lone_queues_the_item_while_the_sender_thread_is_sending() -> None:
    conn = FakeConn()
    sender = lone_sender(conn)
    with sender._turn:
        send(sender, lone_line(1))
    assert conn.calls == []
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1]


def test_send_lone_queues_the_item_for_replicas_or_with_redis_down() -> None:
    conn = FakeConn()
    replicas = lone_sender(conn, min_replicas_ack=1)
    down = lone_sender(conn)
    down.stats.down_since = 1.0
    for sender in (replicas, down):
        send(sender, lone_line(1))
        assert len(sender.outbox) == 1
        assert sender._target.calls == []  # type: ignore[union-attr]
    assert conn.calls == []


def test_send_lone_without_a_stream_publishes_from_the_calling_thread() -> None:
    """Pub/sub only: no append for the short path to write; deliver_here's PUBLISH, from the
    calling thread all the same."""
    conn = FakeConn()
    sender = lone_sender(conn, transport="pubsub")
    sent: list[list[tuple[Any, ...]]] = []
    target = sender._target
    execute = target.execute  # type: ignore[union-attr]

    def recording(cmds: list[tuple[Any, ...]], acks: int, timeout: float | None = None) -> list[int]:
        sent.append(cmds)
        return execute(cmds, acks, timeout)

    target.execute = recording  # type: ignore[union-attr]
    send(sender, lone_line(1))
    assert sender.outbox.empty() and sender.stats.records_shipped == 1
    assert [c[0] for c in sent[0]] == ["PING", "PUBLISH"]
    assert target.calls[0][1:] == (DIRECT_TIMEOUT_S, threading.get_ident())  # type: ignore[union-attr]
    assert conn.calls == []


def test_send_lone_behind_queued_items_goes_after_them() -> None:
    """Not the short path: the batch is queued behind them, and deliver_here delivers all in
    order, from the calling thread."""
    conn = FakeConn()
    sender = lone_sender(conn)
    sender.outbox.put(lone_line(1), wake=False)
    send(sender, lone_line(2))
    assert conn.calls == []
    assert sender._target.calls == [(3, DIRECT_TIMEOUT_S, threading.get_ident())]  # type: ignore[union-attr]
    assert sender.outbox.empty() and sender.stats.records_shipped == 2


@pytest.mark.parametrize("conn", [FakeConn(fail=True), FakeConn([b"PONG", ReplyError("NOSCRIPT No matching script")]),
                                  FakeConn([ReplyError("NOAUTH Authentication required."), 1])],
                         ids=["connection lost", "error reply", "error reply to the PING"])
def test_a_failed_lone_delivery_leaves_the_item_and_the_next_lines_to_the_sender_thread(conn: FakeConn) -> None:
    sender = lone_sender(conn)
    send(sender, lone_line(1))
    assert len(conn.calls) == 1
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1]  # queued, not in flight
    sender.outbox.release_inflight()
    assert sender.stats.records_shipped == 0
    conn.fail, conn.replies = False, [b"PONG", 1]
    send(sender, lone_line(2))  # paused after the failure
    assert len(conn.calls) == 1
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1, 2]
    assert not sender._turn.locked()
    assert sender._target.calls == []  # type: ignore[union-attr]  # nor deliver_here, paused


# -- send_lone: the append written and its replies read by the native module -----------------

needs_native = pytest.mark.skipif(_native.speedups is None, reason="the native module is not built")


class Peer:
    """A socket pair: the sender's connection on one end, the test as Redis on the other."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.theirs.settimeout(5)
        self.conn = Connection(Endpoint())
        self.conn._sock = self.ours
        self.conn.plain_fd = self.ours.fileno()
        self.ours.settimeout(5.0)  # as Connection.connect leaves it

    def expect(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            got += self.theirs.recv(1 << 16)
        return got

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def plain_sender(peer: Peer, **settings: Any) -> Sender:
    s = build({"run_id": "dh"}, {}, ("x",)).replace(**settings)
    sender = Sender(s, Outbox(1 << 20, None, "block", lambda k, a, b: Item(k, "p", a, b, b"")), None)
    target = Target(Endpoint(), lambda ep: Connection(ep), lambda conn: None)
    target.conn = peer.conn
    sender._target = target
    return sender


def answer_in_thread(peer: Peer, expected_len: int, reply: bytes) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def run() -> None:
        got.append(peer.expect(expected_len))
        if reply:
            peer.theirs.sendall(reply)
        else:
            peer.theirs.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=run)
    t.start()
    return t, got


def usual_bytes(item: Item, **settings: Any) -> bytes:
    """What _send writes for ``item`` alone."""
    sent: list[list[tuple[Any, ...]]] = []

    class Recording(FakeTarget):
        def execute(self, cmds: list[tuple[Any, ...]], _acks: int, timeout: float | None = None) -> list[int]:
            sent.append(cmds)
            return [b"PONG"] + [1] * (len(cmds) - 1)

    sender_with(Recording(), **settings)._send([item])
    return pack_many(sent[0])


@needs_native
@pytest.mark.parametrize("settings", [{}, {"pubsub": "sharded"}, {"transport": "stream"}])
def test_send_lone_writes_what_the_usual_path_writes_and_counts_the_delivery(peer: Peer, settings: Any) -> None:
    sender = plain_sender(peer, **settings)
    item = Item("run:dh:output:0", "p", 41, 43, b'{"type":"batch","lines":["a","b","c"]}', 3, 6)
    expected = usual_bytes(item, **settings)
    t, got = answer_in_thread(peer, len(expected), b"+PONG\r\n:1\r\n")
    sender.send_lone(item.key, "p", 41, 3, 6, item.payload)
    t.join(5)
    assert got == [expected]
    assert (sender.stats.records_shipped, sender.stats.bytes_shipped, sender.stats.items_shipped) == (3, 6, 1)
    assert sender.outbox.empty() and not sender._turn.locked()


@needs_native
def test_send_lone_reads_on_past_an_unusual_reply(peer: Peer) -> None:
    """Replies the native module does not check itself (a bulk string here) are read to the
    end by the connection's parser: not an error, so delivered."""
    sender = plain_sender(peer)
    item = lone_line(1)
    t, _got = answer_in_thread(peer, len(usual_bytes(item)), b"+PONG\r\n$2\r\nok\r\n")
    sender.send_lone(item.key, "p", 1, 1, 6, item.payload)
    t.join(5)
    assert sender.stats.records_shipped == 1 and sender.outbox.empty()


@needs_native
@pytest.mark.parametrize("reply", [b"+PONG\r\n-NOSCRIPT No matching script. Please use EVAL.\r\n",
                                   b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n",
                                   b"+PONG\r\n$2\r\nok\r\n:7\r\n", b""],
                         ids=["error reply", "error reply to the PING", "a reply too many", "connection closed"])
def test_a_failed_send_lone_leaves_the_item_and_the_next_lines_to_the_sender_thread(peer: Peer, reply: bytes) -> None:
    sender = plain_sender(peer)
    item = lone_line(1)
    t, _got = answer_in_thread(peer, len(usual_bytes(item)), reply)
    sender.send_lone(item.key, "p", 1, 1, 6, item.payload)
    t.join(5)
    assert [(it.first, it.payload) for it in sender.outbox.take(10, 1 << 20)] == [(1, item.payload)]
    sender.outbox.release_inflight()
    assert sender.stats.records_shipped == 0
    # a lost connection, or one out of step with its replies, is closed
    assert (peer.conn.plain_fd == -1) is (reply == b"" or reply.endswith(b":7\r\n"))
    sender.send_lone(item.key, "p", 2, 1, 6, b"next")  # paused: queued, not sent
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == [1, 2]
    assert not sender._turn.locked()


@pytest.mark.parametrize("reply", [b"+PONG\r\n:1\r\n", b"+PONG\r\n-NOSCRIPT No matching script.\r\n"])
def test_send_lone_over_tls_sends_the_same_bytes_through_the_connection(peer: Peer, reply: bytes) -> None:
    """Without a descriptor the native module may write to (TLS), the connection's own round
    trip sends what lone_exchange would; an error reply leaves the item to the sender thread."""
    sender = plain_sender(peer)
    peer.conn.plain_fd = -1  # as with TLS
    item = Item("run:dh:output:0", "p", 5, 6, b'{"lines":["a","b"]}', 2, 4)
    expected = usual_bytes(item)
    t, got = answer_in_thread(peer, len(expected), reply)
    sender.send_lone(item.key, "p", 5, 2, 4, item.payload)
    t.join(5)
    assert got == [expected]
    delivered = reply.endswith(b":1\r\n")
    assert sender.stats.records_shipped == (2 if delivered else 0)
    assert [it.first for it in sender.outbox.take(10, 1 << 20)] == ([] if delivered else [5])


def test_send_lone_queues_the_item_without_an_open_connection(peer: Peer) -> None:
    """The first line of a run: no connection yet, deliver_here declines too; the sender
    thread (woken) opens one and delivers the item, equal to the one the batch stands for."""
    sender = plain_sender(peer)
    peer.conn.close()
    sender.send_lone("run:dh:output:0", "p", 5, 2, 9, b"payload")
    assert sender.outbox.take(10, 1 << 20) == [Item("run:dh:output:0", "p", 5, 6, b"payload", 2, 9)]


def test_the_sender_thread_survives_a_bug_and_cleans_up_under_its_turn() -> None:
    """The items of a delivery that hit a bug are handed out again and delivered; the
    cleanup holds _turn, so that the pipe reader is not delivering on the connection it drops."""
    import time

    target = FakeTarget()
    sender = sender_with(target)
    locked_at_release: list[bool] = []
    release = sender.outbox.release_inflight

    def recording_release() -> None:
        locked_at_release.append(sender._turn.locked())
        release()

    sender.outbox.release_inflight = recording_release  # type: ignore[method-assign]
    deliver = sender._deliver
    calls: list[int] = []

    def buggy_once(items: list[Item]) -> bool:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("bug")
        return deliver(items)

    sender._deliver = buggy_once  # type: ignore[method-assign]
    sender.outbox.put(lone_line(1))
    sender.start()
    deadline = time.monotonic() + 10
    while sender.stats.records_shipped < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.abandon()
    assert sender.join(5)
    assert sender.stats.records_shipped == 1 and calls == [1, 1]
    assert locked_at_release == [True]
