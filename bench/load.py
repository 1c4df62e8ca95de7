"""Load and capacity test: many sidecars at once against one Redis.

    python bench/load.py                       # N = 50, 100, 200 agents, 20 s each; a few minutes
    python bench/load.py --quick               # N = 10, 5 s: a smoke run (< 60 s)
    python bench/load.py --agents 20,40 --seconds 10 --json /tmp/load.json

For each N: a fresh throwaway redis-server (``--save "" --appendonly no``; or the Redis of
--redis-url), a pub/sub subscriber in its own process (PSUBSCRIBE ``run:load-*:output:*``,
timing lines from their write by the agent to their receipt), then N sidecars started
within about a second, each wrapping ``bench/llm_stream.py`` (about 50 lines/s with bursts,
for --seconds). While they run, every 0.5 s: Redis CPU and used_memory, the sidecars' CPU
and RSS (the agents excluded), how saturated the machine is. Afterwards every stream is
read back with XRANGE and its records counted and hashed against what each agent says it
wrote; what the sidecars left in their spool is replayed and counted again.

Prints tables and writes JSON (default bench/results/load.json). Exit status 0 when every
line arrived live and every sidecar exited 0; 1 otherwise (reasons under FAILURES).
See bench/README.md, section "Load and capacity".
"""

from __future__ import annotations

import argparse
import array
import ctypes
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
import psutil
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import agent_text  # noqa: E402

import bench  # noqa: E402  (its throwaway redis-server)
from sidecar import protocol  # noqa: E402

PY = sys.executable  # not a version-manager shim from PATH: it would slow every start
AGENT = os.path.join(HERE, "llm_stream.py")
DEFAULT_JSON = os.path.join(HERE, "results", "load.json")
PATTERN = "run:load-*:output:*"
SAMPLE_S = 0.5
STAGGER_S = 1.0
RESERVOIR = 200_000
HARNESS_NICE = -10  # the measuring instruments should not starve (see README)
MB = 1_000_000
NCPU = os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop, clean up, report what was measured."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------- processes and priorities


def _die_with_parent() -> None:
    """In a child: SIGTERM when the load script dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def autogroup_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def set_nice(pid: int, nice: int, *, process: bool = True) -> str:
    """Nice value of a session leader and, with autogroup scheduling, of its whole session.

    With autogroup (the Linux default on desktops and many VMs) CPU is shared fairly between
    sessions first: every sidecar and every agent leads its own session, so a process's own
    nice value barely matters against them; the session's autogroup nice does. A process
    nice value is inherited by children, an autogroup's is not (a new session starts at 0).
    """
    done = []
    if process:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
            done.append(f"nice {nice}")
        except OSError as exc:
            done.append(f"nice failed: {exc.strerror}")
    if autogroup_enabled():
        try:
            with open(f"/proc/{pid}/autogroup", "w") as fh:
                fh.write(str(nice))
            done.append(f"autogroup nice {nice}")
        except OSError as exc:
            done.append(f"autogroup nice failed: {exc.strerror}")
    return ", ".join(done)


def kill_groups(pgids: Iterable[int], sig: int) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------- redis server


class ThrowawayRedis(bench.ThrowawayRedis):
    """bench.py's throwaway redis-server, in a session of its own (one scheduling group, like
    each sidecar), dying with this script, and with room for thousands of clients."""

    def __init__(self) -> None:
        super().__init__(["--maxclients", "10000"], prefix="load-redis-", start_new_session=True,
                         preexec_fn=_die_with_parent)

    def notable_log_lines(self, limit: int = 20) -> list[str]:
        """Lines of the server log about clients dropped, limits, latency or memory."""
        keys = ("output buffer", "closed", "limit", "latency", "oom", "max number", "timeout", "error")
        try:
            with open(self.logfile, errors="replace") as fh:
                lines = [
                    ln.strip()
                    for ln in fh
                    if any(k in ln.lower() for k in keys) and "overcommit" not in ln and "maxclients" not in ln
                ]
        except OSError:
            return []
        return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


# ---------------------------------------------------------------- subscriber (own process)


class Reservoir:
    """A uniform sample of at most ``size`` (total, write->capture, capture->receipt) triples."""

    def __init__(self, size: int, seed: int = 1) -> None:
        self.size = size
        self.seen = 0
        self.total = array.array("d")
        self.w2c = array.array("d")
        self.c2r = array.array("d")
        self.rand = random.Random(seed).random

    def add(self, total: float, w2c: float, c2r: float) -> None:
        self.seen += 1
        if len(self.total) < self.size:
            self.total.append(total)
            self.w2c.append(w2c)
            self.c2r.append(c2r)
            return
        j = int(self.rand() * self.seen)
        if j < self.size:
            self.total[j] = total
            self.w2c[j] = w2c
            self.c2r[j] = c2r


def write_time(text: str) -> float | None:
    """The write time llm_stream.py put in front of a line (or as key "t" of a JSON line)."""
    try:
        if text.startswith('{"t":'):
            return float(text[5 : text.index(",", 5)])
        return float(text[: text.index(" ")])
    except ValueError:
        return None


def resp_command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def open_pubsub(url: str) -> tuple[socket.socket, hiredis.Reader]:
    """A raw connection that has PSUBSCRIBEd to PATTERN, and its hiredis reader.

    Raw rather than redis-py: its get_message(timeout=...) gives up on a message that has only
    partly arrived when the rest takes longer than the timeout (a CPU-starved Redis), which
    throws the connection away with whatever it held.
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(u.path)
    elif u.scheme == "redis":
        sock = socket.create_connection((u.hostname or "localhost", u.port or 6379), timeout=10)
    else:
        raise RuntimeError(f"the subscriber speaks redis:// and unix:// only, not {u.scheme}://")
    password = urllib.parse.unquote(u.password) if u.password else os.environ.get("REDIS_PASSWORD")
    cmds = b""
    if password:
        user = urllib.parse.unquote(u.username) if u.username else ""
        cmds += resp_command("AUTH", user, password) if user else resp_command("AUTH", password)
    cmds += resp_command("PSUBSCRIBE", PATTERN)
    sock.sendall(cmds)
    reader = hiredis.Reader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("Redis closed the subscriber connection")
        reader.feed(data)
        reply = reader.gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"subscriber: {reply}")
            if isinstance(reply, list) and reply and reply[0] == b"psubscribe":
                sock.settimeout(None)
                return sock, reader
            reply = reader.gets()


def subscriber_main(url: str, ready: Any, stop: Any, lines_seen: Any, conn: Any) -> None:
    """PSUBSCRIBE to every load run and time each line: receipt - write, in seconds.

    Runs in its own process and session (its own scheduling group), at a raised priority
    when allowed, so that what it measures is delivery rather than its own wait for a CPU.
    Results go back over ``conn`` when ``stop`` is set.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and sets stop
    _die_with_parent()
    priority = ""
    try:
        os.setsid()
        priority = set_nice(os.getpid(), HARNESS_NICE)
    except OSError as exc:
        priority = f"setsid failed: {exc.strerror}"
    res = Reservoir(RESERVOIR)
    per_run: dict[str, int] = {}
    max_total = 0.0
    unparsed = 0
    undecodable = 0
    disconnects: list[str] = []
    error = ""
    sock: socket.socket | None = None

    def handle(msg: Any, now: float) -> None:
        nonlocal max_total, unparsed, undecodable
        if not isinstance(msg, list) or len(msg) != 4 or msg[0] != b"pmessage":
            return
        try:
            obj = protocol.decode(msg[3])
        except protocol.ProtocolError:
            undecodable += 1
            return
        if obj.get("type") != "batch":
            return
        run_id = msg[2].split(b":", 2)[1].decode()
        lines: list[str] = obj.get("lines") or []
        per_run[run_id] = per_run.get(run_id, 0) + len(lines)
        lines_seen.value += len(lines)
        runs = obj.get("ts") or [[0, 0.0]]
        b64 = obj.get("b64") or ()
        r = 0
        cap = float(runs[0][1])
        for i, text in enumerate(lines):
            while r + 1 < len(runs) and runs[r + 1][0] <= i:
                r += 1
                cap = float(runs[r][1])
            w = None if b64 and i in b64 else write_time(text)
            if w is None:
                unparsed += 1
                continue
            total = now - w
            if total > max_total:
                max_total = total
            res.add(total, cap - w, now - cap)

    try:
        sock, reader = open_pubsub(url)
        ready.set()
        while not stop.is_set():
            if not select.select([sock], [], [], 0.2)[0]:
                continue
            try:
                data = sock.recv(1 << 20)
            except OSError as exc:
                data, why = b"", f"{type(exc).__name__}: {exc}"
            else:
                why = "Redis closed the connection (client-output-buffer-limit pubsub?)"
            now = time.time()
            if not data:
                # Everything published until the new subscription is in place is missed.
                disconnects.append(f"{now:.3f} {why}")
                sock.close()
                sock = None
                while sock is None and not stop.is_set() and len(disconnects) < 50:
                    try:
                        sock, reader = open_pubsub(url)
                    except (OSError, RuntimeError) as exc:
                        disconnects.append(f"{time.time():.3f} reconnect: {type(exc).__name__}: {exc}")
                        time.sleep(0.5)
                if sock is None:
                    break
                continue
            reader.feed(data)
            msg = reader.gets()
            while msg is not False:
                handle(msg, now)
                msg = reader.gets()
    except Exception as exc:  # reported with the results instead of dying silently
        error = f"{type(exc).__name__}: {exc}"
        ready.set()
    finally:
        if sock is not None:
            sock.close()
    conn.send(
        {
            "per_run": per_run,
            "timed": res.seen,
            "max_total": max_total,
            "total": res.total.tobytes(),
            "w2c": res.w2c.tobytes(),
            "c2r": res.c2r.tobytes(),
            "unparsed": unparsed,
            "undecodable": undecodable,
            "disconnects": disconnects,
            "error": error,
            "priority": priority,
        }
    )
    conn.close()


class Subscriber:
    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")  # a clean child: no inherited sockets or handlers
        self.ready = ctx.Event()
        self.stop_event = ctx.Event()
        self.lines_seen = ctx.RawValue("q", 0)  # lines received so far
        self.parent_conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=subscriber_main,
            args=(url, self.ready, self.stop_event, self.lines_seen, child_conn),
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        if not self.ready.wait(30):
            self.kill()
            raise RuntimeError("the subscriber did not start")

    @property
    def pid(self) -> int:
        return cast(int, self.proc.pid)

    def finish(self, timeout: float = 20) -> dict[str, Any]:
        self.stop_event.set()
        out: dict[str, Any] = {"error": "no result from the subscriber"}
        try:
            if self.parent_conn.poll(timeout):
                out = self.parent_conn.recv()
        except (EOFError, OSError):
            pass
        self.proc.join(5)
        self.kill()
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ---------------------------------------------------------------- counting in Redis


@dataclass
class RunCount:
    entries: int = 0
    batches: int = 0
    lines: int = 0
    nbytes: int = 0
    sha256: str = ""
    gaps: int = 0
    seq_breaks: int = 0
    malformed: int = 0
    first_ms: int | None = None  # Redis time of the first batch (from its entry id)


def xrange_pages(r: redis.Redis, key: str, page: int = 1000) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    start: bytes | str = "-"
    while True:
        chunk = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(key, min=start, max="+", count=page))
        yield from chunk
        if len(chunk) < page:
            return
        start = b"(" + chunk[-1][0]


def count_stream(r: redis.Redis, key: str, latencies: array.array[float] | None = None) -> RunCount:
    """Every batch entry of a stream: sum of n, bytes and SHA-256 of the records, seq gaps.

    With ``latencies``, appends for each line the time from its write (the agent's stamp) to
    its arrival in Redis (the millisecond of the entry id that XADD * gave it), in ms.
    """
    c = RunCount()
    sha = hashlib.sha256()
    expected_seq: int | None = None
    for eid, fields in xrange_pages(r, key):
        c.entries += 1
        try:
            obj = protocol.decode(fields[b"d"])
        except (KeyError, protocol.ProtocolError):
            c.malformed += 1
            continue
        kind = obj.get("type")
        if kind == protocol.GAP:
            c.gaps += 1
            continue
        if kind != protocol.BATCH:
            continue
        n = obj.get("n")
        if not isinstance(n, int) or n != len(obj.get("lines") or []):
            c.malformed += 1
        c.batches += 1
        seq = obj.get("seq")
        if expected_seq is not None and seq != expected_seq:
            c.seq_breaks += 1
        ms = int(eid.split(b"-", 1)[0])
        if c.first_ms is None:
            c.first_ms = ms
        try:
            k = 0
            for rec in protocol.iter_records(obj):
                sha.update(rec.data)
                c.nbytes += len(rec.data)
                k += 1
                if latencies is not None:
                    w = write_time(rec.data.decode("utf-8", "replace"))
                    if w is not None:
                        latencies.append(ms - w * 1000.0)
        except protocol.ProtocolError:
            c.malformed += 1
            continue
        c.lines += k
        expected_seq = seq + k if isinstance(seq, int) else None
    c.sha256 = sha.hexdigest()
    return c


def spool_leftovers(root: str) -> tuple[int, int]:
    """(directories, bytes of segment files) a spool root still holds."""
    dirs = nbytes = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0, 0
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        segs = [s for s in os.listdir(path) if s.endswith(".seg")]
        if segs:
            dirs += 1
            nbytes += sum(os.path.getsize(os.path.join(path, s)) for s in segs)
    return dirs, nbytes


# ---------------------------------------------------------------- sampling


def read_first_line(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.readline()
    except OSError:
        return ""


def cpu_pressure_us() -> int | None:
    """Microseconds some runnable task waited for a CPU (PSI), machine or cgroup wide."""
    line = read_first_line("/proc/pressure/cpu")
    m = re.search(r"total=(\d+)", line)
    return int(m.group(1)) if m else None


def procs_running() -> int | None:
    try:
        with open("/proc/stat") as fh:
            for ln in fh:
                if ln.startswith("procs_running"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


def runqueue_wait_ns(pid: int) -> int | None:
    """Nanoseconds the process's main thread spent runnable but waiting for a CPU."""
    parts = read_first_line(f"/proc/{pid}/schedstat").split()
    return int(parts[1]) if len(parts) >= 2 else None


@dataclass
class Sample:
    t: float  # seconds since the first sidecar was started
    alive: int  # sidecars running
    sidecar_cpu: float  # % of one core, all sidecars together, over the last interval
    sidecar_rss: int  # bytes, all sidecars together
    agent_cpu: float  # % of one core, all agents together
    redis_cpu: float | None  # % of one core
    redis_wait: float | None  # % of the interval Redis was runnable but not running
    redis_mem: int | None
    machine_cpu: float  # % of all cores
    pressure: float | None  # % of the interval some task waited for a CPU
    running: int | None  # runnable tasks at the sample
    self_cpu: float  # % of one core: this script and its subscriber
    others_cpu: float  # % of one core: everything else on the machine (other users' work)


class Rate:
    """Growth of a counter per second of wall time, timed at each reading, in % of ``unit``."""

    def __init__(self, unit: float) -> None:
        self.unit = unit
        self.prev: tuple[float, float] | None = None

    def update(self, value: float | None) -> float | None:
        now = time.monotonic()
        if value is None:
            self.prev = None
            return None
        out = None
        if self.prev is not None and now > self.prev[1]:
            out = 100.0 * (value - self.prev[0]) / self.unit / (now - self.prev[1])
        self.prev = (value, now)
        return out


class Sampler:
    """CPU and RSS of the sidecars (agents excluded), of Redis, of the load script itself.

    The sidecar's agent runs in its own session, as a child of the sidecar; any other child
    of a sidecar counts as the sidecar's. The process tree is read from /proc every 2 s.
    """

    def __init__(self, r: redis.Redis, redis_pid: int | None, own_pids: list[int]) -> None:
        self.r = r
        self.redis_pid = redis_pid
        self.redis_proc = psutil.Process(redis_pid) if redis_pid else None
        self.redis_cpu_s0 = self._redis_cpu_s()
        self.redis_cpu = Rate(1.0)  # CPU seconds
        self.redis_wait = Rate(1e9)  # run-queue nanoseconds
        self.pressure = Rate(1e6)  # PSI microseconds
        self._rates()
        self.own = {p: psutil.Process(p) for p in own_pids}
        self.sidecars: dict[int, psutil.Process] = {}
        self.index: dict[int, int] = {}  # sidecar pid -> agent index
        self.series: dict[int, list[tuple[float, float, int]]] = {}  # index -> (t, cpu s, rss)
        self.helpers: dict[int, psutil.Process] = {}  # non-agent children of sidecars
        self.agents: dict[int, psutil.Process] = {}
        self.agents_ever: list[psutil.Process] = []
        self.cpu_prev: dict[int, float] = {}
        self.t_prev: float | None = None
        self.tree_at = -1e9
        self.samples: list[Sample] = []
        psutil.cpu_percent(None)

    def _redis_cpu_s(self) -> float | None:
        """CPU seconds Redis has used: from /proc when it is ours, else from INFO cpu."""
        try:
            if self.redis_proc is not None:
                t = self.redis_proc.cpu_times()
                return float(t.user + t.system)
            c = self.r.info("cpu")
            return float(c["used_cpu_user"]) + float(c["used_cpu_sys"])
        except (psutil.Error, redis.RedisError, KeyError):
            return None

    def _rates(self) -> tuple[float | None, float | None, float | None]:
        """Redis CPU, Redis run-queue wait and CPU pressure, each timed at its own reading."""
        return (
            self.redis_cpu.update(self._redis_cpu_s()),
            self.redis_wait.update(runqueue_wait_ns(self.redis_pid) if self.redis_pid else None),
            self.pressure.update(cpu_pressure_us()),
        )

    def redis_cpu_used(self) -> float | None:
        now = self._redis_cpu_s()
        return None if now is None or self.redis_cpu_s0 is None else now - self.redis_cpu_s0

    def add_sidecar(self, pid: int, index: int) -> None:
        try:
            self.sidecars[pid] = psutil.Process(pid)
            self.index[pid] = index
            self.series[index] = []
        except psutil.Error:
            pass

    def _refresh_tree(self) -> None:
        parents = set(self.sidecars)
        for p in psutil.process_iter(["ppid"]):
            ppid = p.info["ppid"]
            if ppid not in parents or p.pid in self.agents or p.pid in self.helpers:
                continue
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if AGENT in cmd:
                self.agents[p.pid] = p
                self.agents_ever.append(p)
            else:
                self.helpers[p.pid] = p
        self.tree_at = time.monotonic()

    @staticmethod
    def _read(procs: dict[int, psutil.Process]) -> tuple[dict[int, float], dict[int, int]]:
        cpu: dict[int, float] = {}
        rss: dict[int, int] = {}
        for pid, p in list(procs.items()):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu[pid] = t.user + t.system
                    rss[pid] = p.memory_info().rss
            except psutil.Error:
                del procs[pid]
        return cpu, rss

    def _delta(self, cpu: dict[int, float]) -> float:
        used = 0.0
        for pid, c in cpu.items():
            used += c - self.cpu_prev.get(pid, c)
            self.cpu_prev[pid] = c
        return used

    def sample(self, t: float, alive: int) -> None:
        now = time.monotonic()
        if now - self.tree_at > 2.0:
            try:
                self._refresh_tree()
            except psutil.Error:
                pass
        dt_s = now - self.t_prev if self.t_prev is not None else 0.0
        redis_cpu, redis_wait, pressure = self._rates()
        sc_cpu, sc_rss = self._read(self.sidecars)
        hp_cpu, hp_rss = self._read(self.helpers)
        ag_cpu, _ = self._read(self.agents)
        own_cpu, _ = self._read(dict(self.own))
        for pid, c in sc_cpu.items():
            self.series[self.index[pid]].append((t, c, sc_rss[pid]))
        used_sc = self._delta(sc_cpu) + self._delta(hp_cpu)
        used_ag = self._delta(ag_cpu)
        used_own = self._delta(own_cpu)
        redis_mem: int | None = None
        try:
            redis_mem = int(self.r.info("memory")["used_memory"])
        except (redis.RedisError, KeyError):
            pass
        machine = psutil.cpu_percent(None)
        if dt_s > 0:
            self.samples.append(
                Sample(
                    t=t,
                    alive=alive,
                    sidecar_cpu=100.0 * used_sc / dt_s,
                    sidecar_rss=sum(sc_rss.values()) + sum(hp_rss.values()),
                    agent_cpu=100.0 * used_ag / dt_s,
                    redis_cpu=redis_cpu,
                    redis_wait=redis_wait,
                    redis_mem=redis_mem,
                    machine_cpu=machine,
                    pressure=pressure,
                    running=procs_running(),
                    self_cpu=100.0 * used_own / dt_s,
                    others_cpu=max(
                        0.0,
                        machine * NCPU - 100.0 * (used_sc + used_ag + used_own) / dt_s - (redis_cpu or 0.0),
                    ),
                )
            )
        self.t_prev = now


# ---------------------------------------------------------------- one level


def percentile(values: Iterable[float], q: float) -> float | None:
    s = sorted(values)
    if not s:
        return None
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def dist(values: Iterable[float], scale: float = 1.0, nd: int = 2) -> dict[str, float | None]:
    s = sorted(values)
    if not s:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(cast(float, percentile(s, 50)) * scale, nd),
        "p99": round(cast(float, percentile(s, 99)) * scale, nd),
        "max": round(s[-1] * scale, nd),
    }


def mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def rnd(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


class Child:
    """A child started with fork and exec in a new session, without waiting for the exec.

    subprocess.Popen waits until the child has exec'd, so on a saturated machine every
    start waits for the new process to be scheduled, and starting N sidecars "at once"
    takes tens of seconds. Here the parent returns right after fork.
    """

    def __init__(self, argv: list[str], cwd: str, stderr_path: str) -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pid = os.fork()
            if pid == 0:  # child: nothing here may return
                try:
                    os.setsid()
                    os.chdir(cwd)
                    os.dup2(devnull, 0)
                    os.dup2(devnull, 1)
                    os.dup2(err, 2)
                    os.closerange(3, 1 << 16)
                    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
                        signal.signal(sig, signal.SIG_DFL)
                    os.execv(argv[0], argv)
                finally:
                    os._exit(127)
        finally:
            os.close(devnull)
            os.close(err)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode


@dataclass
class Sidecar:
    index: int
    run_id: str
    proc: Child
    err_path: str
    count_path: str
    started: float
    ended: float | None = None


@dataclass
class Level:
    agents: int
    seconds: float
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        log(f"!!! N={self.agents}: {msg}")

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        log(f"  ! N={self.agents}: {msg}")


def stop_all(sidecars: list[Sidecar], sampler: Sampler | None) -> None:
    """SIGTERM to every sidecar's group and every agent's group, then SIGKILL what is left."""
    running = [s for s in sidecars if s.proc.poll() is None]

    def agents() -> list[int]:
        # Agents are the sidecars' children, not ours: is_running() checks the start time,
        # so a pid that was reused by an unrelated process is never signalled.
        return [p.pid for p in (sampler.agents_ever if sampler else []) if p.is_running()]

    first = agents()
    if not running and not first:
        return
    kill_groups([s.proc.pid for s in running] + first, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(s.proc.poll() is None for s in running):
        time.sleep(0.05)
    kill_groups([s.proc.pid for s in running if s.proc.poll() is None] + agents(), signal.SIGKILL)
    for s in running:
        s.proc.wait(5)


def delete_keys(r: redis.Redis, n: int) -> None:
    for pat in (f"run:load-{n}-*", f"agent:load-{n}-*"):
        keys = list(r.scan_iter(match=pat, count=1000))
        for k in range(0, len(keys), 1000):
            r.delete(*keys[k : k + 1000])


def read_counts(sidecars: list[Sidecar]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for s in sidecars:
        try:
            with open(s.count_path) as fh:
                out[s.index] = json.load(fh)
        except (OSError, ValueError):
            pass
    return out


def read_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return []


_LOG_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b\s+(.*?)(?=\s+[a-z_]+=|$)")


def diagnostics(sidecars: list[Sidecar]) -> dict[str, dict[str, Any]]:
    """The sidecars' own warnings and errors: per message, how many sidecars said it."""
    out: dict[str, dict[str, Any]] = {}
    for s in sidecars:
        said: set[str] = set()
        for line in read_lines(s.err_path):
            m = _LOG_RE.search(line)
            if not m:
                continue
            msg = re.sub(r"load-\d+-\d+", "<run>", f"{m.group(1)} {m.group(2)}")
            if msg in said:
                continue
            said.add(msg)
            entry = out.setdefault(msg, {"sidecars": 0, "example": f"{s.run_id}: {line[:400]}"})
            entry["sidecars"] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["sidecars"]))


def redis_stats(r: redis.Redis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        stats = r.info("stats")
        for k in ("total_connections_received", "rejected_connections", "total_commands_processed"):
            out[k] = stats.get(k)
        cmds = r.info("commandstats")
        top = sorted(cmds.items(), key=lambda kv: -float(kv[1].get("usec", 0)))[:6]
        out["commands_by_cpu"] = {
            k.replace("cmdstat_", ""): {"calls": v.get("calls"), "usec_per_call": v.get("usec_per_call")}
            for k, v in top
        }
        out["slowlog_len"] = r.slowlog_len()
        out["connected_clients"] = r.info("clients").get("connected_clients")
    except redis.RedisError as exc:
        out["error"] = str(exc)
    return out


def run_level(
    n: int, seconds: float, url: str | None, sidecar_args: list[str], timeout: float, redis_nice: int
) -> Level:
    lv = Level(n, seconds)
    server = None if url else ThrowawayRedis().start()
    work = tempfile.mkdtemp(prefix=f"load-{n}-")
    sidecars: list[Sidecar] = []
    sub: Subscriber | None = None
    sampler: Sampler | None = None
    try:
        url = url or cast(ThrowawayRedis, server).url
        redis_priority = ""
        if server and server.proc and redis_nice:
            redis_priority = set_nice(server.proc.pid, redis_nice)
        r = redis.Redis.from_url(url)
        r.ping()
        delete_keys(r, n)
        # One spool directory shared by the level's sidecars, as on one host with the default
        # --spool-dir; kept apart from other levels and from other users of the machine.
        own_spool = not any(a.startswith("--spool-dir") for a in sidecar_args)
        spool = os.path.join(work, "spool")
        extra = [*sidecar_args, *(["--spool-dir", spool] if own_spool else [])]
        sub = Subscriber(url)
        # Other work on the machine skews every figure: note how busy it was beforehand.
        machine_before = psutil.cpu_percent(interval=0.5)
        mem_base = int(r.info("memory")["used_memory"])
        redis_pid = server.proc.pid if server and server.proc else None
        # A client of its own with a timeout: a starved Redis must not stall the sampling.
        sampler = Sampler(redis.Redis.from_url(url, socket_timeout=1.0), redis_pid, [os.getpid(), sub.pid])
        log(f"-- N={n}: {n} sidecars x {seconds:g} s, redis {public_url(url)}")

        t0 = time.monotonic()
        t0_wall = time.time()
        next_sample = t0 + SAMPLE_S
        deadline = t0 + timeout
        exited = 0
        i = 0
        while True:
            now = time.monotonic()
            while i < n and now >= t0 + STAGGER_S * i / n:
                run_id = f"load-{n}-{i}"
                err_path = os.path.join(work, f"sidecar-{i}.err")
                count_path = os.path.join(work, f"count-{i}.json")
                cmd = [PY, "-m", "sidecar", "--redis-url", url, "--run-id", run_id, "--agent-id", run_id]
                cmd += ["--no-echo", *extra, "--", PY, AGENT, "--seconds", str(seconds)]
                cmd += ["--seed", str(i), "--count-file", count_path]
                proc = Child(cmd, REPO, err_path)
                sidecars.append(Sidecar(i, run_id, proc, err_path, count_path, time.monotonic() - t0))
                sampler.add_sidecar(proc.pid, i)
                i += 1
                now = time.monotonic()
            for s in sidecars:
                if s.ended is None and s.proc.poll() is not None:
                    s.ended = time.monotonic() - t0
                    exited += 1
            if now >= next_sample:
                sampler.sample(now - t0, sum(1 for s in sidecars if s.ended is None))
                next_sample = max(next_sample + SAMPLE_S, now + SAMPLE_S / 2)
            if i == n and exited == n:
                break
            if now > deadline:
                lv.fail(f"TIMEOUT: {n - exited} sidecars still running after {timeout:.0f} s; killed")
                stop_all(sidecars, sampler)
                for s in sidecars:
                    if s.ended is None:
                        s.ended = time.monotonic() - t0
                break
            time.sleep(0.02 if i < n else 0.05)
        wall = time.monotonic() - t0
        sampler.sample(wall, 0)
        redis_cpu_s = sampler.redis_cpu_used()

        # Let pub/sub deliver the last batches, then collect the subscriber's figures.
        written = read_counts(sidecars)
        expect = sum(c.get("stdout_lines", 0) for c in written.values())
        settle = time.monotonic() + 5
        while time.monotonic() < settle and sub.lines_seen.value < expect:
            time.sleep(0.05)
        subres = sub.finish()
        sub = None
        mem = r.info("memory")
        mem_end, mem_peak = int(mem["used_memory"]), int(mem["used_memory_peak"])
        log(f"   all exited after {wall:.1f} s; counting in Redis")
        ctx = {
            "t0_wall": t0_wall,
            "wall": wall,
            "mem_base": mem_base,
            "mem_end": mem_end,
            "mem_peak": mem_peak,
            "redis_cpu_s": redis_cpu_s,
            "machine_before": machine_before,
            "redis_priority": redis_priority,
            "redis_stats": redis_stats(r),
            "redis_log": server.notable_log_lines() if server else [],
            "spool": spool if own_spool else None,
            "url": url,
        }
        lv.result = summarize(lv, r, sidecars, written, subres, sampler, ctx)
        if not server:
            delete_keys(r, n)
        r.close()
    finally:
        stop_all(sidecars, sampler)
        if sub is not None:
            sub.finish(timeout=2)
        if server:
            server.remove()
        shutil.rmtree(work, ignore_errors=True)
    return lv


def replay(spool: str, url: str) -> str:
    """``python -m sidecar replay`` on the level's spool; its last line of output."""
    try:
        p = subprocess.run(
            [PY, "-m", "sidecar", "replay", "--spool-dir", spool, "--redis-url", url],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "replay timed out after 300 s"
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return f"exit {p.returncode}: {tail}"


def summarize(
    lv: Level,
    r: redis.Redis,
    sidecars: list[Sidecar],
    written: dict[int, dict[str, Any]],
    sub: dict[str, Any],
    sampler: Sampler,
    ctx: dict[str, Any],
) -> dict[str, Any]:
    n = lv.agents
    t0_wall = ctx["t0_wall"]

    # -- what each agent wrote against what its streams hold
    lat_redis: array.array[float] = array.array("d")
    counts: dict[int, tuple[RunCount, RunCount]] = {}
    for s in sidecars:
        out = count_stream(r, f"run:{s.run_id}:output:0", lat_redis)
        counts[s.index] = (out, count_stream(r, f"run:{s.run_id}:logs:0"))
    lines_written = sum(c["stdout_lines"] for c in written.values())
    logs_written = sum(c["stderr_lines"] for c in written.values())
    delivered = sum(o.lines for o, _ in counts.values())
    logs_delivered = sum(lg.lines for _, lg in counts.values())
    short: list[dict[str, Any]] = []
    content_bad: list[str] = []
    problems: list[str] = []
    for s in sidecars:
        out, logs = counts[s.index]
        c = written.get(s.index)
        if c is None:
            lv.fail(f"{s.run_id}: the agent wrote no count file (sidecar exit {s.proc.returncode})")
            continue
        if out.lines != c["stdout_lines"] or logs.lines != c["stderr_lines"]:
            short.append(
                {
                    "run": s.run_id,
                    "stdout_written": c["stdout_lines"],
                    "stdout_in_redis": out.lines,
                    "stderr_written": c["stderr_lines"],
                    "stderr_in_redis": logs.lines,
                }
            )
        elif out.sha256 != c["stdout_sha256"]:
            content_bad.append(s.run_id)
        for kind, k in (
            ("gap markers", out.gaps + logs.gaps),
            ("seq breaks", out.seq_breaks + logs.seq_breaks),
            ("malformed entries", out.malformed + logs.malformed),
        ):
            if k:
                problems.append(f"{s.run_id}: {k} {kind}")
    entries = sum(o.entries for o, _ in counts.values())
    batches = sum(o.batches for o, _ in counts.values())

    # -- what the sidecars left in their spool: replay it and count again
    spool_dirs = spool_bytes = 0
    after_replay: int | None = None
    replay_note = ""
    # per run: lines missing (or, if ever, repeated) against what the agent wrote
    lost = sum(max(0, c["stdout_lines"] - counts[i][0].lines) for i, c in written.items())
    repeated = sum(max(0, counts[i][0].lines - c["stdout_lines"]) for i, c in written.items())
    if ctx["spool"]:
        spool_dirs, spool_bytes = spool_leftovers(ctx["spool"])
        if spool_dirs:
            replay_note = replay(ctx["spool"], ctx["url"])
            again = {s.index: count_stream(r, f"run:{s.run_id}:output:0") for s in sidecars}
            after_replay = sum(c.lines for c in again.values())
            lost = sum(max(0, c["stdout_lines"] - again[i].lines) for i, c in written.items())
            repeated = sum(max(0, again[i].lines - c["stdout_lines"]) for i, c in written.items())
            differ = [
                sidecars[i].run_id
                for i, c in written.items()
                if again[i].lines == c["stdout_lines"] and again[i].sha256 != c["stdout_sha256"]
            ]
            if differ:
                lv.fail(f"CONTENT MISMATCH after replay in {len(differ)} runs: {differ[:5]}")
    if repeated:
        lv.fail(f"{repeated:,} LINES REPEATED: runs hold more lines than their agents wrote")
    if short:
        missing = lines_written - delivered
        where = "; ".join(
            f"{x['run']} stdout {x['stdout_in_redis']}/{x['stdout_written']}, "
            f"stderr {x['stderr_in_redis']}/{x['stderr_written']}"
            for x in short[:4]
        )
        msg = (
            f"LINES NOT DELIVERED: agents wrote {lines_written:,} stdout lines, Redis held {delivered:,} "
            f"when the sidecars had exited ({missing:,} missing, {len(short)} runs short: {where}"
            f"{' ...' if len(short) > 4 else ''})"
        )
        if after_replay is not None:
            msg += (
                f"; {spool_dirs} spool directories ({spool_bytes / MB:.1f} MB) were left, replay "
                f"({replay_note}) brought Redis to {after_replay:,}: "
                + (f"{lost:,} LINES LOST for good" if lost else "nothing lost for good")
            )
        elif ctx["spool"]:
            msg += f"; nothing was left in the spool: {lost:,} LINES LOST for good"
        lv.fail(msg)
    elif spool_dirs:
        lv.note(f"{spool_dirs} spool directories ({spool_bytes:,} bytes) left although every line arrived")
    if content_bad:
        lv.fail(f"CONTENT MISMATCH: right line count, different bytes in {len(content_bad)} runs: {content_bad[:5]}")
    for p in problems[:10]:
        lv.fail(p)

    # -- exit codes and the sidecars' own diagnostics
    codes: dict[str, int] = {}
    for s in sidecars:
        rc = s.proc.returncode
        codes[str(rc)] = codes.get(str(rc), 0) + 1
        if rc != 0:
            lv.fail(f"{s.run_id}: sidecar exited {rc}: {' | '.join(read_lines(s.err_path)[-3:])}")
    diag = diagnostics(sidecars)

    # -- latency seen by the pub/sub subscriber
    arrays = {}
    for key in ("total", "w2c", "c2r"):
        a: array.array[float] = array.array("d")
        a.frombytes(sub.get(key, b""))
        arrays[key] = a
    if sub.get("error"):
        lv.note(f"subscriber: {sub['error']}")
    if sub.get("disconnects"):
        lv.note(f"the pub/sub subscriber lost its connection {len(sub['disconnects'])} times: {sub['disconnects'][:2]}")
    pubsub_lines = sum(sub.get("per_run", {}).values())
    sub_total = dist(arrays["total"], 1000.0)
    if sub.get("timed"):
        sub_total["max"] = round(sub["max_total"] * 1000.0, 2)

    # -- when each agent streamed, from its own clock (same machine)
    spans = {i: (c["started_at"] - t0_wall, c["ended_at"] - t0_wall) for i, c in written.items() if c.get("ended_at")}
    streaming_s = mean(e - b for b, e in spans.values()) or lv.seconds
    first_ms = [o.first_ms for o, _ in counts.values() if o.first_ms is not None]
    all_in_redis = (max(first_ms) / 1000.0 - t0_wall) if len(first_ms) == n else None
    all_started = max((b for b, _ in spans.values()), default=None) if len(spans) == n else None
    first_end = min((e for _, e in spans.values()), default=None)

    # -- per sidecar, over its agent's streaming time (start-up and drain left out)
    cpu_each: list[float] = []
    rss_each: list[float] = []
    for i, (b, e) in spans.items():
        pts = [p for p in sampler.series.get(i, []) if b + 1.0 <= p[0] <= e - 0.25]
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            cpu_each.append(100.0 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
            rss_each.append(mean(p[2] for p in pts) or 0.0)
    cpu_total_each = [ser[-1][1] for ser in sampler.series.values() if ser]

    # -- machine-wide samples while every agent streamed (or, failing that, at least half)
    samples = sampler.samples

    def streaming_at(t: float) -> int:
        return sum(1 for b, e in spans.values() if b <= t <= e)

    counted = [(x, streaming_at(x.t)) for x in samples]
    peak_streaming = max((k for _, k in counted), default=0)
    window_k = [(x, k) for x, k in counted if k == n]
    window_note = f"the {len(window_k)} samples with all {n} agents streaming"
    if len(window_k) < 3:
        # Start-up took longer than an agent streams: they never all ran at once.
        floor = max(1, int(0.8 * peak_streaming))
        window_k = [(x, k) for x, k in counted if k >= floor]
        window_note = (
            f"the {len(window_k)} samples with at least {floor} agents streaming "
            f"(never all {n} at once; at most {peak_streaming})"
        )
    window = [x for x, _ in window_k]
    busy = [(x, k) for x, k in counted if k]
    redis_cpu_all = [x.redis_cpu for x in samples if x.redis_cpu is not None]
    redis_cpu_per_agent = (
        sum(x.redis_cpu or 0.0 for x, _ in busy) / sum(k for _, k in busy) if busy and redis_cpu_all else None
    )
    delta = ctx["mem_end"] - ctx["mem_base"]
    per_agent_mb = delta / n / MB

    res: dict[str, Any] = {
        "agents": n,
        "seconds": lv.seconds,
        "lines_written": lines_written,
        "lines_delivered": delivered,
        "delivered_pct": rnd(100.0 * delivered / lines_written if lines_written else None, 3),
        "lines_equal": lines_written == delivered and not short,
        "content_equal": not content_bad,
        "stderr_lines_written": logs_written,
        "stderr_lines_delivered": logs_delivered,
        "runs_short": short,
        "spool_dirs_left": spool_dirs,
        "spool_bytes_left": spool_bytes,
        "replay": replay_note,
        "lines_delivered_after_replay": after_replay,
        "lines_lost": lost,
        "lines_repeated": repeated,
        "stream_entries": entries,
        "batches": batches,
        "lines_per_batch": rnd(delivered / batches if batches else None, 2),
        "lines_per_s_total": rnd(lines_written / streaming_s, 1),
        "lines_per_s_per_agent": rnd(lines_written / streaming_s / n, 1),
        "bursts_per_agent": rnd(mean(c["bursts"] for c in written.values()), 2),
        "latency_pubsub_ms": {
            **sub_total,
            "lines_timed": sub.get("timed", 0),
            "sample": len(arrays["total"]),
        },
        "latency_write_to_capture_ms": dist(arrays["w2c"], 1000.0),
        "latency_capture_to_subscriber_ms": dist(arrays["c2r"], 1000.0),
        "latency_write_to_redis_ms": {**dist(lat_redis), "lines": len(lat_redis)},
        "pubsub_lines_received": pubsub_lines,
        "pubsub_received_pct": rnd(100.0 * pubsub_lines / lines_written if lines_written else None, 3),
        "pubsub_unparsed_lines": sub.get("unparsed", 0),
        "subscriber_disconnects": sub.get("disconnects", []),
        "subscriber_priority": sub.get("priority", ""),
        "all_agents_started_s": rnd(all_started, 2),
        "all_runs_in_redis_s": rnd(all_in_redis, 2),
        "first_agent_done_s": rnd(first_end, 2),
        "peak_agents_streaming": peak_streaming,
        "window": window_note,
        "redis_priority": ctx["redis_priority"] or "default",
        "redis_cpu_pct_mean": rnd(mean(x.redis_cpu for x in window), 1),
        "redis_cpu_pct_peak": rnd(max(redis_cpu_all, default=None), 1),
        "redis_cpu_pct_per_streaming_agent": rnd(redis_cpu_per_agent, 3),
        "redis_cpu_s_total": rnd(ctx["redis_cpu_s"], 2),
        "redis_cpu_ms_per_1k_lines": rnd(
            ctx["redis_cpu_s"] * 1e6 / lines_written if ctx["redis_cpu_s"] is not None and lines_written else None,
            2,
        ),
        "redis_runqueue_wait_pct_mean": rnd(mean(x.redis_wait for x in window), 1),
        "redis_runqueue_wait_pct_peak": rnd(
            max((x.redis_wait for x in samples if x.redis_wait is not None), default=None), 1
        ),
        "redis_used_memory_base": ctx["mem_base"],
        "redis_used_memory_end": ctx["mem_end"],
        "redis_used_memory_peak": ctx["mem_peak"],
        "redis_mb_per_agent": rnd(per_agent_mb, 4),
        "redis_mb_per_agent_hour": rnd(per_agent_mb * 3600 / streaming_s, 2),
        "redis_bytes_per_line": rnd(delta / delivered if delivered else None, 1),
        "redis_stats": ctx["redis_stats"],
        "redis_log": ctx["redis_log"],
        "sidecar_cpu_pct_per_agent": rnd(mean(cpu_each), 2),
        "sidecar_cpu_pct_per_agent_p90": rnd(percentile(cpu_each, 90), 2),
        "sidecar_cpu_s_per_agent_whole_run": rnd(mean(cpu_total_each), 3),
        "sidecar_rss_mb_per_agent": rnd((mean(rss_each) or 0.0) / MB if rss_each else None, 1),
        "sidecar_rss_mb_per_agent_max": rnd(max(rss_each) / MB if rss_each else None, 1),
        "sidecars_measured": len(cpu_each),
        "sidecar_helper_processes": len(sampler.helpers),
        "agent_cpu_pct_per_agent": rnd(mean(x.agent_cpu / k for x, k in window_k), 2),
        "machine_cpu_pct_mean": rnd(mean(x.machine_cpu for x in window), 1),
        "cpu_pressure_pct_mean": rnd(mean(x.pressure for x in window), 1),
        "runnable_tasks_mean": rnd(mean(float(x.running) for x in window if x.running is not None), 1),
        "machine_cpu_pct_before": ctx["machine_before"],
        "load_script_cpu_pct_mean": rnd(mean(x.self_cpu for x in samples), 1),
        "others_cpu_pct_mean": rnd(mean(x.others_cpu for x in window), 1),
        "exit_codes": codes,
        "all_exit_0": codes == {"0": n},
        "sidecar_diagnostics": diag,
        "wall_s": rnd(ctx["wall"], 2),
        "samples_columns": [
            "t_s",
            "sidecars_alive",
            "sidecar_cpu_pct_total",
            "sidecar_rss_bytes_total",
            "agent_cpu_pct_total",
            "redis_cpu_pct",
            "redis_runqueue_wait_pct",
            "redis_used_memory",
            "machine_cpu_pct",
            "cpu_pressure_pct",
            "runnable_tasks",
            "others_cpu_pct",
        ],
        "samples": [
            [
                round(x.t, 2),
                x.alive,
                round(x.sidecar_cpu, 1),
                x.sidecar_rss,
                round(x.agent_cpu, 1),
                rnd(x.redis_cpu, 1),
                rnd(x.redis_wait, 1),
                x.redis_mem,
                round(x.machine_cpu, 1),
                rnd(x.pressure, 1),
                x.running,
                round(x.others_cpu, 1),
            ]
            for x in samples
        ],
    }
    res["failures"] = lv.failures
    res["notes"] = lv.notes
    return res


# ---------------------------------------------------------------- report


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def tables(levels: list[dict[str, Any]]) -> str:
    main = [
        [
            "agents",
            "written",
            "delivered",
            "deliv %",
            "p50 ms",
            "p99 ms",
            "max ms",
            "redis CPU % mean/peak",
            "redis MB/agent",
            "MB/agent-h",
            "sidecar CPU %/agent",
            "sidecar RSS MB/agent",
            "exit 0",
            "wall s",
        ]
    ]
    delivery = [
        [
            "agents",
            "lines/s",
            "write->redis p50/p99/max ms",
            "write->capture p50/p99 ms",
            "capture->sub p50/p99 ms",
            "pub/sub recv %",
            "spool left",
            "after replay",
            "lost",
            "lines/batch",
        ]
    ]
    load = [
        [
            "agents",
            "all started s",
            "peak streaming",
            "redis CPU ms/1k lines",
            "redis %/agent",
            "redis runq wait % mean/peak",
            "machine CPU %",
            "others CPU %",
            "CPU pressure %",
            "runnable",
            "sidecar CPU s/agent",
            "agent CPU %/agent",
            "bytes/line",
        ]
    ]
    for x in levels:
        lat = x["latency_pubsub_ms"]
        wr = x["latency_write_to_redis_ms"]
        w2c = x["latency_write_to_capture_ms"]
        c2r = x["latency_capture_to_subscriber_ms"]
        main.append(
            [
                str(x["agents"]),
                fmt(x["lines_written"]),
                fmt(x["lines_delivered"]) + ("" if x["lines_equal"] else " SHORT"),
                fmt(x["delivered_pct"], 2),
                fmt(lat["p50"]),
                fmt(lat["p99"]),
                fmt(lat["max"]),
                f"{fmt(x['redis_cpu_pct_mean'])} / {fmt(x['redis_cpu_pct_peak'])}",
                fmt(x["redis_mb_per_agent"], 3),
                fmt(x["redis_mb_per_agent_hour"]),
                fmt(x["sidecar_cpu_pct_per_agent"], 2),
                fmt(x["sidecar_rss_mb_per_agent"]),
                "yes" if x["all_exit_0"] else "NO " + json.dumps(x["exit_codes"]),
                fmt(x["wall_s"]),
            ]
        )
        spool = f"{x['spool_dirs_left']} dirs, {x['spool_bytes_left'] / MB:.1f} MB" if x["spool_dirs_left"] else "-"
        delivery.append(
            [
                str(x["agents"]),
                fmt(x["lines_per_s_total"], 0),
                f"{fmt(wr['p50'])} / {fmt(wr['p99'])} / {fmt(wr['max'])}",
                f"{fmt(w2c['p50'])} / {fmt(w2c['p99'])}",
                f"{fmt(c2r['p50'])} / {fmt(c2r['p99'])}",
                fmt(x["pubsub_received_pct"], 2),
                spool,
                fmt(x["lines_delivered_after_replay"]) if x["lines_delivered_after_replay"] is not None else "-",
                fmt(x["lines_lost"]),
                fmt(x["lines_per_batch"], 2),
            ]
        )
        load.append(
            [
                str(x["agents"]),
                fmt(x["all_agents_started_s"]),
                fmt(x["peak_agents_streaming"]),
                fmt(x["redis_cpu_ms_per_1k_lines"]),
                fmt(x["redis_cpu_pct_per_streaming_agent"], 3),
                f"{fmt(x['redis_runqueue_wait_pct_mean'])} / {fmt(x['redis_runqueue_wait_pct_peak'])}",
                fmt(x["machine_cpu_pct_mean"], 0),
                fmt(x["others_cpu_pct_mean"], 0),
                fmt(x["cpu_pressure_pct_mean"], 0),
                fmt(x["runnable_tasks_mean"]),
                fmt(x["sidecar_cpu_s_per_agent_whole_run"], 2),
                fmt(x["agent_cpu_pct_per_agent"], 2),
                fmt(x["redis_bytes_per_line"], 0),
            ]
        )
    return "\n\n".join(
        [render(main), "delivery:\n" + render(delivery), "machine and Redis under load:\n" + render(load)]
    )


def public_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


def environment(url: str | None, sidecar_help: str) -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "sched_autogroup": autogroup_enabled(),
        "redis_server": out(["redis-server", "--version"]),
        "redis_url": public_url(url) if url else "throwaway redis-server per level",
        "git_commit": out(["git", "rev-parse", "--short", "HEAD"]),
        # Uncommitted changes to the code under test, if any: the figures are for those too.
        "sidecar_changes": out(["git", "status", "--porcelain", "--", "sidecar", "agent_wrapper"]).splitlines(),
        "sidecar_has_heartbeat": "--heartbeat-interval" in sidecar_help,
    }


CHILD_ENV = "LOAD_PY_IN_OWN_SESSION"


def run_in_own_session(argv: list[str]) -> int:
    """Runs this script again as the leader of a new session and waits for it.

    The copy can then raise the priority of its own scheduling group (autogroup) without
    touching the caller's terminal session: the harness that starts the sidecars and samples
    them must not be starved by them. Ctrl-C and SIGTERM are passed on; the copy cleans up.
    """
    env = dict(os.environ, **{CHILD_ENV: "1"})
    proc = subprocess.Popen(
        [PY, os.path.abspath(__file__), *argv], env=env, start_new_session=True, preexec_fn=_die_with_parent
    )

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def main(argv: list[str] | None = None) -> int:
    if autogroup_enabled() and os.environ.get(CHILD_ENV) != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="50,100,200", help="comma-separated agent counts (default 50,100,200)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each agent streams (default 20)")
    ap.add_argument("--quick", action="store_true", help="N=10 for 5 s: a smoke run (< 60 s)")
    ap.add_argument("--redis-url", help="use this Redis (keys run:load-*, agent:load-* are deleted)")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every sidecar, repeatable, e.g. --sidecar-arg=--linger-ms=1",
    )
    ap.add_argument(
        "--redis-nice",
        type=int,
        default=0,
        help="nice value (and autogroup nice) of the throwaway redis-server, e.g. -10 to model a "
        "Redis with CPU of its own (default 0: an equal among the sidecars)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds per level before the sidecars are killed (default seconds + 60 + N/2)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        counts, seconds = [10], 5.0
    else:
        try:
            counts = [int(x) for x in args.agents.split(",") if x.strip()]
        except ValueError:
            ap.error("--agents takes comma-separated integers")
        seconds = args.seconds
    if not counts or min(counts) < 1 or seconds <= 0:
        ap.error("need at least one agent and a positive --seconds")

    help_run = subprocess.run([PY, "-m", "sidecar", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    if help_run.returncode != 0:
        log(f"!!! `python -m sidecar --help` exited {help_run.returncode}: {help_run.stderr.strip()[-300:]}")
        return 1
    agent_text.warm(agent_text.POOL_SIZE)  # the agents read the text pool from this cache

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    harness = "default"
    if os.environ.get(CHILD_ENV) == "1":
        harness = set_nice(os.getpid(), HARNESS_NICE, process=False)
    started = time.monotonic()
    levels: list[Level] = []
    stopped = ""
    try:
        for n in counts:
            timeout = args.timeout or seconds + 60 + n / 2
            levels.append(run_level(n, seconds, args.redis_url, args.sidecar_arg, timeout, args.redis_nice))
    except Interrupted as exc:
        stopped = str(exc)
        log(f"!!! interrupted ({exc}); processes stopped")
    except (RuntimeError, redis.RedisError, OSError) as exc:
        stopped = f"{type(exc).__name__}: {exc}"
        log(f"!!! cannot continue: {stopped}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    done = [lv.result for lv in levels if lv.result]
    failures = [f"N={lv.agents}: {f}" for lv in levels for f in lv.failures]
    notes = [f"N={lv.agents}: {f}" for lv in levels for f in lv.notes]
    if stopped:
        failures.append(f"run stopped early: {stopped}")
    elapsed = time.monotonic() - started
    if done:
        print(tables(done))
        print()
    for x in done:
        print(
            f"N={x['agents']}: {x['lines_per_s_per_agent']} lines/s and {x['bursts_per_agent']} bursts per "
            f"agent; averages over {x['window']}; machine {x['machine_cpu_pct_before']}% busy before the "
            f"start; load script {x['load_script_cpu_pct_mean']}% of a core"
        )
        for msg, d in list(x["sidecar_diagnostics"].items())[:6]:
            print(f"  sidecar log, {d['sidecars']} of {x['agents']} sidecars: {msg}")
        for line in x["redis_log"][:5]:
            print(f"  redis log: {line}")
    for msg in notes:
        print(f"note: {msg}")
    if failures:
        print("\nFAILURES:")
        for f in failures:
            print(f"  - {f}")
    print(f"\n{len(done)} levels, {len(failures)} failures, {elapsed:.1f} s")

    result = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "ok": not failures,
        "failures": failures,
        "notes": notes,
        "elapsed_s": round(elapsed, 2),
        "agents": counts,
        "seconds": seconds,
        "sidecar_args": args.sidecar_arg,
        "redis_nice": args.redis_nice,
        "harness_priority": harness,
        "environment": environment(args.redis_url, help_run.stdout),
        "levels": done,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    log(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
