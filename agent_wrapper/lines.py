"""Splitting a byte stream into records at LF, keeping every byte."""

from __future__ import annotations

DEFAULT_MAX_LINE_BYTES = 1 << 20


class LineSplitter:
    """Feeds chunks of a pipe, returns complete records.

    A record is the bytes up to (not including) an LF. ``\\r``, NUL and invalid UTF-8 are
    kept as they are. A line longer than ``max_line_bytes`` is cut into chunks that are
    marked partial (no LF follows them), so a 100 MB line never sits whole in memory.
    """

    __slots__ = ("max_line_bytes", "_pending")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._pending = b""

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, chunk: bytes) -> tuple[list[bytes], list[int]]:
        """Returns (records, indices of partial records)."""
        data = self._pending + chunk if self._pending else chunk
        last_nl = data.rfind(b"\n")
        partial: list[int] = []
        if last_nl < 0:
            records: list[bytes] = []
            rest = data
        else:
            records = data[:last_nl].split(b"\n")
            rest = data[last_nl + 1 :]
            limit = self.max_line_bytes
            if len(data) > limit and any(len(r) > limit for r in records):
                records, partial = _cut_long(records, limit)
        if len(rest) >= self.max_line_bytes:
            limit = self.max_line_bytes
            cut = len(rest) - len(rest) % limit
            for i in range(0, cut, limit):
                partial.append(len(records))
                records.append(rest[i : i + limit])
            rest = rest[cut:]
        self._pending = rest
        return records, partial

    def flush(self) -> tuple[list[bytes], list[int]]:
        """At end of stream: the unterminated tail as a partial record, if any."""
        if not self._pending:
            return [], []
        tail, self._pending = self._pending, b""
        return [tail], [0]


def _cut_long(records: list[bytes], limit: int) -> tuple[list[bytes], list[int]]:
    out: list[bytes] = []
    partial: list[int] = []
    for rec in records:
        if len(rec) <= limit:
            out.append(rec)
            continue
        for i in range(0, len(rec), limit):
            piece = rec[i : i + limit]
            if i + limit < len(rec):
                partial.append(len(out))
            out.append(piece)
    return out, partial
