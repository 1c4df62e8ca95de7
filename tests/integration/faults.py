"""Tools for fault injection: exact accounting of what reached a stream, a reply-dropping proxy and a
throttling one."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import redis

from sidecar import protocol


def raw_seqs(client: redis.Redis, key: str) -> list[int]:
    """Sequence numbers of every record in the stream, duplicates included (no consumer-side dedupe)."""
    seqs: list[int] = []
    for _id, fields in client.xrange(key, "-", "+"):
        msg = protocol.decode(fields[b"d"])
        if msg.get("type") == "batch":
            seqs.extend(range(msg["seq"], msg["seq"] + msg["n"]))
    return seqs


def counter_bytes(first: int, last: int, pad: int = 0) -> bytes:
    dots = b"." * pad
    return b"".join(b"line %d%s\n" % (i, dots) for i in range(first, last + 1))


class ReplyDroppingProxy:
    """TCP proxy to Redis that, once, forwards a write command and then cuts the connection
    before the reply can reach the client: the write is applied but the client cannot know."""

    def __init__(self, upstream_port: int, trigger: bytes = b"EVALSHA") -> None:
        self.upstream_port = upstream_port
        self.trigger = trigger
        self.fired = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._conns += [client, upstream]
            for args in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_server and not self.fired.is_set() and self.trigger in data.upper():
                    self.fired.set()
                    dst.sendall(data)
                    # Let the server apply it, then cut both sides: the reply never arrives.
                    threading.Event().wait(0.3)
                    for s in (src, dst):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_all(src, dst)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass

    def __enter__(self) -> ReplyDroppingProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ThrottlingProxy(ReplyDroppingProxy):
    """TCP proxy to Redis that passes what the client sends at ``rate`` bytes/s: a Redis that
    is reachable and answers, only slower than the agent writes."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.rate = rate
        super().__init__(upstream_port)

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while True:
                data = src.recv(4096 if to_server else 65536)
                if not data:
                    break
                dst.sendall(data)
                if to_server:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            _close_all(src, dst)


def _close_all(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
