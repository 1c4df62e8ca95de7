"""The unit that waits in the buffer, the spool and the transport: one encoded batch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Item:
    key: str  # stream key, also the pub/sub channel
    producer: str  # unique per sidecar process: sequence numbers are per (key, producer)
    first: int  # sequence number of the first record
    last: int  # sequence number of the last record
    payload: bytes  # appended to the stream, and published unless ``pubs`` is set
    records: int = 0  # agent output records in the payload (0 for status and gap messages)
    raw_bytes: int = 0  # agent output bytes they stand for
    pubs: list[bytes] | None = None  # per-line-json: published instead of the payload
    kind: str = "batch"  # batch, status, gap
    size: int = field(init=False)  # bytes it takes in memory, as the buffer counts them

    def __post_init__(self) -> None:
        self.size = len(self.payload) + (sum(len(p) for p in self.pubs) if self.pubs else 0) + 64
