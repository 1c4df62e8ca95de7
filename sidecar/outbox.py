"""What waits for Redis: one FIFO, a disk prefix (the spool) followed by a memory suffix.

New items join the memory tail. When memory passes its limit, the oldest memory item moves
to the spool tail, which keeps the order (disk items are always the oldest). While Redis
is unreachable every item goes to disk at once (``set_durable``), so a sidecar killed
during an outage leaves its backlog in the spool. When both are full, ``block`` makes
``put`` wait (the reader stops, the agent blocks on write) and ``drop`` replaces the
oldest waiting batch in memory by a gap marker.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from . import log
from .items import Item
from .spool import DiskRef, Spool, SpoolError

GapFactory = Callable[[str, int, int], Item]
PAUSED_TOLD_EVERY_S = 60.0  # the warning that reading pauses, at most this often


class Outbox:
    def __init__(
        self,
        mem_max: int,
        spool: Spool | None,
        when_full: str,
        gap_factory: GapFactory,
    ) -> None:
        self.mem_max = mem_max
        self.spool = spool
        self.when_full = when_full
        self._gap = gap_factory
        # Sections take the lock itself (a C-level context manager); the conditions are for
        # wait and notify. Re-entrant: a section may call another that takes it. The sender
        # thread waits on ``cond`` for work; a blocked ``put`` waits on ``room``, so that an
        # acknowledgement (room) does not wake the sender thread (no work).
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.room = threading.Condition(self.lock)
        self._room_waiters = 0  # producers waiting in put: ack wakes them only when there are some
        self._q: deque[Item | DiskRef] = deque()
        self._ndisk = 0  # length of the disk prefix of _q
        self.unreadable_records = 0  # records of spool frames that could not be read back
        self._unreadable_told: set[str] = set()
        self._inflight = 0  # head entries handed to the sender and not yet acknowledged
        self._durable = False
        self._closing = False
        self._final = False  # spill_all has run: the queue is what the spool holds, the sender is done
        self.mem_bytes = 0
        self.waiting_records = 0
        self.waiting_bytes = 0
        self.dropped_records = 0
        self.blocked_since: float | None = None
        self._paused_told: float | None = None

    # -- producer side -------------------------------------------------------------------
    def put(self, item: Item, *, force: bool = False, wake: bool = True) -> None:
        """Queue ``item``. Blocks while full under ``block`` unless ``force`` (control messages).
        ``wake=False`` leaves the sender thread asleep: the caller delivers the item itself or
        calls ``notify``."""
        with self.lock:
            if not force:
                if self.when_full == "block":
                    while self._full(item.size) and not self._closing:
                        if self.blocked_since is None:
                            self.blocked_since = now = time.monotonic()
                            if self._paused_told is None or now - self._paused_told >= PAUSED_TOLD_EVERY_S:
                                # once a minute at most: a Redis slower than the agent blocks
                                # and frees it many times a second
                                self._paused_told = now
                                log.warning(f"{self.full_text()}: pausing reads, the agent will block on write")
                        self._room_waiters += 1
                        try:
                            self.room.wait(0.5)
                        finally:
                            self._room_waiters -= 1
                    self.blocked_since = None
                else:
                    while self._full(item.size) and self._drop_oldest():
                        pass
                    if self._full(item.size):
                        self._append(self._gap(item.key, item.first, item.last))
                        self._note_drop(item.records)
                        self.cond.notify_all()
                        return
            self._append(item)
            if wake:
                self.cond.notify_all()

    def _full(self, size: int) -> bool:
        """No room for ``size`` more bytes: memory is over budget and the spool cannot take the
        oldest memory items (no spool, over its limit, or failing to write)."""
        while self._q and self.mem_bytes + size > self.mem_max:
            if self.spool is None:
                return True
            if self.mem_bytes == 0:
                return not self.spool.has_room(size)  # the item itself will go on to disk
            if not self._spill_one():
                return True
        return False  # an item larger than the whole buffer still goes in when nothing waits

    def _append(self, item: Item) -> None:
        self.waiting_records += item.records
        self.waiting_bytes += item.raw_bytes
        if self._durable and self.spool is not None and len(self._q) == self._ndisk and self.spool.has_room(item.size):
            ref = self._to_disk(item)
            if ref is not None:
                self._q.append(ref)
                self._ndisk += 1
                return
        self._q.append(item)
        self.mem_bytes += item.size
        while self.mem_bytes > self.mem_max and self._spill_one():
            pass

    def _to_disk(self, item: Item) -> DiskRef | None:
        assert self.spool is not None
        try:
            return self.spool.write(item)
        except OSError as exc:
            log.error("spool write failed; keeping the item in memory", error=str(exc))
            return None

    def _spill_one(self) -> bool:
        """Move the oldest memory item to the spool tail. False when that is not possible."""
        if self.spool is None or self._ndisk >= len(self._q):
            return False
        item = self._q[self._ndisk]
        assert isinstance(item, Item)
        if not self.spool.has_room(item.size):
            return False
        ref = self._to_disk(item)
        if ref is None:
            return False
        self._q[self._ndisk] = ref
        self._ndisk += 1
        self.mem_bytes -= item.size
        return True

    def full_text(self) -> str:
        return "buffer and spool are full" if self.spool is not None else "buffer is full"

    def _note_drop(self, records: int) -> None:
        if not self.dropped_records:
            log.warning(f"{self.full_text()}: dropping the oldest waiting output (--when-full drop); "
                        "gap markers in the streams say what is missing")
        self.dropped_records += records

    def _drop_oldest(self) -> bool:
        """Replace the oldest waiting output batch in memory by a gap marker."""
        for i in range(max(self._inflight, self._ndisk), len(self._q)):
            entry = self._q[i]
            assert isinstance(entry, Item)
            if entry.kind != "batch":
                continue
            gap = self._gap(entry.key, entry.first, entry.last)
            self.mem_bytes += gap.size - entry.size
            self.waiting_records -= entry.records
            self.waiting_bytes -= entry.raw_bytes
            self._note_drop(entry.records)
            prev = self._q[i - 1] if i > max(self._inflight, self._ndisk) else None
            if isinstance(prev, Item) and prev.kind == "gap" and prev.key == gap.key and prev.last + 1 == gap.first:
                merged = self._gap(gap.key, prev.first, gap.last)
                self.mem_bytes += merged.size - prev.size - gap.size
                self._q[i - 1] = merged
                del self._q[i]
            else:
                self._q[i] = gap
            return True
        return False

    def set_durable(self, durable: bool) -> None:
        """While Redis is down, move everything waiting to disk and send new items there."""
        with self.lock:
            self._durable = durable
            if durable:
                while self._spill_one():
                    pass

    def spill_all(self) -> tuple[int, int, int]:
        """At exit, move what is in memory to the spool. Output batches that do not fit are
        replaced by gap markers; gap markers and status messages go in even past the spool's
        limit (they are small, and a consumer must learn how the run ended and what is
        missing). Returns (records replaced by gap markers, records lost, items lost): lost
        means not written at all (no spool, or the disk refused the write).

        Batches the sender may still get into Redis (in flight, or sent before a lost reply)
        can be among them: the append script writes a gap marker unless all of its range
        already landed, and then names only the rest. From now on the sender's
        acknowledgements are ignored (a late one must not release a frame)."""
        with self.lock:
            self._final = True
            self._inflight = 0
            while self._spill_one():
                pass
            rest = [e for e in list(self._q)[self._ndisk :] if isinstance(e, Item)]
            if self.spool is None or not rest or not self.spool.usable():
                return 0, sum(e.records for e in rest), len(rest)
            for _ in rest:
                self._remove_at(len(self._q) - 1)
            small: list[tuple[Item, int]] = []  # (item, output records it stands for)
            for e in rest:
                if e.kind == "batch":
                    self._gap_for(small, e)
                else:
                    small.append((e, 0))
            gapped = sum(n for _, n in small)
            for i, (e, _) in enumerate(small):
                ref = self._to_disk(e)
                if ref is None:
                    left = small[i:]
                    for x, _ in left:  # kept in memory, as without a spool: lost at exit
                        self._q.append(x)
                        self.mem_bytes += x.size
                    lost = sum(n for _, n in left)
                    return gapped - lost, lost, len(left)
                self._q.append(ref)
                self._ndisk += 1
            return gapped, 0, 0

    def spooled_records(self) -> int:
        with self.lock:
            return sum(self._q[i].records for i in range(self._ndisk))

    def _gap_for(self, out: list[tuple[Item, int]], batch: Item) -> None:
        """Append a gap marker for ``batch`` to ``out``, merged into the last marker of the same
        key when the ranges touch."""
        for j in range(len(out) - 1, -1, -1):
            prev, n = out[j]
            if prev.key != batch.key:
                continue
            if prev.kind == "gap" and n and prev.last + 1 == batch.first:
                out[j] = (self._gap(batch.key, prev.first, batch.last), n + batch.records)
                return
            break
        out.append((self._gap(batch.key, batch.first, batch.last), batch.records))

    # -- sender side ---------------------------------------------------------------------
    def take(self, max_items: int, max_bytes: int) -> list[Item]:
        """The next items not yet handed out, without removing them (see ``ack``)."""
        out: list[Item] = []
        with self.lock:
            if self._final:
                return out
            size = 0
            i = self._inflight
            while i < len(self._q) and len(out) < max_items and size < max_bytes:
                entry = self._q[i]
                if isinstance(entry, DiskRef):
                    assert self.spool is not None
                    try:
                        item = self.spool.read(entry)
                    except (OSError, SpoolError, ValueError, struct.error) as exc:
                        self._unreadable(entry, exc)
                        self._remove_at(i)
                        continue
                else:
                    item = entry
                out.append(item)
                size += item.size
                i += 1
            self._inflight = i
        return out

    def _unreadable(self, ref: DiskRef, exc: BaseException) -> None:
        """One error per segment file for its frames that cannot be read back (a spool deleted
        or truncated under the sidecar would otherwise give one line per frame)."""
        path = ref.segment.path
        self.unreadable_records += ref.records
        if path not in self._unreadable_told and len(self._unreadable_told) < 100:
            self._unreadable_told.add(path)
            log.error("spool frames unreadable, skipped (one report per file)", file=path, error=str(exc))

    def _remove_at(self, i: int) -> None:
        entry = self._q[i]
        del self._q[i]
        self.waiting_records -= entry.records
        self.waiting_bytes -= entry.raw_bytes
        if isinstance(entry, DiskRef):
            self._ndisk -= 1
            assert self.spool is not None
            self.spool.release(entry)
        else:
            self.mem_bytes -= entry.size

    def ack(self, n: int) -> None:
        """The first ``n`` handed-out items are delivered."""
        with self.lock:
            if self._final:
                return
            for _ in range(n):
                self._remove_at(0)
            self._inflight -= n
            if self._room_waiters:
                self.room.notify_all()

    def release_inflight(self) -> None:
        with self.lock:
            self._inflight = 0

    def wait(self, timeout: float) -> None:
        with self.lock:
            if len(self._q) <= self._inflight:
                self.cond.wait(timeout)

    def notify(self) -> None:
        with self.lock:
            self.cond.notify_all()

    def close(self) -> None:
        with self.lock:
            self._closing = True
            self.cond.notify_all()
            self.room.notify_all()

    def __len__(self) -> int:
        return len(self._q)

    def idle(self) -> bool:
        """Nothing waiting and nothing in flight (read without the lock: a hint)."""
        return not self._q

    def empty(self) -> bool:
        with self.lock:
            return not self._q

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes if self.spool is not None else 0

    def adopt(self, refs: list[DiskRef]) -> None:
        """Items of an earlier sidecar's spool go first, before anything of ours."""
        with self.lock:
            assert self._inflight == 0 or not refs
            for ref in reversed(refs):
                self._q.appendleft(ref)
                self.waiting_records += ref.records
                self.waiting_bytes += ref.raw_bytes
            self._ndisk += len(refs)
            self.cond.notify_all()
