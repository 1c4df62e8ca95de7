"""Batcher: sealing by records, bytes, quiet pipe and linger; sequence numbers; per-line JSON."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agent_wrapper.events import STDERR, STDOUT, Output
from agent_wrapper.lines import LineSplitter, Segment
from sidecar import _native, protocol
from sidecar import batcher as batcher_mod
from sidecar.batcher import Batcher, Channel
from sidecar.items import Item
from sidecar.outbox import Outbox

OUT_KEY = "run:r:output:v1"
LOG_KEY = "run:r:logs:v1"
PRODUCER = "agent.1.2.abc"


def gap_factory(key: str, first: int, last: int) -> Item:
    return Item(key, PRODUCER, first, last, b"gap", kind="gap")


class Clock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t


Make = Callable[..., tuple[Batcher, Outbox]]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(batcher_mod, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


@pytest.fixture
def make(clock: Clock) -> Iterator[Make]:
    yield from _factory()


@pytest.fixture
def make_real_time() -> Iterator[Make]:
    """``make`` on the real monotonic clock."""
    yield from _factory()


def _factory() -> Iterator[Make]:
    made: list[tuple[Batcher, Outbox]] = []

    def factory(
        *,
        max_records: int = 1000,
        max_bytes: int = 1 << 20,
        linger_s: float = 0.5,
        threshold: int = -1,
        per_line_json: bool = False,
        start: bool = True,
    ) -> tuple[Batcher, Outbox]:
        outbox = Outbox(1 << 30, None, "block", gap_factory)
        base = {"v": 1, "run_id": "r", "variation_id": "v1", "agent_id": "agent", "producer": PRODUCER}
        channels = {
            STDOUT: Channel(OUT_KEY, STDOUT, dict(base, type="batch", channel=OUT_KEY, stream=STDOUT), True),
            STDERR: Channel(LOG_KEY, STDERR, dict(base, type="batch", channel=LOG_KEY, stream=STDERR), False),
        }
        b = Batcher(
            outbox,
            channels,
            max_records=max_records,
            max_bytes=max_bytes,
            linger_s=linger_s,
            compress_threshold=threshold,
            per_line_json=per_line_json,
            variation_id="v1",
            producer=PRODUCER,
        )
        made.append((b, outbox))
        if start:
            b.start()
        return b, outbox

    yield factory
    for b, outbox in made:
        outbox.close()
        if b.thread.is_alive():
            assert b.close(timeout=5.0)


def segments_of(records: list[bytes], partial: list[int]) -> list[Segment]:
    marks = set(partial)
    segs: list[Segment] = []
    run: list[bytes] = []
    for i, rec in enumerate(records):
        if i in marks:
            if run:
                segs.append((b"".join(x + b"\n" for x in run), len(run), False))
                run = []
            segs.append((rec, 1, True))
        else:
            run.append(rec)
    if run:
        segs.append((b"".join(x + b"\n" for x in run), len(run), False))
    return segs


def out(
    records: list[bytes],
    *,
    ts: float = 1700000000.0,
    partial: list[int] | None = None,
    stream: str = STDOUT,
    nbytes: int | None = None,
) -> Output:
    segs = segments_of(records, partial or [])
    size = sum(len(d) for d, _, _ in segs) if nbytes is None else nbytes
    return Output(stream, ts, segs, len(records), size)


def wait_for(ob: Outbox, n: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while len(ob) < n and time.monotonic() < deadline:
        ob.wait(0.05)
    assert len(ob) >= n, f"expected {n} items, have {len(ob)}"


def stays_empty(ob: Outbox, seconds: float = 0.2) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(ob):
            return False
        ob.wait(0.02)
    return len(ob) == 0


def queued(ob: Outbox) -> list[Item]:
    items = ob.take(10_000, 1 << 40)
    ob.ack(len(items))
    return items


def decoded(item: Item) -> dict[str, Any]:
    return protocol.decode(item.payload)


# -- sealing at limits -------------------------------------------------------------------


def test_seals_at_max_records(make: Make) -> None:
    b, ob = make(max_records=3)
    b.add(out([b"a"]))
    b.add(out([b"b"]))
    assert stays_empty(ob)
    b.add(out([b"c"]))
    wait_for(ob, 1)
    (it,) = queued(ob)
    assert (it.key, it.producer, it.first, it.last, it.records, it.raw_bytes, it.kind) == (
        OUT_KEY,
        PRODUCER,
        1,
        3,
        3,
        6,
        "batch",
    )
    assert it.pubs is None
    msg = decoded(it)
    assert msg["lines"] == ["a", "b", "c"]
    assert (msg["seq"], msg["n"], msg["channel"], msg["stream"], msg["type"]) == (
        1,
        3,
        OUT_KEY,
        STDOUT,
        "batch",
    )
    assert msg["producer"] == PRODUCER


def test_one_read_with_more_records_than_a_batch_becomes_several_batches(make: Make) -> None:
    b, ob = make(max_records=10)
    recs = [b"r%d" % i for i in range(25)]
    b.add(out(recs))
    wait_for(ob, 3)
    items = queued(ob)
    assert [(it.first, it.last, it.records) for it in items] == [(1, 10, 10), (11, 20, 10), (21, 25, 5)]
    assert [line.encode() for it in items for line in decoded(it)["lines"]] == recs


def test_seals_at_max_bytes(make: Make) -> None:
    b, ob = make(max_bytes=10)
    b.add(out([b"abc"]))  # 4 bytes
    b.add(out([b"def"]))  # 8 bytes
    assert stays_empty(ob)
    b.add(out([b"g"]))  # 10 bytes: sealed at the limit
    wait_for(ob, 1)
    assert [(it.first, it.last, it.raw_bytes) for it in queued(ob)] == [(1, 3, 10)]
    b.add(out([b"0123456789abcdef"]))  # one read past the limit
    wait_for(ob, 1)
    assert [(it.first, it.last, it.raw_bytes) for it in queued(ob)] == [(4, 4, 17)]


def test_raw_bytes_come_from_event_nbytes(make: Make) -> None:
    b, ob = make(max_records=2)
    b.add(out([b"x"], nbytes=100))
    b.add(out([b"y"], nbytes=23))
    wait_for(ob, 1)
    assert queued(ob)[0].raw_bytes == 123
    assert (b.records_in, b.bytes_in) == (2, 123)


def test_sequence_numbers_contiguous_across_batches(make: Make) -> None:
    rng = random.Random(7)
    b, ob = make(max_records=7, max_bytes=40)
    sent: list[bytes] = []
    for i in range(120):
        n = rng.randint(1, 4)
        recs = [b"r%d-%d" % (i, j) + b"z" * rng.randint(0, 6) for j in range(n)]
        sent.extend(recs)
        b.add(out(recs))
    assert b.close(timeout=5.0)
    items = queued(ob)
    assert len(items) > 10
    assert items[0].first == 1
    for prev, nxt in zip(items, items[1:], strict=False):
        assert nxt.first == prev.last + 1
    assert items[-1].last == len(sent)
    recs = [r for it in items for r in protocol.iter_records(decoded(it))]
    assert [r.seq for r in recs] == list(range(1, len(sent) + 1))
    assert [r.data for r in recs] == [s + b"\n" for s in sent]
    for it in items:
        msg = decoded(it)
        assert msg["seq"] == it.first
        assert msg["n"] == it.records == it.last - it.first + 1
    assert b.records_in == len(sent)


def test_splitter_output_round_trips_byte_exact(make: Make) -> None:
    rng = random.Random(11)
    data = bytes(rng.choice(b"ab\r\x00\xff\xc3\xa9{}\n") for _ in range(3000))
    b, ob = make(max_records=13, max_bytes=100)
    splitter = LineSplitter(16)
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 64)
        segs = splitter.feed(data[pos : pos + n])
        pos += n
        if segs:
            b.add(Output(STDOUT, 1.0, segs, sum(c for _, c, _ in segs), sum(len(d) for d, _, _ in segs)))
    tail = splitter.flush()
    if tail:
        b.add(Output(STDOUT, 1.0, tail, 1, len(tail[0][0])))
    assert b.close(timeout=5.0)
    items = queued(ob)
    recs = [r for it in items for r in protocol.iter_records(decoded(it))]
    assert b"".join(r.data for r in recs) == data
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1))


def test_channels_have_their_own_sequences(make: Make) -> None:
    b, ob = make(max_records=2)
    b.add(out([b"o1"]))
    b.add(out([b"e1"], stream=STDERR))
    b.add(out([b"o2"]))
    wait_for(ob, 1)
    b.add(out([b"e2", b"e3"], stream=STDERR))  # three records for a batch of two: split
    wait_for(ob, 3)
    b.add(out([b"o3", b"o4"]))
    wait_for(ob, 4)
    items = queued(ob)
    assert [(it.key, it.first, it.last) for it in items] == [
        (OUT_KEY, 1, 2),
        (LOG_KEY, 1, 2),
        (LOG_KEY, 3, 3),
        (OUT_KEY, 3, 4),
    ]
    assert decoded(items[1])["stream"] == STDERR
    assert decoded(items[1])["lines"] == ["e1", "e2"]
    assert decoded(items[2])["lines"] == ["e3"]


def test_structured_only_on_structured_channel(make: Make) -> None:
    b, ob = make()
    b.add(out([b'{"k":1}', b"t"]))
    b.add(out([b'{"k":2}'], stream=STDERR))
    assert b.close(timeout=5.0)
    o, e = queued(ob)
    assert decoded(o)["json"] == [[0, {"k": 1}]]
    assert "json" not in decoded(e)


def test_compress_threshold_is_applied(make: Make) -> None:
    b, ob = make(threshold=0)
    b.add(out([b"hello"]))
    assert b.close(timeout=5.0)
    (it,) = queued(ob)
    assert it.payload[:4] == protocol.ZSTD_MAGIC
    assert decoded(it)["lines"] == ["hello"]


def test_partial_records_flagged(make: Make) -> None:
    b, ob = make()
    b.add(out([b"ab", b"cdef"], partial=[1]))
    b.add(out([b"gh", b"ij", b"kl"], partial=[0, 2]))
    assert b.close(timeout=5.0)
    (it,) = queued(ob)
    msg = decoded(it)
    assert msg["partial"] == [1, 2, 4]
    assert msg["n"] == it.records == 5
    recs = list(protocol.iter_records(msg))
    assert [r.partial for r in recs] == [False, True, True, False, True]
    assert b"".join(r.data for r in recs) == b"ab\ncdefghij\nkl"


def test_ts_runs_per_read(make: Make) -> None:
    b, ob = make()
    b.add(out([b"a", b"b"], ts=10.0))
    b.add(out([b"c"], ts=20.0))
    b.add(out([b"d", b"e"], ts=30.0))
    assert b.close(timeout=5.0)
    (it,) = queued(ob)
    msg = decoded(it)
    assert msg["ts"] == [[0, 10.0], [2, 20.0], [3, 30.0]]
    assert [r.ts for r in protocol.iter_records(msg)] == [10.0, 10.0, 20.0, 30.0, 30.0]


def test_close_seals_and_encodes_everything(make: Make) -> None:
    b, ob = make(max_records=2)
    b.add(out([b"1", b"2", b"3"]))  # sealed at once, shipped as two batches
    b.add(out([b"4"]))  # open
    b.add(out([b"x"], stream=STDERR))  # open
    assert b.close(timeout=5.0)
    assert not b.thread.is_alive()
    assert sorted((it.key, it.first, it.last) for it in queued(ob)) == [
        (LOG_KEY, 1, 1),
        (OUT_KEY, 1, 2),
        (OUT_KEY, 3, 3),
        (OUT_KEY, 4, 4),
    ]


@pytest.fixture
def slow_zstd(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Compression that takes 30 ms a batch: the compressor lags behind the encoder. Returns
    the first sequence number of each batch compressed, in the order compressed."""
    order: list[int] = []
    real = protocol.compress

    def slow(raw: bytes) -> bytes:
        time.sleep(0.03)
        order.append(orjson.loads(raw)["seq"])
        return real(raw)

    monkeypatch.setattr(protocol, "compress", slow)
    return order


def test_batches_stay_in_order_when_only_some_are_compressed(make: Make, slow_zstd: list[int]) -> None:
    """Large batches go through the compressor, small ones could go straight to the outbox:
    a small one never overtakes a large one still being compressed."""
    b, ob = make(max_records=1, threshold=300)
    sizes = [400, 5, 400, 400, 5, 5, 400, 5]
    for i, size in enumerate(sizes):
        b.add(out([bytes([97 + i]) * size]))
    assert b.close(timeout=5.0)
    items = queued(ob)
    assert [(it.first, it.last) for it in items] == [(i, i) for i in range(1, 9)]
    assert [it.payload[:4] == protocol.ZSTD_MAGIC for it in items] == [s > 300 for s in sizes]
    assert slow_zstd == [1, 3, 4, 7]
    assert [decoded(it)["lines"] for it in items] == [[chr(97 + i) * s] for i, s in enumerate(sizes)]


def test_a_lone_line_does_not_overtake_a_batch_in_the_compressor(make: Make, slow_zstd: list[int]) -> None:
    """On a quiet pipe the reader ships a lone line itself, but not past a batch that the
    compressor still holds."""
    b, ob = make(max_records=1, threshold=300, linger_s=5.0)
    b.add(out([b"x" * 400]))  # sealed, handed to the compressor
    time.sleep(0.01)
    b.add(out([b"lone"], stream=STDERR))
    b.on_quiet(True)
    wait_for(ob, 2)
    assert [(it.key, it.first) for it in queued(ob)] == [(OUT_KEY, 1), (LOG_KEY, 1)]


def test_close_waits_for_the_compressor(make: Make, slow_zstd: list[int]) -> None:
    b, ob = make(max_records=1, threshold=0)
    for i in range(5):
        b.add(out([b"line %d" % i]))
    assert b.close(timeout=5.0)
    assert not b.compressor.is_alive()
    assert [it.first for it in queued(ob)] == [1, 2, 3, 4, 5]
    assert slow_zstd == [1, 2, 3, 4, 5]


# -- linger and quiet pipes --------------------------------------------------------------


def test_linger_seals_open_batch(make: Make, clock: Clock) -> None:
    b, ob = make(linger_s=0.5)
    b.add(out([b"a"]))
    clock.t = 1000.3
    b.add(out([b"b"]))  # linger counts from the first record of the batch
    b.notify_idle()
    assert stays_empty(ob)
    clock.t = 1000.49
    b.notify_idle()
    assert stays_empty(ob)
    clock.t = 1000.5
    b.notify_idle()
    wait_for(ob, 1)
    assert [(it.first, it.last) for it in queued(ob)] == [(1, 2)]
    # A new batch starts its own linger.
    clock.t = 2000.0
    b.add(out([b"c"]))
    clock.t = 2000.2
    b.notify_idle()
    assert stays_empty(ob)
    clock.t = 2000.6
    b.notify_idle()
    wait_for(ob, 1)
    assert [(it.first, it.last) for it in queued(ob)] == [(3, 3)]


def test_linger_per_channel(make: Make, clock: Clock) -> None:
    b, ob = make(linger_s=1.0)
    b.add(out([b"o"]))
    clock.t = 1000.8
    b.add(out([b"e"], stream=STDERR))
    b.notify_idle()
    assert stays_empty(ob)
    clock.t = 1001.0  # stdout is due, stderr is not yet
    b.notify_idle()
    wait_for(ob, 1)
    items = queued(ob)
    assert items[0].key == OUT_KEY
    clock.t = 1001.8
    b.notify_idle()
    if len(items) < 2:
        wait_for(ob, 1)
        items += queued(ob)
    assert [(it.key, it.first, it.last) for it in items] == [(OUT_KEY, 1, 1), (LOG_KEY, 1, 1)]


def test_quiet_pipe_with_idle_outbox_seals_at_once(make: Make) -> None:
    b, ob = make(linger_s=0.5)
    b.add(out([b"lone line"]))
    assert stays_empty(ob, 0.1)
    b.on_quiet(True)
    wait_for(ob, 1)
    assert [(it.first, it.last) for it in queued(ob)] == [(1, 1)]


def test_quiet_pipe_waits_while_outbox_busy(make: Make, clock: Clock) -> None:
    b, ob = make(linger_s=0.5)
    ob.put(Item("other", PRODUCER, 1, 1, b"busy"))
    ob.take(1, 1 << 20)  # in flight: the outbox is not idle
    b.add(out([b"x"]))
    b.on_quiet(True)
    assert len(ob) == 1
    time.sleep(0.2)
    assert len(ob) == 1
    ob.ack(1)  # delivered: now idle
    b.notify_idle()
    wait_for(ob, 1)
    assert [(it.key, it.first) for it in queued(ob)] == [(OUT_KEY, 1)]


def test_not_quiet_waits_for_linger(make: Make, clock: Clock) -> None:
    b, ob = make(linger_s=0.5)
    b.on_quiet(True)
    b.on_quiet(False)
    b.add(out([b"x"]))
    b.notify_idle()
    assert stays_empty(ob)
    clock.t += 0.5
    b.notify_idle()
    wait_for(ob, 1)


def test_a_batch_opened_while_the_pipes_never_go_quiet_goes_out_within_its_linger(make_real_time: Make) -> None:
    """The reader gathering a busy agent's writes reports quiet=False after every read. The
    encoder, asleep with nothing open to time, is woken to time the new batch: it goes out
    after the linger, not after the encoder's idle wait (1 s)."""
    b, ob = make_real_time(linger_s=0.05)
    time.sleep(0.1)  # the encoder is asleep, nothing open
    t0 = time.monotonic()
    b.add(out([b"x"]))
    b.on_quiet(False)
    deadline = t0 + 2.0
    while not len(ob) and time.monotonic() < deadline:
        b.add(out([b"more"]))
        b.on_quiet(False)
        ob.wait(0.005)
    waited = time.monotonic() - t0
    assert len(ob) >= 1
    assert waited < 0.5, waited


# -- back-pressure -----------------------------------------------------------------------


def test_add_blocks_while_sealed_batches_wait_for_the_encoder(make: Make) -> None:
    b, ob = make(max_records=1, start=False)
    b.sealed_max_bytes = 10
    b.add(out([b"12345"]))  # 6 bytes sealed: under the limit
    done = threading.Event()

    def reader() -> None:
        b.add(out([b"abcdefgh"]))  # 9 more: 15 > 10
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert not done.wait(0.3)
        assert ob.empty()
        b.start()
        assert done.wait(2.0)
        wait_for(ob, 2)
        assert [(it.first, it.last) for it in queued(ob)] == [(1, 1), (2, 2)]
    finally:
        b.close(timeout=2.0)
        t.join(2.0)


# -- per-line JSON -----------------------------------------------------------------------


def test_per_line_json_pubs(make: Make) -> None:
    b, ob = make(per_line_json=True)
    b.add(out([b"hello", b"caf\xc3\xa9 \xff"], ts=1700000000.25))
    b.add(out([b"part", b'{"j":1}\r'], ts=1700000001.5, partial=[0]))
    assert b.close(timeout=5.0)
    (it,) = queued(ob)
    assert it.pubs is not None
    assert len(it.pubs) == it.records == 4
    msgs = [orjson.loads(p) for p in it.pubs]
    assert msgs == [
        {"content": "hello", "timestamp": "2023-11-14T22:13:20.250000Z", "variation_id": "v1"},
        {"content": "caf\u00e9 \ufffd", "timestamp": "2023-11-14T22:13:20.250000Z", "variation_id": "v1"},
        {
            "content": "part",
            "timestamp": "2023-11-14T22:13:21.500000Z",
            "variation_id": "v1",
            "partial": True,
        },
        {"content": '{"j":1}\r', "timestamp": "2023-11-14T22:13:21.500000Z", "variation_id": "v1"},
    ]
    # The stream payload is still a v1 batch with the exact bytes.
    recs = list(protocol.iter_records(decoded(it)))
    assert [r.data for r in recs] == [b"hello\n", b"caf\xc3\xa9 \xff\n", b"part", b'{"j":1}\r\n']


def test_per_line_json_one_message_per_record_across_batches(make: Make) -> None:
    b, ob = make(per_line_json=True, max_records=3)
    for i in range(7):
        b.add(out([b"line %d" % i], ts=float(i)))
    assert b.close(timeout=5.0)
    items = queued(ob)
    assert [len(it.pubs or []) for it in items] == [3, 3, 1]
    contents = [orjson.loads(p)["content"] for it in items for p in it.pubs or []]
    assert contents == [f"line {i}" for i in range(7)]
    stamps = [orjson.loads(p)["timestamp"] for it in items for p in it.pubs or []]
    assert stamps == [protocol.iso_utc(float(i)) for i in range(7)]


def test_without_per_line_json_no_pubs(make: Make) -> None:
    b, ob = make(per_line_json=False)
    b.add(out([b"x"]))
    assert b.close(timeout=5.0)
    assert queued(ob)[0].pubs is None


# -- a lone line's shorter path (send_lone) ------------------------------------------------

NATIVE = _native.speedups is not None  # the short path encodes with the native module, or is not taken


def shipping_into(shipped: list[Item]) -> Callable[[str, str, int, int, int, bytes], None]:
    """A send_lone that records each batch as the item the usual path would queue."""
    def send_lone(key: str, producer: str, first: int, n: int, nbytes: int, payload: bytes) -> None:
        shipped.append(Item(key, producer, first, first + n - 1, payload, n, nbytes))

    return send_lone

LONE_CASES = {
    "one line": [b"token 7 of the answer\n"],
    "a few lines in one read": [b"first\nsecond, with \"quotes\" and \\ and \x01\ntabs\there\n"],
    "CRLF and unicode": ["caf\u00e9 \u2014 \U0001F600\r\n".encode()],
    "a JSON object line": [b'{"type":"assistant","message":{"text":"hi"}}\n'],
    "an event line (parsed on the usual path)": [b'{"usage":{"input_tokens":3,"output_tokens":5}}\n'],
    "bytes that are not UTF-8 (base64 on the usual path)": [b"bad \xff\xfe bytes\n"],
    "a partial line": [b"no line end yet"],
    "two reads in one batch": [b"one\n", b"two\n"],
    "lines past the compression threshold": [b"x" * 300 + b"\n"],
}


@pytest.mark.parametrize(("entry", "case"), [("on_quiet", c) for c in LONE_CASES] +
                         [("lone_read", c) for c in LONE_CASES if len(LONE_CASES[c]) == 1])  # one read at a time
@pytest.mark.parametrize("stream", [STDOUT, STDERR])
@pytest.mark.parametrize("events_wanted", [False, True])
def test_a_lone_batch_is_shipped_byte_for_byte_as_the_usual_path_queues_it(
        make: Make, case: str, stream: str, events_wanted: bool, entry: str) -> None:
    """The same reads through a batcher with the short paths and through one without: the
    same items (key, sequence numbers, payload bytes, counts), and the same objects reported
    for events. The reads are handed to on_quiet (add, then on_quiet, which hands a lone
    batch to send_lone), or to lone_read (the pipe reader's: send_lone takes the batch) with
    add and on_quiet where it declines. Whatever a short path cannot encode as the usual path would
    goes the usual way."""
    results = []
    for lone in (True, False):
        b, ob = make(threshold=400)
        objects: list[dict[str, Any]] = []
        if events_wanted:
            b.on_object = objects.append
        shipped: list[Item] = []  # what a short path shipped
        if lone:
            b.send_lone = shipping_into(shipped)
        items: list[Item] = []
        for i in range(3):  # three lone batches: the sequence numbers go on
            before = len(shipped)
            for k, data in enumerate(LONE_CASES[case]):
                partial = not data.endswith(b"\n")
                n = 1 if partial else data.count(b"\n")
                ts = 1700000000.123456 + i + k / 10
                if not (lone and entry == "lone_read" and b.lone_read(stream, data, ts)):
                    b.add(Output(stream, ts, [(data, n, partial)], n, len(data)))
            b.on_quiet(True)
            if len(shipped) == before:
                wait_for(ob, 1)
            items += shipped[before:] + queued(ob)
        assert b.records_in == 3 * sum(max(1, d.count(b"\n")) for d in LONE_CASES[case])
        results.append(([(it.key, it.producer, it.first, it.last, it.payload, it.records, it.raw_bytes, it.pubs,
                          it.kind, it.size) for it in items], objects, len(shipped)))
    short = case in ("one line", "a few lines in one read", "CRLF and unicode", "a JSON object line") or \
        case.startswith("an event line") and (stream == STDERR or not events_wanted)
    assert results[0][2] == (3 if short and NATIVE else 0)  # batches that took a short path
    assert results[0][:2] == results[1][:2]
    per_batch = results[0][0][0][5]
    assert [it[2] for it in results[0][0]] == [1, 1 + per_batch, 1 + 2 * per_batch]


def test_the_short_path_is_taken_for_plain_lines_and_json_objects(make: Make) -> None:
    """Not a path that only ever falls back: plain lines, and JSON objects that carry no
    event, go to send_lone, encoded there."""
    b, ob = make(start=False)
    b.on_object = lambda _obj: None
    delivered: list[Item] = []
    b.send_lone = shipping_into(delivered)
    for data in (b"plain\n", b'{"type":"assistant"}\n', b"a\nb\n"):
        b.add(Output(STDOUT, 1700000000.5, [(data, data.count(b"\n"), False)], data.count(b"\n"), len(data)))
        b.on_quiet(True)
    if not NATIVE:
        assert delivered == [] and len(ob) >= 1  # the usual path: the first batch waits in the outbox
        return
    assert [(it.first, it.last) for it in delivered] == [(1, 1), (2, 2), (3, 4)]
    assert decoded(delivered[1])["json"] == [[0, {"type": "assistant"}]]
    assert decoded(delivered[2])["lines"] == ["a", "b"]
    assert len(ob) == 0
    assert b._sealed_bytes == 0


def test_a_lone_line_waits_for_a_batch_still_in_the_outbox(make: Make) -> None:
    """The short path is only for a batch with nothing under way before it."""
    b, ob = make(start=False)
    delivered: list[Item] = []
    b.send_lone = shipping_into(delivered)
    ob.put(Item("other", PRODUCER, 1, 1, b"busy"))
    b.add(out([b"x"]))
    b.on_quiet(True)
    assert delivered == []


def test_lone_read_declines_while_anything_is_open_or_under_way(make: Make) -> None:
    b, ob = make(start=False)
    sent: list[tuple[Any, ...]] = []
    b.send_lone = lambda *args: sent.append(args)
    b.add(out([b"open on stderr"], stream=STDERR))
    assert not b.lone_read(STDOUT, b"x\n", 1.0)  # a batch is open
    b.on_quiet(True)  # it goes out: to send_lone, or the usual way to the outbox
    ob.put(Item("other", PRODUCER, 1, 1, b"busy"))
    assert not b.lone_read(STDOUT, b"x\n", 1.0)  # something waits for Redis
    queued(ob)
    assert b.lone_read(STDOUT, b"x\n", 1.0) is NATIVE
    assert [(a[0], a[2], a[3]) for a in sent] == ([(LOG_KEY, 1, 1), (OUT_KEY, 1, 1)] if NATIVE else [])
    b.per_line_json = True
    assert not b.lone_read(STDOUT, b"y\n", 2.0)
