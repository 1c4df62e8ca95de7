"""Deduper: repeats dropped, gaps reported, producers kept apart."""

from __future__ import annotations

from typing import Any

from sidecar import protocol
from sidecar.consumer import Deduper, Gap, Status, channel_names, decode_message
from sidecar.protocol import Lines, Record

OUT = "run:r:output:0"
STATUS = "run:r:status"


def mk_lines(lines: list[bytes], ts: float) -> Lines:
    data = b"".join(x + b"\n" for x in lines)
    return Lines([(data, len(lines), False)] if lines else [], [(0, ts)], len(lines), len(data))


def batch_msg(
    seq: int,
    n: int,
    *,
    producer: str = "p1",
    channel: str = OUT,
    stream: str = "stdout",
    tag: str = "",
    compress: bool = False,
) -> dict[str, Any]:
    header = {
        "v": 1,
        "type": "batch",
        "run_id": "r",
        "variation_id": "0",
        "agent_id": "a",
        "producer": producer,
        "channel": channel,
        "stream": stream,
    }
    lines = [f"{tag}line{seq + i}".encode() for i in range(n)]
    payload = protocol.encode_batch(
        header,
        seq,
        mk_lines(lines, 1000.0 + seq),
        structured=True,
        threshold=0 if compress else -1,
    )
    return protocol.decode(payload)


def gap_msg(first: int, last: int, *, producer: str = "p1", channel: str = OUT) -> dict[str, Any]:
    msg = {
        "v": 1,
        "type": "gap",
        "run_id": "r",
        "variation_id": "0",
        "agent_id": "a",
        "producer": producer,
        "channel": channel,
        "stream": "stdout",
        "seq": first,
        "n": last - first + 1,
        "timestamp": "2024-01-01T00:00:00.000000Z",
        "from": first,
        "to": last,
    }
    return protocol.decode(protocol.encode_object(msg))


def status_msg(seq: int, status: str, *, producer: str = "p1") -> dict[str, Any]:
    msg = {
        "v": 1,
        "type": "status",
        "run_id": "r",
        "variation_id": "0",
        "agent_id": "a",
        "producer": producer,
        "channel": STATUS,
        "seq": seq,
        "status": status,
        "timestamp": "2024-01-01T00:00:00.000000Z",
        "metadata": {},
    }
    return protocol.decode(protocol.encode_object(msg))


def seqs(events: list[Any]) -> list[int]:
    return [e.seq for e in events if isinstance(e, Record)]


def test_records_in_order() -> None:
    d = Deduper()
    ev = list(d.feed(batch_msg(1, 3))) + list(d.feed(batch_msg(4, 2)))
    assert all(isinstance(e, Record) for e in ev)
    assert seqs(ev) == [1, 2, 3, 4, 5]
    assert [e.data for e in ev] == [b"line1\n", b"line2\n", b"line3\n", b"line4\n", b"line5\n"]
    assert d.last == {(OUT, "p1"): 5}


def test_compressed_batch_decoded() -> None:
    d = Deduper()
    msg = decode_message(
        protocol.encode_batch(
            {"v": 1, "type": "batch", "channel": OUT, "producer": "p1"},
            1,
            mk_lines([b"x" * 50] * 30, 1.0),
            structured=False,
            threshold=0,
        )
    )
    assert seqs(list(d.feed(msg))) == list(range(1, 31))


def test_same_batch_twice_is_dropped() -> None:
    d = Deduper()
    assert seqs(list(d.feed(batch_msg(1, 3)))) == [1, 2, 3]
    assert list(d.feed(batch_msg(1, 3))) == []
    assert seqs(list(d.feed(batch_msg(4, 1)))) == [4]
    assert list(d.feed(batch_msg(4, 1))) == []
    assert list(d.feed(batch_msg(1, 3))) == []
    assert d.last[(OUT, "p1")] == 4


def test_overlapping_batch_yields_only_new_records() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 5)))
    ev = list(d.feed(batch_msg(4, 4)))
    assert seqs(ev) == [6, 7]
    assert not any(isinstance(e, Gap) for e in ev)
    assert d.last[(OUT, "p1")] == 7


def test_missing_range_yields_gap_then_records() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 3)))
    ev = list(d.feed(batch_msg(10, 2)))
    assert ev[0] == Gap(OUT, "stdout", "p1", 4, 9, "missing")
    assert seqs(ev[1:]) == [10, 11]
    assert len(ev) == 3
    ev = list(d.feed(batch_msg(13, 1)))
    assert ev[0] == Gap(OUT, "stdout", "p1", 12, 12, "missing")
    assert seqs(ev) == [13]


def test_first_batch_seen_starts_the_sequence_without_gap() -> None:
    d = Deduper()
    ev = list(d.feed(batch_msg(50, 2)))
    assert seqs(ev) == [50, 51]
    assert not any(isinstance(e, Gap) for e in ev)


def test_read_from_the_start_a_producer_whose_first_records_are_missing_has_a_gap() -> None:
    """Trimmed by --max-stream-len, or lost with a Redis that kept nothing: from the start of
    the stream a producer's records begin at 1, and what is not there is reported."""
    d = Deduper(from_start=True)
    got = list(d.feed(batch_msg(5, 2)))
    assert isinstance(got[0], Gap) and (got[0].first, got[0].last, got[0].reason) == (1, 4, "missing")
    assert [r.seq for r in got[1:]] == [5, 6]
    assert [type(e) for e in d.feed(batch_msg(1, 3, producer="p2"))] == [Record] * 3  # another producer from 1
    late = Deduper()  # joined live: the first message seen starts the sequence
    assert [type(e) for e in late.feed(batch_msg(5, 2))] == [Record, Record]


def test_late_batch_after_gap_is_dropped() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 2)))
    list(d.feed(batch_msg(5, 2)))  # gap 3..4 reported
    assert list(d.feed(batch_msg(3, 2))) == []


def test_sidecar_gap_message() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 3)))
    ev = list(d.feed(gap_msg(4, 10)))
    assert ev == [Gap(OUT, "stdout", "p1", 4, 10, "dropped")]
    assert d.last[(OUT, "p1")] == 10
    ev = list(d.feed(batch_msg(11, 2)))
    assert seqs(ev) == [11, 12]
    assert not any(isinstance(e, Gap) for e in ev)


def test_repeated_gap_message_is_dropped() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 3)))
    list(d.feed(gap_msg(4, 10)))
    assert list(d.feed(gap_msg(4, 10))) == []
    assert list(d.feed(gap_msg(2, 8))) == []


def test_gap_message_overlapping_seen_records_is_trimmed() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 6)))
    assert list(d.feed(gap_msg(4, 9))) == [Gap(OUT, "stdout", "p1", 7, 9, "dropped")]


def test_gap_message_as_first_message() -> None:
    d = Deduper()
    assert list(d.feed(gap_msg(1, 5))) == [Gap(OUT, "stdout", "p1", 1, 5, "dropped")]
    assert seqs(list(d.feed(batch_msg(6, 1)))) == [6]


def test_missing_range_before_sidecar_gap_is_reported() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 3)))
    # Records 4..9 never arrived; 10..12 were dropped by the sidecar.
    ev = list(d.feed(gap_msg(10, 12)))
    assert ev == [Gap(OUT, "stdout", "p1", 4, 9, "missing"), Gap(OUT, "stdout", "p1", 10, 12, "dropped")]


def test_status_dedupe() -> None:
    d = Deduper()
    ev = []
    for seq, st in [(1, "starting"), (2, "running"), (2, "running"), (1, "starting"), (3, "exited")]:
        ev.extend(d.feed(status_msg(seq, st)))
    assert all(isinstance(e, Status) for e in ev)
    assert [(e.seq, e.status) for e in ev] == [(1, "starting"), (2, "running"), (3, "exited")]
    assert ev[0].channel == STATUS
    assert ev[0].producer == "p1"
    assert ev[2].msg["status"] == "exited"
    assert d.last[(STATUS, "p1")] == 3


def test_status_and_output_tracked_separately() -> None:
    d = Deduper()
    list(d.feed(batch_msg(1, 5)))
    ev = list(d.feed(status_msg(1, "running")))
    assert [(e.seq, e.status) for e in ev] == [(1, "running")]
    assert d.last == {(OUT, "p1"): 5, (STATUS, "p1"): 1}


def test_restarted_producer_starting_at_one_is_not_dropped() -> None:
    d = Deduper()
    assert seqs(list(d.feed(batch_msg(1, 3, producer="pod.100.1.aaa")))) == [1, 2, 3]
    ev = list(d.feed(batch_msg(1, 2, producer="pod.200.2.bbb", tag="new-")))
    assert seqs(ev) == [1, 2]
    assert [e.data for e in ev] == [b"new-line1\n", b"new-line2\n"]
    assert [e.producer for e in ev] == ["pod.200.2.bbb"] * 2
    assert not any(isinstance(e, Gap) for e in ev)
    # The old producer's state is untouched.
    assert list(d.feed(batch_msg(3, 1, producer="pod.100.1.aaa"))) == []
    assert seqs(list(d.feed(batch_msg(4, 1, producer="pod.100.1.aaa")))) == [4]
    assert d.last == {(OUT, "pod.100.1.aaa"): 4, (OUT, "pod.200.2.bbb"): 2}


def test_interleaved_producers_and_channels() -> None:
    d = Deduper()
    logs = "run:r:logs:0"
    ev: list[Any] = []
    ev += d.feed(batch_msg(1, 2, producer="a"))
    ev += d.feed(batch_msg(1, 2, producer="b"))
    ev += d.feed(batch_msg(1, 1, producer="a", channel=logs, stream="stderr"))
    ev += d.feed(batch_msg(3, 1, producer="b"))
    ev += d.feed(batch_msg(3, 1, producer="a"))
    ev += d.feed(batch_msg(1, 1, producer="a", channel=logs, stream="stderr"))
    assert [(e.channel, e.producer, e.seq) for e in ev] == [
        (OUT, "a", 1),
        (OUT, "a", 2),
        (OUT, "b", 1),
        (OUT, "b", 2),
        (logs, "a", 1),
        (OUT, "b", 3),
        (OUT, "a", 3),
    ]


def test_unknown_message_type_ignored() -> None:
    d = Deduper()
    assert list(d.feed({"v": 1, "type": "hello", "channel": OUT, "producer": "p1", "seq": 5})) == []
    assert d.last == {}


def test_json_field_reaches_records() -> None:
    d = Deduper()
    header = {"v": 1, "type": "batch", "channel": OUT, "producer": "p1", "stream": "stdout"}
    msg = protocol.decode(
        protocol.encode_batch(header, 1, mk_lines([b'{"a":1}', b"text"], 5.0), structured=True, threshold=-1)
    )
    ev = list(d.feed(msg))
    assert [e.json for e in ev] == [{"a": 1}, None]
    assert [e.ts for e in ev] == [5.0, 5.0]


def test_channel_names() -> None:
    assert channel_names("R") == {
        "stdout": "run:R:output:0",
        "stderr": "run:R:logs:0",
        "status": "run:R:status",
    }
    assert channel_names(
        "R",
        "v2",
        "ag",
        output="o:{agent_id}:{run_id}",
        logs="l:{variation_id}",
        status="s:{run_id}:{agent_id}",
    ) == {"stdout": "o:ag:R", "stderr": "l:v2", "status": "s:R:ag"}


# -- reading a run: order across keys, hostile entries ------------------------------------------

LOGS = "run:r:logs:0"


def _entry(payload_msg: dict[str, Any]) -> dict[str, bytes]:
    return {"d": protocol.encode_object(payload_msg)}


def _status_at(seq: int, status: str, ts: float) -> dict[str, Any]:
    from datetime import UTC, datetime

    msg = status_msg(seq, status)
    msg["timestamp"] = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return msg


def _client_with(entries: list[tuple[str, dict[str, bytes]]]) -> Any:
    import fakeredis

    client = fakeredis.FakeRedis()
    for key, fields in entries:
        client.xadd(key, fields)
    return client


def _texts(events: list[Any]) -> list[str]:
    out = []
    for e in events:
        out.append(e.text if isinstance(e, Record) else f"<{e.status}>" if isinstance(e, Status) else "<gap>")
    return out


def test_stored_interleaves_keys_by_time_and_keeps_each_key_in_order() -> None:
    from sidecar.consumer import RunReader

    out1 = batch_msg(1, 1, tag="o")  # ts 1001
    out2 = batch_msg(2, 1, tag="o")  # ts 1002
    err1 = batch_msg(1, 1, tag="e", channel=LOGS, stream="stderr")  # ts 1001
    err1["ts"] = [[0, 1001.5]]
    client = _client_with([(OUT, _entry(out1)), (OUT, _entry(out2)), (LOGS, _entry(err1)),
                           (STATUS, _entry(_status_at(1, "running", 1000.5))),
                           (STATUS, _entry(_status_at(2, "exited", 1003.0)))])
    reader = RunReader(client, [OUT, LOGS, STATUS], page=1)  # one entry per page: the merge pages all keys
    assert _texts(list(reader.stored())) == ["<running>", "oline1", "eline1", "oline2", "<exited>"]


def test_follow_never_puts_the_final_status_before_the_output_it_follows() -> None:
    from sidecar.consumer import RunReader

    last = batch_msg(5, 2, tag="o")
    last["ts"] = [[0, 1005.0], [1, 1004.0]]  # the wall clock stepped back inside the batch
    client = _client_with([(OUT, _entry(last)), (STATUS, _entry(_status_at(9, "exited", 1005.5)))])
    reader = RunReader(client, [OUT, STATUS])
    got: list[Any] = []
    for ev in reader.follow(block_ms=10):
        if ev is None:
            break
        got.append(ev)
    assert _texts(got) == ["<gap>", "oline5", "oline6", "<exited>"]  # records 1-4 are not in the stream


def test_hostile_entries_are_counted_and_skipped_never_fatal() -> None:
    from sidecar.consumer import RunReader

    bomb = b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00x"
    bad_n = batch_msg(1, 1, tag="o")
    bad_n["n"] = 10**18
    not_str = batch_msg(1, 1, tag="o")
    not_str["lines"] = [1]
    far_ts = batch_msg(1, 1, tag="o")
    far_ts["ts"] = [[0, 1e20]]
    good = batch_msg(1, 2, tag="o")
    client = _client_with([(OUT, {"d": bomb}), (OUT, _entry(bad_n)), (OUT, _entry(not_str)), (OUT, _entry(far_ts)),
                           (OUT, _entry(good))])
    reader = RunReader(client, [OUT])
    assert _texts(list(reader.stored())) == ["oline1", "oline2"]
    assert reader.errors == 4



def test_messages_of_another_version_are_skipped() -> None:
    # PROTOCOL §14: a v2 entry (or one without a version) is not described by v1. Read as v1,
    # its large seq would move the producer's sequence past the real v1 records that follow.
    d = Deduper()
    for v in (2, None, True, 1.0, "1"):
        msg = dict(batch_msg(100, 3), v=v)
        if v is None:
            del msg["v"]
        assert list(d.feed(msg)) == []
        assert list(d.feed(dict(status_msg(50, "running"), v=v))) == []
    assert d.last == {}
    ev = list(d.feed(batch_msg(1, 3)))
    assert seqs(ev) == [1, 2, 3] and not [e for e in ev if isinstance(e, Gap)]


def test_start_ids_dash_and_dollar() -> None:
    from sidecar.consumer import RunReader

    client = _client_with([(OUT, _entry(batch_msg(1, 2, tag="o")))])
    from_dash = RunReader(client, [OUT], start_id="-")
    assert _texts(list(from_dash.stored())) == ["oline1", "oline2"]
    from_now = RunReader(client, [OUT, LOGS], start_id="$")  # LOGS holds nothing yet
    assert list(from_now.stored()) == []
    client.xadd(OUT, _entry(batch_msg(3, 1, tag="o")))
    client.xadd(LOGS, _entry(batch_msg(1, 1, tag="e", channel=LOGS, stream="stderr")))
    assert sorted(_texts(list(from_now.stored()))) == ["eline1", "oline3"]  # no gap for records 1-2: not asked for


def test_a_client_that_decodes_responses_is_refused() -> None:
    import fakeredis
    import pytest

    from sidecar.consumer import RunReader

    with pytest.raises(ValueError, match="decode_responses=False"):
        RunReader(fakeredis.FakeRedis(decode_responses=True), [OUT])


def test_an_entry_without_a_payload_counts_as_unreadable() -> None:
    from sidecar.consumer import RunReader

    client = _client_with([(OUT, {"other": b"x"}), (OUT, _entry(batch_msg(1, 1, tag="o")))])
    reader = RunReader(client, [OUT])
    assert _texts(list(reader.stored())) == ["oline1"]
    assert reader.errors == 1
