"""Wire format v1: encode_batch, decode, iter_records."""

from __future__ import annotations

import base64
import random
from typing import Any

import orjson
import pytest
import zstandard

from agent_wrapper.lines import LineSplitter
from agent_wrapper.lines import records_of as records_of_segments
from sidecar import protocol
from sidecar.protocol import ZSTD_MAGIC, Lines, ProtocolError, decode, encode_batch, iter_records

HEADER: dict[str, Any] = {
    "v": 1,
    "type": "batch",
    "run_id": "r1",
    "variation_id": "v0",
    "agent_id": "agent-7",
    "producer": "agent-7.123.456.abcdef",
    "channel": "run:r1:output:v0",
    "stream": "stdout",
}


def segments_of(lines: list[bytes], partial: list[int] | None = None) -> list[tuple[bytes, int, bool]]:
    """Segments as the splitter makes them: complete records in runs, partial chunks alone."""
    marks = set(partial or [])
    segs: list[tuple[bytes, int, bool]] = []
    run: list[bytes] = []
    for i, line in enumerate(lines):
        if i in marks:
            if run:
                segs.append((b"".join(x + b"\n" for x in run), len(run), False))
                run = []
            segs.append((line, 1, True))
        else:
            run.append(line)
    if run:
        segs.append((b"".join(x + b"\n" for x in run), len(run), False))
    return segs


def lines_batch(
    lines: list[bytes], partial: list[int] | None = None, ts: list[tuple[int, float]] | None = None
) -> Lines:
    segs = segments_of(lines, partial)
    return Lines(
        segments=segs,
        ts=ts if ts is not None else [(0, 1700000000.25)],
        n=len(lines),
        nbytes=sum(len(d) for d, _, _ in segs),
    )


def enc(
    lines: list[bytes],
    *,
    seq: int = 1,
    partial: list[int] | None = None,
    ts: list[tuple[int, float]] | None = None,
    structured: bool = False,
    threshold: int = -1,
) -> bytes:
    batch = lines_batch(lines, partial, ts)
    return encode_batch(HEADER, seq, batch, structured=structured, threshold=threshold)


def records_of(payload: bytes) -> list[protocol.Record]:
    return list(iter_records(decode(payload)))


def stream_bytes(lines: list[bytes], partial: list[int]) -> bytes:
    marks = set(partial)
    return b"".join(x if i in marks else x + b"\n" for i, x in enumerate(lines))


# -- message layout ----------------------------------------------------------------------


def test_plain_batch_fields() -> None:
    msg = decode(enc([b"hello", b"world"], seq=41))
    assert msg["seq"] == 41
    assert msg["n"] == 2
    assert msg["lines"] == ["hello", "world"]
    assert msg["ts"] == [[0, 1700000000.25]]
    for key, value in HEADER.items():
        assert msg[key] == value
    assert "partial" not in msg
    assert "b64" not in msg
    assert "json" not in msg


def test_header_is_not_modified() -> None:
    before = dict(HEADER)
    enc([b"a"], seq=5)
    assert before == HEADER


def test_records_carry_header_fields_and_sequence_numbers() -> None:
    recs = records_of(enc([b"a", b"b", b"c"], seq=10))
    assert [r.seq for r in recs] == [10, 11, 12]
    for r in recs:
        assert r.channel == "run:r1:output:v0"
        assert r.stream == "stdout"
        assert r.producer == "agent-7.123.456.abcdef"
        assert r.agent_id == "agent-7"
        assert r.variation_id == "v0"
        assert r.partial is False
        assert r.json is None
    assert [r.data for r in recs] == [b"a\n", b"b\n", b"c\n"]
    assert [r.text for r in recs] == ["a", "b", "c"]


def test_empty_batch() -> None:
    msg = decode(encode_batch(HEADER, 1, Lines(), structured=True, threshold=-1))
    assert msg["n"] == 0
    assert msg["lines"] == []
    assert list(iter_records(msg)) == []


def test_single_empty_line() -> None:
    recs = records_of(enc([b""]))
    assert len(recs) == 1
    assert recs[0].data == b"\n"
    assert recs[0].text == ""


# -- byte-exact reconstruction -----------------------------------------------------------


def test_invalid_utf8_lines_are_base64_with_indices() -> None:
    lines = [b"ok", b"\xff\xfe", b"caf\xc3\xa9", b"\xc3", b"\xed\xa0\x80", b"fine"]
    msg = decode(enc(lines))
    assert msg["b64"] == [1, 3, 4]
    assert msg["lines"][0] == "ok"
    assert msg["lines"][1] == base64.b64encode(b"\xff\xfe").decode()
    assert msg["lines"][2] == "caf\u00e9"
    assert msg["lines"][3] == base64.b64encode(b"\xc3").decode()
    assert msg["lines"][4] == base64.b64encode(b"\xed\xa0\x80").decode()
    assert msg["lines"][5] == "fine"
    assert [r.data for r in iter_records(msg)] == [x + b"\n" for x in lines]


def test_nul_and_cr_round_trip() -> None:
    lines = [b"a\x00b", b"\x00", b"cr\r", b"\r", b"mid\rdle", b"\r\r", b"\x00\r\x00"]
    msg = decode(enc(lines))
    assert "b64" not in msg
    assert msg["lines"] == ["a\x00b", "\x00", "cr\r", "\r", "mid\rdle", "\r\r", "\x00\r\x00"]
    assert [r.data for r in iter_records(msg)] == [x + b"\n" for x in lines]


def test_partial_records_have_no_lf() -> None:
    lines = [b"abcd", b"efgh", b"ij", b"tail"]
    msg = decode(enc(lines, partial=[0, 1, 3]))
    assert msg["partial"] == [0, 1, 3]
    recs = list(iter_records(msg))
    assert [r.partial for r in recs] == [True, True, False, True]
    assert [r.data for r in recs] == [b"abcd", b"efgh", b"ij\n", b"tail"]
    assert recs[0].text == "abcd"
    assert recs[2].text == "ij"
    assert b"".join(r.data for r in recs) == b"abcdefghij\ntail"


def test_partial_invalid_utf8_chunk() -> None:
    lines = [b"\xe2\x82", b"\xac end"]  # a euro sign cut in the middle
    recs = records_of(enc(lines, partial=[0]))
    assert b"".join(r.data for r in recs) == b"\xe2\x82\xac end\n"


def test_random_streams_round_trip_byte_exact() -> None:
    rng = random.Random(2024)
    alphabet = b'ab \r\x00\xff\xc3\xa9{}"\n'
    for round_ in range(50):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        splitter = LineSplitter(rng.choice([3, 8, 64]))
        out = b""
        seq = 1
        pos = 0
        feeds = []
        while pos < len(data):
            n = rng.randint(1, 40)
            feeds.append(splitter.feed(data[pos : pos + n]))
            pos += n
        feeds.append(splitter.flush())
        for segs in feeds:
            if not segs:
                continue
            n = sum(c for _, c, _ in segs)
            batch = Lines(segments=segs, ts=[(0, 1.0)], n=n, nbytes=sum(len(d) for d, _, _ in segs))
            payload = encode_batch(
                HEADER, seq, batch, structured=bool(round_ % 2), threshold=rng.choice([-1, 0, 100])
            )
            got = records_of(payload)
            assert [r.seq for r in got] == list(range(seq, seq + n))
            assert [(r.data if r.partial else r.data[:-1], r.partial) for r in got] == records_of_segments(
                segs
            )
            seq += n
            out += b"".join(r.data for r in got)
        assert out == data, f"round {round_}"


def test_texts_of_segments() -> None:
    batch = Lines(
        segments=[
            (b"a\n\xff\nc\n", 3, False),
            (b"\xe2\x82", 1, True),
            (b"\xac\n", 1, False),
            (b"tail", 1, True),
        ],
        n=6,
    )
    t = protocol.texts_of(batch)
    assert t.lines == [
        "a",
        base64.b64encode(b"\xff").decode(),
        "c",
        base64.b64encode(b"\xe2\x82").decode(),
        base64.b64encode(b"\xac").decode(),
        "tail",
    ]
    assert t.partial == [3, 5]
    assert t.b64 == [1, 3, 4]


def test_precomputed_texts_give_same_payload() -> None:
    batch = lines_batch([b'{"a":1}', b"\xff", b"x"], partial=[2])
    texts = protocol.texts_of(batch)
    plain = encode_batch(HEADER, 3, batch, structured=True, threshold=-1)
    assert encode_batch(HEADER, 3, batch, structured=True, threshold=-1, texts=texts) == plain


@pytest.mark.skipif(protocol._speedups is None, reason="native module not built")
def test_the_payload_written_without_orjson_is_what_orjson_writes() -> None:
    """The native path writes the message itself (orjson's import would cost every start):
    byte for byte what orjson writes for the same message, with Unix times as time.time()
    gives them, partial records, JSON objects, non-ASCII ids and text."""
    rnd = random.Random(5)
    header = dict(HEADER, agent_id="agent-\u00e9\u2603", channel="run:r\u00fc:output:0")
    header_json = protocol.encode_object(header)[:-1]
    words = [b"plain", b'{"a": [1, 2.5, null]}', b"\xc3\xa9t\xc3\xa9", b"tab\there", b'quote " and \\', b""]
    for _ in range(500):
        lines = [b" ".join(rnd.choices(words, k=rnd.randint(0, 4))) for _ in range(rnd.randint(1, 30))]
        partial = [len(lines) - 1] if rnd.random() < 0.3 else []
        ts = sorted({(rnd.randint(0, len(lines) - 1), 1.7e9 + rnd.random() * 1e8) for _ in range(rnd.randint(1, 3))})
        batch = lines_batch(lines, partial, ts)
        seq = rnd.randint(1, 10**12)
        written = encode_batch(header, seq, batch, structured=True, threshold=-1, header_json=header_json)
        assert encode_batch(header, seq, batch, structured=True, threshold=-1) == written
        # the orjson path (texts given)
        assert encode_batch(header, seq, batch, structured=True, threshold=-1,
                            texts=protocol.texts_of(batch)) == written


def test_control_plane_messages_are_what_orjson_writes_and_refuse_what_it_refused() -> None:
    msg = {"v": 1, "type": "status", "run_id": "r\u00e9", "seq": 2, "status": "running",
           "metadata": {"pid": 12, "note": "tab\t\u2603 \"q\" \x01", "f": 0.5, "none": None, "ok": True,
                        "big": (1 << 64) - 1, "neg": -(1 << 63), "list": [1, [2, {"x": []}]]}}
    assert protocol.encode_object(msg) == orjson.dumps(msg)
    for bad, reason in (((1 << 64), "beyond 64 bits"), (float("nan"), "not a JSON number"),
                        ({1: "x"}, "not a string"), ("\ud800", "surrogates")):
        with pytest.raises(ValueError, match=reason):
            protocol.encode_object({"metadata": {"x": bad}})
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 255"):
        protocol.encode_object({"metadata": deep})


# -- compression -------------------------------------------------------------------------


def test_compression_only_above_threshold() -> None:
    lines = [f"line number {i} with some text".encode() for i in range(20)]
    raw = enc(lines, threshold=-1)
    size = len(raw)
    assert raw[:1] == b"{"
    at = enc(lines, threshold=size)
    assert at == raw
    assert at[:4] != ZSTD_MAGIC
    above = enc(lines, threshold=size - 1)
    assert above[:4] == ZSTD_MAGIC
    assert zstandard.ZstdDecompressor().decompress(above) == raw
    assert decode(above) == decode(raw)


def test_default_threshold_compresses_large_batches() -> None:
    lines = [b"x" * 100 for _ in range(50)]
    payload = enc(lines, threshold=protocol.DEFAULT_COMPRESS_THRESHOLD)
    assert payload[:4] == ZSTD_MAGIC
    assert len(payload) < 500
    assert [r.data for r in records_of(payload)] == [b"x" * 100 + b"\n"] * 50


def test_small_batch_not_compressed_at_default_threshold() -> None:
    payload = enc([b"tiny"], threshold=protocol.DEFAULT_COMPRESS_THRESHOLD)
    assert payload[:1] == b"{"
    assert orjson.loads(payload)["lines"] == ["tiny"]


def test_negative_threshold_never_compresses() -> None:
    payload = enc([b"y" * 5000], threshold=-1)
    assert payload[:1] == b"{"


def test_zero_threshold_compresses_everything() -> None:
    assert enc([b"a"], threshold=0)[:4] == ZSTD_MAGIC


def test_compress_if_large() -> None:
    assert protocol.compress_if_large(b"abc", 3) == b"abc"
    assert protocol.compress_if_large(b"abcd", 3)[:4] == ZSTD_MAGIC
    assert protocol.decompress(protocol.compress_if_large(b"abcd", 3)) == b"abcd"
    assert protocol.decompress(b"{}") == b"{}"


def test_encode_object_is_never_compressed() -> None:
    obj = {"type": "status", "status": "running", "pad": "z" * 5000}
    payload = protocol.encode_object(obj)
    assert payload[:1] == b"{"
    assert decode(payload) == obj


# -- structured JSON ---------------------------------------------------------------------


def test_json_objects_indexed() -> None:
    lines = [
        b'{"a":1}',
        b"[1,2]",
        b'{"b":',
        b"plain text",
        b'{"c":[1,{"d":null}],"e":"\\u00e9"}\r',
        b'{"x":1} trailing',
        b' {"y":2}',
        b'{"z":"\xff"}',
        b"{}",
        b'{"n": 1.5e3, "t": true}\r\r',
        b"{not json}",
    ]
    msg = decode(enc(lines, structured=True))
    assert msg["b64"] == [7]
    assert msg["json"] == [
        [0, {"a": 1}],
        [4, {"c": [1, {"d": None}], "e": "\u00e9"}],
        [8, {}],
        [9, {"n": 1500.0, "t": True}],
    ]
    recs = list(iter_records(msg))
    assert [r.json for r in recs] == [
        {"a": 1},
        None,
        None,
        None,
        {"c": [1, {"d": None}], "e": "\u00e9"},
        None,
        None,
        None,
        {},
        {"n": 1500.0, "t": True},
        None,
    ]
    # The JSON view never changes the bytes.
    assert [r.data for r in recs] == [x + b"\n" for x in lines]
    assert recs[4].data.endswith(b"\r\n")


def test_json_arrays_and_scalars_not_indexed() -> None:
    msg = decode(enc([b"[1,2]", b"[]", b"1", b'"s"', b"null", b"[{}]"], structured=True))
    assert "json" not in msg
    assert all(r.json is None for r in iter_records(msg))


def test_json_not_indexed_when_unstructured() -> None:
    msg = decode(enc([b'{"a":1}', b"{}"], structured=False))
    assert "json" not in msg
    assert [r.json for r in iter_records(msg)] == [None, None]


def test_json_survives_compression() -> None:
    lines = [b'{"i":%d,"pad":"%s"}' % (i, b"p" * 40) for i in range(40)]
    payload = enc(lines, structured=True, threshold=10)
    assert payload[:4] == ZSTD_MAGIC
    recs = records_of(payload)
    assert [r.json for r in recs] == [{"i": i, "pad": "p" * 40} for i in range(40)]


def test_json_on_partial_record_refers_to_chunk() -> None:
    msg = decode(enc([b'{"k":"v"}', b"rest"], partial=[0], structured=True))
    assert msg["json"] == [[0, {"k": "v"}]]


# -- timestamps --------------------------------------------------------------------------


def test_ts_runs_mapping() -> None:
    lines = [b"l%d" % i for i in range(7)]
    runs = [(0, 100.0), (2, 200.0), (2, 250.0), (5, 300.5)]
    recs = records_of(enc(lines, ts=runs))
    assert [r.ts for r in recs] == [100.0, 100.0, 250.0, 250.0, 250.0, 300.5, 300.5]


def test_ts_single_run_and_precision() -> None:
    recs = records_of(enc([b"a", b"b"], ts=[(0, 1712345678.123456)]))
    assert [r.ts for r in recs] == [1712345678.123456, 1712345678.123456]


def test_ts_run_per_record() -> None:
    recs = records_of(enc([b"a", b"b", b"c"], ts=[(0, 1.0), (1, 2.0), (2, 3.0)]))
    assert [r.ts for r in recs] == [1.0, 2.0, 3.0]


def test_no_ts_runs_gives_zero() -> None:
    recs = records_of(enc([b"a"], ts=[]))
    assert recs[0].ts == 0.0


def test_iso_utc() -> None:
    assert protocol.iso_utc(0) == "1970-01-01T00:00:00.000000Z"
    assert protocol.iso_utc(1.5) == "1970-01-01T00:00:01.500000Z"
    assert protocol.iso_utc(1700000000.25) == "2023-11-14T22:13:20.250000Z"


# -- non-batch messages and errors -------------------------------------------------------


def test_iter_records_ignores_other_types() -> None:
    assert list(iter_records({"type": "status", "seq": 1, "lines": ["x"]})) == []
    assert list(iter_records({"type": "gap", "from": 1, "to": 3})) == []
    assert list(iter_records({})) == []


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\xff{",
        b"{",
        b'{"a":1',
        b"[1,2,3]",
        b'"str"',
        b"42",
        b"null",
        b"true",
    ],
)
def test_decode_rejects_non_object_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_decode_rejects_corrupt_zstd() -> None:
    with pytest.raises(ProtocolError):
        decode(ZSTD_MAGIC + b"\x00" * 16)
    good = enc([b"z" * 300 for _ in range(10)], threshold=0)
    assert good[:4] == ZSTD_MAGIC
    with pytest.raises(ProtocolError):
        decode(good[: len(good) // 2])
    with pytest.raises(ProtocolError):
        decode(good[:4])


def test_decode_rejects_compressed_non_json_and_non_object() -> None:
    c = zstandard.ZstdCompressor()
    with pytest.raises(ProtocolError):
        decode(c.compress(b"not json at all"))
    with pytest.raises(ProtocolError):
        decode(c.compress(b"[1,2]"))
    assert decode(c.compress(b'{"ok":true}')) == {"ok": True}


def test_protocol_error_is_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


def test_iter_records_missing_lines() -> None:
    with pytest.raises(ProtocolError):
        list(iter_records({"type": "batch", "seq": 1}))


def test_iter_records_bad_seq() -> None:
    with pytest.raises(ProtocolError):
        list(iter_records({"type": "batch", "seq": "abc", "lines": ["a"]}))


def test_iter_records_bad_base64() -> None:
    msg = {"type": "batch", "seq": 1, "lines": ["ok", "!!not base64!!"], "b64": [1], "ts": [[0, 1.0]]}
    recs = iter_records(msg)
    assert next(recs).data == b"ok\n"
    with pytest.raises(ProtocolError):
        next(recs)


def test_iter_records_malformed_json_field() -> None:
    with pytest.raises(ProtocolError):
        list(iter_records({"type": "batch", "seq": 1, "lines": ["a"], "json": [[0]]}))


def test_iter_records_malformed_ts_runs() -> None:
    # A ts run without its time is a malformed batch, reported as such.
    with pytest.raises(ProtocolError):
        list(iter_records({"type": "batch", "seq": 1, "lines": ["a"], "ts": [[0]]}))


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7, 100])
def test_split_lines_keeps_bytes_order_and_times(limit: int) -> None:
    segs: list[tuple[bytes, int, bool]] = [(b"a\nbb\nccc\n", 3, False), (b"par", 1, True), (b"d\n\ne\n", 3, False)]
    batch = Lines(segments=segs, ts=[(0, 1.0), (3, 2.0), (4, 3.0), (5, 4.0)], n=7, nbytes=sum(len(s[0]) for s in segs))
    parts = protocol.split_lines(batch, limit)
    assert all(0 < p.n <= limit for p in parts) and sum(p.n for p in parts) == 7
    assert b"".join(s[0] for p in parts for s in p.segments) == b"a\nbb\nccc\npard\n\ne\n"
    assert [p.nbytes for p in parts] == [sum(len(s[0]) for s in p.segments) for p in parts]
    times = []
    seq = 1
    for p in parts:
        recs = list(iter_records(decode(encode_batch(HEADER, seq, p, structured=False, threshold=-1))))
        assert [r.seq for r in recs] == list(range(seq, seq + p.n))
        seq += p.n
        times += [r.ts for r in recs]
    assert times == [1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    assert protocol.split_lines(batch, 7) == [batch]


def test_objects_nested_past_the_limit_stay_plain_lines() -> None:
    limit = protocol.MAX_JSON_DEPTH
    ok = b'{"a":' + b"[" * (limit - 1) + b"]" * (limit - 1) + b"}"
    deep = b'{"a":' + b"[" * limit + b"]" * limit + b"}"
    wide = b'{"a":[' + b",".join([b"[]"] * 500) + b"]}"  # many brackets, depth 3
    msg = decode(enc([ok, deep, wide], structured=True))
    assert [i for i, _ in msg["json"]] == [0, 2]
    assert [r.data for r in iter_records(msg)] == [ok + b"\n", deep + b"\n", wide + b"\n"]
