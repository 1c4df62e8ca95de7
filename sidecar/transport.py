"""The Redis side: one sender thread pipelines queued items, retrying with backoff until they land.

Each item is appended by a Lua script that keeps, per stream, the highest sequence number
each producer has written (hash ``<stream>:idem``). A batch whose reply was lost is sent
again on retry, and the script skips it if it was applied: no duplicate in the stream.
Producers are unique per sidecar process, so a restarted pod never has its new data taken
for a repeat. Publishing happens inside the same script, so a retry does not repeat the
pub/sub message either (except with --transport pubsub or --wire per-line-json).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from . import log
from ._native import speedups as _speedups
from .batcher import Batcher
from .config import Settings, mask_url, split_hosts
from .items import Item
from .outbox import Outbox
from .resp import Connection, Endpoint, ReplyError, client_name, pack_py, parse_url
from .topology import ClusterTarget, SentinelTarget, Target, has_hash_tag, parse_sentinel_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# ARGV: producer, first, last, payload, maxlen, publish (0/1/2), ttl, prev, gap (1: a gap
# marker). A batch lands whole or not at all: it is skipped when the high-water mark has reached
# its first sequence number. A gap marker is skipped only when every record it names landed:
# one made at exit can cover batches sent before a lost reply that did land; its JSON then
# names only the rest (from, seq, n). ``prev`` is the last sequence number of the item before
# this one for the same key in the same pipeline (0: none): unless that item landed, this one
# must not, or the high-water mark would jump over it and its retry would be skipped as a
# repeat.
APPEND_SCRIPT = """
local hwm = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local first, last, payload = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if ARGV[9] == '1' then
  if hwm >= last then return 0 end
  if hwm >= first then
    local m = cjson.decode(payload)
    m['from'] = hwm + 1
    m['seq'] = hwm + 1
    m['n'] = last - hwm
    payload = cjson.encode(m)
  end
elseif hwm >= first then
  return 0
end
local prev = tonumber(ARGV[8])
if prev > 0 and hwm < prev then return redis.error_reply('SEQGAP the batch before this one was not written') end
if ARGV[5] ~= '0' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'd', payload)
else
  redis.call('XADD', KEYS[1], '*', 'd', payload)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[6] == '1' then
  redis.call('PUBLISH', KEYS[1], payload)
elseif ARGV[6] == '2' then
  redis.call('SPUBLISH', KEYS[1], payload)
end
return 1
"""

# Token usage: added to per-run totals once per report (same idempotency rule as appends),
# then announced on the metrics channel. A report that would take a total past what HINCRBY
# (64-bit) or HINCRBYFLOAT keeps is not counted at all (returns 2): a script that failed half
# way would leave the first fields added, and its retry would be skipped as a repeat.
# ARGV: producer, seq, payload, ttl, variation, prev (as for appends), then field/value pairs.
TOKENS_SCRIPT = """
local hwm = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if hwm >= tonumber(ARGV[2]) then return 0 end
local prev = tonumber(ARGV[6])
if prev > 0 and hwm < prev then return redis.error_reply('SEQGAP the report before this one was not counted') end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local prefix = 'variation:' .. ARGV[5] .. ':'
for i = 7, #ARGV - 1, 2 do
  local f, v = ARGV[i], tonumber(ARGV[i + 1])
  local limit = 9e18
  if f == 'cost_usd' then limit = 1e300 end
  for _, field in ipairs({f, prefix .. f}) do
    local total = (tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0) + v
    if not (total < limit) then return 2 end
  end
end
for i = 7, #ARGV - 1, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if f == 'cost_usd' then
    redis.call('HINCRBYFLOAT', KEYS[1], f, v)
    redis.call('HINCRBYFLOAT', KEYS[1], prefix .. f, v)
  else
    redis.call('HINCRBY', KEYS[1], f, v)
    redis.call('HINCRBY', KEYS[1], prefix .. f, v)
  end
end
redis.call('HINCRBY', KEYS[1], 'reports', 1)
redis.call('HINCRBY', KEYS[1], prefix .. 'reports', 1)
redis.call('PUBLISH', 'metrics:agent:tokens', ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""
# Each script's SHA-1, as EVALSHA names it; literal, so that start-up does not load OpenSSL
# for hashlib (tests/unit/test_transport_scripts.py checks them against the scripts).
TOKENS_SHA = "9e889b784ad257de1be04b630beb06eefb08877a"

# The variation hash takes a status only if it is not older than the one it holds (by the
# status timestamp): replaying an earlier attempt's spool must not roll the state back.
# ARGV: timestamp, ttl, then field/value pairs.
VARIATION_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], 'updated_at')
if cur and cur > ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""
VARIATION_SHA = "e8d03e14a55e1675c7a72eb86cca1758568ecd2f"
TOKEN_TOTAL_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                      "cost_usd")
# Lifecycle states that set `status` in the variation hash (agent-reported states set `agent_state`).
_FINAL = ("exited", "killed", "failed", "cancelled")


def status_key_tagged(settings: Settings, key: str, msg: dict[str, Any]) -> bool:
    """Whether a status message's key was written with the run id in a hash tag: as the
    status template gives it one way or the other; the setting when both or neither match."""
    run = str(msg.get("run_id", ""))
    fields = {"variation_id": str(msg.get("variation_id", "")), "agent_id": str(msg.get("agent_id", ""))}
    tagged = settings.status_channel.format(run_id=f"{{{run}}}", **fields) == key
    plain = settings.status_channel.format(run_id=run, **fields) == key
    return tagged if tagged != plain else settings.cluster_hash_tag


def variation_key(run_id: str, variation_id: str) -> str:
    return f"run:{run_id}:variation:{variation_id}"


def status_hash_fields(msg: dict[str, Any]) -> list[Any]:
    """HSET field/value pairs for the variation hash from a status message."""
    meta = msg.get("metadata") or {}
    status = str(msg.get("status", ""))
    fields: list[Any] = ["agent_id", msg.get("agent_id", ""), "updated_at", msg.get("timestamp", ""),
                         "producer", msg.get("producer", "")]
    if status == "agent":
        # the agent chose the other keys of this metadata: only its state goes to the hash
        return [*fields, "agent_state", str(meta.get("state", ""))]
    if status not in ("degraded", "recovered", "control_rejected"):
        fields += ["status", status]
    if "pid" in meta:
        fields += ["pid", meta["pid"]]
    if status in _FINAL and "exit_code" in meta:
        fields += ["exit_code", meta["exit_code"]]
    if status in ("killed", "cancelled") and "signal" in meta:  # cancelled: when a signal ended it
        fields += ["signal", meta["signal"]]
    if status == "running" and not meta.get("resumed"):  # the end of a pause is no new start
        fields += ["started_at", msg.get("timestamp", "")]
    return fields


# Replies that tell a client which took the server for a standalone one that it is a cluster
# node: a redirection, or CROSSSLOT for a two-key script (the cluster refuses that one before
# it looks at which node serves the slot).
CLUSTER_CUES = ("MOVED", "ASK", "CROSSSLOT")


def taken_for_standalone(settings: Settings, target: Target | None) -> bool:
    """In auto mode, a target that has not turned out to be a cluster (or Sentinel) yet."""
    return settings.redis_mode == "auto" and type(target) is Target


def reveals_cluster(settings: Settings, target: Target, replies: list[Any]) -> bool:
    """In auto mode, a standalone target whose replies say it is a cluster node."""
    return taken_for_standalone(settings, target) and any(
        isinstance(r, ReplyError) and r.code in CLUSTER_CUES for r in replies)

# Failures worth waiting out: the server is away, restarting, loading, read-only after a
# failover, out of memory, or refusing our credentials (they may be fixed meanwhile).
RETRYABLE: tuple[type[BaseException], ...] = (OSError, ReplyError)
APPEND_SHA = "1e7cd01a506c9e4920b071c77732193a434c3e33"
# Loaded on every new connection, each checked against its digest.
_SCRIPTS = ((APPEND_SCRIPT, APPEND_SHA), (TOKENS_SCRIPT, TOKENS_SHA), (VARIATION_SCRIPT, VARIATION_SHA))

MAX_PIPELINE_ITEMS = 64
MAX_PIPELINE_BYTES = 8 << 20
# A lone line delivered by the pipe reader itself (Sender.deliver_here) waits at most this
# long for each socket operation; past it the connection is dropped and the sender thread
# takes over (appends are idempotent), so the reader is back at the pipe soon in any case.
DIRECT_TIMEOUT_S = 0.025
DIRECT_TIMEOUT_MS = round(DIRECT_TIMEOUT_S * 1000)  # the same, for the native module
# After a direct delivery failed, the sender thread delivers everything for this long.
DIRECT_PAUSE_S = 5.0
_lone_exchange = getattr(_speedups, "lone_exchange", None)


def idem_key(stream_key: str, cluster: bool = False) -> str:
    """The idempotency hash of a stream. On a cluster it must share the stream's slot: the
    stream key becomes the hash tag unless it already has one."""
    if cluster and not has_hash_tag(stream_key):
        return f"{{{stream_key}}}:idem"
    return f"{stream_key}:idem"


def connect(settings: Settings, **overrides: Any) -> Any:
    """A redis-py client for the read side (tail, consumers): standalone, Sentinel master or Cluster,
    with our timeouts and without redis-py's own retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": min(settings.socket_timeout_s, 5.0),
    }
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    tls = settings.redis_url.startswith("rediss")
    if tls:
        kwargs["ssl_cert_reqs"] = "required"
        if settings.redis_ca_file:
            kwargs["ssl_ca_certs"] = settings.redis_ca_file
        if settings.redis_cert_file:
            kwargs["ssl_certfile"] = settings.redis_cert_file
            kwargs["ssl_keyfile"] = settings.redis_key_file
    kwargs.update(overrides)
    url = settings.redis_url
    if "+sentinel://" in url or settings.redis_mode == "sentinel":
        from redis.sentinel import MasterNotFoundError, Sentinel

        spec = parse_sentinel_url(url, settings.redis_password, settings.redis_username)
        if tls:
            kwargs["ssl"] = True
        kwargs.pop("password", None)
        kwargs.pop("username", None)
        # The sentinels are asked as the run command asks them (SentinelTarget._ask_sentinel):
        # in plaintext, then (rediss+sentinel://) with TLS, each without credentials, then
        # with the URL's where they may go; the first way that names a master is kept.
        timeouts = {"socket_timeout": settings.socket_timeout_s,
                    "socket_connect_timeout": min(settings.socket_timeout_s, 5.0), "retry": Retry(NoBackoff(), 0)}
        ways = [timeouts]
        if tls:
            ways.append(dict(timeouts, **{k: v for k, v in kwargs.items() if k.startswith("ssl")}))
        if spec.password is not None:  # after the last way: with TLS when the URL asks for it
            ways.append(dict(ways[-1], username=spec.username, password=spec.password))
        sentinel = None
        for way in ways:
            sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs=way)
            try:
                sentinel.discover_master(spec.master_name)
                break
            except MasterNotFoundError:
                continue
        assert sentinel is not None
        return sentinel.master_for(spec.master_name, db=spec.db, password=spec.password, username=spec.username,
                                   **kwargs)
    hosts = split_hosts(url)
    if hosts is not None:
        from redis.cluster import ClusterNode, RedisCluster

        seeds = [parse_url(u, password=settings.redis_password, username=settings.redis_username) for u in hosts]
        kwargs.update(username=seeds[0].username, password=seeds[0].password, ssl=tls)
        return RedisCluster(startup_nodes=[ClusterNode(e.host, e.port) for e in seeds], **kwargs)
    cluster = settings.redis_mode == "cluster"
    if settings.redis_mode == "auto":
        probe = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **kwargs)
        try:
            cluster = probe.info("cluster").get("cluster_enabled") == 1
        except redis.RedisError:
            cluster = False
        finally:
            probe.close()
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **kwargs)


def tls_context(settings: Settings) -> Any:
    """Verification on, always: a CA file adds trust, it never turns checking off."""
    import ssl

    ctx = ssl.create_default_context()  # the system's CAs: with cafile= it would trust that file alone
    if settings.redis_ca_file:
        ctx.load_verify_locations(cafile=settings.redis_ca_file)
    if settings.redis_cert_file:
        ctx.load_cert_chain(settings.redis_cert_file, settings.redis_key_file)
    return ctx


def make_target(settings: Settings, on_connect: Any, name: str = "agent-sidecar") -> Target:
    """Standalone, Sentinel or Cluster, from the URL and --redis-mode."""
    ctx = None

    def factory(ep: Endpoint) -> Connection:
        nonlocal ctx
        if ep.tls and ctx is None:
            ctx = tls_context(settings)
        return Connection(ep, socket_timeout=settings.socket_timeout_s,
                          connect_timeout=min(settings.socket_timeout_s, 5.0),
                          ssl_context=ctx if ep.tls else None, client_name=name)

    url = settings.redis_url
    if "+sentinel://" in url or settings.redis_mode == "sentinel":
        spec = parse_sentinel_url(url, settings.redis_password, settings.redis_username)
        return SentinelTarget(spec, factory, on_connect, tls=url.startswith("rediss+"))
    hosts = split_hosts(url) or [url]
    endpoint, *more = (parse_url(u, password=settings.redis_password, username=settings.redis_username)
                       for u in hosts)
    if settings.redis_mode == "cluster" or more:
        return ClusterTarget(endpoint, factory, on_connect, [(e.host, e.port) for e in more])
    return Target(endpoint, factory, on_connect)


def cluster_enabled(reply: Any) -> bool:
    """Whether a CLUSTER INFO reply came from a cluster node: a standalone server answers with
    an error (cluster support disabled), and so does one whose ACL refuses the command."""
    return isinstance(reply, bytes) and b"cluster_state:" in reply


class TargetPipe:
    """A Connection-like face (connect, pipeline, close) over a Target, for side paths such as the
    heartbeat: it follows Sentinel and Cluster like the data path, and turns into a cluster
    client, in auto mode, on the first MOVED reply or when a new connection finds a cluster node."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self._cluster_seen = False
        self.target = make_target(settings, self._on_connect, name)
        self.connected = True  # connects lazily

    def _on_connect(self, conn: Connection) -> None:
        if taken_for_standalone(self.settings, self.target):
            self._cluster_seen = cluster_enabled(conn.pipeline([("CLUSTER", "INFO")])[0])

    def connect(self) -> None:
        pass

    def interrupt(self) -> None:
        self.target.interrupt()

    def pipeline(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        if self._cluster_seen and type(self.target) is Target:
            self.target = ClusterTarget.replacing(self.target)
        replies = self.target.execute(cmds)
        if reveals_cluster(self.settings, self.target, replies):
            self.target = ClusterTarget.replacing(self.target)
            replies = self.target.execute(cmds)
        return replies

    def close(self) -> None:
        self.target.close()


def subscriber_connection(settings: Settings, name: str) -> Connection:
    """A plain connection for SUBSCRIBE: to the master the sentinels name, or the URL's node (on a
    cluster, classic pub/sub messages reach every node)."""
    if "+sentinel://" in settings.redis_url or settings.redis_mode == "sentinel":
        target = make_target(settings, lambda _conn: None, name)
        assert isinstance(target, SentinelTarget)
        endpoint = target._resolve()
        return target.factory(endpoint)
    return open_connection(settings, name)


def open_connection(settings: Settings, name: str = "agent-sidecar", node: tuple[str, int] | None = None) -> Connection:
    """A plain connection to the URL's server (the first of several), or to ``node`` (a cluster
    node) with the same credentials and TLS settings."""
    url = (split_hosts(settings.redis_url) or [settings.redis_url])[0]
    endpoint = parse_url(url, password=settings.redis_password, username=settings.redis_username)
    if node is not None:
        endpoint = endpoint.replace(host=node[0], port=node[1], db=0)
    return Connection(
        endpoint,
        socket_timeout=settings.socket_timeout_s,
        connect_timeout=min(settings.socket_timeout_s, 5.0),
        ssl_context=tls_context(settings) if endpoint.tls else None,
        client_name=name,
    )


def describe_error(exc: BaseException, url: str) -> str:
    """One line, no secrets; names the cluster node that failed when it was not the URL's."""
    text = str(exc) or type(exc).__name__
    node = getattr(exc, "redis_node", None)
    where = f"node {node} of the cluster at {mask_url(url)}" if node else mask_url(url)
    return f"{type(exc).__name__}: {text} ({where})"


class Stats:
    __slots__ = ("records_shipped", "bytes_shipped", "items_shipped", "last_ok", "connected", "down_since")

    def __init__(self) -> None:
        self.records_shipped = 0
        self.bytes_shipped = 0
        self.items_shipped = 0
        self.last_ok = 0.0
        self.connected = False
        self.down_since: float | None = None


def _backoff(cap_s: float) -> Any:
    """Exponential backoff from 50 ms with jitter, capped (tenacity renamed `initial` to `multiplier`)."""
    from tenacity import wait_exponential_jitter

    try:
        return wait_exponential_jitter(multiplier=0.05, max=cap_s, jitter=0.2)
    except TypeError:
        return wait_exponential_jitter(initial=0.05, max=cap_s, jitter=0.2)


class Sender:
    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        batcher: Batcher | None,
        *,
        on_degraded: Callable[[float, str], None] | None = None,
        on_recovered: Callable[[float, int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        # What _send asks of the settings for every item, computed once (properties).
        self._ttl, self._use_stream, self._use_pubsub = settings.ttl_s, settings.use_stream, settings.use_pubsub
        # send_lone's publish mode for the append script; -1: that path is not taken (no
        # stream, or each batch waits for replicas)
        self._lone_publish = -1 if settings.min_replicas_ack or not self._use_stream else \
            (2 if settings.pubsub == "sharded" else 1) if self._use_pubsub else 0
        # stream key -> (producer, the PING and the append before its seqs, after its payload)
        self._lone_cmds: dict[str, tuple[str, bytes, bytes]] = {}
        self.outbox = outbox
        self.batcher = batcher
        self.on_degraded = on_degraded
        self.on_recovered = on_recovered
        self.stats = Stats()
        self._stop = threading.Event()  # deliver what is queued, then stop
        self._stopping = False  # _stop is set (read once a lone line: Event.is_set is Python code)
        self._abandon = threading.Event()  # stop now, even mid-retry
        self._target: Target | None = None
        self._last_error = ""
        # Held by whoever takes items from the outbox and sends them: the sender thread, or
        # the pipe reader delivering a lone line itself (deliver_here).
        self._turn = threading.Lock()
        self._direct_after = 0.0  # monotonic time before which deliver_here declines
        # The agent's output decides how many token reports overflow: its log must not.
        self._overflow_budget = log.Budget("more than 20 token reports not added to the totals this minute; "
                                           "not logging each")
        self._refusals_told: set[str] = set()  # codes of error replies already logged as warnings
        self._cluster_seen = False  # a connection in auto mode found a cluster node
        # On Sentinel, called (from the target's watcher) with the master the sentinels name
        # after a failover; the control subscription follows the data path with it.
        self.on_master_switch: Callable[[tuple[str, int]], None] | None = None
        self.thread = threading.Thread(target=self._run, name="redis-sender", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """No more input will come: deliver everything, then end."""
        self._stop.set()
        self._stopping = True
        self.outbox.notify()

    def abandon(self) -> None:
        """Stop now, even mid-retry or mid-read: what is not acknowledged stays queued."""
        self._abandon.set()
        self._stop.set()
        self._stopping = True
        self.outbox.notify()
        target = self._target
        if target is not None:
            target.interrupt()

    def join(self, timeout: float | None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._abandon.is_set():
            try:
                with self._turn:
                    items = self.outbox.take(MAX_PIPELINE_ITEMS, MAX_PIPELINE_BYTES)
                    if items:
                        if not self._deliver(items):
                            self.outbox.release_inflight()
                            return
                        self.outbox.ack(len(items))
                if not items:
                    if self._stop.is_set() and self.outbox.empty():
                        return
                    # Stopping: the pipe reader may hold the last items (deliver_here), and
                    # its acknowledgement does not wake this thread.
                    self.outbox.wait(0.05 if self._stop.is_set() else 1.0)
                    continue
                failures = 0
                if self.batcher is not None and self.outbox.idle():
                    self.batcher.notify_idle()
            except Exception as exc:
                # A bug must neither take the agent down nor lose output: keep what waits
                # queued, say so once, and try again after a pause. Under _turn: the pipe
                # reader may be delivering on this connection (send_lone writes its descriptor).
                with self._turn:
                    self.outbox.release_inflight()
                    self._drop_client()
                if failures == 0:
                    log.error("unexpected error while sending; retrying", error=repr(exc))
                failures += 1
                self._abandon.wait(min(5.0, 0.1 * 2**failures))

    def deliver_here(self) -> bool:
        """Deliver what waits in the outbox from the calling thread (the pipe reader, after
        queuing a lone line with ``wake=False``), when the sender thread is idle and one round
        trip on an open connection will do. A lone line then costs one thread wake-up less.

        False when it declined or failed: the caller must wake the sender thread
        (``outbox.notify``), which delivers as usual, retrying. Each socket operation here
        waits at most DIRECT_TIMEOUT_S; a slower or failed reply drops the connection (the
        sender thread sends the items again; appends are idempotent) and leaves delivery to
        the sender thread for DIRECT_PAUSE_S.
        """
        if (self.settings.min_replicas_ack or self.stats.down_since is not None or self._stop.is_set()
                or time.monotonic() < self._direct_after or not self._turn.acquire(blocking=False)):
            return False
        try:
            target = self._target
            if target is None or not target.ready():
                return False
            items = self.outbox.take(MAX_PIPELINE_ITEMS, MAX_PIPELINE_BYTES)
            if not items:
                return True
            try:
                self._send(items, DIRECT_TIMEOUT_S)
            except RETRYABLE as exc:  # what the sender thread waits out, retrying
                self._direct_failed()
                log.debug("direct delivery failed; the sender thread takes over", error=repr(exc))
                return False
            self._delivered(items)
            self.outbox.ack(len(items))
            return True
        except Exception as exc:  # a bug must not stop the pipe reader: the sender thread takes over
            self._direct_failed()
            log.error("unexpected error in a direct delivery; the sender thread takes over", error=repr(exc))
            return False
        finally:
            self._turn.release()

    def send_lone(self, key: str, producer: str, first: int, n: int, nbytes: int, payload: bytes) -> None:
        """The batch of a lone read that the pipe reader encoded with nothing else under way
        (Batcher.lone_read), written to Redis from the calling thread where deliver_here would
        deliver it: the PING and the append go out and their replies are read by one native
        call (_speedups.lone_exchange) on a connection without TLS, by the connection's own
        round trip with TLS. Otherwise (no stream, replicas to wait for, no open connection,
        something queued) it is queued as an item for deliver_here to deliver or decline. A
        failed round trip or an error reply leaves the item to the sender thread, and this
        path to it for DIRECT_PAUSE_S, as in deliver_here."""
        if (self._lone_publish >= 0 and self.stats.down_since is None and not self._stopping
                and time.monotonic() >= self._direct_after and self._turn.acquire(blocking=False)):
            conn = None
            try:
                target = self._target
                conn = target.conn if target is not None else None
                if (conn is not None and (conn.plain_fd >= 0 or conn.connected) and not self._cluster_seen
                        and type(target) is not ClusterTarget and (type(target) is Target or target.ready())  # type: ignore[union-attr]
                        and self.outbox.idle()):
                    cmd = self._lone_cmds.get(key)
                    if cmd is None or cmd[0] is not producer:
                        cmd = self._lone_cmds[key] = self._lone_command(key, producer)
                    last = first + n - 1
                    exchange = _lone_exchange
                    if conn.plain_fd >= 0 and exchange is not None:
                        status, extra = exchange(conn.plain_fd, cmd[1], first, last, payload, cmd[2], DIRECT_TIMEOUT_MS)
                        if status == 2:  # the replies are not both read, or not the usual ones
                            status = self._lone_replies(conn, read=extra)
                        elif status == 1:
                            conn.close()
                            log.debug("direct delivery failed; the sender thread takes over",
                                      error=os.strerror(extra))
                    else:  # TLS: the same bytes through the ssl socket
                        a, b = b"%d" % first, b"%d" % last
                        status = self._lone_replies(conn, send=b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (
                            cmd[1], len(a), a, len(b), b, len(payload), payload, cmd[2]))
                    if status == 0:
                        stats = self.stats  # _delivered, inline: Redis was not down
                        stats.connected = True
                        stats.last_ok = time.time()
                        stats.items_shipped += 1
                        stats.records_shipped += n
                        stats.bytes_shipped += nbytes
                        return
                    self._direct_after = time.monotonic() + DIRECT_PAUSE_S
            except Exception as exc:  # a bug must not stop the pipe reader: the sender thread takes over
                self._direct_after = time.monotonic() + DIRECT_PAUSE_S
                if conn is not None:
                    conn.close()  # replies may be left unread
                log.error("unexpected error in a direct delivery; the sender thread takes over", error=repr(exc))
            finally:
                self._turn.release()
        self.outbox.put(Item(key, producer, first, first + n - 1, payload, n, nbytes), wake=False)
        if not self.deliver_here():
            self.outbox.notify()

    def _lone_command(self, key: str, producer: str) -> tuple[str, bytes, bytes]:
        """What _send packs for one batch of ``key`` behind its PING, around the sequence
        numbers and the payload."""
        def bulk(*args: Any) -> bytes:
            return b"".join(pack_py((a,))[4:] for a in args)  # without the array's header, *1

        head = pack_py(("PING",)) + b"*14\r\n" + bulk("EVALSHA", APPEND_SHA, 2, key, idem_key(key), producer)
        return producer, head, bulk(self.settings.max_stream_len, self._lone_publish, self._ttl, 0, 0)

    def _lone_replies(self, conn: Connection, *, read: bytes = b"", send: bytes = b"") -> int:
        """The two replies, the first bytes of which were ``read`` already, or to the commands
        ``send`` sends: 0 when neither is an error, 1 otherwise (also when the round trip
        failed: the connection is closed then)."""
        try:
            if send:
                replies = conn.exchange(send, 2, DIRECT_TIMEOUT_S)
            else:
                replies = conn.replies_after(read, 2, DIRECT_TIMEOUT_S)
        except RETRYABLE as exc:
            log.debug("direct delivery failed; the sender thread takes over", error=repr(exc))
            return 1
        return 1 if any(type(r) is ReplyError for r in replies) else 0

    def _direct_failed(self) -> None:
        """What deliver_here took goes back to the outbox; the sender thread delivers for a while."""
        self.outbox.release_inflight()
        self._direct_after = time.monotonic() + DIRECT_PAUSE_S

    def _deliver(self, items: list[Item]) -> bool:
        """Send until it lands. False only when abandoned."""
        try:
            self._send(items)  # the common case, without building a retry loop
        except RETRYABLE as first_error:
            if not self._retry(items, first_error):
                return False
        self._delivered(items)
        return True

    def _delivered(self, items: list[Item]) -> None:
        now = time.time()
        down = self.stats.down_since
        if down is not None:
            self.stats.down_since = None
            self.outbox.set_durable(False)
            log.info("Redis is back; delivering what waited", after_s=round(now - down, 3))
            if self.on_recovered is not None:
                self.on_recovered(now - down, self.outbox.waiting_records, self.outbox.waiting_bytes)
        self.stats.connected = True
        self.stats.last_ok = now
        self.stats.items_shipped += len(items)
        for it in items:
            self.stats.records_shipped += it.records
            self.stats.bytes_shipped += it.raw_bytes

    def _retry(self, items: list[Item], first_error: BaseException) -> bool:
        from tenacity import Retrying, retry_if_exception_type

        retrying = Retrying(
            retry=retry_if_exception_type(RETRYABLE),
            wait=_backoff(self.settings.retry_max_s),
            stop=lambda _state: self._abandon.is_set(),
            sleep=self._abandon.wait,
            before_sleep=self._on_failure,
            reraise=True,
        )
        # One lost connection is routine (a restart, an idle timeout, CLIENT KILL): reconnect
        # and try again at once; only a second failure counts as an outage, or a first one
        # that was a timeout. A command Redis refused (an ACL without PUBLISH, say) is worth a
        # warning, once per kind of error.
        error = describe_error(first_error, self.settings.redis_url)
        if isinstance(first_error, ReplyError) and first_error.code not in ("NOSCRIPT", "MOVED", "ASK"):
            if first_error.code not in self._refusals_told and len(self._refusals_told) < 100:
                self._refusals_told.add(first_error.code)
                if "script" in error and "can't run this command" in error:
                    # Refused inside a script: where it was the PUBLISH after the append, a retry
                    # finds the batch written and succeeds (the stream is complete, subscribers get
                    # nothing); where it was the append, output waits for the ACL to be fixed.
                    log.warning("Redis refused a write: the ACL user may not run a command of the sidecar's "
                                "scripts (k8s/base/redis/users.acl lists what they need); retrying", error=error)
                else:
                    log.warning("Redis refused a write; retrying", error=error)
        elif isinstance(first_error, TimeoutError):
            # Silent for --socket-timeout: down now. Reconnecting at once would wait as long
            # again, with the backlog still in memory rather than on disk.
            self._note_failure(first_error)
        else:
            log.debug("write failed; reconnecting", error=error)
        self._drop_client()
        try:
            for attempt in retrying:
                with attempt:
                    if self._abandon.is_set():
                        return False  # no new connection attempt after abandon()
                    self._send(items)
        except RETRYABLE:
            return False
        return True

    def _on_failure(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self._note_failure(exc)

    def _note_failure(self, exc: BaseException | None) -> None:
        msg = describe_error(exc, self.settings.redis_url) if exc is not None else "unknown error"
        self.stats.connected = False
        self._drop_client()
        if self.stats.down_since is None:
            self.stats.down_since = time.time()
            self.outbox.set_durable(True)
            if self.batcher is None:  # replay: no agent, the spool stays as it is
                log.warning("cannot write to Redis; retrying", error=msg)
            else:
                where = "buffer and spool" if self.outbox.spool is not None else "the memory buffer (no spool)"
                log.warning(f"cannot write to Redis; output waits in {where}, the agent keeps running", error=msg)
            if self.on_degraded is not None:
                self.on_degraded(self.stats.down_since, msg)
        elif msg != self._last_error:
            log.warning("still cannot write to Redis", error=msg)
        self._last_error = msg

    # -- I/O -----------------------------------------------------------------------------
    def _on_connect(self, conn: Connection) -> None:
        """Load our scripts on every new connection; in auto mode, ask a server taken for
        standalone whether it is a cluster node (all of a run's keys may live on that node,
        and then no MOVED would ever tell: its failover would not be followed)."""
        cmds: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", script) for script, _sha in _SCRIPTS]
        probe = taken_for_standalone(self.settings, self._target)
        replies = conn.pipeline([*cmds, ("CLUSTER", "INFO")] if probe else cmds)
        if probe and cluster_enabled(replies.pop()):
            self._cluster_seen = True
        for reply, (_script, digest) in zip(replies, _SCRIPTS, strict=True):
            if isinstance(reply, ReplyError):
                raise reply
            if reply.decode() != digest:
                raise ReplyError(f"unexpected script digest {reply!r}")

    def _target_for(self) -> Target:
        if self._target is None:
            name = client_name("agent-sidecar", self.settings.agent_id)
            self._target = make_target(self.settings, self._on_connect, name)
            if isinstance(self._target, SentinelTarget):
                self._target.on_switch = self.on_master_switch
        return self._target

    def _to_cluster(self) -> Target:
        """A MOVED reply from a server we took for standalone: it is a cluster node."""
        assert self._target is not None
        log.info("Redis Cluster detected; routing by slot")
        self._target = ClusterTarget.replacing(self._target)  # interrupted if abandon() reached the old one
        return self._target

    def _drop_client(self) -> None:
        if self._target is not None and type(self._target) is not ClusterTarget:
            self._target.close()
        elif self._target is not None:
            # A cluster keeps its healthy nodes; the failed one was dropped already.
            pass

    def cluster_nodes(self) -> list[tuple[str, int]]:
        """The cluster nodes known from the slot map (any thread); empty unless a cluster."""
        target = self._target
        return list(target.seeds) if isinstance(target, ClusterTarget) else []

    def _send(self, items: list[Item], timeout: float | None = None) -> None:
        target = self._target or self._target_for()
        if self._cluster_seen and type(target) is Target:
            target = self._to_cluster()
        cluster = isinstance(target, ClusterTarget)
        s = self.settings
        ttl = self._ttl
        maxlen = s.max_stream_len
        publish_mode = 2 if s.pubsub == "sharded" else 1
        publish_cmd = "SPUBLISH" if s.pubsub == "sharded" else "PUBLISH"
        cmds: list[tuple[Any, ...]] = []
        before: dict[tuple[str, str], int] = {}  # (key, producer) -> last seq of the previous item here
        tokens_at: list[int] = []  # indices of token-report scripts in cmds
        for it in items:
            prev = before.get((it.key, it.producer), 0)
            before[(it.key, it.producer)] = it.last
            if it.kind == "tokens":
                tokens_at.append(len(cmds))
                cmds.append(self._tokens_command(it, ttl, cluster, prev))
                continue
            publish_inline = self._use_pubsub and it.pubs is None
            if it.kind == "status":
                msg = json.loads(it.payload)
                run = str(msg.get("run_id", ""))
                # As the status key names the run (a spool replayed with other flags keeps its keys)
                tagged = status_key_tagged(s, it.key, msg)
                vkey = variation_key(f"{{{run}}}" if tagged else run, str(msg.get("variation_id", "")))
                cmds.append(("EVALSHA", VARIATION_SHA, 1, vkey, str(msg.get("timestamp", "")), ttl,
                             *status_hash_fields(msg)))
            if self._use_stream:
                cmds.append(("EVALSHA", APPEND_SHA, 2, it.key, idem_key(it.key, cluster), it.producer, it.first,
                             it.last, it.payload, maxlen, publish_mode if publish_inline else 0, ttl, prev,
                             1 if it.kind == "gap" else 0))
            elif publish_inline:
                cmds.append((publish_cmd, it.key, it.payload))
            if self._use_pubsub and it.pubs is not None:
                cmds.extend((publish_cmd, it.key, msg) for msg in it.pubs)
        if not cluster:
            # Redis writes the replies of one event-loop round last-queued-first: with this
            # PING ahead, our own acknowledgement is queued before the messages to subscribers
            # and the replies to blocked XREADs, so the consumers are woken first, and the
            # sidecar (which only does bookkeeping with the reply) last.
            replies = target.execute([("PING",), *cmds], s.min_replicas_ack, timeout=timeout)[1:]
        else:
            replies = target.execute(cmds, s.min_replicas_ack, timeout=timeout)
        for reply in replies:  # a loop, not a call: this runs once a lone line, and errors are rare
            if isinstance(reply, ReplyError):
                if reveals_cluster(s, target, replies):
                    # Appends are idempotent, so sending the items again through the slot map is
                    # safe. The commands are built again: on a cluster the :idem keys have other
                    # names (sent as they were, they would be refused as CROSSSLOT and retried,
                    # with a warning).
                    self._to_cluster()
                    self._send(items, timeout)
                    return
                break
        for reply in replies:
            if isinstance(reply, ReplyError):
                if reply.code == "NOSCRIPT":
                    target.close()  # reconnecting loads the scripts again
                raise reply
        for i in tokens_at:
            if replies[i] == 2 and self._overflow_budget.take():
                log.warning("token report not added to the run's totals: a total would pass the largest number "
                            "Redis keeps", key=cmds[i][3], seq=cmds[i][6])

    @staticmethod
    def _tokens_command(it: Item, ttl: int, cluster: bool, prev: int = 0) -> tuple[Any, ...]:
        msg = json.loads(it.payload)
        pairs: list[Any] = []
        for f in TOKEN_TOTAL_FIELDS:
            v = msg.get(f)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                pairs += [f, repr(float(v)) if f == "cost_usd" else int(v)]
        return ("EVALSHA", TOKENS_SHA, 2, it.key, idem_key(it.key, cluster), it.producer, it.first, it.payload, ttl,
                str(msg.get("variation_id", "")), prev, *pairs)

    def close(self) -> None:
        if self._target is not None:
            self._target.close()
            self._target = None
