"""Benchmark of the sidecar: throughput, latency, startup, overhead, Redis memory, footprint.

    python bench/bench.py                    # full run, a couple of minutes
    python bench/bench.py --quick            # small sizes, under a minute (CI smoke check)
    python bench/bench.py --redis-url redis://127.0.0.1:6379/0 --json /tmp/b.json
    python bench/bench.py --only latency --only floor   # some sections only

Starts a throwaway redis-server on a free loopback port unless --redis-url is given.
Prints a table (figure | value | target | baseline | ratio) and writes the same as JSON.
Exit status: 0 when every measurement ran and every count was right (targets missed or
not); 1 when the sidecar failed, timed out or delivered a wrong number of lines or wrong
bytes, or a measurement could not be made; 2 with --strict when a target was missed.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import psutil
import redis
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import agent_text  # noqa: E402
import naive  # noqa: E402

# The interpreter running this file, not `python` from PATH: a version-manager shim there
# can add a few hundred milliseconds to every start.
PY = sys.executable
WRITER = os.path.join(HERE, "writer.py")
NAIVE = os.path.join(HERE, "naive.py")
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")
# What --only can pick, in the order of a full run (see Bench.sections).
SECTIONS = ("writer", "startup", "wrap", "warm-up", "bulk", "native", "replica", "flush", "naive", "latency",
            "highrate", "floor", "midrate", "idle", "outage")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PRINT_PROG = "for i in range(10000): print('line', i)"
MB = 1_000_000

StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None


@dataclass(frozen=True)
class Sizes:
    bulk_lines: int
    flush_lines: int
    naive_lines: int
    latency_rate: int
    latency_seconds: float
    startup_runs: int
    wrap_runs: int
    run_timeout: float  # one sidecar run moving data
    short_timeout: float  # one startup or wrap run
    outage_lines: int  # written while Redis is unreachable (12.5M lines: about 1 GB)
    bulk_runs: int  # bulk runs, each followed by one without redaction; the figures are medians
    midrate_seconds: float  # the run at MIDRATE lines/s
    highrate_seconds: float  # each run at HIGHRATE lines/s
    idle_seconds: float  # the run of a silent agent


FULL = Sizes(2_000_000, 1_000_000, 200_000, 100, 10.0, 10, 5, 300.0, 30.0, 12_500_000, 3, 6.0, 3.0, 20.0)
QUICK = Sizes(50_000, 50_000, 20_000, 100, 2.0, 3, 3, 20.0, 10.0, 200_000, 1, 1.5, 1.0, 4.0)
# A chatty agent (a build log, a test runner): one write per line, this many a second.
MIDRATE = 3000
# The high rate of the latency target: p99 at most the linger (5 ms by default) plus 10 ms.
HIGHRATE = 100_000
# The idle run's window starts this long after the sidecar: its start-up is not idleness.
IDLE_SETTLE_S = 2.0
# The sidecar's default --buffer-max-bytes; the outage target is this plus 30 MB.
BUFFER_BYTES = 64 << 20


# figure (without the .consumer suffix) -> unit, how the value must compare, target
SPEC: dict[str, tuple[str, str, float | None]] = {
    "bulk_lines_per_s": ("lines/s", ">=", 1_500_000),
    "naive_publish_lines_per_s": ("lines/s", "", None),
    "bulk_vs_naive_ratio": ("x", ">=", 100),
    "flush_lines_per_s": ("lines/s", ">=", 700_000),
    "latency_p50_ms": ("ms", "<=", 1.0),
    "latency_p99_ms": ("ms", "<=", 5.0),
    "startup_ms": ("ms", "<=", 250),
    "wrap_overhead_ratio": ("x", "<=", 1.3),
    "wrap_floor_ratio": ("x", "", None),
    "wrap_buffered_ratio": ("x", "", None),
    "redis_lines_per_mb": ("lines/MB", ">=", 10_000),
    "sidecar_cpu_pct": ("% of a core", "<=", 2.0),
    "sidecar_rss_mb": ("MB", "<=", 60),
    "midrate_cpu_pct": ("% of a core", "", None),
    "midrate_p99_ms": ("ms", "", None),
    "idle_cpu_pct": ("% of a core", "", None),
    "highrate_p50_ms": ("ms", "", None),
    "highrate_p99_ms": ("ms", "<=", 15.0),
    "outage_rss_mb": ("MB", "<=", BUFFER_BYTES / MB + 30),
    "bulk_no_redact_lines_per_s": ("lines/s", "", None),
    "redaction_cost_pct": ("%", "", None),
    "bulk_pure_python_lines_per_s": ("lines/s", "", None),
    "native_gain_pct": ("%", "", None),
    "bulk_replica_ack_lines_per_s": ("lines/s", "", None),
    "replica_ack_cost_pct": ("%", "", None),
}


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    target: float | None = None
    op: str = ""  # ">=" or "<=": how value must compare to target
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        return out


class SidecarFailure(Exception):
    """The sidecar exited badly, timed out, or delivered the wrong lines."""


class Skipped(Exception):
    """A figure that could not be measured because an earlier step failed."""


# ---------------------------------------------------------------- wire format


def decode(payload: bytes, dctx: zstandard.ZstdDecompressor) -> dict[str, Any]:
    if payload[:4] == ZSTD_MAGIC:
        payload = dctx.decompress(payload, max_output_size=1 << 31)
    obj = orjson.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("payload is not a JSON object")
    return obj


def record_texts(batch: dict[str, Any]) -> list[str]:
    lines: list[str] = batch.get("lines") or []
    b64 = batch.get("b64")
    if b64:
        lines = list(lines)
        for i in b64:
            lines[i] = base64.b64decode(lines[i]).decode("utf-8", "replace")
    return lines


def record_bytes(batch: dict[str, Any]) -> bytes:
    """The exact bytes the agent wrote for the records of one batch."""
    lines: list[str] = batch.get("lines") or []
    partial = set(batch.get("partial") or ())
    b64 = set(batch.get("b64") or ())
    if not partial and not b64:
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    out: list[bytes] = []
    for i, text in enumerate(lines):
        out.append(base64.b64decode(text) if i in b64 else text.encode("utf-8"))
        if i not in partial:
            out.append(b"\n")
    return b"".join(out)


@dataclass
class StreamCount:
    entries: int = 0
    batches: int = 0
    lines: int = 0
    other_types: dict[str, int] = field(default_factory=dict)
    seq_breaks: int = 0
    malformed: int = 0
    sha256: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.seq_breaks:
            out.append(f"{self.seq_breaks} breaks in the seq numbering (lost or repeated batches)")
        if self.malformed:
            out.append(f"{self.malformed} malformed entries")
        for kind, k in self.other_types.items():
            if kind != "status":
                out.append(f"{k} entries of type {kind!r}")
        return out


def xrange_pages(r: redis.Redis, key: str, page: int = 1000) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    start: bytes | str = "-"
    while True:
        chunk = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(key, min=start, max="+", count=page))
        yield from chunk
        if len(chunk) < page:
            return
        start = b"(" + chunk[-1][0]


def count_stream(r: redis.Redis, key: str, *, digest: bool = False) -> StreamCount:
    """Sum of n over the batch entries of a stream, with seq continuity and optional sha256."""
    dctx = zstandard.ZstdDecompressor()
    sha = hashlib.sha256() if digest else None
    c = StreamCount()
    expected_seq: int | None = None
    for _eid, fields in xrange_pages(r, key):
        c.entries += 1
        payload = fields.get(b"d")
        try:
            obj = decode(payload, dctx) if payload is not None else None
        except (ValueError, zstandard.ZstdError):
            obj = None
        if obj is None:
            c.malformed += 1
            continue
        kind = obj.get("type")
        if kind != "batch":
            c.other_types[str(kind)] = c.other_types.get(str(kind), 0) + 1
            continue
        n = obj.get("n")
        if not isinstance(n, int) or n != len(obj.get("lines") or []):
            c.malformed += 1
            n = len(obj.get("lines") or [])
        c.batches += 1
        c.lines += n
        seq = obj.get("seq")
        if expected_seq is not None and seq != expected_seq:
            c.seq_breaks += 1
        expected_seq = seq + n if isinstance(seq, int) else None
        if sha is not None:
            sha.update(record_bytes(obj))
    if sha is not None:
        c.sha256 = sha.hexdigest()
    return c


# ---------------------------------------------------------------- redis server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayRedis:
    """redis-server on a free loopback port, no persistence, removed on exit.

    ``extra_args`` go to redis-server, ``popen`` to subprocess.Popen (bench/load.py starts
    it in a session of its own)."""

    def __init__(self, extra_args: Sequence[str] = (), *, prefix: str = "bench-redis-", **popen: Any) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = ""
        self.url = ""
        self.extra_args = list(extra_args)
        self.prefix = prefix
        self.popen = popen

    @property
    def logfile(self) -> str:
        return os.path.join(self.dir, "redis.log")

    def start(self) -> ThrowawayRedis:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found on PATH (install it or pass --redis-url)")
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        for _attempt in range(3):
            port = free_port()
            cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", self.dir, "--logfile", self.logfile, *self.extra_args]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, **self.popen)
            self.url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    client.ping()
                    client.close()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.05)
            self.stop()  # port taken in the meantime, or a slow start: try another
        raise RuntimeError("could not start redis-server")

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """A replica: wait until its first sync with the master is done. While it runs (the
        master waits, forks and streams its data set), sidecar runs measured at the same time
        took tens of milliseconds longer."""
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's replica did not sync with its master")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ---------------------------------------------------------------- measurements


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_wait(cmd: list[str], timeout: float, **popen: Any) -> tuple[int | None, float]:
    """Runs ``cmd`` to its end: (exit code, None if killed after ``timeout`` s; wall seconds).

    It waits in waitpid, woken by the child's exit. ``subprocess.run(timeout=...)`` polls
    instead, sleeping 0.5 ms, 1 ms, 2 ms and so on up to 50 ms between checks, which puts a
    run that ends after 64 ms at 114 ms."""
    expired = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen)

    def kill() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted (Ctrl-C): no child left behind
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - t0
    # A run that ended on its own just as the timer fired is not a timeout.
    return (None if expired.is_set() and rc == -signal.SIGKILL else rc), seconds


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``cmd`` with its stdout to /dev/null."""
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - t0


def timed_piped_run(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``cmd`` with its stdout a 1 MiB pipe (as the sidecar makes them) that
    is read only after it exited: its writes never wake a reader, the least a capture of its
    output can cost it. The output must fit in the pipe."""
    import fcntl

    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=w, env=env)
        os.close(w)
        w = -1
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        while os.read(r, 1 << 16):
            pass
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if rc != 0:
        raise RuntimeError(f"{cmd[:3]} exited {rc}")
    return seconds


def subscribe_confirmed(client: redis.Redis, channel: str) -> Any:
    """A pubsub object whose subscription the server has acknowledged."""
    ps = client.pubsub()  # type: ignore[no-untyped-call]
    ps.subscribe(channel)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
        if msg and msg["type"] == "subscribe":
            return ps
    raise RuntimeError(f"no subscribe confirmation for {channel}")


class LatencyConsumer:
    """Receives batches and records receipt_time - write_time for each line, in ms.

    Each consumer runs in a process of its own: two consumers in one interpreter, woken by
    the same batch, would wait for each other's GIL, and the benchmark's sampler holds it
    while it reads /proc. The line count and the first receipt are shared while it runs;
    the latencies come back on ``finish``.
    """

    kind = ""

    def __init__(self, url: str, key: str, warmup_s: float = 0.0) -> None:
        self.url = url
        self.key = key
        # Lines written within this long of the first one are counted but not timed: they
        # include the ones that waited in the pipe while the sidecar started.
        self.warmup_s = warmup_s
        ctx = multiprocessing.get_context("fork")
        self._lines = ctx.Value("q", 0, lock=False)
        self._first = ctx.Value("d", 0.0, lock=False)
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._results = ctx.Queue()
        self.proc = ctx.Process(target=self._main, name=f"latency-{self.kind}", daemon=True)
        self.latencies_ms: list[float] = []
        self.unparsed = 0
        self.error = ""

    @property
    def lines(self) -> int:
        return int(self._lines.value)

    @property
    def first_at(self) -> float | None:
        return float(self._first.value) or None

    def start(self) -> None:
        self.proc.start()
        if not self._ready.wait(10):
            self.error = "consumer not ready within 10 s"

    def wait_lines(self, n: int, seconds: float) -> None:
        """Until ``n`` lines arrived, the consumer failed, or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.lines < n and not self.error:
            time.sleep(0.05)

    def _main(self) -> None:
        out: list[float] = []
        unparsed = [0]
        error = ""
        try:
            client = redis.Redis.from_url(self.url)
            dctx = zstandard.ZstdDecompressor()
            lines = self._lines
            first = self._first
            timed_from = [0.0]

            def handle(payload: bytes, received: float) -> None:
                obj = decode(payload, dctx)
                if obj.get("type") != "batch":
                    return
                if not first.value:
                    first.value = received
                texts = record_texts(obj)
                for text in texts:
                    try:
                        written = float(text.split(" ", 1)[0])
                    except ValueError:
                        unparsed[0] += 1
                        continue
                    if not timed_from[0]:
                        timed_from[0] = written + self.warmup_s
                    if written >= timed_from[0]:
                        out.append((received - written) * 1000.0)
                lines.value += len(texts)

            self.receive(client, handle)
        except Exception as exc:  # reported with the figure instead of killing the run
            error = f"{type(exc).__name__}: {exc}"
            self._ready.set()
        self._results.put((out, unparsed[0], error))

    def receive(self, client: redis.Redis, handle: Callable[[bytes, float], None]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self._stop.set()
        try:
            out, unparsed, error = self._results.get(timeout=10)
        except queue.Empty:
            out, unparsed, error = [], 0, "consumer gave no results"
        self.latencies_ms, self.unparsed = out, unparsed
        self.error = self.error or error
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()


class PubSubConsumer(LatencyConsumer):
    kind = "pubsub"

    def receive(self, client: redis.Redis, handle: Callable[[bytes, float], None]) -> None:
        ps = subscribe_confirmed(client, self.key)
        self._ready.set()
        get = ps.get_message
        while not self._stop.is_set():
            msg = get(timeout=0.05)
            if msg is None or msg["type"] != "message":
                continue
            handle(msg["data"], time.time())
        ps.close()


class StreamConsumer(LatencyConsumer):
    kind = "stream"

    def receive(self, client: redis.Redis, handle: Callable[[bytes, float], None]) -> None:
        last: bytes | str = "0-0"
        client.ping()
        self._ready.set()
        while not self._stop.is_set():
            resp = cast(StreamReply, client.xread({self.key: last}, count=1000, block=50))
            received = time.time()
            for _key, entries in resp or ():
                for eid, fields in entries:
                    last = eid
                    payload = fields.get(b"d")
                    if payload is not None:
                        handle(payload, received)


class ProcSampler:
    """CPU and RSS of the sidecar process and its children, the agent (writer.py) excluded.

    Listing children scans all of /proc, which takes milliseconds and holds the GIL the
    latency consumers need, so the process tree is refreshed rarely and cached between
    samples.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.procs: list[psutil.Process] = [self.root]
        self.writers: list[psutil.Process] = []
        self.refreshed_at = -1e9
        self.peak_rss = 0
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.t_first: float | None = None
        self.t_last: float | None = None

    def _refresh(self) -> None:
        kids = self.root.children(recursive=True)
        parent: dict[int, int] = {}
        writer_pids: set[int] = set()
        for kid in kids:
            try:
                parent[kid.pid] = kid.ppid()
                if WRITER in kid.cmdline():
                    writer_pids.add(kid.pid)
            except psutil.Error:
                continue

        def under_writer(pid: int) -> bool:
            while pid in parent:
                if pid in writer_pids:
                    return True
                pid = parent[pid]
            return False

        self.writers = [k for k in kids if k.pid in writer_pids]
        self.procs = [self.root] + [k for k in kids if k.pid in parent and not under_writer(k.pid)]
        self.refreshed_at = time.monotonic()

    def writer_running(self) -> bool:
        for w in self.writers:
            try:
                if w.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                continue
        return False

    def sample(self, in_window: bool) -> None:
        now = time.monotonic()
        if now - self.refreshed_at > (2.0 if self.writers else 0.3):
            try:
                self._refresh()
            except psutil.Error:
                return
        rss = 0
        cpu: dict[int, float] = {}
        for p in self.procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        # Only while the agent runs: start-up imports and the final drain are not steady state.
        if in_window and self.writer_running():
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
            for pid, c in cpu.items():
                self.cpu_first.setdefault(pid, c)
                self.cpu_last[pid] = c

    @staticmethod
    def combined(samplers: Sequence[ProcSampler]) -> tuple[float | None, float]:
        """CPU in % of a core over the windows of several runs together, and their total seconds."""
        used = 0.0
        window = 0.0
        for x in samplers:
            if x.t_first is None or x.t_last is None or x.t_last - x.t_first < 0.2:
                continue
            used += sum(x.cpu_last[p] - x.cpu_first[p] for p in x.cpu_last)
            window += x.t_last - x.t_first
        return (100.0 * used / window if window else None), window


class Bench:
    def __init__(self, url: str, sizes: Sizes, sidecar_args: list[str], log: Callable[[str], None]) -> None:
        self.url = url
        self.sizes = sizes
        self.sidecar_args = sidecar_args
        self.log = log
        self.r = redis.Redis.from_url(url)
        self.figures: dict[str, Figure] = {}
        self.failures: list[str] = []
        self.context: dict[str, Any] = {}
        self.sidecar_broken = ""
        self._runs = 0
        self.extra_args: list[str] = []  # for one measurement (redaction off, replica acks)
        self.extra_env: dict[str, str | None] = {}  # for one measurement (None: unset)
        self.replica_url: str | None = None
        # A spool directory of the benchmark's own: the default one may hold what other
        # sidecars of this machine left, which every start would scan (and import orjson for).
        self.spool_dir = tempfile.mkdtemp(prefix="bench-spool-")

    def close(self) -> None:
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    # -- helpers

    def run_id(self, tag: str) -> str:
        self._runs += 1
        return f"bench-{os.getpid()}-{int(time.time())}-{self._runs}-{tag}"

    def keys(self, run_id: str) -> tuple[str, str, str]:
        return f"run:{run_id}:output:0", f"run:{run_id}:logs:0", f"run:{run_id}:status"

    def cleanup(self, run_id: str) -> None:
        keys = list(self.r.scan_iter(match=f"run:{run_id}:*", count=1000))
        if keys:
            self.r.delete(*keys)

    def sidecar_cmd(self, run_id: str, agent: list[str]) -> list[str]:
        return [*self._sidecar_cmd(run_id, agent)]

    def _sidecar_cmd(self, run_id: str, agent: list[str]) -> list[str]:
        return [
            PY,
            "-m",
            "sidecar",
            "--no-echo",
            "--run-id",
            run_id,
            "--redis-url",
            self.url,
            "--spool-dir",
            self.spool_dir,
            *self.sidecar_args,
            *self.extra_args,
            "--",
            *agent,
        ]

    def add(
        self,
        name: str,
        value: float | None,
        *,
        baseline: float | None = None,
        label: str = "",
        ratio: float | None = None,
        note: str = "",
    ) -> None:
        """Records a figure; the ratio defaults to value / baseline."""
        unit, op, target = SPEC[name.split(".")[0]]
        if ratio is None and baseline and value is not None and unit != "x":
            ratio = value / baseline
        self.figures[name] = Figure(name, value, unit, target, op, baseline, label, ratio, note)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        self.log(f"!!! {msg}")

    def check_sidecar(self) -> None:
        try:
            p = subprocess.run([PY, "-m", "sidecar", "--help"], cwd=REPO, capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            self.sidecar_broken = "`python -m sidecar --help` timed out"
        else:
            if p.returncode != 0:
                tail = p.stderr.decode(errors="replace").strip().splitlines()[-3:]
                self.sidecar_broken = f"`python -m sidecar --help` exited {p.returncode}: {' | '.join(tail)}"
        if self.sidecar_broken:
            self.fail(self.sidecar_broken)

    def sidecar_io(self, err: Any) -> dict[str, Any]:
        """How every sidecar run is started: from the repository, without stdin, its stdout
        dropped, its stderr into ``err``, with ``extra_env`` (a variable set to None: unset)."""
        env = None
        if self.extra_env:
            env = {k: v for k, v in {**os.environ, **self.extra_env}.items() if v is not None}
        return {"cwd": REPO, "stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": err, "env": env}

    def run_sidecar(self, run_id: str, agent: list[str], timeout: float) -> float:
        """Runs the sidecar to completion; returns wall seconds. Raises SidecarFailure."""
        if self.sidecar_broken:
            raise Skipped(self.sidecar_broken)
        with tempfile.TemporaryFile() as err:
            rc, seconds = timed_wait(self.sidecar_cmd(run_id, agent), timeout, **self.sidecar_io(err))
            if rc is None:
                self.sidecar_broken = f"sidecar timed out after {timeout:.0f} s (run {run_id})"
                raise SidecarFailure(self.sidecar_broken)
            if rc != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
                raise SidecarFailure(f"sidecar exited {rc} (run {run_id}): {' | '.join(tail)}")
        return seconds

    def watch(self, proc: subprocess.Popen[bytes], err: Any, sampler: ProcSampler, run_id: str, timeout: float,
              steady: Callable[[], bool], every_s: float) -> None:
        """Samples a running sidecar until it exits; raises SidecarFailure on a timeout or an
        exit code other than 0 (with the end of its stderr, a temporary file)."""
        t0 = time.monotonic()
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                self.sidecar_broken = f"sidecar timed out after {timeout:.0f} s (run {run_id})"
                raise SidecarFailure(self.sidecar_broken)
            sampler.sample(in_window=steady())
            time.sleep(every_s)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise SidecarFailure(f"sidecar exited {proc.returncode} (run {run_id}): {' | '.join(tail)}")

    def measure(self, label: str, fn: Callable[[], None]) -> None:
        self.log(f"-- {label}")
        t0 = time.perf_counter()
        try:
            fn()
        except Skipped as exc:
            self.log(f"   skipped: {exc}")
        except SidecarFailure as exc:
            self.fail(f"{label}: {exc}")
        except (OSError, subprocess.SubprocessError, redis.RedisError, RuntimeError, ValueError) as exc:
            self.fail(f"{label}: measurement error: {type(exc).__name__}: {exc}")
        self.log(f"   ({time.perf_counter() - t0:.1f} s)")

    # -- figures

    def writer_alone(self) -> None:
        """How fast the writer itself is, into /dev/null: a ceiling for the sidecar figures."""
        for mode, n in (("bulk", self.sizes.bulk_lines), ("flush", self.sizes.flush_lines)):
            agent_text.warm(n)
            t0 = time.perf_counter()
            cmd = [PY, WRITER, "--lines", str(n), "--mode", mode]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            self.context[f"writer_{mode}_devnull_lines_per_s"] = round(n / (time.perf_counter() - t0))

    def throughput(self, mode: str, n: int) -> tuple[float, StreamCount, int | None]:
        """One sidecar run of writer.py; returns (seconds, what Redis holds, MEMORY USAGE)."""
        agent_text.warm(n)
        run_id = self.run_id(mode)
        out_key = self.keys(run_id)[0]
        agent = [PY, WRITER, "--lines", str(n), "--mode", mode]
        try:
            seconds = self.run_sidecar(run_id, agent, self.sizes.run_timeout)
            count = count_stream(self.r, out_key, digest=True)
            mem = self.r.memory_usage(out_key, samples=0) if mode == "bulk" else None
        finally:
            self.cleanup(run_id)
        expected = hashlib.sha256(agent_text.make_block(n)).hexdigest()
        if count.lines != n:
            self.fail(
                f"LINE COUNT MISMATCH ({mode}): writer wrote {n:,} lines, "
                f"Redis holds {count.lines:,} in {count.batches} batches"
            )
        elif count.sha256 != expected:
            self.fail(
                f"CONTENT MISMATCH ({mode}): {n:,} lines arrived but their bytes differ from the written"
            )
        for problem in count.problems():
            self.fail(f"{mode} run: {problem}")
        return seconds, count, mem

    def warm_up(self) -> None:
        """One bulk run, checked like the others but not a figure: a fresh redis-server spends
        the first run growing its heap (~70 MB), which a long-running one has done already,
        and the runs compared with the bulk run (without redaction, without the native
        module) would otherwise all find it warm."""
        n = self.sizes.bulk_lines
        seconds, count, _ = self.throughput("bulk", n)
        self.context["bulk_first_run_lines_per_s"] = round(count.lines / seconds)

    def bulk(self) -> None:
        """The bulk runs, each followed by the same run with --no-redact (what masking secrets
        costs): alternating, so that the machine's drift between runs falls on both."""
        n = self.sizes.bulk_lines
        on: list[tuple[float, StreamCount]] = []
        off: list[float] = []
        mem = None
        for _ in range(self.sizes.bulk_runs):
            seconds, count, used = self.throughput("bulk", n)
            on.append((seconds, count))
            mem = mem or used
            self.extra_args = ["--no-redact"]
            try:
                off.append(self.throughput("bulk", n)[0])
            finally:
                self.extra_args = []
        seconds, count = sorted(on, key=lambda run: run[0])[len(on) // 2]
        each = ", ".join(f"{s:.2f}" for s, _ in on)
        note = (f"{count.lines:,} of {n:,} lines counted in Redis, {count.batches} batches, {seconds:.2f} s "
                f"(median of {len(on)}: {each} s)")
        self.add("bulk_lines_per_s", count.lines / seconds, note=note)
        if mem:
            raw_per_mb = n / (len(agent_text.make_block(n)) / MB)
            value = count.lines / (mem / MB)
            note = f"MEMORY USAGE {mem:,} bytes for {count.entries} entries"
            self.add("redis_lines_per_mb", value, baseline=raw_per_mb, label="raw text", note=note)
        unmasked = sorted(off)[len(off) // 2]
        each = ", ".join(f"{s:.2f}" for s in off)
        self.add("bulk_no_redact_lines_per_s", n / unmasked,
                 note=f"bulk runs with --no-redact, one after each bulk run: median of {len(off)}: {each} s")
        self.add("redaction_cost_pct", 100 * (1 - unmasked / seconds),
                 note="throughput lost to redaction: 1 - bulk / bulk without redaction (medians)")

    def native_gain(self) -> None:
        """The bulk run again with SIDECAR_PURE_PYTHON=1: what the native module gives."""
        if not native_module():
            raise Skipped("the native module is not built")
        if pure_python_asked():
            raise Skipped("SIDECAR_PURE_PYTHON is set: the bulk run used the Python code already")
        n = self.sizes.bulk_lines
        self.extra_env = {"SIDECAR_PURE_PYTHON": "1"}
        try:
            seconds, count, _ = self.throughput("bulk", n)
        finally:
            self.extra_env = {}
        value = count.lines / seconds
        self.add("bulk_pure_python_lines_per_s", value, note=f"bulk run with SIDECAR_PURE_PYTHON=1, {seconds:.2f} s")
        bulk = self.figures.get("bulk_lines_per_s")
        if bulk and bulk.value:
            self.add("native_gain_pct", 100 * (bulk.value / value - 1),
                     note="bulk / bulk with the Python code only - 1")

    def replica_ack_cost(self) -> None:
        """The bulk run with a replica and --min-replicas-ack 1 (WAIT after each pipeline)."""
        if self.replica_url is None:
            raise Skipped("needs the benchmark's own redis-server (no --redis-url)")
        n = self.sizes.bulk_lines
        self.extra_args = ["--min-replicas-ack", "1"]
        try:
            seconds, count, _ = self.throughput("bulk", n)
        finally:
            self.extra_args = []
        value = count.lines / seconds
        self.add("bulk_replica_ack_lines_per_s", value, note=f"one replica, --min-replicas-ack 1, {seconds:.2f} s")
        bulk = self.figures.get("bulk_lines_per_s")
        if bulk and bulk.value:
            self.add("replica_ack_cost_pct", 100 * (1 - value / bulk.value),
                     note="throughput lost to WAIT: 1 - acked bulk / bulk")

    def flush(self) -> None:
        n = self.sizes.flush_lines
        seconds, count, _ = self.throughput("flush", n)
        note = f"{count.lines:,} of {n:,} lines counted in Redis, {count.batches} batches, {seconds:.2f} s"
        self.add("flush_lines_per_s", count.lines / seconds, note=note)

    def naive(self) -> None:
        n = self.sizes.naive_lines
        agent_text.warm(n)
        channel = f"naive:{os.getpid()}-{time.time_ns()}"
        counter = naive.Counter(self.url, channel)
        counter.start()
        cmd = [PY, NAIVE, "--lines", str(n), "--redis-url", self.url, "--channel", channel]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=max(self.sizes.run_timeout, n / 1000))
        seconds = time.perf_counter() - t0
        received = counter.settle(n)
        note = f"{received:,} of {n:,} lines received by a subscriber, {seconds:.2f} s"
        if proc.returncode != 0 or received != n:
            note += f" (naive.py exit {proc.returncode}; lines lost)"
        self.add("naive_publish_lines_per_s", received / seconds, note=note)

    def paced_runs(self, rate: int, n: int, kinds: Sequence[type[LatencyConsumer]], tag: str,
                   warmup_s: float = 0.0) -> tuple[list[LatencyConsumer], list[ProcSampler]]:
        """One sidecar run per consumer kind, the writer writing ``n`` lines at ``rate``
        lines/s (one write each, stamped with its time), each consumer alone: two consumer
        processes woken by the same batch on two cores would wait for each other's CPU."""
        if self.sidecar_broken:
            raise Skipped(self.sidecar_broken)
        agent_text.warm(n)
        samplers: list[ProcSampler] = []
        consumers: list[LatencyConsumer] = []
        for kind in kinds:
            run_id = self.run_id(f"{tag}-{kind.kind}")
            c = kind(self.url, self.keys(run_id)[0], warmup_s)
            consumers.append(c)
            c.start()
            agent = [PY, WRITER, "--lines", str(n), "--rate", str(rate)]
            timeout = n / rate + self.sizes.run_timeout
            try:
                with tempfile.TemporaryFile() as err:
                    proc = subprocess.Popen(self.sidecar_cmd(run_id, agent), **self.sidecar_io(err))

                    def steady(c: LatencyConsumer = c) -> bool:
                        first = c.first_at
                        return first is not None and time.time() > first + 0.5

                    sampler = ProcSampler(proc.pid)
                    samplers.append(sampler)
                    self.watch(proc, err, sampler, run_id, timeout, steady, 0.25)
                c.wait_lines(n, 5.0)
            finally:
                c.finish()
                self.cleanup(run_id)
            if c.lines != n and c.kind == "stream":
                self.fail(f"LINE COUNT MISMATCH ({tag} run): {n:,} lines written, {c.lines:,} read from the stream")
        return consumers, samplers

    @staticmethod
    def consumer_note(c: LatencyConsumer, n: int) -> str:
        note = f"{len(c.latencies_ms):,} lines timed, {c.lines:,} of {n:,} received (a run of its own)"
        if c.error:
            note += f"; consumer error: {c.error}"
        if c.unparsed:
            note += f"; {c.unparsed} lines without a timestamp"
        return note

    def latency(self) -> None:
        s = self.sizes
        n = int(s.latency_rate * s.latency_seconds)
        consumers, samplers = self.paced_runs(s.latency_rate, n, (PubSubConsumer, StreamConsumer), "latency")
        for c in consumers:
            for q in (50, 99):
                self.add(f"latency_p{q}_ms.{c.kind}", percentile(c.latencies_ms, q), note=self.consumer_note(c, n))
        cpu, window = ProcSampler.combined(samplers)
        note = f"at {s.latency_rate} lines/s over {window:.1f} s of both latency runs, writer excluded"
        self.add("sidecar_cpu_pct", cpu, note=note)
        note = "peak RSS of the sidecar and its helpers, writer excluded"
        self.add("sidecar_rss_mb", max(x.peak_rss for x in samplers) / MB, note=note)

    def highrate(self) -> None:
        """Latency while the agent writes HIGHRATE lines/s, one write each: batches fill,
        and a line waits at most about the linger before its batch goes. The lines of the
        first fifth of the run are not timed (the backlog of the sidecar's start)."""
        n = int(HIGHRATE * self.sizes.highrate_seconds)
        warmup = self.sizes.highrate_seconds / 5
        consumers, _samplers = self.paced_runs(HIGHRATE, n, (PubSubConsumer, StreamConsumer), "highrate", warmup)
        for c in consumers:
            note = self.consumer_note(c, n)
            self.add(f"highrate_p50_ms.{c.kind}", percentile(c.latencies_ms, 50), note=note)
            self.add(f"highrate_p99_ms.{c.kind}", percentile(c.latencies_ms, 99), note=note)

    def latency_floor(self) -> None:
        """The same consumers, each alone, behind the smallest possible relay (naive.py --as-batch)."""
        s = self.sizes
        n = int(s.latency_rate * min(s.latency_seconds, 5.0))
        agent_text.warm(n)
        floor: dict[str, dict[str, float | None]] = {}
        samplers: list[ProcSampler] = []
        for kind in (PubSubConsumer, StreamConsumer):
            key = f"bench-floor:{os.getpid()}-{time.time_ns()}"
            c = kind(self.url, key)
            c.start()
            cmd = [PY, NAIVE, "--lines", str(n), "--rate", str(s.latency_rate), "--as-batch"]
            cmd += ["--redis-url", self.url, "--channel", key]
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
                # CPU of the relay over the same window as sidecar_cpu_pct (writer excluded, from
                # 0.5 s after the first line arrived): what reading and sending each line costs
                # any process on this machine.
                sampler = ProcSampler(proc.pid)
                samplers.append(sampler)
                deadline = time.monotonic() + n / s.latency_rate + s.run_timeout
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        proc.kill()
                        proc.wait()
                        raise RuntimeError("the latency-floor relay timed out")
                    first = c.first_at
                    sampler.sample(first is not None and time.time() > first + 0.5)
                    time.sleep(0.25)
                c.wait_lines(n, 3.0)
            finally:
                c.finish()
                self.r.delete(key)
            p50, p99 = percentile(c.latencies_ms, 50), percentile(c.latencies_ms, 99)
            floor[c.kind] = {"p50": p50 and round(p50, 3), "p99": p99 and round(p99, 3), "lines": c.lines}
        self.context["latency_floor_ms"] = floor
        cpu, _window = ProcSampler.combined(samplers)
        self.context["latency_floor_cpu_pct"] = cpu and round(cpu, 2)

    def midrate(self) -> None:
        """CPU of the sidecar while the agent writes MIDRATE lines/s, one write each: more
        wake-ups than the latency runs, too few lines per read for bulk's economies. The
        stream consumer's latency beside it."""
        n = int(MIDRATE * self.sizes.midrate_seconds)
        consumers, samplers = self.paced_runs(MIDRATE, n, (StreamConsumer,), "midrate")
        cpu, window = ProcSampler.combined(samplers)
        note = f"{MIDRATE:,} lines/s, one write each, over {window:.1f} s, writer excluded"
        self.add("midrate_cpu_pct", cpu, note=note)
        c = consumers[0]
        self.add("midrate_p99_ms.stream", percentile(c.latencies_ms, 99), note=self.consumer_note(c, n))

    def idle(self) -> None:
        """CPU of the sidecar of an agent that writes nothing (one waiting on a model's reply,
        most agents most of the time): heartbeats and whatever else wakes it. The writer
        writes one line at its start and one at its end; the window starts
        IDLE_SETTLE_S after the sidecar did, when its start-up is over."""
        if self.sidecar_broken:
            raise Skipped(self.sidecar_broken)
        seconds = self.sizes.idle_seconds
        run_id = self.run_id("idle")
        agent = [PY, WRITER, "--lines", "2", "--rate", str(1.0 / (IDLE_SETTLE_S + seconds))]
        try:
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(self.sidecar_cmd(run_id, agent), **self.sidecar_io(err))
                started = time.monotonic()
                sampler = ProcSampler(proc.pid)
                self.watch(proc, err, sampler, run_id, IDLE_SETTLE_S + seconds + self.sizes.run_timeout,
                           lambda: time.monotonic() > started + IDLE_SETTLE_S, 0.5)
            count = count_stream(self.r, self.keys(run_id)[0])
        finally:
            self.cleanup(run_id)
        if count.lines != 2:
            self.fail(f"LINE COUNT MISMATCH (idle run): 2 lines written, {count.lines} in the stream")
        cpu, window = ProcSampler.combined([sampler])
        note = f"an agent silent for {window:.1f} s, writer excluded"
        self.add("idle_cpu_pct", cpu, note=note)

    def startup(self) -> None:
        base: list[float] = []
        wrapped: list[float] = []
        for _ in range(self.sizes.startup_runs):
            base.append(timed_run([PY, "-c", "pass"]))
            run_id = self.run_id("startup")
            try:
                wrapped.append(self.run_sidecar(run_id, ["true"], self.sizes.short_timeout))
            finally:
                self.cleanup(run_id)
        b = statistics.median(base) * 1000
        v = statistics.median(wrapped) * 1000
        note = f"median of {len(wrapped)} runs of `-- true`"
        self.add("startup_ms", v, baseline=b, label="python -c pass", note=note)

    def wrap_overhead(self) -> None:
        """A short agent printing 10,000 lines, bare (stdout to /dev/null) and through the
        sidecar. Unbuffered, as the sidecar's image runs Python agents (PYTHONUNBUFFERED=1):
        one write() per print argument and separator, 40,000 in all. Beside it, as context,
        the floor of any wrapper that is a Python program: an interpreter's start (`python -c
        pass`) plus the agent run into a pipe read only after it exited (the least a capture
        costs it); and both runs again with stdout block-buffered (a dozen writes)."""
        unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}
        buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        prog = [PY, "-c", PRINT_PROG]
        bare: list[float] = []
        piped: list[float] = []
        wrapped: list[float] = []
        bare_buf: list[float] = []
        wrapped_buf: list[float] = []
        counts: list[int] = []
        interp: list[float] = []
        for _ in range(self.sizes.wrap_runs):
            bare.append(timed_run(prog, unbuffered))
            piped.append(timed_piped_run(prog, unbuffered))
            interp.append(timed_run([PY, "-c", "pass"], unbuffered))
            bare_buf.append(timed_run(prog, buffered))
            for env, into in (("1", wrapped), (None, wrapped_buf)):
                run_id = self.run_id("wrap")
                self.extra_env = {"PYTHONUNBUFFERED": env}
                try:
                    into.append(self.run_sidecar(run_id, prog, self.sizes.short_timeout))
                    counts.append(count_stream(self.r, self.keys(run_id)[0]).lines)
                finally:
                    self.extra_env = {}
                    self.cleanup(run_id)
        if any(c != 10_000 for c in counts):
            self.fail(f"LINE COUNT MISMATCH (wrap runs): 10,000 lines printed per run, Redis held {counts}")
        b, p, w, i = (statistics.median(x) * 1000 for x in (bare, piped, wrapped, interp))
        note = f"median of {len(wrapped)}: {w:.0f} ms wrapped vs {b:.0f} ms bare (unbuffered)"
        self.add("wrap_overhead_ratio", w / b, baseline=b, label="bare run, ms", ratio=None, note=note)
        note = (f"python -c pass {i:.1f} ms + {p:.0f} ms with stdout an unread 1 MiB pipe, vs {b:.0f} ms "
                "to /dev/null")
        self.add("wrap_floor_ratio", (i + p) / b, baseline=b, label="bare run, ms", ratio=None, note=note)
        bb, wb = (statistics.median(x) * 1000 for x in (bare_buf, wrapped_buf))
        note = f"{wb:.0f} ms wrapped vs {bb:.0f} ms bare, stdout block-buffered"
        self.add("wrap_buffered_ratio", wb / bb, baseline=bb, label="bare run, ms", ratio=None, note=note)

    def outage(self) -> None:
        """Redis unreachable for the whole run while the agent writes about 1 GB: the peak RSS
        of the sidecar (default --buffer-max-bytes) and, after `replay` into the benchmark's
        Redis, every line counted and hashed."""
        if self.sidecar_broken:
            raise Skipped(self.sidecar_broken)
        n = self.sizes.outage_lines
        run_id = self.run_id("outage")
        out_key = self.keys(run_id)[0]
        down_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        written = agent_text.block_period(n, 80, 1)[1]
        agent = [PY, WRITER, "--lines", str(n), "--mode", "bulk"]
        timeout = self.sizes.run_timeout + n / 20_000
        with tempfile.TemporaryDirectory(prefix="bench-outage-") as spool, tempfile.TemporaryFile() as err:
            cmd = [PY, "-m", "sidecar", "--no-echo", "--run-id", run_id, "--redis-url", down_url,
                   "--spool-dir", spool, "--spool-max-bytes", str(4 * written), "--drain-timeout", "1",
                   *self.sidecar_args, "--", *agent]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, **self.sidecar_io(err))
            sampler = ProcSampler(proc.pid)
            self.watch(proc, err, sampler, run_id, timeout, lambda: False, 0.1)
            seconds = time.monotonic() - t0
            spooled = sum(f.stat().st_size for f in Path(spool).rglob("*") if f.is_file())
            try:
                rp = subprocess.run([PY, "-m", "sidecar", "replay", "--spool-dir", spool, "--redis-url", self.url],
                                    cwd=REPO, capture_output=True, timeout=timeout)
                if rp.returncode != 0:
                    tail = rp.stderr.decode(errors="replace").strip().splitlines()[-3:]
                    raise SidecarFailure(f"replay exited {rp.returncode}: {' | '.join(tail)}")
                count = count_stream(self.r, out_key, digest=True)
            finally:
                self.cleanup(run_id)
        unit, size = agent_text.block_period(n)
        sha = hashlib.sha256()
        for _ in range(size // len(unit)):
            sha.update(unit)
        sha.update(unit[: size % len(unit)])
        if count.lines != n or count.sha256 != sha.hexdigest():
            self.fail(f"OUTAGE RUN LOST OUTPUT: {n:,} lines written, {count.lines:,} in Redis after replay"
                      + ("" if count.lines != n else " (bytes differ)"))
        note = (f"{written / MB:,.0f} MB written in {seconds:.1f} s with Redis down, {spooled / MB:,.0f} MB "
                f"spooled, {count.lines:,} of {n:,} lines in Redis after replay; target: "
                f"--buffer-max-bytes {BUFFER_BYTES / MB:.1f} MB + 30 MB")
        self.add("outage_rss_mb", sampler.peak_rss / MB, note=note)

    def sections(self) -> list[tuple[str, str, Callable[[], None]]]:
        """(name for --only, label, method) in the order a full run takes them."""
        s = self.sizes
        return [
            ("writer", "writer alone", self.writer_alone),
            ("startup", "startup", self.startup),
            ("wrap", "wrap overhead", self.wrap_overhead),
            ("warm-up", "warm-up: a bulk run into the fresh Redis, not a figure", self.warm_up),
            ("bulk", f"bulk, {s.bulk_lines:,} lines, {s.bulk_runs} times, each followed by one without redaction",
             self.bulk),
            ("native", "bulk without the native module", self.native_gain),
            ("replica", "bulk with --min-replicas-ack 1", self.replica_ack_cost),
            ("flush", f"flush, {s.flush_lines:,} lines", self.flush),
            ("naive", f"naive PUBLISH per line, {s.naive_lines:,} lines", self.naive),
            ("latency", f"latency at {s.latency_rate} lines/s for {s.latency_seconds:g} s", self.latency),
            ("highrate", f"latency at {HIGHRATE:,} lines/s", self.highrate),
            ("floor", "latency floor (naive relay)", self.latency_floor),
            ("midrate", f"CPU at {MIDRATE:,} lines/s", self.midrate),
            ("idle", f"CPU of a silent agent's sidecar, {s.idle_seconds:g} s", self.idle),
            ("outage", f"Redis down while the agent writes {s.outage_lines:,} lines", self.outage),
        ]

    def run_all(self, only: Sequence[str] = ()) -> None:
        self.check_sidecar()
        assert tuple(name for name, _l, _f in self.sections()) == SECTIONS
        for name, label, fn in self.sections():
            if not only or name in only:
                self.measure(label, fn)
        self.relate()

    def relate(self) -> None:
        """Fills the baseline columns that compare the sidecar with the naive publisher."""
        naive_fig = self.figures.get("naive_publish_lines_per_s")
        if not naive_fig or not naive_fig.value:
            return
        label = f"naive PUBLISH, {self.sizes.naive_lines:,} lines"
        for name in ("bulk_lines_per_s", "flush_lines_per_s"):
            fig = self.figures.get(name)
            if fig and fig.value is not None:
                fig.baseline = naive_fig.value
                fig.baseline_label = label
                fig.ratio = fig.value / naive_fig.value
        bulk = self.figures.get("bulk_lines_per_s")
        if bulk and bulk.ratio is not None:
            self.add("bulk_vs_naive_ratio", bulk.ratio, note="bulk_lines_per_s / naive_publish_lines_per_s")


# ---------------------------------------------------------------- report

ORDER = (
    "bulk_lines_per_s",
    "naive_publish_lines_per_s",
    "bulk_vs_naive_ratio",
    "flush_lines_per_s",
    "latency_p50_ms.pubsub",
    "latency_p99_ms.pubsub",
    "latency_p50_ms.stream",
    "latency_p99_ms.stream",
    "highrate_p50_ms.pubsub",
    "highrate_p99_ms.pubsub",
    "highrate_p50_ms.stream",
    "highrate_p99_ms.stream",
    "startup_ms",
    "wrap_overhead_ratio",
    "wrap_floor_ratio",
    "wrap_buffered_ratio",
    "redis_lines_per_mb",
    "sidecar_cpu_pct",
    "sidecar_rss_mb",
    "midrate_cpu_pct",
    "midrate_p99_ms.stream",
    "idle_cpu_pct",
    "outage_rss_mb",
    "bulk_no_redact_lines_per_s",
    "redaction_cost_pct",
    "bulk_pure_python_lines_per_s",
    "native_gain_pct",
    "bulk_replica_ack_lines_per_s",
    "replica_ack_cost_pct",
)


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def ordered(figures: dict[str, Figure]) -> list[str]:
    return [n for n in ORDER if n in figures] + [n for n in figures if n not in ORDER]


def table(figures: dict[str, Figure]) -> str:
    rows = [("figure", "value", "target", "baseline", "ratio")]
    for name in ordered(figures):
        f = figures[name]
        target = "" if f.target is None else f"{f.op} {fmt(f.target)}"
        if f.met is not None:
            target += "  ok" if f.met else "  MISS"
        baseline = "" if f.baseline is None else fmt(f.baseline)
        if f.baseline_label:
            baseline += f" ({f.baseline_label})"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x" if f.ratio < 10 else f"{f.ratio:.0f}x"
        value = "n/a" if f.value is None else f"{fmt(f.value)} {f.unit}"
        rows.append((name, value, target, baseline, ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def public_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username + ':***@' if parts.username else ':***@'}{host}"
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


def prepare_bytecode() -> None:
    """Compile the project's modules to bytecode, as pip does when it installs the package: with
    PYTHONDONTWRITEBYTECODE set, every sidecar start would otherwise compile them from source."""
    import compileall

    for package in ("sidecar", "agent_wrapper"):
        compileall.compile_dir(os.path.join(REPO, package), quiet=1)


@functools.cache
def native_module() -> bool:
    """Whether the sidecar's children load sidecar/_speedups.c (as built by the install)."""
    code = "from sidecar import _native; print(_native.speedups is not None)"
    p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if k != "SIDECAR_PURE_PYTHON"})
    return p.stdout.strip() == "True"


def pure_python_asked() -> bool:
    """SIDECAR_PURE_PYTHON as the sidecar reads it: the runs use the Python code."""
    from sidecar._native import pure_python_asked as asked

    return asked(os.environ)


def import_hooks() -> list[str]:
    """Import hooks of editable installs in this interpreter: site runs them at every start of
    every child started with the same interpreter (about 20 ms each for setuptools' finder),
    which an installed sidecar does not pay. scripts/venv.sh installs without one."""
    names = [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path]
    names += [getattr(f, "__name__", "") for f in sys.path_hooks]
    return [n for n in names if "editable" in n.lower()]


def environment(r: redis.Redis, url: str, sidecar_args: list[str]) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    try:
        redis_version = r.info("server").get("redis_version", "")
    except redis.RedisError:
        redis_version = ""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "redis_version": redis_version,
        "redis_url": public_url(url),
        "git_commit": commit,
        "sidecar_args": sidecar_args,
        "import_hooks": import_hooks(),
        "native_module": native_module() and not pure_python_asked(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke check (< 60 s)")
    ap.add_argument("--redis-url", help="use this Redis instead of starting a throwaway redis-server")
    ap.add_argument(
        "--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})"
    )
    ap.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every sidecar run, e.g. --sidecar-arg=--linger-ms=1 (repeatable)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}; "
        "the results are then written only where --json says",
    )
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    prepare_bytecode()
    # No delay before a replica's first sync (the default waits 5 s for more replicas).
    server = None if args.redis_url else ThrowawayRedis(["--repl-diskless-sync-delay", "0"])
    replica: ThrowawayRedis | None = None
    try:
        if server:
            server.__enter__()
            host, port = server.url.split("//")[1].split("/")[0].split(":")
            replica = ThrowawayRedis(["--replicaof", host, port])
            replica.__enter__()
            replica.wait_in_sync()
        url = args.redis_url or server.url  # type: ignore[union-attr]
        log(f"redis: {public_url(url)}{' (throwaway)' if server else ''}; python: {PY}")
        bench = Bench(url, sizes, args.sidecar_arg, log)
        try:
            bench.replica_url = replica.url if replica else None
            bench.r.ping()
            env = environment(bench.r, url, args.sidecar_arg)
            bench.run_all(args.only)
        finally:
            bench.close()
    except (RuntimeError, redis.RedisError) as exc:
        log(f"!!! cannot run the benchmark: {exc}")
        return 1
    finally:
        if replica:
            replica.__exit__(None, None, None)
        if server:
            server.__exit__(None, None, None)

    elapsed = time.perf_counter() - started
    report = table(bench.figures)
    print(report)
    writer = [(k.split("_")[1], v) for k, v in bench.context.items() if k.startswith("writer_")]
    if writer:
        print("context: writer alone into /dev/null: " + ", ".join(f"{m} {v:,} lines/s" for m, v in writer))
    first = bench.context.get("bulk_first_run_lines_per_s")
    if first:
        print(f"context: warm-up, the first bulk run into the fresh Redis (not a figure): {first:,} lines/s")
    floor = bench.context.get("latency_floor_ms")
    if floor:
        parts = [f"{kind} p50 {fmt(v['p50'])} ms p99 {fmt(v['p99'])} ms" for kind, v in floor.items()]
        floor_cpu = bench.context.get("latency_floor_cpu_pct")
        if floor_cpu is not None:
            parts.append(f"CPU {fmt(floor_cpu)} % of a core")
        print("context: latency floor, one XADD+PUBLISH per line by naive.py: " + ", ".join(parts))
    if env.get("import_hooks"):
        hooks = ", ".join(env["import_hooks"])
        print(f"context: editable-install import hooks run at every interpreter start: {hooks}")
    print(
        f"note: the naive baseline uses {sizes.naive_lines:,} lines (one PUBLISH per line is slow); "
        f"the sidecar runs use {sizes.bulk_lines:,} (bulk) and {sizes.flush_lines:,} (flush)."
    )
    for name in ordered(bench.figures):
        if bench.figures[name].note:
            print(f"  {name}: {bench.figures[name].note}")
    missed = [f.name for f in bench.figures.values() if f.met is False]
    if bench.failures:
        print("\nFAILURES:")
        for msg in bench.failures:
            print(f"  - {msg}")
    print(
        f"\n{len(bench.figures)} figures, {len(missed)} targets missed, {len(bench.failures)} failures, "
        f"{elapsed:.1f} s"
    )

    result = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "ok": not bench.failures,
        "failures": bench.failures,
        "targets_missed": missed,
        "elapsed_s": round(elapsed, 2),
        "sizes": asdict(sizes),
        "environment": env,
        "context": bench.context,
        "figures": {name: bench.figures[name].as_json() for name in ordered(bench.figures)},
    }
    if args.only and args.json == DEFAULT_JSON:
        log("partial run (--only): results not written; give --json to keep them")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
        log(f"wrote {args.json}")

    if bench.failures:
        return 1
    if args.strict and missed:
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
