"""LineSplitter: records at LF in runs, every byte kept, long lines cut into partial chunks."""

from __future__ import annotations

import random

import pytest

from agent_wrapper.lines import DEFAULT_MAX_LINE_BYTES, LineSplitter, Segment, records_of

# Every kind of content the splitter must keep untouched.
MIXED = (
    b"plain line\n"
    b"crlf line\r\n"
    b"bare\rcarriage\rreturns\r\n"
    b"\n"
    b"\n"
    b"nul\x00inside\x00\n"
    b"\x00\n"
    b"invalid utf8 \xff\xfe\xc3 end\n"
    b"caf\xc3\xa9 \xe2\x82\xac\n"
    b"\r\n"
    b"\r\r\r\n"
    b"truncated multibyte \xe2\x82\n"
    b"unterminated tail \xf0\x9f"
)


def check_segments(segments: list[Segment], limit: int) -> None:
    """The shape every segment must have."""
    for data, count, partial in segments:
        assert isinstance(data, bytes)
        if partial:
            assert count == 1
            assert b"\n" not in data
            assert 0 < len(data) <= limit
        else:
            assert count >= 1
            assert data.endswith(b"\n")
            assert data.count(b"\n") == count
            assert all(len(line) <= limit for line in data.split(b"\n")[:-1])


def view(segments: list[Segment]) -> tuple[list[bytes], list[int]]:
    """(records without LF, indices of the partial ones)."""
    recs = records_of(segments)
    return [r for r, _ in recs], [i for i, (_, p) in enumerate(recs) if p]


def collect(splitter: LineSplitter, chunks: list[bytes], *, flush: bool = True) -> list[Segment]:
    segments: list[Segment] = []
    for c in chunks:
        segments.extend(splitter.feed(c))
    if flush:
        segments.extend(splitter.flush())
    check_segments(segments, splitter.max_line_bytes)
    return segments


def rebuild(records: list[bytes], partial: list[int]) -> bytes:
    marks = set(partial)
    return b"".join(r if i in marks else r + b"\n" for i, r in enumerate(records))


def logical_lines(records: list[bytes], partial: list[int]) -> list[bytes]:
    """Joins continuation chunks: each entry is one line as the agent wrote it (without LF)."""
    marks = set(partial)
    lines: list[bytes] = []
    cur = b""
    for i, rec in enumerate(records):
        cur += rec
        if i not in marks:
            lines.append(cur)
            cur = b""
    if cur:
        lines.append(cur)
    return lines


def random_chunks(data: bytes, rng: random.Random, max_chunk: int) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_chunk)
        chunks.append(data[pos : pos + n])
        pos += n
    return chunks


def random_stream(rng: random.Random, nlines: int, max_len: int) -> bytes:
    alphabet = [b"a", b"b", b"\r", b"\x00", b"\xff", b"\xc3", b"\xa9", b" "]
    weights = [20, 20, 3, 2, 2, 2, 2, 5]
    out = bytearray()
    for _ in range(nlines):
        out += b"".join(rng.choices(alphabet, weights, k=rng.randint(0, max_len)))
        out += b"\n"
    out += b"".join(rng.choices(alphabet, weights, k=rng.randint(0, max_len)))
    return bytes(out)


# -- basics ------------------------------------------------------------------------------


def test_complete_lines_in_one_chunk_are_one_run() -> None:
    s = LineSplitter()
    assert s.feed(b"one\ntwo\nthree\n") == [(b"one\ntwo\nthree\n", 3, False)]
    assert s.pending == 0
    assert s.flush() == []


def test_counts_come_from_the_given_lf_counter() -> None:
    seen: list[bytes] = []

    def count_lf(data: bytes) -> int:
        seen.append(data)
        return data.count(b"\n")

    sp = LineSplitter(count_lf=count_lf)
    assert sp.feed(b"a\nb\nc") == [(b"a\nb\n", 2, False)]
    assert sp.feed(b"\n") == [(b"c\n", 1, False)]
    assert seen == [b"a\nb\n", b"c\n"]


def test_line_split_across_chunk_boundaries() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.pending == 3
    assert s.feed(b"lo\nwor") == [(b"hello\n", 1, False)]
    assert s.pending == 3
    assert s.feed(b"ld") == []
    assert s.pending == 5
    assert s.feed(b"\n") == [(b"world\n", 1, False)]
    assert s.pending == 0


def test_lf_at_start_of_chunk_ends_pending_line() -> None:
    s = LineSplitter()
    assert s.feed(b"abc") == []
    assert s.feed(b"\ndef\n") == [(b"abc\ndef\n", 2, False)]


def test_empty_lines_are_records() -> None:
    s = LineSplitter()
    assert s.feed(b"\n\n\n") == [(b"\n\n\n", 3, False)]
    assert view(s.feed(b"x\n\n")) == ([b"x", b""], [])
    assert s.pending == 0


def test_empty_chunk_changes_nothing() -> None:
    s = LineSplitter()
    assert s.feed(b"") == []
    s.feed(b"ab")
    assert s.feed(b"") == []
    assert s.pending == 2
    assert s.feed(b"\n") == [(b"ab\n", 1, False)]


def test_crlf_and_bare_cr_are_kept() -> None:
    s = LineSplitter()
    assert view(s.feed(b"win\r\nmac\rstyle\r\n\r\n\r")) == ([b"win\r", b"mac\rstyle\r", b"\r"], [])
    assert s.flush() == [(b"\r", 1, True)]


def test_nul_and_invalid_utf8_are_kept() -> None:
    s = LineSplitter()
    segs = s.feed(b"a\x00b\n\xff\xfe\xfd\n\xc3\n\x00\x00\n")
    assert segs == [(b"a\x00b\n\xff\xfe\xfd\n\xc3\n\x00\x00\n", 4, False)]
    assert view(segs) == ([b"a\x00b", b"\xff\xfe\xfd", b"\xc3", b"\x00\x00"], [])


def test_mixed_content_byte_by_byte() -> None:
    s = LineSplitter()
    segs = collect(s, [MIXED[i : i + 1] for i in range(len(MIXED))])
    assert b"".join(d for d, _, _ in segs) == MIXED
    records, partial = view(segs)
    expected = MIXED.split(b"\n")
    assert records == expected
    assert partial == [len(expected) - 1]  # the unterminated tail, from flush
    assert rebuild(records, partial) == MIXED


def test_mixed_content_in_random_chunkings() -> None:
    rng = random.Random(1234)
    expected = MIXED.split(b"\n")
    for _ in range(200):
        s = LineSplitter()
        segs = collect(s, random_chunks(MIXED, rng, 17))
        assert b"".join(d for d, _, _ in segs) == MIXED
        records, partial = view(segs)
        assert records == expected
        assert partial == [len(expected) - 1]
        assert sum(c for _, c, _ in segs) == len(expected)
        assert s.pending == 0


def test_records_of_view() -> None:
    segs: list[Segment] = [(b"a\n\nb\n", 3, False), (b"xy", 1, True), (b"z\n", 1, False), (b"t", 1, True)]
    assert records_of(segs) == [
        (b"a", False),
        (b"", False),
        (b"b", False),
        (b"xy", True),
        (b"z", False),
        (b"t", True),
    ]
    assert records_of([]) == []


# -- flush -------------------------------------------------------------------------------


def test_flush_returns_unterminated_tail_as_partial() -> None:
    s = LineSplitter()
    assert s.feed(b"done\nnot done") == [(b"done\n", 1, False)]
    assert s.pending == 8
    assert s.flush() == [(b"not done", 1, True)]
    assert s.pending == 0
    assert s.flush() == []


def test_flush_without_tail_is_empty() -> None:
    s = LineSplitter()
    s.feed(b"a\nb\n")
    assert s.flush() == []


def test_flush_of_tail_that_is_only_cr() -> None:
    s = LineSplitter()
    s.feed(b"x\n\r")
    assert s.flush() == [(b"\r", 1, True)]


def test_splitter_is_reusable_after_flush() -> None:
    s = LineSplitter()
    s.feed(b"first")
    assert s.flush() == [(b"first", 1, True)]
    assert s.feed(b"second\n") == [(b"second\n", 1, False)]


# -- long lines --------------------------------------------------------------------------


def test_invalid_max_line_bytes() -> None:
    with pytest.raises(ValueError):
        LineSplitter(0)
    with pytest.raises(ValueError):
        LineSplitter(-5)


def test_default_limit() -> None:
    assert LineSplitter().max_line_bytes == DEFAULT_MAX_LINE_BYTES == 1 << 20


def test_long_line_in_one_chunk_is_cut() -> None:
    s = LineSplitter(4)
    segs = s.feed(b"abcdefghij\nxy\n")
    assert segs == [(b"abcd", 1, True), (b"efgh", 1, True), (b"ij\n", 1, False), (b"xy\n", 1, False)]
    assert view(segs) == ([b"abcd", b"efgh", b"ij", b"xy"], [0, 1])
    assert s.pending == 0


def test_short_lines_around_a_long_one_stay_in_runs() -> None:
    s = LineSplitter(4)
    segs = s.feed(b"a\nbb\nabcdefghij\nc\nd\n")
    assert segs == [
        (b"a\nbb\n", 2, False),
        (b"abcd", 1, True),
        (b"efgh", 1, True),
        (b"ij\n", 1, False),
        (b"c\nd\n", 2, False),
    ]


def test_several_long_lines_in_one_chunk() -> None:
    s = LineSplitter(3)
    segs = s.feed(b"aaaaaaa\nbb\ncccccc\nddd\n")
    records, partial = view(segs)
    assert records == [b"aaa", b"aaa", b"a", b"bb", b"ccc", b"ccc", b"ddd"]
    assert partial == [0, 1, 4]
    assert max(len(r) for r in records) == 3
    check_segments(segs, 3)


def test_line_of_exactly_the_limit_in_one_chunk_is_not_cut() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abcd\n") == [(b"abcd\n", 1, False)]
    assert s.feed(b"wxyz\nabcd\n") == [(b"wxyz\nabcd\n", 2, False)]


def test_long_unterminated_tail_is_cut_and_rest_kept() -> None:
    s = LineSplitter(5)
    data = bytes(range(65, 65 + 23))  # 23 bytes, no LF
    assert s.feed(data) == [
        (data[0:5], 1, True),
        (data[5:10], 1, True),
        (data[10:15], 1, True),
        (data[15:20], 1, True),
    ]
    assert s.pending == 3
    assert s.flush() == [(data[20:23], 1, True)]


def test_long_tail_after_complete_lines() -> None:
    s = LineSplitter(4)
    segs = s.feed(b"ab\ncdefghij")
    assert segs == [(b"ab\n", 1, False), (b"cdef", 1, True), (b"ghij", 1, True)]
    assert s.pending == 0
    assert s.feed(b"k\n") == [(b"k\n", 1, False)]


def test_long_line_growing_over_several_chunks() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abc") == []
    assert s.feed(b"def") == [(b"abcd", 1, True)]
    assert s.pending == 2
    assert s.feed(b"gh") == [(b"efgh", 1, True)]
    assert s.pending == 0
    assert s.feed(b"ij\nk") == [(b"ij\n", 1, False)]
    assert s.pending == 1


def test_pending_prefix_plus_chunk_is_cut_at_limit_multiples() -> None:
    s = LineSplitter(4)
    s.feed(b"ab")
    assert view(s.feed(b"cdefghijk\nz\n")) == ([b"abcd", b"efgh", b"ijk", b"z"], [0, 1])


def test_limit_of_one_byte() -> None:
    s = LineSplitter(1)
    assert view(s.feed(b"abc\n\nd")) == ([b"a", b"b", b"c", b"", b"d"], [0, 1, 4])
    assert s.pending == 0
    assert s.flush() == []


def test_line_longer_than_default_limit() -> None:
    s = LineSplitter()
    line = b"x" * (DEFAULT_MAX_LINE_BYTES + 5)
    segs = s.feed(line + b"\nshort\n")
    assert [(len(d), c, p) for d, c, p in segs] == [
        (DEFAULT_MAX_LINE_BYTES, 1, True),
        (6, 1, False),
        (6, 1, False),
    ]
    assert segs[2][0] == b"short\n"


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 16, 64])
def test_random_chunkings_with_small_limits(limit: int) -> None:
    rng = random.Random(limit * 7919)
    for round_ in range(60):
        data = random_stream(rng, nlines=rng.randint(0, 30), max_len=limit * 4)
        max_chunk = rng.choice([1, 2, limit, limit + 1, 3 * limit, 200])
        s = LineSplitter(limit)
        segs = collect(s, random_chunks(data, rng, max_chunk))
        ctx = f"limit={limit} round={round_}"
        # Byte-exact reconstruction, including the flushed tail.
        assert b"".join(d for d, _, _ in segs) == data, ctx
        records, partial = view(segs)
        assert rebuild(records, partial) == data, ctx
        # No record exceeds the limit; every continuation chunk is exactly the limit.
        assert all(len(r) <= limit for r in records), ctx
        tail = data.rsplit(b"\n", 1)[-1]
        tail_flushed = len(tail) % limit != 0
        for i in partial:
            if tail_flushed and i == len(records) - 1:
                assert 0 < len(records[i]) < limit, ctx
            else:
                assert len(records[i]) == limit, ctx
        # Joining continuation chunks gives back the lines of the input.
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        assert logical_lines(records, partial) == lines, ctx
        assert s.pending == 0


def test_random_chunkings_without_long_lines_match_split() -> None:
    rng = random.Random(99)
    for _ in range(100):
        data = random_stream(rng, nlines=rng.randint(1, 40), max_len=30)
        s = LineSplitter(64)
        segs = collect(s, random_chunks(data, rng, rng.randint(1, 50)))
        records, partial = view(segs)
        expected = data.split(b"\n")
        if expected[-1] == b"":
            expected.pop()
            assert partial == []
        else:
            assert partial == [len(expected) - 1]
        assert records == expected
        assert sum(c for _, c, _ in segs) == len(expected)
