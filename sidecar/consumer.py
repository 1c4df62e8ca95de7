"""The read side: decode payloads, read a run's streams from any offset, in order, with gaps visible.

Sequence numbers are per (channel, producer). A record whose sequence number is not above
the last one seen for its producer is a repeat (pub/sub after a retry) and is dropped; a
jump is reported as a ``Gap``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator
from datetime import datetime

import redis
from redis.exceptions import ClusterDownError, RedisClusterException

from agent_wrapper.values import Frozen

from . import protocol
from .config import DEFAULT_LOGS, DEFAULT_OUTPUT, DEFAULT_STATUS
from .protocol import ProtocolError, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Gap(Frozen):
    """Records ``first``..``last`` of ``producer`` on ``channel`` will never arrive."""

    channel: str
    stream: str
    producer: str
    first: int
    last: int
    reason: str  # "dropped" (a gap marker: --when-full drop, or no room in the spool at exit) or "missing"
    __slots__ = tuple(__annotations__)


class Status(Frozen):
    channel: str
    status: str
    seq: int
    producer: str
    msg: dict[str, Any]
    __slots__ = tuple(__annotations__)


Event = Record | Gap | Status


class Deduper:
    """Tracks the last sequence number per (channel, producer). ``from_start``: the messages
    are read from the start of their streams, so a producer's first records (seq 1 on) must
    be there; missing ones (trimmed by --max-stream-len, lost with a Redis that kept nothing)
    are reported as a gap. Otherwise the first message seen starts each sequence."""

    def __init__(self, *, from_start: bool = False) -> None:
        self.last: dict[tuple[str, str], int] = {}
        self.from_start = from_start

    def feed(self, msg: dict[str, Any]) -> Iterator[Event]:
        version = msg.get("v")
        if type(version) is not int or version != 1:
            return  # another version of the protocol (or none): not described by v1, skipped (PROTOCOL §14)
        kind = msg.get("type")
        channel = str(msg.get("channel", ""))
        producer = str(msg.get("producer", ""))
        key = (channel, producer)
        prev = self.last.get(key, 0)
        known = prev > 0 or self.from_start  # where this producer's sequence stands
        if kind == protocol.BATCH:
            records = list(protocol.iter_records(msg))  # checked whole before anything is yielded
            first = int(msg.get("seq", 0))
            if first > prev + 1 and known:
                yield Gap(channel, str(msg.get("stream", "")), producer, prev + 1, first - 1, "missing")
            for rec in records:
                if rec.seq > prev:
                    yield rec
            self.last[key] = max(prev, first + len(records) - 1)
        elif kind == protocol.GAP:
            first, last = int(msg["from"]), int(msg["to"])
            if first > prev + 1 and known:
                yield Gap(channel, str(msg.get("stream", "")), producer, prev + 1, first - 1, "missing")
            if last > prev:
                yield Gap(channel, str(msg.get("stream", "")), producer, max(first, prev + 1), last, "dropped")
                self.last[key] = last
        elif kind == protocol.STATUS:
            seq = int(msg.get("seq", 0))
            if seq > prev:
                self.last[key] = seq
                yield Status(channel, str(msg.get("status", "")), seq, producer, msg)


def channel_names(run_id: str, variation_id: str = "0", agent_id: str = "",
                  output: str = DEFAULT_OUTPUT, logs: str = DEFAULT_LOGS,
                  status: str = DEFAULT_STATUS) -> dict[str, str]:
    fmt = {"run_id": run_id, "variation_id": variation_id, "agent_id": agent_id}
    return {"stdout": output.format(**fmt), "stderr": logs.format(**fmt), "status": status.format(**fmt)}


class RunReader:
    """Reads the streams of one variation of a run, from stored entries onward."""

    def __init__(self, client: redis.Redis, keys: Iterable[str], *, start_id: str = "0-0", page: int = 500) -> None:
        """``start_id``: read the entries after this id; ``"0-0"`` (or ``"0"``, ``"-"``) from
        the start of each stream, ``"$"`` only what is added after this call. ``client``
        must return bytes (``decode_responses=False``, redis-py's default): payloads are binary."""
        encoder = getattr(client, "get_encoder", None)
        if encoder is not None and getattr(encoder(), "decode_responses", False):
            raise ValueError("RunReader needs a client made with decode_responses=False: the payloads are binary")
        self.client = client
        self.page = page
        keys = list(keys)
        if start_id in ("0", "-"):
            start_id = "0-0"
        if start_id == "$":  # XRANGE has no "$": each key's last id now (XREAD's "$" would skip a read's worth)
            self.ids = {k: self._last_id(k) for k in keys}
        else:
            self.ids = {k: start_id for k in keys}
        self.dedupe = Deduper(from_start=start_id == "0-0")
        self.errors = 0
        # While follow() cannot read: since when (time.monotonic()) and why; None when it can.
        self.failing_since: float | None = None
        self.failure: BaseException | None = None

    def _last_id(self, key: str) -> str:
        last = self.client.xrevrange(key, count=1)
        if not last:
            return "0-0"
        return _text(last[0][0])

    def _decode_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]], key: str) -> Iterator[Event]:
        for entry_id, fields in entries:
            self.ids[key] = _text(entry_id)
            payload = fields.get(b"d")
            if payload is None:
                self.errors += 1  # not an entry of this protocol: something else wrote to the key
                continue
            try:
                msg = protocol.decode(payload)
                yield from self.dedupe.feed(msg)
            except (ProtocolError, KeyError, TypeError, ValueError):
                self.errors += 1

    def _stored_key(self, key: str) -> Iterator[Event]:
        while True:
            start = self.ids[key]
            entries = self.client.xrange(key, min=f"({start}" if start != "0-0" else "-", max="+", count=self.page)
            if not entries:
                return
            yield from self._decode_entries(entries, key)
            if len(entries) < self.page:
                return

    def stored(self) -> Iterator[Event]:
        """Everything stored now: each key in its stream order, the keys interleaved by time
        (see ``merge_by_time``), paging through all of them together."""
        yield from merge_by_time([self._stored_key(k) for k in list(self.ids)])

    def _xread(self, streams: dict[str, str], block_ms: int) -> Any:
        """XREAD BLOCK of ``streams`` (on a cluster, all on one slot). A cluster client is
        given the node that serves the slot: ``RedisCluster.xread`` would first ask its
        default node which keys the command names (COMMAND GETKEYS), outside its retries and
        slot map refresh, so once that node died every read failed alike, failover or not.
        A read that fails on the node makes redis-py read the slot map again."""
        client: Any = self.client
        if not is_cluster(client):
            return client.xread(streams, count=self.page, block=block_ms)
        node = client.get_node_from_key(next(iter(streams)))
        return client.execute_command("XREAD", "COUNT", self.page, "BLOCK", block_ms, "STREAMS", *streams,
                                      *streams.values(), target_nodes=node)

    def follow(self, block_ms: int = 1000) -> Iterator[Event | None]:
        """New entries as they come (XREAD BLOCK); yields None on each idle timeout.

        On a cluster, keys on different slots cannot share one XREAD: each is read in turn
        with a short block (use --cluster-hash-tag to keep a run on one slot)."""
        from .topology import key_slot

        split = is_cluster(self.client) and len({key_slot(k) for k in self.ids}) > 1
        pause = 0.1
        while True:
            started = time.monotonic()
            try:
                if split:
                    resp = []
                    for key in list(self.ids):
                        part = self._xread({key: self.ids[key]}, max(1, block_ms // (4 * len(self.ids))))
                        resp.extend(part or [])
                else:
                    resp = self._xread(dict(self.ids), block_ms)
            except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException) as exc:
                # Redis restarting or failing over (on a cluster, no node reachable for a while
                # is RedisClusterException): go on from the last entry read, with backoff.
                if self.failing_since is None:
                    self.failing_since = started  # a hung server fails a read only at its timeout
                self.failure = exc
                yield None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            self.failing_since = None
            if not resp:
                yield None
                continue
            per_key: list[list[Event]] = []
            for key, entries in resp:
                per_key.append(list(self._decode_entries(entries, _text(key))))
            yield from merge_by_time(per_key)


def _text(name: bytes | str) -> str:
    """A key or entry id as redis-py returns it (bytes), as text."""
    return name.decode() if isinstance(name, bytes) else name


def event_time(ev: Event) -> float:
    """When an event happened: a record's capture time, a status message's timestamp."""
    if isinstance(ev, Record):
        return ev.ts
    if isinstance(ev, Status):
        stamp = ev.msg.get("timestamp")
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    return 0.0  # a gap: placed by its neighbours (see merge_by_time)


def merge_by_time(sources: list[Iterable[Event]]) -> Iterator[Event]:
    """Interleave per-key event sequences by time without ever reordering one key: within a
    key an event counts as no earlier than the one before it (a clock that stepped back, a
    gap marker, a status written after the output it follows), so each key stays in stream
    order and, across keys, what happened first comes first."""

    def timed(index: int, events: Iterable[Event]) -> Iterator[tuple[float, int, Event]]:
        latest = 0.0
        for ev in events:
            latest = max(latest, event_time(ev))
            yield latest, index, ev

    for _t, _i, ev in heapq.merge(*(timed(i, src) for i, src in enumerate(sources)), key=lambda x: (x[0], x[1])):
        yield ev


def is_cluster(client: Any) -> bool:
    return type(client).__name__ == "RedisCluster"


def subscribe(client: Any, channels: Iterable[str], *, sharded: bool = False) -> Any:
    """A pub/sub object subscribed to ``channels`` (SSUBSCRIBE with ``sharded``, for --pubsub sharded).
    Decode each message's data with ``decode_message``; drop repeats with a ``Deduper``."""
    ps = client.pubsub()
    if sharded:
        ps.ssubscribe(*channels)
    else:
        ps.subscribe(*channels)
    return ps


def decode_message(payload: bytes) -> dict[str, Any]:
    """Decode one pub/sub message or stream entry payload."""
    return protocol.decode(payload)
