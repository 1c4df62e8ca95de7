"""Per-channel batching, and the encoder and compressor threads.

The reader thread only appends runs of records to an open batch (no per-line work, no
encoding), so it gets back to the pipe at once. An encoder thread seals batches and turns
them into JSON payloads; a compressor thread compresses them (zstd) and queues them in the
outbox, in order, while the encoder goes on with the next batch. The native JSON encoding,
zstd and the socket writes release the GIL, so reading, encoding, compressing and sending
overlap on two cores. A payload too small to compress goes straight to the outbox when the
compressor has nothing in hand (a lone line makes no extra thread hop).

A batch is sealed when it reaches the record or byte limit; when the pipe is quiet and
nothing is waiting for Redis (a lone line goes out at once); or when its linger expires.
While a pipeline is in flight, records keep collecting, so batches grow with the load.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from agent_wrapper.events import Output

from . import log, protocol
from ._native import speedups as _speedups
from .items import Item
from .outbox import Outbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Batches the encoder may hand to the compressor before it waits for one to be queued.
COMPRESS_AHEAD = 2

# A batch encoded but not yet compressed: key, first sequence number, records, raw bytes,
# JSON payload, per-line messages (per-line-json).
Encoded = tuple[str, int, int, int, bytes, "list[bytes] | None"]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Channel:
    __slots__ = ("key", "stream", "header", "header_json", "structured", "next_seq", "open", "opened_at")

    def __init__(self, key: str, stream: str, header: dict[str, Any], structured: bool) -> None:
        self.key = key
        self.stream = stream
        self.header = header
        self.header_json = protocol.encode_object(header)[:-1]  # every payload's first bytes
        self.structured = structured
        self.next_seq = 1
        self.open = protocol.Lines()
        self.opened_at = 0.0


class Batcher:
    def __init__(
        self,
        outbox: Outbox,
        channels: dict[str, Channel],
        *,
        max_records: int,
        max_bytes: int,
        linger_s: float,
        compress_threshold: int,
        per_line_json: bool,
        variation_id: str,
        producer: str,
        on_object: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.channels = channels
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.threshold = compress_threshold
        self.per_line_json = per_line_json
        self.variation_id = variation_id
        self.producer = producer
        self.on_object = on_object  # each stdout JSON object, after its batch is queued
        # Delivers what the outbox holds from the calling thread, or returns False (see
        # Sender.deliver_here): a lone line sealed by the reader then needs no other thread.
        self.deliver_here: Callable[[], bool] | None = None
        self._lone_payload = getattr(_speedups, "lone_payload", None)
        # Ships a lone batch from the calling thread, or queues it (Sender.send_lone): (key,
        # producer, first seq, records, raw bytes, payload)
        self.send_lone: Callable[[str, str, int, int, int, bytes], None] | None = None
        # Sections take the lock itself (a C-level context manager); the condition is for
        # wait and notify. Re-entrant: a section may call another that takes it.
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self._sealed: deque[tuple[Channel, int, protocol.Lines]] = deque()
        self._sealed_bytes = 0
        # Raw batches waiting for the encoder; past this the reader waits (the encoder is
        # itself waiting on a full outbox under --when-full block).
        self.sealed_max_bytes = 4 << 20
        self._quiet = False
        # The encoder waits with no open batch to time. A batch opened meanwhile wakes it on
        # the reader's next report (on_quiet), so that its linger runs from then.
        self._untimed = False
        self._encoding = False  # the encoder holds taken batches not yet in the outbox
        # Batches handed to the compressor and not yet in the outbox; a few at most, so that
        # the encoder works ahead by a batch or two and no further.
        self._compressing = 0
        self._to_compress: queue.Queue[tuple[list[Encoded], list[dict[str, Any]] | None] | None] = \
            queue.Queue(maxsize=COMPRESS_AHEAD)
        self._closing = False
        self.records_in = 0
        self.bytes_in = 0
        self.thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self.compressor = threading.Thread(target=self._compress_run, name="compressor", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.compressor.start()

    # -- reader side ---------------------------------------------------------------------
    def add(self, ev: Output) -> None:
        with self.lock:
            ch = self.channels[ev.stream]
            batch = ch.open
            if batch.n == 0:
                ch.opened_at = time.monotonic()
            batch.ts.append((batch.n, ev.ts))
            batch.segments.extend(ev.segments)
            batch.n += ev.records
            batch.nbytes += ev.nbytes
            self.records_in += ev.records
            self.bytes_in += ev.nbytes
            if batch.n >= self.max_records or batch.nbytes >= self.max_bytes:
                self._seal(ch)
                self.cond.notify_all()
                while self._sealed_bytes > self.sealed_max_bytes and not self._closing:
                    self.cond.wait(0.5)

    def lone_read(self, stream: str, data: bytes, ts: float) -> bool:
        """``add`` and ``on_quiet(True)`` for the records of one read (``data``, whole lines)
        on a quiet pipe, on a short path: with nothing open, sealed or on its way to Redis,
        one native call writes their batch (``_speedups.lone_payload``: the bytes ``_ship``
        queues for it), and ``send_lone`` ships it. False, with nothing changed, when the
        usual path must take them: something is under way, or a record is not UTF-8 or may
        carry an event, the payload is to be compressed, per-line messages are wanted, or
        the native module is missing."""
        send = self.send_lone
        if send is None:
            return False
        with self.lock:
            if self._encoding or self._compressing or self._sealed or self._closing or not self.outbox.idle():
                return False
            for ch in self.channels.values():
                if ch.open.n:
                    return False
            ch = self.channels[stream]
            first = ch.next_seq
            got = self._lone_encode(ch, first, data, ts)
            if got is None:
                return False
            payload, n = got
            ch.next_seq = first + n
            self.records_in += n
            self.bytes_in += len(data)
            self._quiet = True
        send(ch.key, self.producer, first, n, len(data), payload)
        return True

    def on_quiet(self, quiet: bool) -> None:
        """The reader drained the pipes (or not). On a quiet pipe with nothing on its way to
        Redis, the reader encodes the open batch itself, and delivers it too when
        ``deliver_here`` can: a lone line wakes no other thread."""
        work: list[tuple[Channel, int, protocol.Lines]] = []
        with self.lock:
            self._quiet = quiet
            if not quiet:
                # More is coming (a full read, or a busy agent's writes gathering in the pipe):
                # no seal now, but a batch opened while the encoder waits untimed must still
                # go out within its linger.
                if self._untimed and any(ch.open.n for ch in self.channels.values()):
                    self._untimed = False
                    self.cond.notify_all()
                return
            if self._idle() and not self._sealed and not self._closing:
                for ch in self.channels.values():
                    if ch.open.n:
                        self._seal(ch)
                work = list(self._sealed)
                self._sealed.clear()
            else:
                self.cond.notify_all()
        if not work:
            return
        send = self.send_lone
        if send is not None and len(work) == 1:
            ch, first, batch = work[0]
            data, _count, partial = batch.segments[0]
            got = None if len(batch.segments) != 1 or partial or len(batch.ts) != 1 else \
                self._lone_encode(ch, first, data, batch.ts[0][1])
            if got is not None:
                with self.lock:
                    self._sealed_bytes -= batch.nbytes
                send(ch.key, self.producer, first, got[1], batch.nbytes, got[0])
                return
        direct = self.deliver_here
        self._ship(work, wake=direct is None)
        if direct is not None and not direct():
            self.outbox.notify()

    def notify_idle(self) -> None:
        """The sender has nothing in flight: a good moment to ship what is open."""
        with self.lock:
            if self._sealed or any(ch.open.n for ch in self.channels.values()):
                self.cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Seal what is open, encode and compress everything, stop both threads. False if
        they did not finish."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            for ch in self.channels.values():
                if ch.open.n:
                    self._seal(ch)
            self._closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        if self.compressor.is_alive():
            try:
                self._to_compress.put(None, timeout=_left(deadline))
            except queue.Full:
                return False
            self.compressor.join(_left(deadline))
        return not self.compressor.is_alive()

    def _idle(self) -> bool:
        """Nothing taken by the encoder or the compressor and not yet queued, nothing queued
        and not yet sent (the caller holds the lock)."""
        return not self._encoding and not self._compressing and self.outbox.idle()

    # -- encoder -------------------------------------------------------------------------
    def _seal(self, ch: Channel) -> None:
        batch = ch.open
        ch.open = protocol.Lines()
        first = ch.next_seq
        ch.next_seq += batch.n
        self._sealed.append((ch, first, batch))
        self._sealed_bytes += batch.nbytes

    def _due(self, now: float) -> float | None:
        """Seconds until an open batch must be sealed; 0 when one should go now."""
        opened = [ch.opened_at for ch in self.channels.values() if ch.open.n]
        if not opened:
            return None
        if self._quiet and self._idle():
            return 0.0
        return max(0.0, min(opened) + self.linger_s - now)

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._sealed:
                        due = self._due(time.monotonic())
                        if due == 0.0:
                            for ch in self.channels.values():
                                if ch.open.n:
                                    self._seal(ch)
                            break
                        if self._closing:
                            return
                        self._untimed = due is None
                        self.cond.wait(1.0 if due is None else due)
                        self._untimed = False
                    work = list(self._sealed)
                    self._sealed.clear()
                    self._encoding = True
                try:
                    self._ship(work)
                finally:
                    with self.lock:
                        self._encoding = False
        except Exception as exc:  # a bug must not hang the agent: let the reader go on
            log.error("encoder stopped by an unexpected error", error=repr(exc))
            with self.lock:
                self._closing = True
                self.cond.notify_all()

    def _ship(self, work: list[tuple[Channel, int, protocol.Lines]], wake: bool = True) -> None:
        """Encode ``work``, then queue it in the outbox (``wake``: see Outbox.put) or hand it
        to the compressor."""
        for ch, first, batch in work:
            objects: list[dict[str, Any]] | None = [] if ch.structured and self.on_object else None
            encoded: list[Encoded] = []
            for part in [batch] if batch.n <= self.max_records else protocol.split_lines(batch, self.max_records):
                encoded.append(self._encode(ch, first, part, objects))
                first += part.n
            # protocol.compressible, inline: a lone line takes this path once a line
            threshold = self.threshold
            compress = False
            for e in encoded:
                if 0 <= threshold < len(e[4]):
                    compress = True
                    break
            with self.lock:
                inline = not compress and not self._compressing
                if not inline:
                    self._compressing += 1
            if inline:
                self._queue(encoded, objects, wake)
            else:
                self._to_compress.put((encoded, objects))
            with self.lock:
                waiting = self._sealed_bytes > self.sealed_max_bytes
                self._sealed_bytes -= batch.nbytes
                if waiting:
                    self.cond.notify_all()  # the reader may be waiting for room

    def _lone_encode(self, ch: Channel, first: int, data: bytes, ts: float) -> tuple[bytes, int] | None:
        """The batch message of one run of whole lines captured at ``ts``, with one native call
        (the bytes _ship queues for it), and its record count. None when _ship must take it:
        a record that is not UTF-8 or may carry an event, a payload to compress, per-line
        messages, no native module."""
        encode = self._lone_payload
        if encode is None or self.per_line_json:
            return None
        splice = protocol.SPLICE_NONE if not ch.structured else \
            protocol.SPLICE_PLAIN if self.on_object is not None else protocol.SPLICE_ALL
        return encode(data, ch.header_json, first, round(ts * 1_000_000), splice,  # type: ignore[no-any-return]
                      self.max_records, self.threshold)

    def _compress_run(self) -> None:
        while True:
            job = self._to_compress.get()
            if job is None:
                return
            try:
                self._queue(*job)
            except Exception as exc:  # a bug must not hang the agent: go on with the next batch
                log.error("compressor hit an unexpected error; the batch in hand may be lost", error=repr(exc))
            finally:
                with self.lock:
                    self._compressing -= 1
                    self.cond.notify_all()  # the encoder may be waiting to seal a lone line

    def _queue(self, encoded: list[Encoded], objects: list[dict[str, Any]] | None, wake: bool = True) -> None:
        """Compress what is large enough, queue the items in order, then report the batch's
        JSON objects."""
        for key, first, n, nbytes, payload, pubs in encoded:
            if 0 <= self.threshold < len(payload):  # protocol.compress_if_large, inline
                payload = protocol.compress(payload)
            self.outbox.put(Item(key, self.producer, first, first + n - 1, payload, n, nbytes, pubs), wake=wake)
        if objects and self.on_object is not None:
            for obj in objects:
                self.on_object(obj)

    def _encode(self, ch: Channel, first: int, batch: protocol.Lines,
                objects: list[dict[str, Any]] | None = None) -> Encoded:
        texts = protocol.texts_of(batch) if self.per_line_json else None  # else encode_batch takes the fastest way
        payload = protocol.encode_batch(ch.header, first, batch, structured=ch.structured,
                                        threshold=-1, texts=texts, objects=objects, header_json=ch.header_json)
        pubs = self._per_line(batch, texts) if texts is not None else None
        return ch.key, first, batch.n, batch.nbytes, payload, pubs

    def _per_line(self, batch: protocol.Lines, texts: protocol.Texts) -> list[bytes]:
        import orjson

        out: list[bytes] = []
        runs = batch.ts
        run = 0
        stamp = protocol.iso_utc(runs[0][1]) if runs else ""
        partial = set(texts.partial)
        b64 = set(texts.b64)
        for i, text in enumerate(texts.lines):
            while run + 1 < len(runs) and runs[run + 1][0] <= i:
                run += 1
                stamp = protocol.iso_utc(runs[run][1])
            if i in b64:
                import base64

                text = base64.b64decode(text).decode("utf-8", "replace")
            msg: dict[str, Any] = {"content": text, "timestamp": stamp, "variation_id": self.variation_id}
            if i in partial:
                msg["partial"] = True
            out.append(orjson.dumps(msg))
        return out
