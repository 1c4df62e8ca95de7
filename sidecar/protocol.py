"""Wire format v1: one self-describing payload per batch, JSON, zstd above a threshold.

The encoding is recognisable from the first bytes: a zstd frame starts with the magic
28 B5 2F FD, an uncompressed payload with ``{``. See docs/PROTOCOL.md.

orjson and zstandard are imported where they are first needed, not at start: orjson's import
(it imports dataclasses, inspect and uuid) and zstandard's would cost every start ~15 ms,
while a run whose output the native module encodes, in payloads below the compression
threshold, needs neither. Control-plane messages (status, gap, tokens, heartbeat) are a few a
second and use the standard library's json.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from agent_wrapper.values import Frozen, Value

from ._native import speedups as _speedups

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_COMPRESS_THRESHOLD = 1024
ZSTD_LEVEL = 1

# Payload types
BATCH = "batch"
STATUS = "status"
GAP = "gap"

_local = threading.local()  # each thread's zstd compressor and decompressor


class ProtocolError(ValueError):
    """A payload that is not a valid v1 message."""


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with microseconds and a Z suffix."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compress(raw: bytes) -> bytes:
    """One zstd frame (with its content size). Callable from any thread: zstd's compressor
    objects are not, so each thread has its own."""
    c = getattr(_local, "zstd", None)
    if c is None:
        import zstandard

        c = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c.compress(raw)  # type: ignore[no-any-return]


def compressible(raw: bytes, threshold: int) -> bool:
    """Whether a batch payload this large is compressed (--compress-threshold; -1: never)."""
    return 0 <= threshold < len(raw)


def compress_if_large(raw: bytes, threshold: int) -> bytes:
    return compress(raw) if compressible(raw, threshold) else raw


# The largest decompressed payload a reader accepts: far above any batch the sidecar writes
# (--batch-max-bytes of output, escaped), small enough that a forged frame header cannot make
# a reader allocate gigabytes.
MAX_PAYLOAD_BYTES = 256 << 20


def decompress(payload: bytes) -> bytes:
    if payload[:4] == ZSTD_MAGIC:
        import zstandard

        try:
            # Frames written by ZstdCompressor.compress carry their content size.
            size = zstandard.frame_content_size(payload)
            if size < 0:
                raise ProtocolError("zstd payload without its content size")
            if size > MAX_PAYLOAD_BYTES:
                raise ProtocolError(f"zstd payload of {size} bytes, more than {MAX_PAYLOAD_BYTES}")
            d = getattr(_local, "unzstd", None)
            if d is None:
                d = _local.unzstd = zstandard.ZstdDecompressor()
            return d.decompress(payload, max_output_size=MAX_PAYLOAD_BYTES)  # type: ignore[no-any-return]
        except (zstandard.ZstdError, MemoryError) as exc:
            raise ProtocolError(f"corrupt zstd payload: {exc!r}") from exc
    return payload


def decode(payload: bytes) -> dict[str, Any]:
    """Decode any v1 payload (batch, status, gap) into a dict."""
    import orjson

    try:
        obj = orjson.loads(decompress(payload))
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("payload is not a JSON object")
    return obj


class Lines(Value):
    """Records of one stream collected for a batch, before encoding.

    ``segments`` are runs of records as the splitter produced them (data, count, partial);
    ``ts`` holds (record index, unix time) runs: record i has the time of the last run
    starting at or before i. ``n`` counts records, ``nbytes`` the agent's bytes.
    """

    __slots__ = ("segments", "ts", "n", "nbytes")

    def __init__(self, segments: list[tuple[bytes, int, bool]] | None = None,
                 ts: list[tuple[int, float]] | None = None, n: int = 0, nbytes: int = 0) -> None:
        self.segments = [] if segments is None else segments
        self.ts = [] if ts is None else ts
        self.n = n
        self.nbytes = nbytes


def split_lines(batch: Lines, limit: int) -> list[Lines]:
    """``batch`` cut into batches of at most ``limit`` records, in order (one read of short
    lines can hold more records than a batch may)."""
    if batch.n <= limit:
        return [batch]
    parts: list[Lines] = []
    cur = Lines()
    for data, count, partial in batch.segments:
        while count:
            room = limit - cur.n
            if count <= room:
                piece, taken, data = data, count, b""
            else:
                pos = 0
                for _ in range(room):
                    pos = data.index(b"\n", pos) + 1
                piece, taken, data = data[:pos], room, data[pos:]
            cur.segments.append((piece, taken, partial))
            cur.n += taken
            cur.nbytes += len(piece)
            count -= taken
            if cur.n == limit:
                parts.append(cur)
                cur = Lines()
    if cur.n:
        parts.append(cur)
    start = 0
    runs = batch.ts
    for part in parts:
        end = start + part.n
        before = [t for i, t in runs if i <= start]
        if before:
            part.ts.append((0, before[-1]))
        part.ts.extend((i - start, t) for i, t in runs if start < i < end)
        start = end
    return parts


class Texts(Value):
    """A batch turned into JSON-ready strings."""

    __slots__ = ("lines", "partial", "b64")

    def __init__(self, lines: list[str], partial: list[int], b64: list[int]) -> None:
        self.lines = lines
        self.partial = partial
        self.b64 = b64


def texts_of(batch: Lines) -> Texts:
    lines: list[str] = []
    partial: list[int] = []
    b64: list[int] = []
    for data, _count, is_partial in batch.segments:
        if is_partial:
            try:
                lines.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                b64.append(len(lines))
                lines.append(base64.b64encode(data).decode("ascii"))
            partial.append(len(lines) - 1)
            continue
        try:
            parts = data.decode("utf-8").split("\n")
            parts.pop()  # the run ends with LF: nothing after it
            lines.extend(parts)
        except UnicodeDecodeError:
            for raw in data.split(b"\n")[:-1]:
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    b64.append(len(lines))
                    lines.append(base64.b64encode(raw).decode("ascii"))
    return Texts(lines, partial, b64)


# index, text without trailing CRs, kind: 0 orjson decides, 1 a JSON object, 2 one with a
# top-level key that may carry an event
NativeCandidate = tuple[int, bytes, int]

# lines_json's splice argument: the JSON objects it may splice in itself
SPLICE_PLAIN = 1  # those that carry no event (kind 1): the others are parsed for events
SPLICE_ALL = 2  # kinds 1 and 2: nobody asks for events
SPLICE_NONE = 3  # none wanted (a channel without structured records)


def native_lines(batch: Lines, *, structured: bool = True,
                 parsed: list[dict[str, Any]] | None = None) -> tuple[bytes, int, list[int], bytes] | None:
    """The batch's ``lines`` array as JSON (the bytes orjson writes for texts_of(batch).lines),
    the record count, the partial indices, and (``structured``) the message's ``json`` array
    as _json_objects would make it (b"" when no record is a JSON object), from the native
    module; the objects that may carry an event are appended to ``parsed`` (see
    _spliced_objects). None without the module, or when a record is not valid UTF-8 (base64)."""
    if _speedups is None:
        return None
    splice = SPLICE_NONE if not structured else SPLICE_ALL if parsed is None else SPLICE_PLAIN
    parts: list[bytes] = [b"["]  # the array's pieces, joined with one copy
    partial: list[int] = []
    found: list[tuple[list[NativeCandidate], bytes | None]] = []
    n = 0
    for data, _count, is_partial in batch.segments:
        got = _speedups.lines_json(data, is_partial, n, splice)
        if got is None:
            return None
        js, records, cands, spliced = got
        if is_partial:
            partial.append(n)
        if records:
            if n:
                parts.append(b",")
            parts.append(js)
            found.append((cands, spliced))
            n += records
    parts.append(b"]")
    # Only once every segment took the native path: nothing is parsed twice.
    objects: list[bytes] = []
    for cands, spliced in found:
        if spliced is None:
            entries = _spliced_objects(cands, parsed)
            if entries:
                import orjson

                spliced = orjson.dumps(entries)[1:-1]
            else:
                spliced = b""
        if spliced:
            objects.append(spliced)
    return b"".join(parts), n, partial, b"[" + b",".join(objects) + b"]" if objects else b""


def _micros(t: float) -> int:
    return round(t * 1_000_000)


def ts_micro(t: float) -> float:
    """A capture time to the microsecond, as a batch carries it."""
    return _micros(t) / 1_000_000


def ts_json(t: float) -> bytes:
    """ts_micro(t) as orjson writes it (its shortest repr: the microseconds without trailing
    zeros, for any time from 0.0001 s after 1970 until 2242), without the cost of that repr
    (~10,000 instructions)."""
    sec, us = divmod(round(t * 1_000_000), 1_000_000)  # _micros, inline: once a lone line
    return b"%d.%s" % (sec, (b"%06d" % us).rstrip(b"0")) if us else b"%d.0" % sec


def batch_message(header_json: bytes, seq: int, n: int, array: bytes, ts: list[tuple[int, float]],
                  partial: list[int], spliced: bytes) -> bytes:
    """A batch message from native_lines' parts, byte for byte what orjson writes for it."""
    parts = [header_json, b',"seq":%d,"n":%d,"lines":' % (seq, n), array, b',"ts":[',
             b",".join([b"[%d,%s]" % (i, ts_json(t)) for i, t in ts]), b"]"]
    if partial:
        parts += (b',"partial":[', b",".join([b"%d" % i for i in partial]), b"]")
    if spliced:
        parts += (b',"json":', spliced)
    parts.append(b"}")
    return b"".join(parts)


def encode_batch(
    header: dict[str, Any],
    seq: int,
    batch: Lines,
    *,
    structured: bool,
    threshold: int,
    texts: Texts | None = None,
    objects: list[dict[str, Any]] | None = None,
    header_json: bytes | None = None,
) -> bytes:
    """Encode one batch. ``header`` holds the constant fields (v, type, ids, channel, stream),
    ``header_json`` its JSON without the closing brace, when the caller keeps it.
    Without ``texts`` the native module builds the ``lines`` array when it can, and the
    payload is written here, as orjson would write it, without orjson."""
    native = native_lines(batch, structured=structured, parsed=objects) if texts is None else None
    if native is not None:
        array, n, partial, spliced = native
        message = batch_message(header_json or encode_object(header)[:-1], seq, n, array, batch.ts, partial, spliced)
        return message if threshold < 0 else compress_if_large(message, threshold)
    import orjson

    t = texts if texts is not None else texts_of(batch)
    lines, n, partial, b64 = t.lines, len(t.lines), t.partial, t.b64
    json_objects = _json_objects(t.lines, t.b64, objects) or None if structured else None
    msg = dict(header)
    msg["seq"] = seq
    msg["n"] = n
    msg["lines"] = lines
    msg["ts"] = [(i, ts_micro(t)) for i, t in batch.ts]
    if partial:
        msg["partial"] = partial
    if b64:
        msg["b64"] = b64
    if json_objects is not None:
        msg["json"] = json_objects
    return compress_if_large(orjson.dumps(msg), threshold)


# A JSON-object line nested deeper than this stays a plain line: spliced into a batch, it
# would sit three levels deeper still, and common parsers and serialisers stop between 255
# (orjson's dumps) and 1024 (orjson's loads) levels.
MAX_JSON_DEPTH = 200


def json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (1 for an empty object), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value if isinstance(v, (dict, list)))
    return deepest


def _candidates(lines: Sequence[str], b64: list[int]) -> list[tuple[int, str, int]]:
    """(index, text without trailing CRs, 0) of the lines that may be JSON objects, for
    _spliced_objects (kind 0: orjson decides)."""
    skip = set(b64)
    return [(i, text, 0) for i, line in enumerate(lines)
            if line[:1] == "{" and i not in skip and (text := line.rstrip("\r"))[-1:] == "}"]


def _json_objects(lines: Sequence[str], b64: list[int], parsed: list[dict[str, Any]] | None = None) -> list[list[Any]]:
    """[index, object] for each line that is a JSON object: validated, then spliced in as it was.
    The parsed objects are appended to ``parsed`` when given (for event detection)."""
    return _spliced_objects(_candidates(lines, b64), parsed)


def _spliced_objects(candidates: Sequence[tuple[int, str | bytes, int]],
                     parsed: list[dict[str, Any]] | None) -> list[list[Any]]:
    """[index, object] for (index, text without trailing CRs, kind) of the lines that may be
    JSON objects: kind 1 or 2 from the native module, 0 from the Python code. One the native
    module vouches for is spliced in without being parsed, unless it may carry an event and
    ``parsed`` wants it: only an object with a top-level "sidecar_event" or "usage" key does
    (events.classify); so on the native path ``parsed`` gets the objects that may carry an
    event (and those orjson had to decide on), not every JSON object. The others are parsed
    by orjson: the native module leaves numbers with exponents, escaped surrogates, deep
    nesting, and what is not JSON to it."""
    import orjson

    out: list[list[Any]] = []
    for i, text, kind in candidates:
        if kind == 1 or (kind == 2 and parsed is None):
            out.append([i, orjson.Fragment(text)])
            continue
        obj = _parsed_object(text)
        if obj is not None:
            out.append([i, orjson.Fragment(text)])
            if parsed is not None:
                parsed.append(obj)
    return out


def _parsed_object(text: str | bytes) -> dict[str, Any] | None:
    """``text`` (one line, without CRs) as a JSON object no deeper than MAX_JSON_DEPTH, or None."""
    import orjson

    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    # deeper than the limit takes more brackets than that, and twice as many characters
    if len(text) > 2 * MAX_JSON_DEPTH:
        brackets = text.count("{") + text.count("[") if isinstance(text, str) else text.count(b"{") + text.count(b"[")
        if brackets > MAX_JSON_DEPTH and json_depth(obj) > MAX_JSON_DEPTH:
            return None
    return obj


def json_unsafe(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` does not round-trip through the readers' JSON parsers (None: it does): an
    integer beyond 64 bits (orjson reads it as a float), NaN or an infinity (not JSON),
    nesting past ``max_depth`` levels, a key that is not a string."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str | bool) or v is None:
            continue
        if isinstance(v, int):
            if not -(1 << 63) <= v < (1 << 64):
                text = str(v)
                return f"integer {text[:20]}{'...' if len(text) > 20 else ''} beyond 64 bits"
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return f"{v} is not a JSON number"
        elif isinstance(v, dict | list | tuple):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(v, dict):
                if not all(isinstance(k, str) for k in v):
                    return "a key that is not a string"
                stack.extend((item, depth + 1) for item in v.values())
            else:
                stack.extend((item, depth + 1) for item in v)
    return None


def encode_object(obj: dict[str, Any]) -> bytes:
    """Small control-plane messages (status, gap, tokens): never compressed. ValueError for
    what json_unsafe names, or a value JSON has no form for."""
    reason = json_unsafe(obj, 255)  # orjson's limit, where the messages' readers parse them
    if reason is not None:
        raise ValueError(reason)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class Record(Frozen):
    """One decoded output record."""

    channel: str
    stream: str
    seq: int
    ts: float
    data: bytes  # exact bytes the agent wrote, including the LF unless partial
    partial: bool
    json: dict[str, Any] | None
    producer: str
    agent_id: str
    variation_id: str
    __slots__ = tuple(__annotations__)

    @property
    def text(self) -> str:
        """The line without its LF, decoded leniently (for display)."""
        body = self.data if self.partial else self.data[:-1]
        return body.decode("utf-8", "replace")


MAX_TS = 1e10  # Unix seconds, the year 2286


def iter_records(msg: dict[str, Any]) -> Iterator[Record]:
    """Records of a decoded batch payload, in order."""
    if msg.get("type") != BATCH:
        return
    try:
        lines: list[str] = msg["lines"]
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ProtocolError("malformed batch: lines must be a list of strings")
        if msg.get("n", len(lines)) != len(lines):
            raise ProtocolError("malformed batch: n differs from the number of lines")
        seq0 = int(msg["seq"])
        ts_runs: list[list[float]] = msg.get("ts") or []
        partial = set(msg.get("partial") or ())
        b64 = set(msg.get("b64") or ())
        objs = {int(i): o for i, o in (msg.get("json") or ())}
        channel = str(msg.get("channel", ""))
        stream = str(msg.get("stream", ""))
        producer = str(msg.get("producer", ""))
        agent_id = str(msg.get("agent_id", ""))
        variation_id = str(msg.get("variation_id", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed batch: {exc}") from exc
    try:
        runs = [(int(r[0]), float(r[1])) for r in ts_runs]
    except (IndexError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed ts runs: {exc}") from exc
    if not all(0.0 <= t <= MAX_TS for _i, t in runs):
        raise ProtocolError("malformed ts runs: a time outside 1970..2286")
    run = 0
    ts = runs[0][1] if runs else 0.0
    for i, text in enumerate(lines):
        while run + 1 < len(runs) and runs[run + 1][0] <= i:
            run += 1
            ts = runs[run][1]
        if i in b64:
            try:
                body = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProtocolError(f"bad base64 in record {i}: {exc}") from exc
        else:
            body = text.encode("utf-8", "surrogatepass")
        is_partial = i in partial
        yield Record(
            channel=channel,
            stream=stream,
            seq=seq0 + i,
            ts=ts,
            data=body if is_partial else body + b"\n",
            partial=is_partial,
            json=objs.get(i),
            producer=producer,
            agent_id=agent_id,
            variation_id=variation_id,
        )
