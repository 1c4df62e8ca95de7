"""Disk spool: CRC frames, segments, orphan adoption, torn and corrupt files."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from sidecar import spool as spool_mod
from sidecar.items import Item
from sidecar.spool import MAGIC, Spool, SpoolError, decode_body, encode_frame, scan

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = 12  # magic, body length, crc


def items_fixture(n: int = 5, producer: str = "prod-1") -> list[Item]:
    out = []
    for i in range(n):
        first = 1 + 10 * i
        kind = ("batch", "status", "gap")[i % 3]
        pubs = None if i % 2 == 0 else [b'{"content":"x%d"}' % i, b"", b"\x00\xff"]
        payload = (b"\x28\xb5\x2f\xfd" if i % 2 else b"{") + bytes([i]) * (20 + i)
        out.append(
            Item(
                f"key:{i % 2}",
                producer,
                first,
                first + 9,
                payload,
                records=10 * (i + 1),
                raw_bytes=100 * (i + 1),
                pubs=pubs,
                kind=kind,
            )
        )
    return out


def seg_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def write_orphan(root: Path, producer: str, items: list[Item]) -> Path:
    """A spool directory left by a sidecar that closed without delivering."""
    s = Spool(str(root), producer, 1 << 30)
    s.open()
    for it in items:
        s.write(it)
    s.close(remove_if_empty=False)
    return root / producer


# -- frames ------------------------------------------------------------------------------


def test_frame_round_trip_all_fields() -> None:
    for it in items_fixture(6):
        frame = encode_frame(it)
        assert frame[:4] == MAGIC
        body = frame[HEAD:]
        assert int.from_bytes(frame[4:8], "little") == len(body)
        assert int.from_bytes(frame[8:12], "little") == zlib.crc32(body)
        back = decode_body(body)
        assert back == it
        assert (back.pubs is None) == (it.pubs is None)


def test_frame_empty_pubs_list_is_not_none() -> None:
    it = Item("k", "p", 1, 1, b"payload", pubs=[])
    back = decode_body(encode_frame(it)[HEAD:])
    assert back.pubs == []
    assert back.pubs is not None


def test_frame_empty_payload() -> None:
    it = Item("k", "p", 3, 2, b"", kind="batch")
    assert decode_body(encode_frame(it)[HEAD:]) == it


# -- write and scan ----------------------------------------------------------------------


def test_write_then_scan_in_order(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "prod-1", 1 << 20)
    s.open()
    items = items_fixture(5)
    refs = [s.write(it) for it in items]
    seg = tmp_path / "prod-1" / "00000001.seg"
    assert seg_files(tmp_path / "prod-1") == ["00000001.seg"]
    scanned = list(scan(str(seg)))
    assert [it for _, _, it in scanned] == items
    offsets = [off for off, _, _ in scanned]
    lengths = [ln for _, ln, _ in scanned]
    assert offsets == [r.offset for r in refs]
    assert lengths == [r.length for r in refs]
    assert offsets[0] == 0
    assert all(offsets[i + 1] == offsets[i] + lengths[i] for i in range(4))
    assert lengths == [len(encode_frame(it)) for it in items]
    assert s.bytes == sum(lengths) == seg.stat().st_size
    for ref, it in zip(refs, items, strict=True):
        assert s.read(ref) == it
        assert (ref.key, ref.first, ref.last, ref.records, ref.raw_bytes, ref.kind) == (
            it.key,
            it.first,
            it.last,
            it.records,
            it.raw_bytes,
            it.kind,
        )
    s.close()


def test_producer_name_made_safe(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "pod/a b:1", 1 << 20)
    s.open()
    assert os.path.isdir(tmp_path / "pod_a_b_1")
    assert os.path.exists(tmp_path / "pod_a_b_1" / "lock")
    s.close()


def test_second_spool_on_same_producer_is_refused(tmp_path: Path) -> None:
    s1 = Spool(str(tmp_path), "prod", 1 << 20)
    s1.open()
    s2 = Spool(str(tmp_path), "prod", 1 << 20)
    with pytest.raises(SpoolError):
        s2.open()
    s1.close()


def test_read_detects_changed_frame(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "p", 1 << 20)
    s.open()
    ref = s.write(Item("k", "p", 1, 1, b"abcdefgh"))
    path = Path(ref.segment.path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolError):
        s.read(ref)
    s.close(remove_if_empty=False)


def test_close_removes_empty_directory(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "p", 1 << 20)
    s.open()
    ref = s.write(Item("k", "p", 1, 1, b"x"))
    s.release(ref)
    s.close()
    assert not (tmp_path / "p").exists()


def test_close_keeps_directory_with_undelivered_items(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "p", 1 << 20)
    s.open()
    s.write(Item("k", "p", 1, 1, b"x"))
    s.close()
    assert seg_files(tmp_path / "p") == ["00000001.seg"]


# -- orphans -----------------------------------------------------------------------------


def test_adopt_orphan_after_close_without_delivery(tmp_path: Path) -> None:
    items = items_fixture(5, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    assert seg_files(orphan) == ["00000001.seg"]
    s2 = Spool(str(tmp_path), "alive", 1 << 20)
    s2.open()
    refs = s2.adopt_orphans()
    assert [s2.read(r) for r in refs] == items
    assert [(r.first, r.last, r.records, r.raw_bytes, r.kind, r.key) for r in refs] == [
        (it.first, it.last, it.records, it.raw_bytes, it.kind, it.key) for it in items
    ]
    assert s2.bytes == sum(len(encode_frame(it)) for it in items)
    # Delivering everything deletes the segment and the orphan directory.
    for r in refs:
        s2.release(r)
    assert s2.bytes == 0
    assert not orphan.exists()
    s2.close()


def test_adopt_orphan_of_process_that_exited_without_close(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from sidecar.spool import Spool\n"
        "from sidecar.items import Item\n"
        "s = Spool(sys.argv[1], 'killed', 1 << 20)\n"
        "s.open()\n"
        "for i in range(1, 4):\n"
        "    s.write(Item('k', 'killed', i, i, b'payload-%d' % i, records=1, raw_bytes=i))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO_ROOT, timeout=60)
    s = Spool(str(tmp_path), "next", 1 << 20)
    s.open()
    refs = s.adopt_orphans()
    got = [s.read(r) for r in refs]
    assert [g.payload for g in got] == [b"payload-1", b"payload-2", b"payload-3"]
    assert [g.first for g in got] == [1, 2, 3]
    assert [g.raw_bytes for g in got] == [1, 2, 3]
    s.close()


def test_spool_without_producer_adopts(tmp_path: Path) -> None:
    items = items_fixture(3, "dead")
    write_orphan(tmp_path, "dead", items)
    s = Spool(str(tmp_path), None, 0)
    s.open()
    assert not s.has_room(1)
    refs = s.adopt_orphans()
    assert [s.read(r) for r in refs] == items
    s.close()


def test_live_lock_prevents_adoption(tmp_path: Path) -> None:
    owner = Spool(str(tmp_path), "owner", 1 << 20)
    owner.open()
    items = items_fixture(3, "owner")
    for it in items:
        owner.write(it)
    other = Spool(str(tmp_path), "other", 1 << 20)
    other.open()
    assert other.adopt_orphans() == []
    assert other.bytes == 0 and other.busy == 1
    assert seg_files(tmp_path / "owner") == ["00000001.seg"]
    # Once the owner is gone, the same items can be adopted.
    owner.close(remove_if_empty=False)
    refs = other.adopt_orphans()
    assert [other.read(r) for r in refs] == items
    other.close()


def test_adopted_directory_is_locked_against_others(tmp_path: Path) -> None:
    items = items_fixture(2, "dead")
    write_orphan(tmp_path, "dead", items)
    a = Spool(str(tmp_path), "a", 1 << 20)
    a.open()
    assert len(a.adopt_orphans()) == 2
    b = Spool(str(tmp_path), "b", 1 << 20)
    b.open()
    assert b.adopt_orphans() == []
    a.close()
    b.close()


def test_own_directory_is_not_adopted(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    s.write(Item("k", "me", 1, 1, b"x"))
    assert s.adopt_orphans() == []
    s.close(remove_if_empty=False)


def test_adopt_across_segments_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 1)  # every write starts a new segment
    items = [Item("k", "dead", i, i, b"p%d" % i, records=1) for i in range(1, 13)]
    orphan = write_orphan(tmp_path, "dead", items)
    assert len(seg_files(orphan)) == 12
    s = Spool(str(tmp_path), "new", 1 << 20)
    s.open()
    refs = s.adopt_orphans()
    assert [s.read(r).first for r in refs] == list(range(1, 13))
    # Releasing one item deletes exactly its segment.
    s.release(refs[4])
    assert "00000005.seg" not in seg_files(orphan)
    assert len(seg_files(orphan)) == 11
    for r in refs[:4] + refs[5:]:
        s.release(r)
    assert not orphan.exists()
    s.close()


def test_adopt_orders_directories_by_mtime(tmp_path: Path) -> None:
    old = write_orphan(tmp_path, "zz-old", [Item("a", "zz-old", 1, 1, b"old")])
    new = write_orphan(tmp_path, "aa-new", [Item("b", "aa-new", 1, 1, b"new")])
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    assert [s.read(r).payload for r in s.adopt_orphans()] == [b"old", b"new"]
    s.close()


def test_empty_orphan_directory_is_removed(tmp_path: Path) -> None:
    s1 = Spool(str(tmp_path), "empty", 1 << 20)
    s1.open()
    s1.close(remove_if_empty=False)
    assert (tmp_path / "empty").is_dir()
    s2 = Spool(str(tmp_path), "me", 1 << 20)
    s2.open()
    assert s2.adopt_orphans() == []
    assert not (tmp_path / "empty").exists()
    s2.close()


def test_orphan_with_only_empty_segment_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "dead"
    d.mkdir()
    (d / "00000001.seg").write_bytes(b"")
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    assert s.adopt_orphans() == []
    assert not d.exists()
    s.close()


def test_adopt_with_missing_root(tmp_path: Path) -> None:
    s = Spool(str(tmp_path / "nope"), None, 0)
    assert s.adopt_orphans() == []


# -- torn and corrupt files --------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 3, 20])
def test_torn_tail_keeps_earlier_frames(tmp_path: Path, cut: int, capfd: pytest.CaptureFixture[str]) -> None:
    items = items_fixture(4, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    size = seg.stat().st_size
    os.truncate(seg, size - cut)
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(seg), damaged)] == items[:3]
    assert damaged == []  # an append cut short by a crash was never written whole
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    refs = s.adopt_orphans()
    assert [s.read(r) for r in refs] == items[:3]
    assert s.bytes == sum(len(encode_frame(it)) for it in items[:3])
    s.close()
    assert "torn" in capfd.readouterr().err


def test_torn_inside_header(tmp_path: Path) -> None:
    items = items_fixture(3, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    keep = sum(len(encode_frame(it)) for it in items[:2]) + 5  # 5 bytes of the third frame's header
    os.truncate(seg, keep)
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(seg), damaged)] == items[:2]
    assert damaged == []


def test_bad_crc_in_middle(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    items = items_fixture(5, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    data = bytearray(seg.read_bytes())
    third = sum(len(encode_frame(it)) for it in items[:2])
    data[third + HEAD + 6] ^= 0x01  # one bit of the third frame's body
    seg.write_bytes(bytes(data))
    assert [it for _, _, it in scan(str(seg))] == items[:2] + items[3:]  # only the damaged frame is lost
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    assert [s.read(r) for r in s.adopt_orphans()] == items[:2] + items[3:]
    assert s.damaged == [f"{seg}@{third}"]
    s.close()
    assert "damaged frames skipped" in capfd.readouterr().err


def test_bad_magic_in_middle(tmp_path: Path) -> None:
    items = items_fixture(3, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    data = bytearray(seg.read_bytes())
    second = len(encode_frame(items[0]))
    data[second : second + 4] = b"XXXX"
    seg.write_bytes(bytes(data))
    assert [it for _, _, it in scan(str(seg))] == [items[0], items[2]]  # on at the third frame's magic


def test_a_corrupt_first_frame_loses_only_itself(tmp_path: Path) -> None:
    items = items_fixture(2, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    data = bytearray(seg.read_bytes())
    data[HEAD] ^= 0xFF
    seg.write_bytes(bytes(data))
    assert [it for _, _, it in scan(str(seg))] == items[1:]


def test_garbage_between_frames_and_a_magic_inside_it(tmp_path: Path) -> None:
    a, b = Item("k", "p", 1, 1, b"first"), Item("k", "p", 2, 2, b"second")
    path = tmp_path / "x.seg"
    path.write_bytes(encode_frame(a) + b"junk" + MAGIC + b"\xff\xff\xff\x7f" + b"more junk" + encode_frame(b)
                     + MAGIC + b"\x05\x00\x00\x00")
    assert [it for _, _, it in scan(str(path))] == [a, b]


def test_undecodable_frame_with_valid_crc_is_skipped(tmp_path: Path) -> None:
    a = Item("k", "p", 1, 1, b"first")
    c = Item("k", "p", 3, 3, b"third")
    body = b"\x05\x00\x00\x00hello"  # header length 5, header not JSON
    bad = MAGIC + len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    path = tmp_path / "x.seg"
    path.write_bytes(encode_frame(a) + bad + encode_frame(c))
    assert [it for _, _, it in scan(str(path))] == [a, c]


def test_scan_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.seg"
    path.write_bytes(b"")
    assert list(scan(str(path))) == []


# -- release and rotation ----------------------------------------------------------------


def test_release_deletes_only_sealed_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 1)
    s = Spool(str(tmp_path), "p", 1 << 20)
    s.open()
    d = tmp_path / "p"
    refs = [s.write(Item("k", "p", i, i, b"x" * 10)) for i in range(1, 4)]
    assert seg_files(d) == ["00000001.seg", "00000002.seg", "00000003.seg"]
    s.release(refs[0])
    assert seg_files(d) == ["00000002.seg", "00000003.seg"]
    s.release(refs[2])  # the segment being written stays
    assert seg_files(d) == ["00000002.seg", "00000003.seg"]
    s.release(refs[1])
    assert seg_files(d) == ["00000003.seg"]
    assert s.bytes == 0
    s.close()
    assert not d.exists()


def test_segment_with_live_items_is_kept(tmp_path: Path) -> None:
    items = items_fixture(3, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    s = Spool(str(tmp_path), "me", 1 << 20)
    s.open()
    refs = s.adopt_orphans()
    s.release(refs[0])
    s.release(refs[1])
    assert seg_files(orphan) == ["00000001.seg"]
    assert s.bytes == len(encode_frame(items[2]))
    s.release(refs[2])
    assert not orphan.exists()
    s.close()


def test_rotation_closes_previous_segment_when_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 1)
    s = Spool(str(tmp_path), "p", 1 << 20)
    s.open()
    r1 = s.write(Item("k", "p", 1, 1, b"a"))
    s.release(r1)  # not sealed yet: the file stays
    assert seg_files(tmp_path / "p") == ["00000001.seg"]
    s.write(Item("k", "p", 2, 2, b"b"))  # rotation seals and removes the empty segment
    assert seg_files(tmp_path / "p") == ["00000002.seg"]
    s.close(remove_if_empty=False)


# -- room --------------------------------------------------------------------------------


def test_has_room_respects_max_bytes(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), "p", 1000)
    assert not s.has_room(1)  # not opened: no room at all
    s.open()
    assert s.has_room(1000)
    assert not s.has_room(1001)
    ref = s.write(Item("k", "p", 1, 1, b"y" * 100))
    used = ref.length
    assert s.bytes == used
    assert s.has_room(1000 - used)
    assert not s.has_room(1000 - used + 1)
    s.release(ref)
    assert s.bytes == 0
    assert s.has_room(1000)
    s.close()
    assert not s.has_room(1)


def test_adopted_bytes_count_against_room(tmp_path: Path) -> None:
    items = items_fixture(2, "dead")
    write_orphan(tmp_path, "dead", items)
    total = sum(len(encode_frame(it)) for it in items)
    s = Spool(str(tmp_path), "me", total + 10)
    s.open()
    refs = s.adopt_orphans()
    assert s.bytes == total
    assert s.has_room(10)
    assert not s.has_room(11)
    for r in refs:
        s.release(r)
    assert s.has_room(total + 10)
    s.close()


# -- a full disk ------------------------------------------------------------------------------


def test_a_short_write_fails_leaves_no_torn_frame_and_pauses_the_spool(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    s = Spool(str(tmp_path / "sp"), "prod-1", 1 << 20)
    s.open()
    items = items_fixture(4)
    good = s.write(items[0])
    real_write = os.write
    monkeypatch.setattr(spool_mod.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError):
        s.write(items[1])
    assert not s.has_room(1)  # counts as full for a while after the failure
    monkeypatch.setattr(spool_mod.os, "write", real_write)
    monkeypatch.setattr(spool_mod, "WRITE_RETRY_S", 0.0)
    s._failed_until = 0.0
    assert s.has_room(1)
    s.write(items[2])
    s.close(remove_if_empty=False)
    seg = good.segment.path
    assert [(it.first, it.payload) for _o, _l, it in scan(seg)] == [(items[0].first, items[0].payload),
                                                                    (items[2].first, items[2].payload)]


def test_a_segment_that_cannot_be_opened_keeps_the_old_one_usable(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 1)  # every write rotates
    s = Spool(str(tmp_path / "sp"), "prod-1", 1 << 20)
    s.open()
    items = items_fixture(3)
    s.write(items[0])
    real_open = os.open

    def no_more_files(path: str, *a: object, **kw: object) -> int:
        if path.endswith(".seg"):
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_mod.os, "open", no_more_files)
    with pytest.raises(OSError):
        s.write(items[1])
    monkeypatch.setattr(spool_mod.os, "open", real_open)
    s._failed_until = 0.0
    ref = s.write(items[2])
    s.close(remove_if_empty=False)  # no stale descriptor is closed twice
    files = sorted(p for p in os.listdir(os.path.dirname(ref.segment.path)) if p.endswith(".seg"))
    got = [it.first for f in files for _o, _l, it in scan(os.path.join(os.path.dirname(ref.segment.path), f))]
    assert got == [items[0].first, items[2].first]


def test_orphans_of_other_runs_are_left_alone(tmp_path: Path) -> None:
    items = items_fixture(4, "dead")  # keys key:0 and key:1
    orphan = write_orphan(tmp_path, "dead", items)
    other = Spool(str(tmp_path), "run-b", 1 << 20)
    other.open()
    assert other.adopt_orphans(accept={"key:0"}.__contains__) == []  # key:1 is not this run's
    assert other.skipped == 1 and other.bytes == 0
    assert seg_files(orphan) == ["00000001.seg"]
    other.close()
    own = Spool(str(tmp_path), "run-a", 1 << 20)
    own.open()
    refs = own.adopt_orphans(accept={"key:0", "key:1"}.__contains__)
    assert [own.read(r) for r in refs] == items and own.skipped == 0
    own.close()


def test_an_orphan_that_cannot_be_locked_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_orphan(tmp_path, "dead", items_fixture(2, "dead"))
    s = Spool(str(tmp_path), None, 1 << 20)
    s.open()

    def read_only(_path: str) -> int:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(spool_mod, "_try_lock", read_only)
    assert s.adopt_orphans() == []
    assert len(s.unusable) == 1 and "Read-only file system" in s.unusable[0]
    s.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_segment_that_is_not_a_regular_file_is_reported_and_left_alone(tmp_path: Path, kind: str) -> None:
    """A symlink to /dev/zero would be read forever and a FIFO would block: neither is read,
    and the directory's readable segments stay where they are, in order with it."""
    orphan = write_orphan(tmp_path, "dead", items_fixture(2, "dead"))
    odd = orphan / "00000099.seg"
    if kind == "symlink":
        odd.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.mkdir()
    before = seg_files(orphan)
    s = Spool(str(tmp_path), None, 1 << 20)
    s.open()
    assert s.adopt_orphans() == []
    assert len(s.unusable) == 1 and "00000099.seg" in s.unusable[0]
    assert ("a symbolic link" if kind == "symlink" else "not a regular file") in s.unusable[0]
    s.close()
    assert seg_files(orphan) == before
    # Once the odd file is gone, everything is adopted in order.
    (odd.rmdir if kind == "directory" else odd.unlink)()
    s = Spool(str(tmp_path), None, 1 << 20)
    s.open()
    assert [s.read(r).first for r in s.adopt_orphans()] == [it.first for it in items_fixture(2, "dead")]
    s.close()


def test_files_named_like_segments_but_not_numbered_are_left_alone(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    orphan = write_orphan(tmp_path, "dead", items_fixture(3, "dead"))
    (orphan / "notes.seg").write_bytes(b"not a segment")
    s = Spool(str(tmp_path), None, 1 << 20)
    s.open()
    refs = s.adopt_orphans()
    assert [s.read(r).first for r in refs] == [it.first for it in items_fixture(3, "dead")]
    for r in refs:
        s.release(r)
    s.close()
    assert "files that are not segments left alone" in capfd.readouterr().err
    assert sorted(os.listdir(orphan)) == ["lock", "notes.seg"]


def test_a_corrupt_length_does_not_skip_the_frames_it_spans(tmp_path: Path) -> None:
    items = [Item("k", "p", i, i, b"x" * 200) for i in range(1, 21)]
    path = tmp_path / "x.seg"
    frames = [encode_frame(it) for it in items]
    data = bytearray(b"".join(frames))
    second = len(frames[0])
    data[second + 5] ^= 0x08  # the second frame's length grows by 2048: it would span frames 3 to 10
    path.write_bytes(bytes(data))
    assert [it.first for _, _, it in scan(str(path))] == [1, *range(3, 21)]


def test_replay_exits_1_when_spool_frames_cannot_be_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    from sidecar import replay
    from tests.redis_harness import find_free_port

    write_orphan(tmp_path, "dead", items_fixture(3, "dead"))

    def vanished(self: Spool, ref: object) -> Item:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(Spool, "read", vanished)
    code = replay.main(["--spool-dir", str(tmp_path), "--redis-url", f"redis://127.0.0.1:{find_free_port()}/0",
                        "--timeout", "5"])
    err = capfd.readouterr().err
    assert code == 1, err
    assert "spool frames could not be read back" in err and err.count("spool frames unreadable") == 1


def test_a_corrupt_last_frame_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    """A last frame whose length fits the file but whose checksum fails was written whole and
    changed since: it counts as damaged (replay exits 1), unlike a tail cut short."""
    items = items_fixture(3, "dead")
    orphan = write_orphan(tmp_path, "dead", items)
    seg = orphan / "00000001.seg"
    data = bytearray(seg.read_bytes())
    last = sum(len(encode_frame(it)) for it in items[:2])
    data[-1] ^= 0x01
    seg.write_bytes(bytes(data))
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(seg), damaged)] == items[:2]
    assert damaged == [f"{seg}@{last}"]


@pytest.mark.parametrize("cut", [5, 40])
def test_a_torn_tail_holding_the_magic_in_its_text_is_still_a_torn_tail(tmp_path: Path, cut: int) -> None:
    """The agent's text may hold the magic (b"ASP1"): reading goes on there, finds no valid
    frame, and the cut-short append is a torn tail, not damage."""
    a = Item("k", "p", 1, 1, b"first")
    b = Item("k", "p", 2, 2, b"model " + MAGIC + b" ready " + MAGIC + b"\x10\x00\x00\x00 and more text after it")
    path = tmp_path / "x.seg"
    path.write_bytes(encode_frame(a) + encode_frame(b)[:-cut])
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(path), damaged)] == [a]
    assert damaged == []


def test_skipped_bytes_followed_by_a_valid_frame_are_damage(tmp_path: Path) -> None:
    a, b, c = (Item("k", "p", i, i, b"text " + MAGIC + b" %d" % i) for i in (1, 2, 3))
    fb = bytearray(encode_frame(b))
    fb[-1] ^= 1  # written whole, changed since
    path = tmp_path / "x.seg"
    path.write_bytes(encode_frame(a) + bytes(fb) + encode_frame(c))
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(path), damaged)] == [a, c]
    assert damaged and damaged[0] == f"{path}@{len(encode_frame(a))}"


def test_a_short_remainder_is_a_torn_tail_only_if_it_could_start_a_frame(tmp_path: Path) -> None:
    a = Item("k", "p", 1, 1, b"first")
    for tail, torn in ((MAGIC[:3], True), (MAGIC + b"\x05", True), (b"\0" * 11, False), (b"garbage-gar", False),
                       (b"\0" * 12, False)):
        path = tmp_path / "x.seg"
        path.write_bytes(encode_frame(a) + tail)
        damaged: list[str] = []
        assert [it for _, _, it in scan(str(path), damaged)] == [a]
        assert damaged == ([] if torn else [f"{path}@{len(encode_frame(a))}"]), tail


def test_a_damaged_frame_before_a_torn_tail_is_the_only_damage(tmp_path: Path) -> None:
    items = items_fixture(3, "dead")
    frames = [encode_frame(it) for it in items]
    second = bytearray(frames[1])
    second[-1] ^= 1
    path = tmp_path / "x.seg"
    path.write_bytes(frames[0] + bytes(second) + frames[2][:-5])
    damaged: list[str] = []
    assert [it for _, _, it in scan(str(path), damaged)] == items[:1]
    assert damaged == [f"{path}@{len(frames[0])}"]
