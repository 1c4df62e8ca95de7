"""`python -m sidecar tail RUN_ID`: how a person reads a run (payloads are compressed in Redis)."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Sequence

import orjson

from . import protocol
from .argv import _Parser, add_options
from .config import CONNECTION_OPTIONS, OPTIONS, UsageError, build_connection, check_id, mask_url
from .consumer import Event, Gap, RunReader, Status, channel_names
from .protocol import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO

FOLLOW_BLOCK_MS = 1000
STILL_TRYING_AFTER_S = 30.0  # --follow says so once when Redis cannot be read for this long
_CONN_OPTS = {*CONNECTION_OPTIONS, "output_channel", "logs_channel", "status_channel"}


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agent-sidecar tail", description="Print a run's output from Redis: stdout, stderr and "
                "status interleaved by time, each stream in order. Exit status: 0; 1 when Redis cannot be read; "
                "2 on a usage error; 130 on Ctrl-C; with --raw, 3 when output is missing (a gap or an undecodable "
                "entry; also after a Ctrl-C), which the other modes report in the output.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--variation", default="0", help="variation id (default 0)")
    p.add_argument("--agent-id", help="the run's agent id, for channel templates that use {agent_id}")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new output, like tail -f")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true",
                      help="the agent's bytes exactly: stdout records to stdout, stderr records to stderr")
    mode.add_argument("--json", action="store_true", help="one decoded record per line (JSON)")
    p.add_argument("--stream", choices=("stdout", "stderr"), help="only this stream")
    p.add_argument("--no-status", action="store_true", help="leave status messages out (--json and text modes)")
    add_options(p, [opt for opt in OPTIONS if opt.dest in _CONN_OPTS])
    return p


def _record_json(rec: Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "channel": rec.channel, "stream": rec.stream, "seq": rec.seq, "ts": rec.ts,
        "agent_id": rec.agent_id, "producer": rec.producer,
    }
    body = rec.data if rec.partial else rec.data[:-1]
    try:
        out["text"] = body.decode("utf-8")
    except UnicodeDecodeError:
        out["b64"] = base64.b64encode(body).decode("ascii")
    if rec.partial:
        out["partial"] = True
    if rec.json is not None:
        out["json"] = rec.json
    return out


def _json_line(obj: dict[str, Any]) -> bytes:
    """One JSON line. What orjson refuses (an integer beyond 64 bits, nesting past 255 levels:
    entries written by someone other than a sidecar) goes through the standard library; a
    record's parsed ``json`` object is left out as a last resort, its text stays."""
    try:
        return orjson.dumps(obj)
    except (TypeError, ValueError):
        pass
    import json

    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        rest = {k: v for k, v in obj.items() if k != "json"}
        return json.dumps(rest, ensure_ascii=False, separators=(",", ":"), default=str).encode()


# Text mode shows control characters as escapes: the agent's output must not drive the
# reader's terminal (an OSC sequence can set the window title or write to the clipboard,
# a CR can hide what came before it on the line). --raw and --json keep every byte.
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160)) if c != 9}


def _visible(text: str) -> str:
    return text.removesuffix("\r").translate(_VISIBLE)


class Printer:
    def __init__(self, mode: str, stream: str | None, show_status: bool, variation: str) -> None:
        self.mode = mode
        self.stream = stream
        self.show_status = show_status and mode != "raw"
        self.variation = variation
        self.out: BinaryIO = sys.stdout.buffer
        self.err: BinaryIO = sys.stderr.buffer
        self.gaps = 0

    def emit(self, ev: Event) -> None:
        if isinstance(ev, Record):
            if self.stream and ev.stream != self.stream:
                return
            if self.mode == "raw":
                (self.out if ev.stream == "stdout" else self.err).write(ev.data)
            elif self.mode == "json":
                self.out.write(_json_line(_record_json(ev)) + b"\n")
            else:
                tag = "out" if ev.stream == "stdout" else "err"
                line = _visible(ev.text)
                self.out.write(f"{protocol.iso_utc(ev.ts)[11:23]} {tag} | {line}\n".encode("utf-8", "replace"))
        elif isinstance(ev, Status):
            if str(ev.msg.get("variation_id")) != self.variation:
                return
            if not self.show_status:
                return
            if self.mode == "json":
                self.out.write(_json_line(ev.msg) + b"\n")
            else:
                metadata = ev.msg.get("metadata")
                meta = " ".join(f"{k}={v}" for k, v in metadata.items()) if isinstance(metadata, dict) else ""
                text = _visible(f"{str(ev.msg.get('timestamp', ''))[11:23]} --- {ev.status} {meta}")
                self.out.write(f"{text}\n".encode("utf-8", "replace"))
        elif isinstance(ev, Gap):
            note = f"[agent-sidecar] gap: records {ev.first}..{ev.last} of {ev.channel} {ev.reason}\n"
            if self.mode == "json":
                self.out.write(_json_line({"type": "gap", "channel": ev.channel, "stream": ev.stream,
                                           "from": ev.first, "to": ev.last, "reason": ev.reason}) + b"\n")
            elif self.mode == "raw":
                self.gaps += 1  # stderr carries the agent's bytes only; reported by the exit status
            else:
                self.err.write(note.encode())

    def flush(self) -> None:
        self.out.flush()
        self.err.flush()


def _brief(exc: BaseException) -> str:
    """One line about a redis-py error, without the client's repr some of them carry."""
    text = str(exc).partition(" : <redis.")[0]
    return f"{type(exc).__name__}: {' '.join(text.split())}"


def main(argv: Sequence[str]) -> int:
    ns = parser().parse_args(list(argv))
    try:
        check_id("RUN_ID", ns.run_id)
        check_id("--variation", ns.variation)
        settings = build_connection(vars(ns), dict(os.environ), _CONN_OPTS)
        if ns.agent_id is not None:
            check_id("--agent-id", ns.agent_id)
        templates = (settings.output_channel, settings.logs_channel, settings.status_channel)
        if ns.agent_id is None and any("{agent_id}" in t for t in templates):
            raise UsageError("a channel template uses {agent_id}: give the run's --agent-id")
    except UsageError as exc:
        sys.stderr.write(f"agent-sidecar tail: error: {exc}\n")
        return 2
    import redis

    from .transport import connect

    run_key = f"{{{ns.run_id}}}" if settings.cluster_hash_tag else ns.run_id
    names = channel_names(run_key, ns.variation, ns.agent_id or "", output=settings.output_channel,
                          logs=settings.logs_channel, status=settings.status_channel)
    keys = [names["stdout"], names["stderr"]]
    if ns.stream:
        keys = [names[ns.stream]]
    mode = "raw" if ns.raw else "json" if ns.json else "text"
    if mode != "raw" and not ns.no_status:
        keys.append(names["status"])
    printer = Printer(mode, ns.stream, not ns.no_status, ns.variation)
    from redis.exceptions import RedisClusterException

    try:
        # A read waits at most --socket-timeout beyond XREAD's block: a master that hangs
        # (a partition, a frozen node) must not hold tail after its replica took over.
        client = connect(settings, socket_timeout=settings.socket_timeout_s + FOLLOW_BLOCK_MS / 1000)
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        sys.stderr.write(f"agent-sidecar tail: error: cannot connect to Redis at {mask_url(settings.redis_url)}: "
                         f"{_brief(exc)}\n")
        return 1
    reader = RunReader(client, keys)
    interrupted = False
    try:
        for ev in reader.stored():
            printer.emit(ev)
        printer.flush()
        if ns.follow:
            told = False
            for ev in reader.follow(FOLLOW_BLOCK_MS):
                if ev is not None:
                    printer.emit(ev)
                printer.flush()
                since = reader.failing_since
                if since is None:
                    told = False
                elif not told and time.monotonic() - since >= STILL_TRYING_AFTER_S and mode != "raw" \
                        and reader.failure is not None:
                    # once per outage; with --raw, stderr carries only the agent's bytes
                    told = True
                    sys.stderr.write(f"[agent-sidecar] cannot read from Redis at {mask_url(settings.redis_url)} for "
                                     f"{STILL_TRYING_AFTER_S:g} s, still trying: {_brief(reader.failure)}\n")
                    sys.stderr.flush()
    except KeyboardInterrupt:
        interrupted = True
    except BrokenPipeError:
        return 0
    except (redis.RedisError, RedisClusterException) as exc:
        sys.stderr.write(f"agent-sidecar tail: error: cannot read from Redis at {mask_url(settings.redis_url)}: "
                         f"{_brief(exc)}\n")
        return 1
    finally:
        client.close()
    if mode == "raw":
        # stderr is the agent's: missing output shows in the exit status only, also after a Ctrl-C
        return 3 if reader.errors or printer.gaps else 130 if interrupted else 0
    if reader.errors:
        sys.stderr.write(f"[agent-sidecar] {reader.errors} undecodable entries skipped\n")
    return 130 if interrupted else 0
