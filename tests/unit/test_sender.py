"""Sender.deliver_here: a lone line delivered by the calling thread, and when it must decline."""

from __future__ import annotations

import threading
from typing import Any

from sidecar.config import build
from sidecar.items import Item
from sidecar.outbox import Outbox
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
