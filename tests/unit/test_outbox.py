"""Outbox: FIFO of memory and spool, block and drop policies, accounting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.items import Item
from sidecar.outbox import Outbox
from sidecar.spool import Spool, encode_frame

ITEM_SIZE = 100  # payload of 36 bytes + 64 of overhead


def batch(first: int, n: int = 5, *, key: str = "out", payload_len: int = 36, raw: int | None = None) -> Item:
    return Item(
        key,
        "prod",
        first,
        first + n - 1,
        b"%03d" % first + b"x" * (payload_len - 3),
        records=n,
        raw_bytes=raw if raw is not None else 10 * n,
    )


def status(seq: int) -> Item:
    return Item("status", "prod", seq, seq, b'{"status":"s%d"}' % seq, kind="status")


def gap_factory(key: str, first: int, last: int) -> Item:
    return Item(key, "prod", first, last, b"gap", kind="gap")


GAP_SIZE = 3 + 64


def spans(items: list[Item]) -> list[tuple[str, str, int, int]]:
    return [(it.kind, it.key, it.first, it.last) for it in items]


def drain(ob: Outbox) -> list[Item]:
    got = ob.take(10_000, 1 << 40)
    ob.ack(len(got))
    return got


def contents(ob: Outbox) -> list[Item]:
    """What waits, in order, read back from the spool where it is there (after spill_all, when
    the sender takes nothing more)."""
    assert ob.spool is not None or not ob._ndisk
    return [e if isinstance(e, Item) else ob.spool.read(e) for e in ob._q]  # type: ignore[union-attr]


@pytest.fixture
def make_spool(tmp_path: Path) -> Iterator[Callable[[int], Spool]]:
    """Open spools of a given byte limit under tmp_path; closed at teardown."""
    opened: list[Spool] = []

    def make(limit: int) -> Spool:
        sp = Spool(str(tmp_path), "prod", limit)
        sp.open()
        opened.append(sp)
        return sp

    yield make
    for sp in opened:
        sp.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(str(tmp_path / "spool"), "prod", 1 << 20)
    s.open()
    yield s
    s.close()


def test_item_size() -> None:
    assert batch(1).size == ITEM_SIZE
    assert Item("k", "p", 1, 1, b"ab", pubs=[b"xyz", b""]).size == 2 + 3 + 64


# -- memory only -------------------------------------------------------------------------


def test_fifo_take_and_ack() -> None:
    ob = Outbox(10_000, None, "block", gap_factory)
    items = [batch(1 + 5 * i) for i in range(5)]
    for it in items:
        ob.put(it)
    assert len(ob) == 5
    assert ob.mem_bytes == 5 * ITEM_SIZE
    got = ob.take(2, 1 << 20)
    assert got == items[:2]
    assert got[0] is items[0]
    # Handed-out items are not handed out again until released or acknowledged.
    assert ob.take(10, 1 << 20) == items[2:]
    assert ob.take(10, 1 << 20) == []
    ob.release_inflight()
    assert ob.take(1, 1 << 20) == items[:1]
    ob.ack(1)
    assert len(ob) == 4
    ob.release_inflight()
    assert ob.take(10, 1 << 20) == items[1:]
    ob.ack(4)
    assert ob.empty()
    assert ob.mem_bytes == 0


def test_take_respects_max_bytes_but_returns_at_least_one() -> None:
    ob = Outbox(10_000, None, "block", gap_factory)
    for i in range(4):
        ob.put(batch(1 + 5 * i))
    assert len(ob.take(10, 1)) == 1
    ob.release_inflight()
    assert len(ob.take(10, 100)) == 1
    ob.release_inflight()
    assert len(ob.take(10, 101)) == 2
    ob.release_inflight()
    assert len(ob.take(10, 250)) == 3


def test_waiting_accounting() -> None:
    ob = Outbox(10_000, None, "block", gap_factory)
    ob.put(batch(1, 5, raw=50))
    ob.put(batch(6, 3, raw=31))
    ob.put(status(1), force=True)
    assert ob.waiting_records == 8
    assert ob.waiting_bytes == 81
    assert ob.mem_bytes == 2 * ITEM_SIZE + status(1).size
    ob.take(1, 1 << 20)
    assert ob.waiting_records == 8  # taken, not yet delivered
    ob.ack(1)
    assert (ob.waiting_records, ob.waiting_bytes) == (3, 31)
    drain(ob)
    assert (ob.waiting_records, ob.waiting_bytes, ob.mem_bytes) == (0, 0, 0)


def test_spill_all_without_spool_reports_what_is_left() -> None:
    ob = Outbox(10_000, None, "block", gap_factory)
    ob.put(batch(1, 5))
    ob.put(batch(6, 2))
    ob.put(status(1), force=True)
    assert ob.spill_all() == (0, 7, 3)
    assert len(ob) == 3


def test_wait_returns_when_item_arrives() -> None:
    ob = Outbox(10_000, None, "block", gap_factory)
    t = threading.Timer(0.05, lambda: ob.put(batch(1)))
    t.start()
    try:
        ob.wait(5.0)
        assert len(ob) == 1
    finally:
        t.join(2)


def _waiter(ob: Outbox) -> tuple[threading.Thread, threading.Event]:
    """A thread in ``ob.wait(5)``, as the sender thread waits for work; ``done`` once it returns."""
    done = threading.Event()
    started = threading.Event()

    def run() -> None:
        with ob.lock:
            started.set()
            ob.cond.wait(5.0)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(2)
    return t, done


def test_put_without_wake_and_ack_leave_the_sender_asleep() -> None:
    """``put(wake=False)`` (the reader delivers the item itself) and ``ack`` (room, not work)
    do not wake a thread waiting for work; a plain ``put`` and ``notify`` do."""
    ob = Outbox(10_000, None, "block", gap_factory)
    t, done = _waiter(ob)
    ob.put(batch(1), wake=False)
    assert ob.take(10, 1 << 20)[0].first == 1
    ob.ack(1)
    assert not done.wait(0.3), "woken without new work"
    ob.notify()
    assert done.wait(2)
    t.join(2)
    t, done = _waiter(ob)
    ob.put(batch(6))
    assert done.wait(2)
    t.join(2)


# -- block policy ------------------------------------------------------------------------


def _put_in_thread(ob: Outbox, item: Item) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        ob.put(item)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def test_block_policy_waits_until_ack_frees_space() -> None:
    ob = Outbox(250, None, "block", gap_factory)
    ob.put(batch(1))
    ob.put(batch(6))
    t, done = _put_in_thread(ob, batch(11))
    try:
        assert not done.wait(0.3)
        assert ob.blocked_since is not None
        assert len(ob) == 2
        assert spans(ob.take(1, 1 << 20)) == [("batch", "out", 1, 5)]
        assert not done.wait(0.1)  # handed out is not delivered
        ob.ack(1)
        assert done.wait(1.0)
        t.join(1.0)
        assert ob.blocked_since is None
        assert spans(drain(ob)) == [("batch", "out", 6, 10), ("batch", "out", 11, 15)]
        assert ob.dropped_records == 0
    finally:
        ob.close()
        t.join(1.0)


def test_the_pause_warning_is_not_repeated_when_reads_pause_often(capfd: pytest.CaptureFixture[str]) -> None:
    """A Redis slower than the agent blocks and frees the reader many times a second."""
    ob = Outbox(250, None, "block", gap_factory)
    ob.put(batch(1))
    ob.put(batch(6))
    try:
        for i in range(3):
            t, done = _put_in_thread(ob, batch(11 + 5 * i))
            deadline = time.monotonic() + 5
            while ob.blocked_since is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ob.blocked_since is not None
            got = ob.take(1, 1 << 20)
            ob.ack(len(got))
            assert done.wait(1.0)
            t.join(1.0)
    finally:
        ob.close()
    assert capfd.readouterr().err.count("pausing reads") == 1


def test_block_policy_force_does_not_wait() -> None:
    ob = Outbox(250, None, "block", gap_factory)
    ob.put(batch(1))
    ob.put(batch(6))
    ob.put(status(1), force=True)
    ob.put(batch(11), force=True)
    assert spans(drain(ob)) == [
        ("batch", "out", 1, 5),
        ("batch", "out", 6, 10),
        ("status", "status", 1, 1),
        ("batch", "out", 11, 15),
    ]


def test_close_releases_blocked_put() -> None:
    ob = Outbox(250, None, "block", gap_factory)
    ob.put(batch(1))
    ob.put(batch(6))
    t, done = _put_in_thread(ob, batch(11))
    try:
        assert not done.wait(0.2)
        ob.close()
        assert done.wait(1.0)
        assert len(ob) == 3
    finally:
        ob.close()
        t.join(1.0)


def test_block_policy_accepts_oversized_item_when_empty() -> None:
    # Nothing waits, so nothing could ever make room: the item must be taken, not waited on forever.
    ob = Outbox(50, None, "block", gap_factory)
    t, done = _put_in_thread(ob, batch(1))
    try:
        assert done.wait(1.0)
        assert spans(ob.take(10, 1 << 20)) == [("batch", "out", 1, 5)]
    finally:
        ob.close()
        t.join(1.0)


def test_block_policy_with_full_spool_blocks(make_spool: Callable[[int], Spool]) -> None:
    sp = make_spool(len(encode_frame(batch(1))))
    ob = Outbox(250, sp, "block", gap_factory)
    try:
        for i in range(3):
            ob.put(batch(1 + 5 * i))
        assert sp.bytes > 0
        t, done = _put_in_thread(ob, batch(16))
        assert not done.wait(0.3)
        got = ob.take(2, 1 << 20)
        ob.ack(len(got))
        assert done.wait(1.0)
        t.join(1.0)
        assert [it.first for it in got + drain(ob)] == [1, 6, 11, 16]
    finally:
        ob.close()


# -- drop policy -------------------------------------------------------------------------


def test_drop_policy_replaces_oldest_batch_with_gap() -> None:
    ob = Outbox(500, None, "drop", gap_factory)
    big = 136  # size 200
    ob.put(batch(1, payload_len=big))
    ob.put(batch(6, payload_len=big))
    ob.put(batch(11, payload_len=big))  # 600 > 500: the oldest batch goes
    assert ob.dropped_records == 5
    assert ob.waiting_records == 10
    assert ob.waiting_bytes == 100
    assert ob.mem_bytes == GAP_SIZE + 400
    ob.put(batch(16, payload_len=big))  # the next oldest goes, and joins the gap before it
    assert ob.dropped_records == 10
    assert ob.waiting_records == 10
    assert ob.mem_bytes == GAP_SIZE + 400
    assert len(ob) == 3
    assert spans(drain(ob)) == [("gap", "out", 1, 10), ("batch", "out", 11, 15), ("batch", "out", 16, 20)]
    assert ob.mem_bytes == 0


def test_drop_policy_never_drops_in_flight_items() -> None:
    ob = Outbox(500, None, "drop", gap_factory)
    big = 136
    ob.put(batch(1, payload_len=big))
    ob.put(batch(6, payload_len=big))
    assert spans(ob.take(1, 1 << 20)) == [("batch", "out", 1, 5)]
    ob.put(batch(11, payload_len=big))
    assert ob.dropped_records == 5
    ob.ack(1)
    assert spans(drain(ob)) == [("gap", "out", 6, 10), ("batch", "out", 11, 15)]


def test_drop_policy_drops_new_item_when_everything_is_in_flight() -> None:
    ob = Outbox(250, None, "drop", gap_factory)
    ob.put(batch(1))
    ob.put(batch(6))
    assert len(ob.take(10, 1 << 20)) == 2
    ob.put(batch(11, 4))
    assert ob.dropped_records == 4
    assert ob.waiting_records == 10
    ob.ack(2)
    assert spans(drain(ob)) == [("gap", "out", 11, 14)]


def test_drop_policy_keeps_status_messages() -> None:
    ob = Outbox(300, None, "drop", gap_factory)
    ob.put(status(1), force=True)
    ob.put(batch(1))
    ob.put(batch(6))
    ob.put(batch(11))
    assert ob.dropped_records == 10
    assert spans(drain(ob)) == [("status", "status", 1, 1), ("gap", "out", 1, 10), ("batch", "out", 11, 15)]


def test_drop_policy_gaps_of_different_keys_not_merged() -> None:
    ob = Outbox(1000, None, "drop", gap_factory)
    big = 336  # size 400: one drop makes room for one more
    ob.put(batch(1, payload_len=big, key="out"))
    ob.put(batch(1, payload_len=big, key="logs"))
    ob.put(batch(6, payload_len=big, key="out"))
    ob.put(batch(6, payload_len=big, key="logs"))
    assert ob.dropped_records == 10
    assert spans(drain(ob)) == [
        ("gap", "out", 1, 5),
        ("gap", "logs", 1, 5),
        ("batch", "out", 6, 10),
        ("batch", "logs", 6, 10),
    ]


def test_drop_policy_non_contiguous_gaps_not_merged() -> None:
    ob = Outbox(1000, None, "drop", gap_factory)
    big = 336
    ob.put(batch(1, payload_len=big))
    ob.put(batch(20, payload_len=big))
    ob.put(batch(30, payload_len=big))
    ob.put(batch(40, payload_len=big))
    assert spans(drain(ob)) == [
        ("gap", "out", 1, 5),
        ("gap", "out", 20, 24),
        ("batch", "out", 30, 34),
        ("batch", "out", 40, 44),
    ]


def test_drop_policy_contiguous_gaps_merged_once_per_put() -> None:
    ob = Outbox(1000, None, "drop", gap_factory)
    big = 336
    for first in (1, 6, 11, 16, 21):
        ob.put(batch(first, payload_len=big))
    assert ob.dropped_records == 15
    assert ob.mem_bytes == GAP_SIZE + 2 * 400
    assert spans(drain(ob)) == [("gap", "out", 1, 15), ("batch", "out", 16, 20), ("batch", "out", 21, 25)]


# -- with a spool ------------------------------------------------------------------------


def test_fifo_across_memory_overflow_into_spool(spool: Spool) -> None:
    ob = Outbox(250, spool, "block", gap_factory)
    items = [batch(1 + 5 * i) for i in range(10)]
    for it in items:
        ob.put(it)
        assert ob.mem_bytes <= 250
    assert len(ob) == 10
    assert ob.mem_bytes == 2 * ITEM_SIZE
    assert spool.bytes == sum(len(encode_frame(it)) for it in items[:8])
    assert ob.spool_bytes == spool.bytes
    assert ob.waiting_records == 50
    got = ob.take(3, 1 << 20)
    assert got == items[:3]
    ob.ack(3)
    for it in (batch(51), batch(56)):
        ob.put(it)
        items.append(it)
    rest = drain(ob)
    assert rest == items[3:]
    assert [it.first for it in got + rest] == list(range(1, 61, 5))
    assert spool.bytes == 0
    assert ob.mem_bytes == 0
    assert ob.waiting_records == 0


def test_set_durable_sends_new_items_to_disk(spool: Spool) -> None:
    ob = Outbox(10_000, spool, "block", gap_factory)
    ob.put(batch(1))
    assert (ob.mem_bytes, spool.bytes) == (ITEM_SIZE, 0)
    ob.set_durable(True)  # what is in memory moves to disk as well
    assert ob.mem_bytes == 0
    first_frame = len(encode_frame(batch(1)))
    assert spool.bytes == first_frame
    ob.put(batch(6))
    ob.put(batch(11))
    assert ob.mem_bytes == 0
    assert spool.bytes == first_frame + len(encode_frame(batch(6))) + len(encode_frame(batch(11)))
    ob.set_durable(False)
    ob.put(batch(16))
    assert ob.mem_bytes == ITEM_SIZE
    assert [it.first for it in drain(ob)] == [1, 6, 11, 16]
    assert spool.bytes == 0


def test_items_read_back_from_disk_are_equal(spool: Spool) -> None:
    ob = Outbox(10_000, spool, "block", gap_factory)
    ob.set_durable(True)
    items = [batch(1), status(1), Item("out", "prod", 6, 7, b"\x28\xb5\x2f\xfd\x00", 2, 9, [b"a", b"b"])]
    for it in items:
        ob.put(it, force=it.kind == "status")
    assert ob.mem_bytes == 0
    assert drain(ob) == items


def test_spill_all_moves_memory_to_disk(spool: Spool) -> None:
    ob = Outbox(10_000, spool, "block", gap_factory)
    items = [batch(1 + 5 * i) for i in range(4)]
    for it in items:
        ob.put(it)
    assert spool.bytes == 0
    assert ob.spill_all() == (0, 0, 0)
    assert ob.mem_bytes == 0
    assert spool.bytes == sum(len(encode_frame(it)) for it in items)
    assert contents(ob) == items


def test_spill_all_marks_what_did_not_fit_by_one_gap(make_spool: Callable[[int], Spool]) -> None:
    sp = make_spool(len(encode_frame(batch(1))) * 2)
    ob = Outbox(10_000, sp, "block", gap_factory)
    for i in range(5):
        ob.put(batch(1 + 5 * i, 5))
    assert ob.spill_all() == (15, 0, 0)
    assert ob.mem_bytes == 0
    assert ob.spooled_records() == 10
    assert spans(contents(ob)) == [("batch", "out", 1, 5), ("batch", "out", 6, 10), ("gap", "out", 11, 25)]


def test_spill_all_writes_final_status_and_gaps_past_the_spool_limit(make_spool: Callable[[int], Spool]) -> None:
    limit = len(encode_frame(batch(1)))
    sp = make_spool(limit)
    ob = Outbox(10_000, sp, "block", gap_factory)
    ob.put(batch(1, 5))  # fits
    ob.put(status(1), force=True)
    ob.put(batch(6, 5))
    ob.put(batch(1, 3, key="err"))
    ob.put(batch(11, 5))
    ob.put(batch(4, 2, key="err"))
    ob.put(status(2), force=True)  # the final status
    assert ob.spill_all() == (15, 0, 0)
    assert sp.bytes > limit
    assert ob.mem_bytes == 0
    assert spans(contents(ob)) == [
        ("batch", "out", 1, 5),
        ("status", "status", 1, 1),
        ("gap", "out", 6, 15),
        ("gap", "err", 1, 5),
        ("status", "status", 2, 2),
    ]


def test_spill_all_keeps_a_dropped_range_apart_from_new_gaps(make_spool: Callable[[int], Spool]) -> None:
    sp = make_spool(1)
    ob = Outbox(10_000, sp, "block", gap_factory)
    ob.put(gap_factory("out", 1, 5))  # from --when-full drop: already counted as dropped
    ob.put(batch(6, 5))
    assert ob.spill_all() == (5, 0, 0)
    assert spans(contents(ob)) == [("gap", "out", 1, 5), ("gap", "out", 6, 10)]


def test_spill_all_reports_what_the_disk_refused(make_spool: Callable[[int], Spool],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sp = make_spool(1)
    ob = Outbox(10_000, sp, "block", gap_factory)
    ob.put(batch(1, 5))
    ob.put(batch(1, 4, key="err"))
    ob.put(status(1), force=True)
    real = sp.write
    calls = []

    def write(item: Item):  # type: ignore[no-untyped-def]
        calls.append(item.kind)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(item)

    monkeypatch.setattr(sp, "write", write)
    assert ob.spill_all() == (5, 4, 2)
    assert ob.spooled_records() == 0
    assert len(ob) == 3
    assert spans(contents(ob)) == [("gap", "out", 1, 5), ("gap", "err", 1, 4), ("status", "status", 1, 1)]


def test_adopt_puts_orphan_items_first(tmp_path: Path) -> None:
    root = str(tmp_path)
    dead = Spool(root, "dead", 1 << 20)
    dead.open()
    orphans = [Item("out", "dead", i, i + 1, b"orphan-%d" % i, records=2, raw_bytes=7) for i in (1, 3, 5)]
    for it in orphans:
        dead.write(it)
    dead.close(remove_if_empty=False)

    sp = Spool(root, "prod", 1 << 20)
    sp.open()
    try:
        ob = Outbox(10_000, sp, "block", gap_factory)
        own = batch(1)
        ob.put(own)
        refs = sp.adopt_orphans()
        ob.adopt(refs)
        assert len(ob) == 4
        assert ob.waiting_records == 6 + 5
        assert ob.waiting_bytes == 21 + 50
        got = drain(ob)
        assert got == orphans + [own]
        assert sp.bytes == 0
        assert ob.waiting_records == 0
        assert not (tmp_path / "dead").exists()
    finally:
        sp.close()


def test_drop_policy_with_spool_uses_disk_before_dropping(make_spool: Callable[[int], Spool]) -> None:
    sp = make_spool(len(encode_frame(batch(1))) * 2)
    ob = Outbox(250, sp, "drop", gap_factory)
    for i in range(4):
        ob.put(batch(1 + 5 * i))
    assert ob.dropped_records == 0
    assert sp.bytes > 0
    ob.put(batch(21))  # disk full: the memory batches go, disk items stay
    assert ob.dropped_records == 10
    assert spans(drain(ob)) == [
        ("batch", "out", 1, 5),
        ("batch", "out", 6, 10),
        ("gap", "out", 11, 20),
        ("batch", "out", 21, 25),
    ]


def test_block_mode_blocks_when_the_spool_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the memory budget holds and the producer waits, rather than memory growing."""
    from sidecar import spool as spool_mod

    sp = Spool(str(tmp_path / "spool"), "prod", 1 << 30)
    sp.open()

    def disk_full(_fd: int, _data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "write", disk_full)
    ob = Outbox(3 * ITEM_SIZE, sp, "block", gap_factory)
    ob.set_durable(True)
    done = threading.Event()

    def producer() -> None:
        for i in range(10):
            ob.put(batch(1 + 5 * i))
        done.set()

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    assert not done.wait(1.5)
    assert ob.mem_bytes <= 4 * ITEM_SIZE  # the budget, plus at most the item that found it full
    ob.close()
    t.join(5)
    sp.close()


def test_frames_lost_from_a_deleted_spool_are_reported_once_per_file(spool: Spool,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    ob = Outbox(10_000, spool, "block", gap_factory)
    ob.set_durable(True)
    for first in range(1, 200, 5):
        ob.put(batch(first))
    for seg in Path(spool.root).rglob("*.seg"):
        seg.unlink()
    ob.set_durable(False)
    ob.put(batch(200))
    assert [it.first for it in drain(ob)] == [200]
    assert ob.unreadable_records == 40 * 5
    assert capfd.readouterr().err.count("spool frames unreadable") == 1


def test_a_late_acknowledgement_after_spill_all_changes_nothing(make_spool: Callable[[int], Spool]) -> None:
    sp = make_spool(1)
    ob = Outbox(10_000, sp, "block", gap_factory)
    for i in range(4):
        ob.put(batch(1 + 5 * i, 5))
    ob.put(status(1), force=True)
    assert len(ob.take(2, 1 << 20)) == 2  # in flight when the drain ran out
    assert ob.spill_all() == (20, 0, 0)
    ob.ack(2)  # the sender got its reply after all
    ob.release_inflight()
    assert ob.take(10, 1 << 20) == []  # and takes nothing more
    assert len(ob) == 2 and ob.spooled_records() == 0
    assert spans(contents(ob)) == [("gap", "out", 1, 20), ("status", "status", 1, 1)]
    assert sp.bytes == sum(len(encode_frame(it)) for it in (gap_factory("out", 1, 20), status(1)))

