"""A small RESP2 client for the sidecar's write path: one connection, pipelined commands, hiredis parsing.

Why not redis-py here: importing it pulls in asyncio (about 150 ms of start-up, paid by every
agent), and its pipelines re-check scripts with an extra round trip on every execute. The
write path needs exactly: connect (TCP, Unix socket or TLS), AUTH, SELECT, SCRIPT LOAD, and
pipelines of EVALSHA/PUBLISH. The read side (`tail`, the consumer module) uses redis-py.
"""

from __future__ import annotations

import socket
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from agent_wrapper.values import Frozen

from ._native import speedups as _speedups

_pack_command = hiredis.pack_command

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any


class ReplyError(Exception):
    """An error reply from the server (returned inside a pipeline's replies, raised by ``call``)."""

    @property
    def code(self) -> str:
        return str(self.args[0]).split(" ", 1)[0] if self.args else ""


class ProtocolViolation(OSError):
    pass


class Endpoint(Frozen):
    _defaults = {"host": "localhost", "port": 6379, "unix_path": None, "db": 0, "username": None, "password": None,
                 "tls": False}
    _hidden = ("password",)
    host: str
    port: int
    unix_path: str | None
    db: int
    username: str | None
    password: str | None
    tls: bool
    __slots__ = tuple(__annotations__)

    def describe(self) -> str:
        where = self.unix_path or f"{self.host}:{self.port}"
        return f"{'rediss' if self.tls else 'redis'}://{where}/{self.db}"


def parse_url(url: str, password: str | None = None, username: str | None = None) -> Endpoint:
    """redis://[user[:password]@]host[:port][/db], rediss://..., unix:///path[?db=N]."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    url_user = unquote(parts.username) if parts.username else None
    url_pass = unquote(parts.password) if parts.password is not None else None
    db_text = parts.path.lstrip("/") if parts.scheme != "unix" else (query.get("db") or ["0"])[0]
    db = int(db_text) if db_text else 0
    if parts.scheme == "unix":
        return Endpoint(unix_path=parts.path, db=db, username=username or url_user,
                        password=password or url_pass)
    return Endpoint(
        host=parts.hostname or "localhost",
        port=parts.port or 6379,
        db=db,
        username=username or url_user,
        password=password or url_pass,
        tls=parts.scheme == "rediss",
    )


def pack_py(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP: bytes as they are, str as UTF-8, anything else as its str()."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = a.encode() if isinstance(a, str) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def pack(args: tuple[Any, ...] | list[Any]) -> bytes:
    """``pack_py`` by hiredis, byte for byte (about 3x as fast) for the types it takes: bytes,
    str, int and float; anything else (None, a bool) by ``pack_py``."""
    try:
        return _pack_command(args)  # type: ignore[no-any-return]
    except TypeError:
        return pack_py(args)


# The native packer: what pack_py gives, in one call for all the commands of a pipeline
# (hiredis's took ~24,000 instructions for the PING and the append of a lone line, ~7,000 here).
_pack_commands = getattr(_speedups, "pack_commands", None)


def pack_many(commands: list[tuple[Any, ...]]) -> bytes:
    if _pack_commands is not None:
        packed = _pack_commands(commands)
        if packed is not None:
            return packed  # type: ignore[no-any-return]
    if len(commands) == 1:
        return pack(commands[0])
    return b"".join([pack(c) for c in commands])


def client_name(role: str, agent_id: str) -> str:
    """The CLIENT SETNAME name of a connection, ``role:agent_id``. Redis refuses names with
    anything but printable ASCII and no spaces (every connection's handshake would fail), so
    other bytes of the agent id's UTF-8, and ``%``, are %-escaped: ``agent-ü`` is ``agent-%C3%BC``."""
    raw = agent_id.encode("utf-8", "surrogateescape")
    return f"{role}:" + "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


class Connection:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        client_name: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.client_name = client_name
        self._sock: socket.socket | None = None
        # The socket's descriptor while connected without TLS (the native module writes and
        # reads it itself: _speedups.lone_exchange); -1 otherwise.
        self.plain_fd = -1
        self._timeout: float | None = None  # what the socket's timeout is set to
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._interrupted = False  # interrupt() was called: no new session on this object

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        ep = self.endpoint
        if ep.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(ep.unix_path)
            except OSError:
                sock.close()
                raise
        else:
            # An ASCII host goes to getaddrinfo as bytes: as text it would be IDNA-encoded, and
            # the idna codec costs every start a few milliseconds of imports.
            host: str | bytes = ep.host.encode("ascii") if ep.host.isascii() else ep.host
            sock = socket.create_connection((host, ep.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if ep.tls:
                import ssl

                ctx = self.ssl_context or ssl.create_default_context()
                try:
                    sock = ctx.wrap_socket(sock, server_hostname=ep.host)
                except OSError:
                    sock.close()
                    raise
        sock.settimeout(self.socket_timeout)
        self._timeout = self.socket_timeout
        self._sock = sock
        self.plain_fd = -1 if ep.tls else sock.fileno()
        if self._interrupted:  # interrupt() came before there was a socket to shut down
            self.close()
            raise ConnectionAbortedError("connection interrupted")
        self._reader = hiredis.Reader(replyError=ReplyError)
        hello: list[tuple[Any, ...]] = []
        if ep.password is not None:
            hello.append(("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password))
        if ep.db:
            hello.append(("SELECT", ep.db))
        if self.client_name:
            hello.append(("CLIENT", "SETNAME", self.client_name))
        if hello:
            try:
                for reply in self.pipeline(hello):
                    if isinstance(reply, ReplyError):
                        raise reply
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self.plain_fd = -1
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def pipeline(self, commands: list[tuple[Any, ...]], timeout: float | None = None) -> list[Any]:
        """Send all commands, read all replies. Error replies come back as ReplyError objects.

        A socket error or timeout closes the connection and propagates (OSError): whether the
        server applied some of the commands is then unknown, which callers must tolerate.
        ``timeout`` bounds each socket operation of this call instead of ``socket_timeout``.
        """
        if self._sock is None:
            self.connect()
        return self.exchange(pack_many(commands), len(commands), timeout)

    def exchange(self, packed: bytes, count: int, timeout: float | None = None) -> list[Any]:
        """``pipeline`` for commands packed already (``pack_many``): ``count`` replies. The
        connection must be open."""
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("not connected")
        try:
            want = self.socket_timeout if timeout is None else timeout
            if want != self._timeout:  # settimeout costs a system call: only on a change
                sock.settimeout(want)
                self._timeout = want
            sock.sendall(packed)
            return self._replies(sock, b"", count)
        except (OSError, hiredis.ProtocolError) as exc:
            self._broken(exc)
            raise

    def replies_after(self, data: bytes, count: int, timeout: float) -> list[Any]:
        """``count`` replies, the first bytes of which (``data``) were read from the socket
        already (by _speedups.lone_exchange, with ``timeout``); failures as in ``exchange``."""
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("not connected")
        try:
            if timeout != self._timeout:
                sock.settimeout(timeout)
                self._timeout = timeout
            replies = self._replies(sock, data, count)
            if self._reader.gets() is not False:  # a reply no command asked for: out of step
                raise ProtocolViolation("more replies than commands")
            return replies
        except (OSError, hiredis.ProtocolError) as exc:
            self._broken(exc)
            raise

    def _broken(self, exc: BaseException) -> None:
        """A socket error or a reply hiredis cannot parse: whether the server applied the
        commands is unknown, the connection is closed. The latter is raised as ProtocolViolation."""
        self.close()
        if isinstance(exc, hiredis.ProtocolError):
            raise ProtocolViolation(str(exc)) from exc

    def _replies(self, sock: socket.socket, data: bytes, count: int) -> list[Any]:
        reader = self._reader
        if data:
            reader.feed(data)
        replies: list[Any] = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError("connection closed by Redis")
                reader.feed(data)
                continue
            replies.append(reply)
        return replies

    def send(self, *commands: tuple[Any, ...]) -> None:
        """Write commands without reading replies (pub/sub: SUBSCRIBE, then ``read``)."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(pack_many(commands))
        except OSError:
            self.close()
            raise

    def read(self, timeout: float | None) -> Any:
        """The next reply or push message; None when nothing arrives within ``timeout``.

        A timeout here leaves the connection usable (unlike a timeout inside ``pipeline``).
        """
        if self._sock is None:
            raise ConnectionResetError("not connected")
        sock = self._sock
        while True:
            reply = self._reader.gets()
            if reply is not False:
                return reply
            sock.settimeout(timeout)
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                return None
            except OSError:
                self.close()
                raise
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.socket_timeout)
            if not data:
                self.close()
                raise ConnectionResetError("connection closed by Redis")
            self._reader.feed(data)

    def interrupt(self) -> None:
        """Wake a thread blocked on this connection's socket (close() alone would not), also in
        the middle of connect() once the TCP connection is up (AUTH, SELECT, CLIENT SETNAME).
        Final: connect() on this object fails afterwards."""
        self._interrupted = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def call(self, *args: Any) -> Any:
        reply = self.pipeline([args])[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply
