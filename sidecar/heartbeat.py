"""Heartbeat: a liveness beat with the agent's resource use, on its own thread and connection.

Every ``--heartbeat-interval`` seconds one pipeline goes to Redis:

* ``PUBLISH agent:{agent_id}:heartbeat <json>`` for live watchers;
* ``SET agent:{agent_id}:alive <json> EX <ceil(3 * interval), at least 1>``: the key vanishes
  on its own when the sidecar stops beating, whatever the reason;
* ``HSET run:{run_id}:variation:{variation_id} last_heartbeat <timestamp> agent_id <id>``
  (and ``EXPIRE`` with ``--retention`` when that is positive);
* every quarter of ``--retention`` (at least one interval), ``EXPIRE`` of the run's other
  keys (streams and their idempotency hashes, the token totals): writes refresh a key's TTL,
  and a key the run leaves quiet (often stderr) must not expire while the run goes on.

The beat has its own connection so it keeps its rhythm while the data path is busy shipping
a flood or waiting out an outage. Deadlines are monotonic: a slow beat does not push the
next ones back, and beats missed while Redis hung are skipped rather than sent in a burst.
The first beat goes ``FIRST_BEAT_S`` after the thread starts, and psutil (slow to import) is
imported by the thread just before it: a run over by then, a plain command in a script for
example, has no heartbeat (its status says it ran) and does not wait for that import.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

from . import log, protocol
from .config import Settings
from .resp import Connection, ReplyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEARTBEAT = "heartbeat"
FIRST_BEAT_S = 0.1
# How long stop() waits for a beat in flight before cutting its socket, then in total.
_STOP_SOFT_S = 0.5
_STOP_HARD_S = 2.0


def variation_hash_key(settings: Settings) -> str:
    return f"run:{settings.run_key}:variation:{settings.variation_id}"


def alive_ttl(interval_s: float) -> int:
    """Whole seconds the alive key outlives the last beat: 3 intervals rounded up, at least 1."""
    return max(1, math.ceil(round(3 * interval_s, 6)))


def build(
    settings: Settings,
    *,
    pid: int | None,
    tree_metrics: dict[str, Any],
    stats: dict[str, Any],
    started_at: float,
    now: float,
) -> dict[str, Any]:
    """The heartbeat message (pure). ``started_at`` and ``now`` are wall-clock Unix seconds.

    ``tree_metrics`` holds ``cpu_percent``, ``rss_bytes`` and ``num_procs`` of the agent's
    process tree; ``stats`` (the data path's counters) is merged in without overriding any of
    the fields above.
    """
    msg: dict[str, Any] = {
        "v": protocol.VERSION,
        "type": HEARTBEAT,
        "agent_id": settings.agent_id,
        "run_id": settings.run_id,
        "variation_id": settings.variation_id,
        "timestamp": protocol.iso_utc(now),
        "interval_s": settings.heartbeat_interval_s,
        "pid": pid,
        "uptime_s": round(max(0.0, now - started_at), 3),
        "cpu_percent": round(float(tree_metrics.get("cpu_percent") or 0.0), 1),
        "rss_bytes": int(tree_metrics.get("rss_bytes") or 0),
        "num_procs": int(tree_metrics.get("num_procs") or 0),
    }
    for key, value in stats.items():
        msg.setdefault(key, value)
    return msg


def refresh_period(settings: Settings) -> float:
    """Seconds between two refreshes of the run's keys' TTLs (0: none)."""
    if settings.ttl_s <= 0:
        return 0.0
    return max(settings.heartbeat_interval_s, settings.ttl_s / 4)


def commands(settings: Settings, msg: dict[str, Any], payload: bytes,
             keep_alive: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """The pipeline of one beat (pure); ``keep_alive``: keys whose TTL it renews."""
    vkey = variation_hash_key(settings)
    cmds: list[tuple[Any, ...]] = [
        ("PUBLISH", settings.heartbeat_channel, payload),
        ("SET", settings.alive_key, payload, "EX", alive_ttl(settings.heartbeat_interval_s)),
        ("HSET", vkey, "last_heartbeat", msg["timestamp"], "agent_id", settings.agent_id),
    ]
    ttl = settings.ttl_s
    if ttl > 0:
        cmds.append(("EXPIRE", vkey, ttl))
        cmds.extend(("EXPIRE", key, ttl) for key in keep_alive)  # a key not (yet) written: 0, no effect
    return cmds


class TreeSampler:
    """CPU and memory of a process and all its descendants.

    The psutil.Process objects are kept from one sample to the next, so ``cpu_percent(None)``
    measures each process over the time since the previous sample (a process seen for the
    first time counts 0 for that sample). cpu_percent is in percent of one CPU: a tree
    busy on two cores reports about 200. Processes that vanish meanwhile are skipped.
    """

    def __init__(self, psutil: Any) -> None:
        self.psutil = psutil
        self._procs: dict[int, Any] = {}

    def sample(self, pid: int | None) -> dict[str, Any]:
        ps = self.psutil
        empty = {"cpu_percent": 0.0, "rss_bytes": 0, "num_procs": 0}
        if ps is None or pid is None:
            self._procs = {}
            return empty
        gone = (ps.NoSuchProcess, ps.AccessDenied)
        try:
            root = self._procs.get(pid)
            if root is None or not root.is_running():
                root = ps.Process(pid)
            members = [root]
            try:
                if root.ppid() == os.getpid():
                    # The agent's tree and its orphans, re-parented to the sidecar (subreaper or
                    # PID 1): all of the sidecar's descendants, found in one scan of /proc.
                    members += [p for p in ps.Process(os.getpid()).children(recursive=True) if p.pid != root.pid]
                else:
                    members += root.children(recursive=True)
            except gone:
                pass
        except gone:
            self._procs = {}
            return empty
        kept: dict[int, Any] = {}
        cpu = 0.0
        rss = 0
        for proc in members:
            cached = self._procs.get(proc.pid)
            if cached is not None and cached == proc:  # same pid and creation time
                proc = cached
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
            except ps.AccessDenied:
                kept[proc.pid] = proc  # it exists; its figures are not ours to read
                continue
            except ps.NoSuchProcess:  # exited (or a zombie) since the listing
                continue
            kept[proc.pid] = proc
        self._procs = kept
        return {"cpu_percent": cpu, "rss_bytes": rss, "num_procs": len(kept)}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"


class Heartbeat:
    """Beats every ``settings.heartbeat_interval_s`` seconds from a daemon thread (0: never)."""

    def __init__(
        self,
        settings: Settings,
        *,
        connect: Callable[[], Connection],
        pid: Callable[[], int | None],
        stats: Callable[[], dict[str, Any]],
        started_at: float,
        keep_alive: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.keep_alive = keep_alive
        self._refresh_s = refresh_period(settings) if keep_alive else 0.0
        self._refreshed_at = time.monotonic()  # the keys are new: their first writes set the TTL
        self.interval_s = settings.heartbeat_interval_s
        self._connect = connect
        self._pid = pid
        self._stats = stats
        self.started_at = started_at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._down_since: float | None = None
        self._build_failed = False
        self.beats = 0  # beats Redis accepted
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No beat starts after this returns. Waits for a beat in flight, cutting it short if Redis hangs."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(_STOP_SOFT_S)
        if thread.is_alive():
            interrupt = getattr(self._conn, "interrupt", None)  # a Connection or a TargetPipe
            if interrupt is not None:
                interrupt()
            thread.join(_STOP_HARD_S)

    # -- thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._stop.wait(FIRST_BEAT_S):
                return
            try:
                import psutil
            except ImportError:  # pragma: no cover - psutil is a dependency
                psutil = None
                log.warning("psutil not available; heartbeats carry no CPU or memory figures")
            sampler = TreeSampler(psutil)
            interval = self.interval_s
            next_at = time.monotonic()
            while not self._stop.is_set():
                self._beat(sampler)
                next_at += interval
                now = time.monotonic()
                if next_at <= now:  # a beat overran (Redis slow or away): skip, keep the phase
                    next_at += (math.floor((now - next_at) / interval) + 1) * interval
                if self._stop.wait(next_at - time.monotonic()):
                    break
        except Exception as exc:  # a bug must not take the sidecar down
            log.error("heartbeat stopped by an unexpected error", error=repr(exc))
        finally:
            self._drop()

    def _beat(self, sampler: TreeSampler) -> None:
        try:
            pid = self._pid()
            metrics = sampler.sample(pid)
            stats = self._stats()
            msg = build(self.settings, pid=pid, tree_metrics=metrics, stats=dict(stats),
                        started_at=self.started_at, now=time.time())
            payload = protocol.encode_object(msg)
        except Exception as exc:
            if not self._build_failed:
                log.error("heartbeat could not be built", error=repr(exc))
                self._build_failed = True
            return
        self._build_failed = False
        try:
            conn = self._conn
            if conn is None:
                conn = self._conn = self._connect()
            if not conn.connected:
                conn.connect()
            if self._stop.is_set():
                return
            refresh = bool(self._refresh_s) and time.monotonic() - self._refreshed_at >= self._refresh_s
            for reply in conn.pipeline(commands(self.settings, msg, payload, self.keep_alive if refresh else ())):
                if isinstance(reply, ReplyError):
                    raise reply
            if refresh:
                self._refreshed_at = time.monotonic()
        except Exception as exc:  # OSError, ReplyError, or anything the connect callable raises
            self._drop()
            if not self._stop.is_set():
                self._failed(exc)
            return
        self.beats += 1
        if self._down_since is not None:
            log.info("heartbeat delivered again", after_s=round(time.time() - self._down_since, 3))
            self._down_since = None

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("heartbeat not delivered; retrying on the next beat", error=_describe(exc))

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
