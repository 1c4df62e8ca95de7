"""A lone line on a quiet pipe, delivered by the pipe reader itself (Sender.send_lone),
against a real redis-server: every line arrives once, in order, byte for byte, also when the
server forgets the sidecar's scripts or drops its connection between two lines."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import pytest
import redis

from agent_wrapper.events import STDOUT
from agent_wrapper.pipes import PipeReader
from sidecar import _native, app, config, protocol, transport
from tests.redis_harness import RedisServer


def runtime(url: str, run_id: str) -> tuple[app.Runtime, PipeReader, list[int]]:
    s = config.build({"run_id": run_id, "redis_url": url}, {}, ("true",))
    rt = app.Runtime(s)
    rt.sender.start()
    rt.batcher.start()
    r, w = os.pipe()
    os.close(w)
    count_lf = _native.speedups.count_lf if _native.speedups is not None else None
    reader = PipeReader({STDOUT: r}, rt.sink, on_quiet=rt.batcher.on_quiet, filter=rt.redactor, count_lf=count_lf,
                        lone=rt.batcher.lone_read)
    direct: list[int] = []  # a 1 for each batch that the reader's thread delivered itself
    send = rt.sender.send_lone

    def counted(*args: Any) -> None:
        before = rt.sender.stats.items_shipped
        send(*args)
        if rt.sender.stats.items_shipped > before:
            direct.append(1)

    rt.batcher.send_lone = counted
    return rt, reader, direct


def ship(rt: app.Runtime, reader: PipeReader, line: bytes, shipped: int) -> None:
    """``line`` as the reader's loop hands on a short read that ends a quiet spell."""
    if not reader._handle(STDOUT, line, time.time(), True):
        rt.batcher.on_quiet(True)
    deadline = time.monotonic() + 15
    while rt.sender.stats.records_shipped < shipped:
        assert time.monotonic() < deadline, "line not delivered"
        time.sleep(0.002)


def records(client: redis.Redis, key: str) -> list[tuple[int, str]]:
    out = []
    for _id, fields in client.xrange(key):
        msg = protocol.decode(fields[b"d"])
        out.extend((msg["seq"] + i, line) for i, line in enumerate(msg["lines"]))
    return out


def test_lone_lines_arrive_in_order_through_script_flushes_and_lost_connections(
        redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: Any) -> None:
    monkeypatch.setattr(transport, "DIRECT_PAUSE_S", 0.0)  # the short path again at once after a failure
    rt, reader, direct = runtime(redis_server.url, "lone1")
    lines = [f"line {i}: caf\u00e9 \"quoted\" \\ {'x' * (i % 7)}" for i in range(60)]
    try:
        for i, text in enumerate(lines):
            if i == 20:
                redis_client.script_flush()  # NOSCRIPT: the sender thread loads them again and delivers
            if i == 40:
                redis_client.client_kill_filter(_type="normal", skipme=True)  # the connection is gone
            ship(rt, reader, text.encode() + b"\n", i + 1)
        key = rt.channels[STDOUT].key
        assert records(redis_client, key) == list(enumerate(lines, 1))
        # The short path but for the first line (no connection yet) and the two that failed;
        # without the native module, the usual one
        assert len(direct) == (57 if _native.speedups is not None else 0)
    finally:
        rt.batcher.close(5)
        rt.sender.finish()
        rt.sender.join(5)
        rt.sender.close()


def test_a_lone_line_goes_the_usual_way_when_the_reader_cannot_deliver_it(
        redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: Any) -> None:
    """A round trip that fails on the reader's side (here: every native exchange reports a
    timeout) leaves each line to the sender thread, which connects again and delivers it."""
    if _native.speedups is None:
        pytest.skip("the native module is not built: the reader offers no lone batch")
    monkeypatch.setattr(transport, "DIRECT_PAUSE_S", 0.0)  # each line tries the short path
    rt, reader, direct = runtime(redis_server.url, "lone2")
    failed: list[bytes] = []

    def failing(fd: int, prefix: bytes, first: int, last: int, payload: bytes, suffix: bytes,
                timeout_ms: int) -> tuple[int, Any]:
        failed.append(payload)
        return 1, errno.ETIMEDOUT

    try:
        ship(rt, reader, b"first\n", 1)  # the connection is open from here on
        monkeypatch.setattr(transport, "_lone_exchange", failing)
        for i in range(2, 8):
            ship(rt, reader, b"line %d\n" % i, i)
        key = rt.channels[STDOUT].key
        assert [text for _seq, text in records(redis_client, key)] == ["first"] + [f"line {i}" for i in range(2, 8)]
        assert rt.sender.stats.records_shipped == 7
        assert len(failed) == 6 and direct == []  # the first line opened the connection: the sender thread
    finally:
        rt.batcher.close(5)
        rt.sender.finish()
        rt.sender.join(5)
        rt.sender.close()
