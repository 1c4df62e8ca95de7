"""The unit that waits in the buffer, the spool and the transport: one encoded batch."""

from __future__ import annotations

from agent_wrapper.values import Value


class Item(Value):
    __slots__ = ("key", "producer", "first", "last", "payload", "records", "raw_bytes", "pubs", "kind", "size")

    def __init__(self, key: str, producer: str, first: int, last: int, payload: bytes, records: int = 0,
                 raw_bytes: int = 0, pubs: list[bytes] | None = None, kind: str = "batch") -> None:
        self.key = key  # stream key, also the pub/sub channel
        self.producer = producer  # unique per sidecar process: sequence numbers are per (key, producer)
        self.first = first  # sequence number of the first record
        self.last = last  # sequence number of the last record
        self.payload = payload  # appended to the stream, and published unless ``pubs`` is set
        self.records = records  # agent output records in the payload (0 for status and gap messages)
        self.raw_bytes = raw_bytes  # agent output bytes they stand for
        self.pubs = pubs  # per-line-json: published instead of the payload
        self.kind = kind  # batch, status, gap
        # bytes it takes in memory, as the buffer counts them
        self.size = len(payload) + (sum(len(p) for p in pubs) if pubs else 0) + 64
