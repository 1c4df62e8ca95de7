"""Where commands go: one server, the master that Sentinel names, or the right node of a Redis Cluster.

Every target takes a list of commands and returns the replies in the same order, error replies
as ReplyError objects, so the sender is the same whatever the deployment. Connection errors
propagate (OSError) and the sender retries the whole list; appends are idempotent.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Sequence

from agent_wrapper.values import Frozen

from . import log
from .resp import Connection, Endpoint, ReplyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ConnFactory = Callable[[Endpoint], Connection]

# -- cluster slots ---------------------------------------------------------------------------

_CRC16_TABLE: list[int] = []


def _crc16_table() -> list[int]:
    if not _CRC16_TABLE:
        for i in range(256):
            crc = i << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            _CRC16_TABLE.append(crc & 0xFFFF)
    return _CRC16_TABLE


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots."""
    table = _crc16_table()
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ b) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    k = key.encode() if isinstance(key, str) else key
    return crc16(hash_tag(k)) % 16384


def has_hash_tag(key: str) -> bool:
    return hash_tag(key.encode()) != key.encode()


def command_key(cmd: tuple[Any, ...]) -> Any | None:
    """The key (or sharded channel) a command is routed by; None if any node will do."""
    name = str(cmd[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return cmd[3] if int(cmd[2]) > 0 else None
    if name in ("PUBLISH", "SCRIPT", "WAIT", "PING", "CLIENT", "INFO"):
        return None
    return cmd[1] if len(cmd) > 1 else None


# -- targets ---------------------------------------------------------------------------------


class Target:
    """One server (standalone)."""

    def __init__(self, endpoint: Endpoint, factory: ConnFactory, on_connect: Callable[[Connection], None]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.on_connect = on_connect
        self.conn: Connection | None = None
        self._connecting: list[Connection] = []  # being set up: interrupt() reaches them too
        self.interrupted = False  # final: no connection is opened after interrupt()

    def _open(self, endpoint: Endpoint, *, setup: bool = True,
              use: Callable[[Connection], None] | None = None) -> Connection:
        """A new connection to ``endpoint``, set up by on_connect (unless ``setup`` is False),
        then handed to ``use`` (which stores it, or asks it something) while interrupt() can
        still reach it through ``_connecting``."""
        conn = self.factory(endpoint)
        self._connecting.append(conn)
        try:
            if self.interrupted:  # checked after the append: interrupt() sees one or the other
                raise ConnectionAbortedError("interrupted")
            conn.connect()
            if setup:
                self.on_connect(conn)
            if use is not None:
                use(conn)
        except BaseException:
            conn.close()
            raise
        finally:
            self._connecting.remove(conn)
        return conn

    def _set_conn(self, conn: Connection) -> None:
        self.conn = conn

    def _connection(self) -> Connection:
        conn = self.conn
        if conn is None:
            conn = self._open(self.endpoint, use=self._set_conn)
        return conn

    def execute(self, cmds: list[tuple[Any, ...]], wait_replicas: int = 0, wait_ms: int = 1000,
                timeout: float | None = None) -> list[Any]:
        """``timeout`` bounds each socket operation (see Connection.pipeline)."""
        conn = self._connection()
        send = list(cmds)
        if wait_replicas:
            send.append(("WAIT", wait_replicas, wait_ms))
        replies = conn.pipeline(send, timeout)
        if wait_replicas:
            check_wait(replies.pop(), wait_replicas)
        return replies

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def interrupt(self) -> None:
        """Wake a thread blocked reading from this target, or setting up a connection to it
        (another thread calls this). Final: the target opens no connection afterwards."""
        self.interrupted = True
        for conn in [*self._connections(), *self._connecting]:
            conn.interrupt()

    def _connections(self) -> list[Connection]:
        return [self.conn] if self.conn is not None else []

    def ready(self) -> bool:
        """A request now needs no new connection, lookup or redirection: one round trip."""
        return self.conn is not None and self.conn.connected


def check_wait(reply: Any, wanted: int) -> None:
    if isinstance(reply, ReplyError):
        raise reply
    if int(reply) < wanted:
        raise ReplyError(f"NOREPLICAS only {int(reply)} of {wanted} replicas acknowledged the batch in time")


class SentinelSpec(Frozen):
    _hidden = ("password",)
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    __slots__ = tuple(__annotations__)


def parse_sentinel_url(url: str, password: str | None = None, username: str | None = None) -> SentinelSpec:
    """redis+sentinel://[user[:password]@]host:port[,host:port...]/master_name[/db]"""
    from urllib.parse import unquote

    rest = url.split("://", 1)[1]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/master_name[/db]")
    sentinels = []
    for h in hosts.split(","):
        host, _, port = h.strip().rpartition(":")
        if not host:
            host, port = port, "26379"
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
            raise ValueError(f"bad port {port!r}")
        sentinels.append((host.strip("[]"), int(port)))
    db_text = parts[1] if len(parts) > 1 else "0"
    if not (db_text.isascii() and db_text.isdigit() and len(db_text) <= 10 and int(db_text) < 1 << 31):
        shown = db_text if len(db_text) <= 20 else db_text[:20] + "..."
        raise ValueError(f"database must be a number from 0 to {(1 << 31) - 1}, not {shown!r}")
    db = int(db_text)
    url_user, _, url_pass = auth.partition(":") if auth else ("", "", "")
    return SentinelSpec(
        tuple(sentinels), parts[0], db,
        username or (unquote(url_user) if url_user else None),
        password or (unquote(url_pass) if url_pass else None),
    )


# How often the sentinels are asked again whom they name, while the master answers: after a
# failover the old master takes writes until the sentinels demote it (seconds later), and its
# resync with the new master then discards them.
MASTER_CHECK_S = 1.0


class SentinelTarget(Target):
    """The master that the sentinels name, looked up again after every failure; a watcher
    thread asks the sentinels every MASTER_CHECK_S whom they name, so that writes leave an old
    master within about a second of a failover. The watcher, not the write path, waits on
    slow or unreachable sentinels."""

    def __init__(self, spec: SentinelSpec, factory: ConnFactory, on_connect: Callable[[Connection], None],
                 tls: bool = False) -> None:
        super().__init__(Endpoint(), factory, on_connect)
        self.spec = spec
        self.tls = tls
        self.named: tuple[str, int] | None = None  # what the sentinels named at the last look
        # Called from the watcher when the sentinels name another master than at its last look
        # (a failover): whoever else holds a connection to the old master can leave it too.
        self.on_switch: Callable[[tuple[str, int]], None] | None = None
        self._sentinel_tls: dict[tuple[str, int], bool] = {}  # how each sentinel answered
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def ready(self) -> bool:
        return super().ready() and self.named == (self.endpoint.host, self.endpoint.port)

    def _watch(self) -> None:
        while not self._watch_stop.wait(MASTER_CHECK_S):
            try:
                named = self._resolve()
            except (OSError, ReplyError):
                continue  # sentinels away: a master that answers is better than none
            except Exception as exc:  # a bug must not end the watch silently
                log.error("sentinel watcher error", error=repr(exc))
                continue
            before, self.named = self.named, (named.host, named.port)
            if before is not None and before != self.named and self.on_switch is not None:
                try:
                    self.on_switch(self.named)
                except Exception as exc:
                    log.error("sentinel switch callback error", error=repr(exc))

    def interrupt(self) -> None:
        self._watch_stop.set()
        super().interrupt()

    def _connection(self) -> Connection:
        current = (self.endpoint.host, self.endpoint.port)
        if self.conn is not None and self.named is not None and self.named != current:
            log.info("the sentinels name another master; switching", master_name=self.spec.master_name,
                     old=f"{current[0]}:{current[1]}", new=f"{self.named[0]}:{self.named[1]}")
            self.close()
        if self.conn is None:
            self.endpoint = self._resolve()
            self.named = (self.endpoint.host, self.endpoint.port)
            if self._watcher is None and not self._watch_stop.is_set():
                self._watcher = threading.Thread(target=self._watch, name="sentinel-watch", daemon=True)
                self._watcher.start()
            conn = super()._connection()
            role = conn.call("ROLE")
            if not role or role[0] != b"master":
                self.close()
                raise ReplyError(f"READONLY {self.endpoint.host}:{self.endpoint.port} is not the master (yet)")
        return self.conn  # type: ignore[return-value]

    def _ask_master(self, answer: list[Any], probe: Connection) -> None:
        answer.append(probe.call("SENTINEL", "get-master-addr-by-name", self.spec.master_name))

    def _ask_sentinel(self, host: str, port: int, answer: list[Any]) -> None:
        """Ask one sentinel whom it names. With rediss+sentinel:// a sentinel may listen in
        plaintext or with TLS: plaintext is tried first (a TLS port drops it at once, where a
        plaintext port would wait out a TLS handshake), and the way that worked is kept. A
        sentinel that answers NOAUTH is asked again with the URL's credentials, which never
        go out in plaintext when the URL asks for TLS."""
        ask = functools.partial(self._ask_master, answer)
        known = self._sentinel_tls.get((host, port))
        ways = [known] if known is not None else [False, True] if self.tls else [False]
        for i, tls in enumerate(ways):
            sentinel = Endpoint(host=host, port=port, tls=tls)
            try:
                try:
                    self._open(sentinel, setup=False, use=ask).close()
                except ReplyError as exc:
                    if exc.code != "NOAUTH" or self.spec.password is None or self.tls and not tls:
                        raise
                    sentinel = sentinel.replace(username=self.spec.username, password=self.spec.password)
                    self._open(sentinel, setup=False, use=ask).close()
            except (OSError, ReplyError):
                if i + 1 < len(ways) and not self.interrupted:
                    continue
                raise
            self._sentinel_tls[(host, port)] = tls
            return

    def _resolve(self) -> Endpoint:
        errors = []
        order = list(self.spec.sentinels)
        random.shuffle(order)
        for host, port in order:
            answer: list[Any] = []
            try:
                self._ask_sentinel(host, port, answer)
            except (OSError, ReplyError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            addr = answer[0]
            if not addr:
                errors.append(f"{host}:{port}: does not know master {self.spec.master_name!r}")
                continue
            try:
                master_host, master_port = addr[0].decode(), int(addr[1])
                if not 0 < master_port < 65536:
                    raise ValueError(master_port)
            except (TypeError, ValueError, IndexError, AttributeError, UnicodeDecodeError):
                errors.append(f"{host}:{port}: answered {str(addr)[:80]}, not a master's address")
                continue
            return Endpoint(host=master_host, port=master_port, db=self.spec.db,
                            username=self.spec.username, password=self.spec.password, tls=self.tls)
        raise ConnectionError("no sentinel named a master: " + "; ".join(errors))


class ClusterTarget(Target):
    """Routes each command to the master of its key's slot; follows MOVED and ASK."""

    MAX_REDIRECTS = 5

    def __init__(self, seed: Endpoint, factory: ConnFactory, on_connect: Callable[[Connection], None],
                 more_seeds: Sequence[tuple[str, int]] = ()) -> None:
        super().__init__(seed, factory, on_connect)
        self.seeds: list[tuple[str, int]] = list(dict.fromkeys([(seed.host, seed.port), *more_seeds]))
        self.slots: list[tuple[str, int] | None] = [None] * 16384
        self.nodes: dict[tuple[str, int], Connection] = {}

    @classmethod
    def replacing(cls, old: Target) -> ClusterTarget:
        """The cluster client that takes over from ``old``, a standalone target that turned out
        to be a cluster node: same seed, factory and set-up; interrupted if ``old`` was."""
        old.close()
        new = cls(old.endpoint, old.factory, old.on_connect)
        new.interrupted = old.interrupted
        return new

    def _node(self, addr: tuple[str, int]) -> Connection:
        conn = self.nodes.get(addr)
        if conn is None:
            conn = self._open(self.endpoint.replace(host=addr[0], port=addr[1], db=0),
                              use=lambda c: self.nodes.__setitem__(addr, c))
        return conn

    def refresh(self) -> None:
        """Read the slot map from any node that answers."""
        errors = []
        candidates = list(dict.fromkeys([*self.nodes.keys(), *self.seeds]))
        random.shuffle(candidates)
        for addr in candidates:
            try:
                conn = self._node(addr)
                shards = conn.call("CLUSTER", "SLOTS")
            except (OSError, ReplyError) as exc:
                self._forget(addr)
                errors.append(f"{addr[0]}:{addr[1]}: {exc}")
                continue
            slots: list[tuple[str, int] | None] = [None] * 16384
            for entry in shards:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() or addr[0]
                node = (host, int(master[1]))
                for s in range(start, end + 1):
                    slots[s] = node
                for replica in entry[3:]:
                    self.seeds.append((replica[0].decode() or addr[0], int(replica[1])))
                self.seeds.append(node)
            self.seeds = list(dict.fromkeys(self.seeds))[-64:]
            self.slots = slots
            return
        raise ConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _forget(self, addr: tuple[str, int]) -> None:
        conn = self.nodes.pop(addr, None)
        if conn is not None:
            conn.close()

    def _addr_for(self, cmd: tuple[Any, ...]) -> tuple[str, int]:
        key = command_key(cmd)
        if key is None:
            for addr in self.slots:
                if addr is not None:
                    return addr
            raise ConnectionError("cluster has no known master")
        slot = key_slot(key if isinstance(key, (str, bytes)) else str(key))
        addr = self.slots[slot]
        if addr is None:
            self.slots = [None] * 16384  # a map with a hole may be stale: read it again next time
            raise ReplyError("CLUSTERDOWN slot not served")
        return addr

    def ready(self) -> bool:
        return False  # a request may need a slot map, a node, a redirection

    def execute(self, cmds: list[tuple[Any, ...]], wait_replicas: int = 0, wait_ms: int = 1000,
                timeout: float | None = None) -> list[Any]:
        if all(a is None for a in self.slots):
            self.refresh()
        replies: list[Any] = [None] * len(cmds)
        pending = list(range(len(cmds)))
        asking: dict[int, tuple[str, int]] = {}
        for _round in range(self.MAX_REDIRECTS):
            groups: dict[tuple[str, int], list[int]] = {}
            for i in pending:
                addr = asking.get(i) or self._addr_for(cmds[i])
                groups.setdefault(addr, []).append(i)
            retry: list[int] = []
            moved = False
            for addr, idxs in groups.items():
                try:
                    conn = self._node(addr)
                    send: list[tuple[Any, ...]] = []
                    for i in idxs:
                        if i in asking:
                            send.append(("ASKING",))
                        send.append(cmds[i])
                    if wait_replicas:
                        send.append(("WAIT", wait_replicas, wait_ms))
                    out = conn.pipeline(send, timeout)
                except OSError as exc:
                    self._forget(addr)
                    self.slots = [None] * 16384  # the node is gone: learn the new map next time
                    exc.redis_node = f"{addr[0]}:{addr[1]}"  # type: ignore[attr-defined]  # for describe_error
                    raise
                if wait_replicas:
                    send.pop()
                    check_wait(out.pop(), wait_replicas)
                out = [r for r, c in zip(out, send, strict=True) if c[0] != "ASKING"]
                for i, reply in zip(idxs, out, strict=True):
                    if isinstance(reply, ReplyError) and reply.code in ("MOVED", "ASK"):
                        target = str(reply.args[0]).split()[2]
                        host, _, port = target.rpartition(":")
                        dest = (host or addr[0], int(port))
                        if reply.code == "MOVED":
                            moved = True
                            asking.pop(i, None)
                        else:
                            asking[i] = dest
                        retry.append(i)
                    else:
                        replies[i] = reply
            if moved:
                self.refresh()
            if not retry:
                return replies
            pending = retry
        raise ReplyError("TRYAGAIN too many cluster redirections")

    def _connections(self) -> list[Connection]:
        return list(self.nodes.values())

    def close(self) -> None:
        for addr in list(self.nodes):
            self._forget(addr)
