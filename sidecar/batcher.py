"""Per-channel batching: records collect in an open batch until a size limit, a quiet pipe or the linger.

Sealing encodes the batch and queues it in the outbox under one lock, so batches of a
channel are queued in sequence order whichever thread seals them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from agent_wrapper.events import Output

from . import protocol
from .items import Item
from .outbox import Outbox


class Channel:
    __slots__ = ("key", "stream", "header", "structured", "next_seq", "open", "opened_at")

    def __init__(self, key: str, stream: str, header: dict[str, Any], structured: bool) -> None:
        self.key = key
        self.stream = stream
        self.header = header
        self.structured = structured
        self.next_seq = 1
        self.open = protocol.Lines()
        self.opened_at = 0.0


class Batcher:
    def __init__(
        self,
        outbox: Outbox,
        channels: dict[str, Channel],
        *,
        max_records: int,
        max_bytes: int,
        linger_s: float,
        compress_threshold: int,
        per_line_json: bool,
        variation_id: str,
        producer: str,
    ) -> None:
        self.outbox = outbox
        self.channels = channels
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.threshold = compress_threshold
        self.per_line_json = per_line_json
        self.variation_id = variation_id
        self.producer = producer
        self.lock = threading.Lock()
        self.records_in = 0
        self.bytes_in = 0

    def add(self, ev: Output) -> None:
        """Called by the reader thread for every read. May block when the outbox is full (block policy)."""
        with self.lock:
            ch = self.channels[ev.stream]
            batch = ch.open
            base = len(batch.lines)
            if base == 0:
                ch.opened_at = time.monotonic()
            batch.lines.extend(ev.records)
            batch.ts.append((base, ev.ts))
            if ev.partial:
                batch.partial.extend(base + i for i in ev.partial)
            batch.nbytes += ev.nbytes
            self.records_in += len(ev.records)
            self.bytes_in += ev.nbytes
            if len(batch.lines) >= self.max_records or batch.nbytes >= self.max_bytes:
                self._seal(ch)

    def seal_all(self, *, blocking: bool = True, only_due: bool = False) -> bool:
        """Seal open batches (all, or those past their linger). False if the lock was busy."""
        if not self.lock.acquire(blocking=blocking):
            return False
        try:
            now = time.monotonic()
            sealed = False
            for ch in self.channels.values():
                if ch.open.lines and (not only_due or now - ch.opened_at >= self.linger_s):
                    self._seal(ch)
                    sealed = True
            return sealed
        finally:
            self.lock.release()

    def pending(self) -> bool:
        return any(ch.open.lines for ch in self.channels.values())

    def next_due(self) -> float | None:
        """Seconds until the oldest open batch reaches its linger, None if nothing is open."""
        opened = [ch.opened_at for ch in self.channels.values() if ch.open.lines]
        if not opened:
            return None
        return max(0.0, min(opened) + self.linger_s - time.monotonic())

    def _seal(self, ch: Channel) -> None:
        batch = ch.open
        ch.open = protocol.Lines()
        first = ch.next_seq
        n = len(batch.lines)
        ch.next_seq += n
        payload = protocol.encode_batch(ch.header, first, batch, structured=ch.structured, threshold=self.threshold)
        pubs = self._per_line(batch) if self.per_line_json else None
        item = Item(ch.key, self.producer, first, first + n - 1, payload, n, batch.nbytes, pubs)
        self.outbox.put(item)

    def _per_line(self, batch: protocol.Lines) -> list[bytes]:
        out: list[bytes] = []
        runs = batch.ts
        run = 0
        stamp = protocol.iso_utc(runs[0][1]) if runs else ""
        partial = set(batch.partial)
        for i, line in enumerate(batch.lines):
            while run + 1 < len(runs) and runs[run + 1][0] <= i:
                run += 1
                stamp = protocol.iso_utc(runs[run][1])
            msg: dict[str, Any] = {
                "content": line.decode("utf-8", "replace"),
                "timestamp": stamp,
                "variation_id": self.variation_id,
            }
            if i in partial:
                msg["partial"] = True
            out.append(orjson.dumps(msg))
        return out
