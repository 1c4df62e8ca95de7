"""Real multi-process Redis topologies for tests: a Redis Cluster and a Sentinel-managed master/replica.

Both are built from :class:`tests.redis_harness.RedisServer`, so each process has its own port and
directory, is registered with :mod:`tests.process_registry` while it runs, and is killed at teardown
even when a test fails half-way through starting a topology.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import redis
import redis.cluster

from tests.redis_harness import (
    REDIS_SERVER_BIN,
    RedisServer,
    RedisServerError,
    _no_retry,
    find_free_port,
    redis_server_binary,
)

REDIS_CLI_BIN = os.environ.get("SIDECAR_TEST_REDIS_CLI") or "redis-cli"
HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
# Replicas must not wait the default 5 s for more replicas before a diskless full sync.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
DEFAULT_TOPOLOGY_TIMEOUT = 30.0
_POLL = 0.05

T = TypeVar("T")
Addr = tuple[str, int]


class TopologyError(RuntimeError):
    pass


def redis_cli_binary() -> str | None:
    return shutil.which(REDIS_CLI_BIN)


def _probe(server: RedisServer, timeout: float = 1.0) -> redis.Redis:
    """A short-lived admin connection (str replies, no retries); use it as a context manager."""
    return redis.Redis(
        host=server.host,
        port=server.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_no_retry(),
        decode_responses=True,
    )


def _query(server: RedisServer, *args: Any, timeout: float = 1.0) -> Any:
    with _probe(server, timeout) as conn:
        return conn.execute_command(*args)


def _wait_until(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    diagnostics: Callable[[], str],
) -> T:
    """Call ``check`` until it returns something other than None/False; raise with logs on timeout.

    Connection errors from ``check`` count as "not yet"; the last one is reported.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TopologyError(f"timed out after {timeout:.0f}s waiting for {what}{detail}\n{diagnostics()}")
        time.sleep(_POLL)


def _logs(servers: Sequence[RedisServer], lines: int = 25) -> str:
    return "\n".join(f"=== {server!r} ===\n{server.log_tail(lines)}" for server in servers)


def _info_fields(reply: Any) -> dict[str, str]:
    """INFO-style ``key:value`` lines, whether redis-py already parsed them into a dict or not."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    fields = {}
    for line in str(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


# ----------------------------------------------------------------------------------------------
# Redis Cluster
# ----------------------------------------------------------------------------------------------


class ClusterNode(RedisServer):
    """A ``redis-server --cluster-enabled yes`` node.

    The cluster bus gets its own free port (``--cluster-port``) instead of the default port + 10000,
    which may be taken or above 65535 for an ephemeral data port. The node config file is named after
    the data port, and both are chosen again if the data port has to change on a bind race.
    """

    def __init__(self, tmp_dir: str | os.PathLike[str], extra_args: Sequence[str] = ()) -> None:
        super().__init__(tmp_dir, extra_args=extra_args)
        self._bus_for: int | None = None
        self.bus_port = 0
        self.node_id: str | None = None

    def command(self) -> list[str]:
        if self._bus_for != self.port:
            bus = find_free_port(self.host)
            while bus == self.port:
                bus = find_free_port(self.host)
            self.bus_port, self._bus_for = bus, self.port
        base = super().command()
        # Keep the caller's extra_args last so that they can override any of these.
        base = base[: len(base) - len(self.extra_args)]
        return [
            *base,
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{self.port}.conf",
            "--cluster-node-timeout", "1000",
            "--cluster-port", str(self.bus_port),
            *AOF_ALWAYS,
            *FAST_SYNC,
            *self.extra_args,
        ]  # fmt: skip

    def __repr__(self) -> str:
        state = "running" if self.running else "down"
        return f"ClusterNode(port={self.port}, bus={self.bus_port}, id={self.node_id}, {state})"


class RedisClusterTopology:
    """``masters`` masters with ``replicas`` replicas each, joined by ``redis-cli --cluster create``.

    Roles change on failover, so :meth:`masters`, :meth:`replicas_of` and :meth:`node_for_key` ask the
    running cluster each time. :attr:`url` and :meth:`client` always use the first master *as created*
    (the seed node): a client made after that node was killed cannot bootstrap from it.
    """

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        masters: int = 3,
        replicas: int = 1,
        extra_args: Sequence[str] = (),
        timeout: float = DEFAULT_TOPOLOGY_TIMEOUT,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.dir = Path(tmp_dir)
        self.num_masters = masters
        self.num_replicas = replicas
        self.extra_args = tuple(extra_args)
        self.timeout = timeout
        self.nodes: list[ClusterNode] = []
        self._seed: ClusterNode | None = None
        self._clients: list[redis.cluster.RedisCluster] = []
        self.create_output = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RedisClusterTopology:
        if self.nodes:
            raise TopologyError("cluster already started")
        cli = redis_cli_binary()
        if cli is None:
            raise TopologyError(f"{REDIS_CLI_BIN!r} not found on PATH")
        total = self.num_masters * (1 + self.num_replicas)
        try:
            for index in range(total):
                node = ClusterNode(self.dir / f"node-{index}", extra_args=self.extra_args)
                self.nodes.append(node)
                node.start()
            for node in self.nodes:
                node.node_id = _query(node, "CLUSTER MYID")
            self._create(cli)
            self.wait_state_ok(self.timeout, expect_nodes=total)
            self._wait_replicas_in_sync(self.timeout)
            self._seed = self.masters()[0]
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        """Close the clients made by :meth:`client` and stop every node. Idempotent."""
        clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:
                pass
        errors = []
        for node in reversed(self.nodes):
            try:
                node.shutdown()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise TopologyError(f"cluster shutdown failed: {errors!r}")

    def __enter__(self) -> RedisClusterTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- addressing ------------------------------------------------------------------------

    @property
    def seed(self) -> ClusterNode:
        if self._seed is None:
            raise TopologyError("cluster not started")
        return self._seed

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.seed.port}/0"

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A ``RedisCluster`` bootstrapped from the seed node; closed by :meth:`shutdown`."""
        client = redis.cluster.RedisCluster(host=HOST, port=self.seed.port, **kwargs)
        self._clients.append(client)
        return client

    def node_by_port(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise TopologyError(f"no node of this cluster listens on port {port}")

    def running_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running]

    # -- topology queries ------------------------------------------------------------------

    def slot_map(
        self, via: RedisServer | None = None
    ) -> list[tuple[int, int, ClusterNode, list[ClusterNode]]]:
        """``(first_slot, last_slot, master, replicas)`` from ``CLUSTER SLOTS`` of ``via``."""
        source = via if via is not None else self._any_running()
        ranges = []
        for entry in _query(source, "CLUSTER SLOTS"):
            start, end, master, *replicas = entry
            ranges.append(
                (
                    int(start),
                    int(end),
                    self.node_by_port(int(master[1])),
                    [self.node_by_port(int(r[1])) for r in replicas],
                )
            )
        return sorted(ranges, key=lambda r: r[0])

    def keyslot(self, key: str | bytes) -> int:
        return int(_query(self._any_running(), "CLUSTER KEYSLOT", key))

    def masters(self) -> list[ClusterNode]:
        """Masters currently serving slots (in slot order), as the first running node sees it."""
        found: list[ClusterNode] = []
        for _start, _end, master, _replicas in self.slot_map():
            if not any(m is master for m in found):
                found.append(master)
        return found

    def nodes_view(self, via: RedisServer | None = None) -> dict[int, NodeEntry]:
        """``CLUSTER NODES`` of ``via`` (default: the first running node), keyed by data port."""
        source = via if via is not None else self._any_running()
        return _cluster_nodes(_query(source, "CLUSTER NODES"))

    def replicas_of(self, master: RedisServer) -> list[ClusterNode]:
        """Nodes configured as replicas of ``master``, as the first running node sees it."""
        node = self.node_by_port(master.port)
        ports = [
            port
            for port, entry in self.nodes_view().items()
            if "slave" in entry.flags and entry.master_id == node.node_id
        ]
        return sorted((self.node_by_port(p) for p in ports), key=self.nodes.index)

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The master serving ``key``'s slot right now."""
        slot = self.keyslot(key)
        for start, end, master, _replicas in self.slot_map():
            if start <= slot <= end:
                return master
        raise TopologyError(f"slot {slot} is not served by any node")

    # -- faults ----------------------------------------------------------------------------

    def kill_master_of(self, key: str | bytes) -> ClusterNode:
        """SIGKILL the master serving ``key``'s slot and return it."""
        master = self.node_for_key(key)
        master.kill()
        return master

    def wait_for_failover(
        self, key: str | bytes, old_master: RedisServer, timeout: float = 20
    ) -> ClusterNode:
        """Wait until every surviving node says ``cluster_state:ok`` and that another node, which
        answers ``ROLE`` as master, serves ``key``'s slot; return that node."""
        slot = self.keyslot(key)

        def promoted() -> ClusterNode | None:
            owners = set()
            for node in self.running_nodes():
                if _cluster_info(node).get("cluster_state") != "ok":
                    return None
                for start, end, master, _replicas in self.slot_map(via=node):
                    if start <= slot <= end:
                        owners.add(master.port)
            if len(owners) != 1:
                return None
            new = self.node_by_port(owners.pop())
            if new.port == old_master.port or not new.running:
                return None
            if _query(new, "ROLE")[0] != "master":
                return None
            return new

        return _wait_until(
            f"failover of slot {slot} away from port {old_master.port}",
            promoted,
            timeout,
            self.diagnostics,
        )

    def wait_state_ok(
        self, timeout: float = DEFAULT_TOPOLOGY_TIMEOUT, expect_nodes: int | None = None
    ) -> None:
        """Wait until every running node reports ``cluster_state:ok`` with all 16384 slots assigned
        and ok, and all running nodes agree on who serves each slot (and, if given, that each node
        knows ``expect_nodes`` nodes)."""

        def ok() -> bool:
            views = []
            for node in self.running_nodes():
                info = _cluster_info(node)
                if (
                    info.get("cluster_state") != "ok"
                    or int(info.get("cluster_slots_assigned", 0)) != CLUSTER_SLOTS
                    or int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS
                ):
                    return False
                if expect_nodes is not None and int(info.get("cluster_known_nodes", 0)) != expect_nodes:
                    return False
                view = [(s, e, m.port) for s, e, m, _rs in self.slot_map(via=node)]
                covered = sum(e - s + 1 for s, e, _m in view)
                if covered != CLUSTER_SLOTS:
                    return False
                views.append(view)
            return bool(views) and all(v == views[0] for v in views)

        _wait_until("cluster_state:ok on every node", ok, timeout, self.diagnostics)

    def diagnostics(self) -> str:
        parts = []
        if self.create_output:
            parts.append(f"=== redis-cli --cluster create ===\n{self.create_output[-4000:]}")
        for node in self.running_nodes():
            try:
                info = _cluster_info(node)
                parts.append(
                    f"=== {node!r} CLUSTER INFO ===\n"
                    + " ".join(
                        f"{k}={info.get(k)}"
                        for k in ("cluster_state", "cluster_slots_ok", "cluster_known_nodes")
                    )
                )
            except (redis.RedisError, OSError) as exc:
                parts.append(f"=== {node!r} CLUSTER INFO failed: {exc!r}")
        parts.append(_logs(self.nodes))
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------------

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if node.running and node.ping(timeout=0.5):
                return node
        raise TopologyError(f"no cluster node answers\n{self.diagnostics()}")

    def _create(self, cli: str) -> None:
        cmd = [
            cli,
            "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas", str(self.num_replicas),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            self.create_output = (exc.output or b"").decode(errors="replace")
            raise TopologyError(f"{' '.join(cmd)} timed out\n{self.diagnostics()}") from None
        self.create_output = done.stdout.decode(errors="replace")
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in self.create_output:
            raise TopologyError(f"{' '.join(cmd)} failed (exit {done.returncode})\n{self.diagnostics()}")

    def _wait_replicas_in_sync(self, timeout: float) -> None:
        """Every master has its replicas, each replica's link is up, and every node agrees on who
        replicates whom (masters need that to vote in a failover)."""

        def synced() -> bool:
            relations = None
            for node in self.running_nodes():
                view = {
                    port: entry.master_id if "slave" in entry.flags else None
                    for port, entry in self.nodes_view(via=node).items()
                }
                if relations is not None and view != relations:
                    return False
                relations = view
            for master in self.masters():
                replicas = self.replicas_of(master)
                if len(replicas) != self.num_replicas:
                    return False
                if not all(_replica_link_up(replica, master) for replica in replicas):
                    return False
            return True

        _wait_until("every replica in sync with its master", synced, timeout, self.diagnostics)


class NodeEntry(NamedTuple):
    node_id: str
    flags: frozenset[str]
    master_id: str | None


def _cluster_nodes(reply: Any) -> dict[int, NodeEntry]:
    """``CLUSTER NODES``, raw text or as parsed by redis-py, keyed by data port."""
    rows: list[tuple[str, str, str, str]] = []
    if isinstance(reply, dict):
        rows = [
            (str(addr), str(e["node_id"]), str(e["flags"]), str(e["master_id"])) for addr, e in reply.items()
        ]
    else:
        for line in str(reply).splitlines():
            fields = line.split()
            if len(fields) >= 4:
                rows.append((fields[1], fields[0], fields[2], fields[3]))
    entries = {}
    for addr, node_id, flags, master_id in rows:
        port = int(addr.split("@", 1)[0].split(",", 1)[0].rsplit(":", 1)[1])
        entries[port] = NodeEntry(
            node_id, frozenset(flags.split(",")), None if master_id == "-" else master_id
        )
    return entries


def _cluster_info(node: RedisServer) -> dict[str, str]:
    return _info_fields(_query(node, "CLUSTER INFO"))


def _replica_link_up(replica: RedisServer, master: RedisServer) -> bool:
    fields = _info_fields(_query(replica, "INFO", "replication"))
    return (
        fields.get("role") == "slave"
        and fields.get("master_port") == str(master.port)
        and fields.get("master_link_status") == "up"
    )


# ----------------------------------------------------------------------------------------------
# Sentinel
# ----------------------------------------------------------------------------------------------


class SentinelServer(RedisServer):
    """``redis-server <conf> --sentinel``; the config file lives in the sentinel's own directory and
    is (re)written before each spawn on a new port, since Sentinel rewrites it as it learns."""

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        master_name: str,
        master_addr: Addr,
        quorum: int = 2,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__(tmp_dir)
        self.master_name = master_name
        self.master_addr = master_addr
        self.quorum = quorum
        self.extra_config = tuple(extra_config)
        self._config_for: int | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "sentinel.conf"

    def command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError(f"{REDIS_SERVER_BIN!r} not found on PATH")
        if self._config_for != self.port or not self.config_path.exists():
            self._write_config()
        return [binary, str(self.config_path), "--sentinel"]

    def _write_config(self) -> None:
        name = self.master_name
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {self.dir.resolve()}",
            f"logfile {self.log_path.resolve()}",
            "daemonize no",
            f"sentinel monitor {name} {self.master_addr[0]} {self.master_addr[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 3000",
            f"sentinel parallel-syncs {name} 1",
            *self.extra_config,
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")
        self._config_for = self.port

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def __repr__(self) -> str:
        state = "running" if self.running else "down"
        return f"SentinelServer(port={self.port}, dir={str(self.dir)!r}, {state})"


class SentinelTopology:
    """One master, one replica and three sentinels (quorum 2) watching ``mymaster``.

    :attr:`master` and :attr:`replica` are the servers started in those roles; after a failover
    ask :meth:`current_master_addr` / :meth:`current_master` who the master is.
    """

    master_name = "mymaster"

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        num_sentinels: int = 3,
        quorum: int = 2,
        extra_args: Sequence[str] = (),
        timeout: float = DEFAULT_TOPOLOGY_TIMEOUT,
    ) -> None:
        self.dir = Path(tmp_dir)
        self.num_sentinels = num_sentinels
        self.quorum = quorum
        self.extra_args = tuple(extra_args)
        self.timeout = timeout
        self._master: RedisServer | None = None
        self._replica: RedisServer | None = None
        self.sentinel_servers: list[SentinelServer] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SentinelTopology:
        if self._master is not None:
            raise TopologyError("sentinel topology already started")
        try:
            self._master = RedisServer(
                self.dir / "master", extra_args=(*AOF_ALWAYS, *FAST_SYNC, *self.extra_args)
            ).start()
            self._replica = RedisServer(
                self.dir / "replica",
                extra_args=(
                    *AOF_ALWAYS,
                    *FAST_SYNC,
                    *self.extra_args,
                    "--replicaof",
                    HOST,
                    str(self._master.port),
                ),
            ).start()
            for index in range(self.num_sentinels):
                sentinel = SentinelServer(
                    self.dir / f"sentinel-{index}",
                    self.master_name,
                    (HOST, self._master.port),
                    quorum=self.quorum,
                )
                self.sentinel_servers.append(sentinel)
                sentinel.start()
            _wait_until(
                "replica in sync with the master",
                lambda: _replica_link_up(self.replica, self.master),
                self.timeout,
                self.diagnostics,
            )
            _wait_until(
                "every sentinel to know the master, its replica and the other sentinels",
                self._sentinels_converged,
                self.timeout,
                self.diagnostics,
            )
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        """Stop sentinels first (so they do not fail over a master being shut down), then data nodes."""
        errors = []
        servers: list[RedisServer] = [*reversed(self.sentinel_servers)]
        servers += [s for s in (self._replica, self._master) if s is not None]
        for server in servers:
            try:
                server.shutdown()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise TopologyError(f"sentinel topology shutdown failed: {errors!r}")

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- addressing ------------------------------------------------------------------------

    @property
    def master(self) -> RedisServer:
        if self._master is None:
            raise TopologyError("sentinel topology not started")
        return self._master

    @property
    def replica(self) -> RedisServer:
        if self._replica is None:
            raise TopologyError("sentinel topology not started")
        return self._replica

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [s for s in (self._master, self._replica) if s is not None]

    @property
    def sentinels(self) -> list[Addr]:
        return [s.addr for s in self.sentinel_servers]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def server_at(self, addr: Addr) -> RedisServer:
        for server in self.data_nodes:
            if server.port == int(addr[1]):
                return server
        raise TopologyError(f"no data node of this topology listens on {addr[0]}:{addr[1]}")

    def current_master_addr(self) -> Addr:
        """``SENTINEL get-master-addr-by-name`` from the first sentinel that answers."""
        errors = []
        for sentinel in self.sentinel_servers:
            if not sentinel.running:
                continue
            try:
                host, port = _query(sentinel, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                return (str(host), int(port))
            except (redis.RedisError, OSError, TypeError, ValueError) as exc:
                errors.append(exc)
        raise TopologyError(f"no sentinel reported a master for {self.master_name}: {errors!r}")

    def current_master(self) -> RedisServer:
        return self.server_at(self.current_master_addr())

    # -- faults ----------------------------------------------------------------------------

    def kill_master(self) -> RedisServer:
        """SIGKILL the data node the sentinels currently report as master; return it."""
        server = self.current_master()
        server.kill()
        return server

    def wait_for_failover(self, old_addr: Addr, timeout: float = 30) -> Addr:
        """Wait until every running sentinel reports the same master, other than ``old_addr``,
        and that node answers ``ROLE`` as master; return its address."""
        old = (str(old_addr[0]), int(old_addr[1]))

        def promoted() -> Addr | None:
            reported = set()
            for sentinel in self.sentinel_servers:
                if not sentinel.running:
                    continue
                host, port = _query(sentinel, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                reported.add((str(host), int(port)))
            if len(reported) != 1:
                return None
            addr = reported.pop()
            if addr == old:
                return None
            server = self.server_at(addr)
            if not server.running or _query(server, "ROLE")[0] != "master":
                return None
            return addr

        return _wait_until(
            f"sentinels to fail {self.master_name} over from {old[0]}:{old[1]}",
            promoted,
            timeout,
            self.diagnostics,
        )

    def diagnostics(self) -> str:
        parts = []
        for sentinel in self.sentinel_servers:
            if not sentinel.running:
                continue
            try:
                state = _query(sentinel, "SENTINEL MASTER", self.master_name)
                keys = ("ip", "port", "flags", "num-slaves", "num-other-sentinels", "failover-state")
                parts.append(f"=== {sentinel!r} ===\n" + " ".join(f"{k}={state.get(k)}" for k in keys))
            except (redis.RedisError, OSError) as exc:
                parts.append(f"=== {sentinel!r} SENTINEL MASTER failed: {exc!r}")
        parts.append(_logs([*self.data_nodes, *self.sentinel_servers]))
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------------

    def _sentinels_converged(self) -> bool:
        for sentinel in self.sentinel_servers:
            state = _query(sentinel, "SENTINEL MASTER", self.master_name)
            if int(state.get("port", 0)) != self.master.port or "s_down" in str(state.get("flags", "")):
                return False
            if int(state.get("num-slaves", 0)) < 1:
                return False
            if int(state.get("num-other-sentinels", 0)) < self.num_sentinels - 1:
                return False
        return True
