"""Splitting a byte stream into records at LF, keeping every byte."""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_MAX_LINE_BYTES = 1 << 20


def _count_lf(data: bytes) -> int:
    return data.count(b"\n")


# A run of records: (data, count, partial). Complete records: ``data`` holds ``count`` lines,
# each ending with LF. A partial record: ``data`` is one chunk not followed by LF (a piece
# of a line longer than the limit, or the end of the stream without a newline), count 1.
Segment = tuple[bytes, int, bool]


class LineSplitter:
    """Feeds chunks of a pipe, returns complete records in runs (no per-line objects).

    ``\\r``, NUL and invalid UTF-8 are kept as they are. A line longer than
    ``max_line_bytes`` is cut into partial chunks, so a 100 MB line never sits whole in
    memory.
    """

    __slots__ = ("max_line_bytes", "_pending", "_count_lf")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 count_lf: Callable[[bytes], int] | None = None) -> None:
        """``count_lf(data)`` must return ``data.count(b"\\n")``; a faster one may be given."""
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._pending = b""
        self._count_lf = count_lf if count_lf is not None else _count_lf

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[Segment]:
        data = self._pending + chunk if self._pending else chunk
        limit = self.max_line_bytes
        last_nl = data.rfind(b"\n")
        out: list[Segment] = []
        if last_nl >= 0:
            body = data[: last_nl + 1]
            rest = data[last_nl + 1 :]
            if last_nl < limit or body.find(b"\n") <= limit and _longest_line(body) <= limit:
                out.append((body, self._count_lf(body), False))
            else:
                _cut_long(body, limit, out)
        else:
            rest = data
        if len(rest) >= limit:
            cut = len(rest) - len(rest) % limit
            for i in range(0, cut, limit):
                out.append((rest[i : i + limit], 1, True))
            rest = rest[cut:]
        self._pending = rest
        return out

    def flush(self) -> list[Segment]:
        """At end of stream: the unterminated tail as a partial record, if any."""
        if not self._pending:
            return []
        tail, self._pending = self._pending, b""
        return [(tail, 1, True)]


def _longest_line(body: bytes) -> int:
    longest = 0
    start = 0
    while True:
        nl = body.find(b"\n", start)
        if nl < 0:
            return longest
        longest = max(longest, nl - start)
        start = nl + 1


def _cut_long(body: bytes, limit: int, out: list[Segment]) -> None:
    """Complete lines in runs; lines over the limit as partial chunks plus their LF-ended tail."""
    start = 0
    run_start = 0
    run_count = 0
    while start < len(body):
        nl = body.find(b"\n", start)
        if nl - start <= limit:
            run_count += 1
            start = nl + 1
            continue
        if run_count:
            out.append((body[run_start:start], run_count, False))
        pos = start
        while nl - pos > limit:
            out.append((body[pos : pos + limit], 1, True))
            pos += limit
        out.append((body[pos : nl + 1], 1, False))
        start = run_start = nl + 1
        run_count = 0
    if run_count:
        out.append((body[run_start:start], run_count, False))


def records_of(segments: list[Segment]) -> list[tuple[bytes, bool]]:
    """(record without LF, partial) for each record: the unbatched view, for tests and tools."""
    out: list[tuple[bytes, bool]] = []
    for data, _count, partial in segments:
        if partial:
            out.append((data, True))
        else:
            out.extend((line, False) for line in data.split(b"\n")[:-1])
    return out
