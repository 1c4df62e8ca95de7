"""Crash-safe disk spool: append-only segment files of CRC-framed items.

Layout: ``SPOOL_DIR/<producer>/<n>.seg`` plus a ``lock`` file held (flock) while the
producer lives. A directory whose lock is free belongs to a sidecar that is gone: its
items are delivered first by the next sidecar or by ``replay``. Every frame carries its
length and CRC32, so a tail torn by SIGKILL or a full disk is detected and skipped, and so is
a corrupt frame elsewhere (reading goes on with the next one).
Delivery is idempotent on the Redis side, so a frame delivered before a crash and sent
again is not duplicated in the stream.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator

from . import log
from .items import Item

MAGIC = b"ASP1"
# Where a delivered segment with damaged frames is kept, for inspection: a hidden directory of
# the spool root (adoption skips dot-names), so that its producer directory can go.
DAMAGED_DIR = ".damaged"
_HEAD = struct.Struct("<4sII")  # magic, body length, crc32 of body
_U32 = struct.Struct("<I")
SEGMENT_BYTES = 16 << 20
WRITE_RETRY_S = 1.0  # after a failed write, the spool counts as full this long
MAX_FRAME = 1 << 30


class SpoolError(OSError):
    pass


class Segment:
    __slots__ = ("path", "live", "size", "sealed", "owner", "damaged")

    def __init__(self, path: str, live: int = 0, size: int = 0, sealed: bool = False,
                 owner: ProducerDir | None = None) -> None:
        self.path = path
        self.live = live
        self.size = size
        self.sealed = sealed
        self.owner = owner
        self.damaged = False  # frames of it could not be read back: kept in DAMAGED_DIR once delivered


class DiskRef:
    """Where an item lies on disk, with the figures needed for accounting."""

    __slots__ = ("segment", "offset", "length", "key", "first", "last", "records", "raw_bytes", "kind")

    def __init__(self, segment: Segment, offset: int, length: int, key: str, first: int, last: int, records: int,
                 raw_bytes: int, kind: str) -> None:
        self.segment = segment
        self.offset = offset
        self.length = length
        self.key = key
        self.first = first
        self.last = last
        self.records = records
        self.raw_bytes = raw_bytes
        self.kind = kind


class ProducerDir:
    __slots__ = ("path", "lock_fd", "segments", "foreign")

    def __init__(self, path: str, lock_fd: int, segments: list[Segment] | None = None,
                 foreign: bool = False) -> None:
        self.path = path
        self.lock_fd = lock_fd
        self.segments: list[Segment] = [] if segments is None else segments
        self.foreign = foreign


def encode_frame(item: Item) -> bytes:
    import orjson  # only when output goes to disk: its import costs every start ~10 ms

    header = orjson.dumps(
        {"k": item.key, "p": item.producer, "f": item.first, "l": item.last, "r": item.records,
         "b": item.raw_bytes, "t": item.kind, "n": -1 if item.pubs is None else len(item.pubs)}
    )
    parts = [_U32.pack(len(header)), header, _U32.pack(len(item.payload)), item.payload]
    for pub in item.pubs or ():
        parts += [_U32.pack(len(pub)), pub]
    body = b"".join(parts)
    return _HEAD.pack(MAGIC, len(body), zlib.crc32(body)) + body


def decode_body(body: bytes) -> Item:
    import orjson

    (hlen,) = _U32.unpack_from(body, 0)
    h = orjson.loads(body[4 : 4 + hlen])
    pos = 4 + hlen
    (plen,) = _U32.unpack_from(body, pos)
    payload = body[pos + 4 : pos + 4 + plen]
    pos += 4 + plen
    pubs: list[bytes] | None = None
    if h["n"] >= 0:
        pubs = []
        for _ in range(h["n"]):
            (n,) = _U32.unpack_from(body, pos)
            pubs.append(body[pos + 4 : pos + 4 + n])
            pos += 4 + n
    return Item(h["k"], h["p"], h["f"], h["l"], payload, h["r"], h["b"], pubs, h["t"])


SEGMENT_NAME = re.compile(r"[0-9]+\.seg")


def read_segment(path: str) -> bytes:
    """A segment's bytes. Only a regular file is read: a symlink, a FIFO or a device in a spool
    directory (put there by hand) raises SpoolError instead of blocking or reading forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise SpoolError(f"{path}: {reason}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        data = b""
        if regular:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read()
    except OSError as exc:
        raise SpoolError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not regular:
        raise SpoolError(f"{path}: not a regular file")
    return data


def scan(path: str, damaged: list[str] | None = None) -> Iterator[tuple[int, int, Item]]:
    """(offset, frame length, item) for each valid frame. Past a frame its checksum does not
    vouch for, reading goes on at the next frame's magic. Each place skipped is noted in
    ``damaged`` as "path@offset", but for a torn tail: the last append cut short by a crash
    (a frame that starts with the magic but ends past the end of the file, or the start of
    one shorter than a header, with no valid frame after it; whatever follows its start is
    taken as part of it). A damaged last frame that looks cut short passes for a torn tail.
    SpoolError when the segment cannot be read (see read_segment)."""
    data = read_segment(path)
    pos = 0
    pending: list[int] = []  # places skipped since the last valid frame
    cut_at: int | None = None  # the first of them that looks like an append cut short
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            if cut_at is None and MAGIC.startswith(data[pos : pos + len(MAGIC)]):
                cut_at = pos
            pending.append(pos)
            break
        magic, blen, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + blen
        body = data[pos + _HEAD.size : end]
        if magic != MAGIC or blen > MAX_FRAME or end > len(data) or zlib.crc32(body) != crc:
            # Not a frame the checksum vouches for, and its length may be what is wrong: go
            # on at the next frame's magic, if any (the checksum checks what is found there).
            if cut_at is None and magic == MAGIC and end > len(data):
                cut_at = pos
            pending.append(pos)
            nxt = data.find(MAGIC, pos + 1)
            if nxt < 0:
                break
            pos = nxt
            continue
        if pending:  # a valid frame follows: what was skipped was damaged, not torn
            _damaged(path, pending, damaged)
            pending, cut_at = [], None
        try:
            item = decode_body(body)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("spool: undecodable frame skipped", file=path, offset=pos, error=str(exc))
            if damaged is not None:
                damaged.append(f"{path}@{pos}")
            pos = end
            continue
        yield pos, end - pos, item
        pos = end
    if pending:
        # No valid frame after them. From the first place that looks cut short on, it is the
        # torn tail; what comes before it was damaged.
        lost = pending if cut_at is None else pending[: pending.index(cut_at)]
        if lost:
            _damaged(path, lost, damaged)
        if cut_at is not None:
            log.warning("spool: torn frame at end of file skipped (an append cut short by a crash)", file=path,
                        offset=cut_at)


def _damaged(path: str, offsets: list[int], damaged: list[str] | None) -> None:
    log.warning("spool: damaged frames skipped", file=path, offsets=",".join(map(str, offsets[:10])))
    if damaged is not None:
        damaged.extend(f"{path}@{off}" for off in offsets)


def _try_lock(path: str) -> int | None:
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class Spool:
    """One producer's spool directory plus the orphaned directories it adopted."""

    def __init__(self, root: str, producer: str | None, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.bytes = 0  # bytes of frames not yet delivered, own and adopted
        self._own: ProducerDir | None = None
        self._producer = producer
        self._write_seg: Segment | None = None  # None: the next write starts a new segment
        self._last_seg: Segment | None = None  # the segment _write_fh belongs to
        self._write_fh: int | None = None
        self._failed_until = 0.0
        self._seq = 0
        self._adopted: list[ProducerDir] = []
        self.skipped = 0  # orphaned directories adopt_orphans left alone
        self.busy = 0  # directories another process holds (a live sidecar, a running replay)
        self.unusable: list[str] = []  # orphaned directories that could not be locked, and why
        self.damaged: list[str] = []  # frames of adopted segments that could not be read back ("path@offset")

    def open(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if self._producer is not None:
            # Create and lock under a hidden name, then rename: another sidecar scanning for
            # orphans must never see our directory unlocked.
            path = os.path.join(self.root, _safe(self._producer))
            tmp = os.path.join(self.root, "." + _safe(self._producer) + ".new")
            os.makedirs(tmp, mode=0o700, exist_ok=True)
            fd = _try_lock(tmp)
            if fd is None:
                raise SpoolError(f"spool directory {tmp} is locked by another process")
            try:
                os.rename(tmp, path)
            except OSError:
                os.close(fd)
                for leftover in ("lock", ""):
                    try:
                        (os.unlink if leftover else os.rmdir)(os.path.join(tmp, leftover) if leftover else tmp)
                    except OSError:
                        pass
                raise SpoolError(f"spool directory {path} is in use by another process") from None
            self._own = ProducerDir(path, fd)

    def adopt_orphans(self, accept: Callable[[str], bool] | None = None) -> list[DiskRef]:
        """Lock every directory left by a sidecar that is gone; return its items in order.
        With ``accept``, a directory holding an item whose key it refuses is left alone (for
        ``replay``, or for a sidecar of its own run); ``self.skipped`` counts those."""
        refs: list[DiskRef] = []
        try:
            names = sorted(os.listdir(self.root), key=lambda n: _mtime(os.path.join(self.root, n)))
        except OSError:
            return refs
        if DAMAGED_DIR in names:
            try:
                kept = os.listdir(os.path.join(self.root, DAMAGED_DIR))
            except OSError:
                kept = []
            if kept:
                log.warning("spool: segments with damaged frames kept for inspection (delete them when done)",
                            directory=os.path.join(self.root, DAMAGED_DIR), files=len(kept))
        for name in names:
            path = os.path.join(self.root, name)
            if name.startswith(".") or self._own is not None and path == self._own.path or not os.path.isdir(path):
                continue
            try:
                fd = _try_lock(path)
            except OSError as exc:
                self.unusable.append(f"{path}: {exc.strerror or exc}")
                continue
            if fd is None:
                self.busy += 1  # a live sidecar or a running replay owns it
                continue
            pdir = ProducerDir(path, fd, foreign=True)
            try:
                names = os.listdir(path)
            except OSError:
                os.close(fd)  # taken and emptied by another sidecar meanwhile
                continue
            segs = sorted((s for s in names if SEGMENT_NAME.fullmatch(s)), key=lambda s: int(s[:-4]))
            strays = [s for s in names if s.endswith(".seg") and not SEGMENT_NAME.fullmatch(s)]
            if strays:
                log.warning("spool: files that are not segments left alone", directory=path, files=strays[:5])
            found: list[tuple[Segment, list[DiskRef], int]] = []
            damaged_before = len(self.damaged)
            refused = False
            try:
                for seg_name in segs:
                    seg = Segment(os.path.join(path, seg_name), sealed=True, owner=pdir)
                    before = len(self.damaged)
                    seg_refs = [_ref(seg, off, length, item) for off, length, item in scan(seg.path, self.damaged)]
                    seg.damaged = len(self.damaged) > before
                    if accept is not None and any(not accept(r.key) for r in seg_refs):
                        refused = True
                        break
                    found.append((seg, seg_refs, sum(r.length for r in seg_refs)))
            except SpoolError as exc:
                # Nothing of this directory is taken or deleted: its readable segments stay
                # in order with the unreadable one until someone sees to it.
                os.close(fd)
                self.unusable.append(f"unreadable segment {exc}")
                del self.damaged[damaged_before:]  # not taken: not ours to report
                continue
            if refused:
                os.close(fd)
                self.skipped += 1
                del self.damaged[damaged_before:]
                continue
            for seg, seg_refs, nbytes in found:
                pdir.segments.append(seg)
                refs.extend(seg_refs)
                seg.live += len(seg_refs)
                self.bytes += nbytes
                if seg.live == 0:
                    self._unlink(seg)
            self._adopted.append(pdir)
            self._maybe_remove_dir(pdir)
        return refs

    def has_room(self, nbytes: int) -> bool:
        """Within the byte budget, and not failing: after a failed write (a full disk) the
        spool counts as full for WRITE_RETRY_S, so --when-full applies instead of memory
        growing without bound."""
        return self.bytes + nbytes <= self.max_bytes and self.usable()

    def usable(self) -> bool:
        """Open for writing and not failing, whatever its byte budget."""
        return self._own is not None and time.monotonic() >= self._failed_until

    def write(self, item: Item) -> DiskRef:
        assert self._own is not None
        frame = encode_frame(item)
        seg = self._write_seg
        if seg is None or seg.size >= SEGMENT_BYTES:
            self._rotate()
            seg = self._write_seg
            assert seg is not None
        assert self._write_fh is not None
        offset = seg.size
        try:
            written = os.write(self._write_fh, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, f"short write to the spool ({written} of {len(frame)} bytes)")
        except OSError:
            self._failed_until = time.monotonic() + WRITE_RETRY_S
            # Leave no half frame behind for the next frame to be appended after.
            try:
                os.ftruncate(self._write_fh, offset)
            except OSError:
                self._write_seg = None  # unusable: the next write starts a new segment
            raise
        self._failed_until = 0.0
        seg.size += len(frame)
        seg.live += 1
        self.bytes += len(frame)
        return _ref(seg, offset, len(frame), item)

    def read(self, ref: DiskRef) -> Item:
        with open(ref.segment.path, "rb") as fh:
            fh.seek(ref.offset)
            frame = fh.read(ref.length)
        magic, blen, crc = _HEAD.unpack_from(frame, 0)
        body = frame[_HEAD.size :]
        if magic != MAGIC or zlib.crc32(body) != crc:
            raise SpoolError(f"spool frame at {ref.segment.path}:{ref.offset} changed on disk")
        return decode_body(body)

    def release(self, ref: DiskRef) -> None:
        """The item is delivered (or given up): forget it, delete its segment when empty."""
        seg = ref.segment
        seg.live -= 1
        self.bytes -= ref.length
        if seg.live <= 0 and seg.sealed:
            self._unlink(seg)
            if seg.owner is not None and seg.owner.foreign:
                self._maybe_remove_dir(seg.owner)

    def close(self, *, remove_if_empty: bool = True) -> None:
        if self._write_fh is not None:
            os.close(self._write_fh)
            self._write_fh = None
        if self._last_seg is not None:
            self._last_seg.sealed = True
            if self._last_seg.live <= 0:
                self._unlink(self._last_seg)
        if self._own is not None:
            if remove_if_empty:
                self._maybe_remove_dir(self._own, force_check=True)
            os.close(self._own.lock_fd)
            self._own = None
        for pdir in self._adopted:
            try:
                os.close(pdir.lock_fd)
            except OSError:
                pass
        self._adopted = []

    def _rotate(self) -> None:
        """Start a new segment. The new file is opened first: if that fails, the old one
        stays as it was and the error goes to the caller."""
        assert self._own is not None
        self._seq += 1
        path = os.path.join(self._own.path, f"{self._seq:08d}.seg")
        try:
            fh = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        except OSError:
            self._failed_until = time.monotonic() + WRITE_RETRY_S
            raise
        if self._write_fh is not None:
            os.close(self._write_fh)
        old = self._last_seg
        if old is not None:
            old.sealed = True
            if old.live <= 0:
                self._unlink(old)
        self._write_fh = fh
        self._write_seg = self._last_seg = Segment(path, owner=self._own)
        self._own.segments.append(self._write_seg)

    def _unlink(self, seg: Segment) -> None:
        """Delete a delivered segment; one with damaged frames is moved to DAMAGED_DIR for
        inspection, as ``<producer directory>-<segment>``."""
        try:
            if seg.damaged:
                kept = os.path.join(self.root, DAMAGED_DIR)
                os.makedirs(kept, mode=0o700, exist_ok=True)
                name = f"{os.path.basename(os.path.dirname(seg.path))}-{os.path.basename(seg.path)}"
                os.replace(seg.path, os.path.join(kept, name))
            else:
                os.unlink(seg.path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # kept where it is, then: the next look at the spool reports it again
            log.warning("spool: a damaged segment could not be set aside", file=seg.path, error=str(exc))
        if seg.owner is not None and seg in seg.owner.segments:
            seg.owner.segments.remove(seg)

    def _maybe_remove_dir(self, pdir: ProducerDir, force_check: bool = False) -> None:
        if pdir.segments and not force_check:
            return
        try:
            leftover = [n for n in os.listdir(pdir.path) if n != "lock"]
        except OSError:
            return
        if not leftover:
            try:
                os.unlink(os.path.join(pdir.path, "lock"))
                os.rmdir(pdir.path)
            except OSError:
                pass


def _ref(seg: Segment, offset: int, length: int, item: Item) -> DiskRef:
    return DiskRef(seg, offset, length, item.key, item.first, item.last, item.records, item.raw_bytes, item.kind)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
