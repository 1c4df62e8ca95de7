"""The naive way to ship an agent's output: one Redis PUBLISH per line.

Spawns bench/writer.py (bulk mode), reads its stdout line by line and publishes each line
with redis-py on channel ``naive:<id>``. Prints a JSON summary on stdout. This is the
baseline bench.py compares the sidecar against.

    python bench/naive.py --lines 20000 --check      # also count what a subscriber got
    python bench/naive.py --lines 500 --rate 100 --as-batch --channel K
                                                     # relay for the latency floor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import redis

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "writer.py")


class Counter(threading.Thread):
    """Subscribes to a channel and counts messages until stopped."""

    def __init__(self, url: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.count = 0
        self.last_at = time.monotonic()
        self._stop_event = threading.Event()
        self._pubsub = redis.Redis.from_url(url).pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(channel)
        # Wait for the confirmation so no message published after this returns is missed.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "subscribe":
                break
        else:
            raise RuntimeError(f"no subscribe confirmation for {channel}")

    def run(self) -> None:
        get = self._pubsub.get_message
        while not self._stop_event.is_set():
            msg = get(timeout=0.1)
            if msg is not None and msg["type"] == "message":
                self.count += 1
                self.last_at = time.monotonic()

    def settle(self, expected: int, quiet: float = 1.0, limit: float = 30.0) -> int:
        """Wait until ``expected`` arrived or nothing came for ``quiet`` s; then stop."""
        end = time.monotonic() + limit
        while self.count < expected and time.monotonic() < end:
            if time.monotonic() - self.last_at > quiet:
                break
            time.sleep(0.02)
        self._stop_event.set()
        self.join(2)
        self._pubsub.close()
        return self.count


def publish_lines(url: str, channel: str, writer_cmd: list[str]) -> tuple[int, int, float]:
    """Returns (lines published, writer exit code, seconds from spawn to writer exit)."""
    client = redis.Redis.from_url(url)
    client.ping()
    publish = client.publish
    count = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(writer_cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        publish(channel, line.rstrip(b"\n"))
        count += 1
    rc = proc.wait()
    return count, rc, time.perf_counter() - t0


def relay_batches(url: str, key: str, writer_cmd: list[str]) -> tuple[int, int, float]:
    """Like publish_lines, but each line goes out as a one-record v1 batch, by XADD and PUBLISH.

    The smallest relay that speaks the sidecar's wire format: its latency is a floor for
    what any pipe-to-Redis relay can reach on the machine.
    """
    client = redis.Redis.from_url(url)
    client.ping()
    count = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(writer_cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        count += 1
        text = line.rstrip(b"\n").decode("utf-8", "replace")
        payload = json.dumps({"v": 1, "type": "batch", "seq": count, "n": 1, "lines": [text]})
        pipe = client.pipeline(transaction=False)
        pipe.xadd(key, {"d": payload})
        pipe.publish(key, payload)
        pipe.execute()
    rc = proc.wait()
    return count, rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--channel", default=f"naive:{os.getpid()}-{time.time_ns()}")
    ap.add_argument("--avg-len", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="count received messages with a subscriber thread")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="writer's lines per second (0: as fast as it can)"
    )
    ap.add_argument(
        "--as-batch",
        action="store_true",
        help="send each line as a one-record v1 batch, XADD and PUBLISH to --channel",
    )
    args = ap.parse_args(argv)

    writer_cmd = [
        sys.executable,
        WRITER,
        "--lines",
        str(args.lines),
        "--mode",
        "bulk",
        "--avg-len",
        str(args.avg_len),
        "--seed",
        str(args.seed),
        "--rate",
        str(args.rate),
    ]
    counter = Counter(args.redis_url, args.channel) if args.check else None
    if counter:
        counter.start()
    relay = relay_batches if args.as_batch else publish_lines
    published, rc, seconds = relay(args.redis_url, args.channel, writer_cmd)
    summary: dict[str, object] = {
        "channel": args.channel,
        "published": published,
        "seconds": round(seconds, 6),
        "lines_per_s": round(published / seconds, 1) if seconds else None,
        "writer_rc": rc,
    }
    if counter:
        summary["received"] = counter.settle(published)
    print(json.dumps(summary))
    ok = rc == 0 and published == args.lines and summary.get("received", published) == published
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
