"""Load-test agent: streams agent-like text the way an LLM agent does, for a bounded time.

    python bench/llm_stream.py --seconds 20 --seed 7 --count-file /tmp/c7.json

Pacing (seeded per agent, so the same seed gives the same schedule):

- quiet phases of 1-3 s at about 20 lines/s (exponential gaps: tokens trickling in);
- after a quiet phase, with probability BURST_P, a burst of 200-500 lines written back to
  back (a tool result, a file dump, a test log);

which averages about 50 lines/s. Every line is one ``os.write`` (line-flushed), and starts
with its write time, ``time.time()`` with microseconds, taken just before the write:

    1718000000.123456 Let me look at the failing test...
    {"t":1718000000.173456,"type":"assistant","message":{...}}

JSON lines (the stream-json events of bench/agent_text.py, an init event at the start and a
``result`` event with token usage at the end) carry the time as their first key ``t``
instead, so they stay JSON objects. A couple of log lines go to stderr.

At the end (after ``--seconds``), the agent writes what it wrote to ``--count-file`` as
JSON: ``stdout_lines``, ``stdout_bytes``, ``stdout_sha256``, ``stderr_lines``,
``stderr_bytes``, ``bursts``, ``started_at`` and ``ended_at`` (unix time of the first and
last line), ``seconds``; then exits 0 (141 if stdout was closed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import agent_text  # noqa: E402

QUIET_RATE = 20.0  # lines/s during a quiet phase
QUIET_S = (1.0, 3.0)  # length of a quiet phase
BURST_LINES = (200, 500)
TARGET_RATE = 50.0
# Expected lines per cycle: QUIET_RATE * mean(QUIET_S) + BURST_P * mean(BURST_LINES),
# over mean(QUIET_S) seconds; BURST_P makes that TARGET_RATE.
_MEAN_QUIET = sum(QUIET_S) / 2
BURST_P = (TARGET_RATE - QUIET_RATE) * _MEAN_QUIET / (sum(BURST_LINES) / 2)
MODEL = "claude-sonnet-4-5"


class Out:
    """One os.write per line on a file descriptor, counted and hashed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines = 0
        self.nbytes = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.lines += data.count(b"\n")
        self.nbytes += len(data)
        self.sha.update(data)


def stamped(line: bytes) -> bytes:
    """``line`` with the current time in front (as key ``t`` for a JSON object line)."""
    now = time.time()
    if line[:1] == b"{":
        return b'{"t":%.6f,%s' % (now, line[1:])
    return b"%.6f %s" % (now, line)


def json_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def run(seconds: float, seed: int, out: Out, err: Out, times: dict[str, float]) -> int:
    rng = random.Random(f"llm-stream:{seed}")
    pool = agent_text.make_lines(agent_text.POOL_SIZE)  # read from the warm cache
    pos = rng.randrange(len(pool))
    session = f"{rng.getrandbits(64):016x}"

    def next_line() -> bytes:
        nonlocal pos
        line = pool[pos]
        pos = (pos + 1) % len(pool)
        return line

    start = time.monotonic()
    deadline = start + seconds
    times["started_at"] = time.time()
    err.write(b"llm_stream: seed=%d session=%s seconds=%g\n" % (seed, session.encode(), seconds))
    init = {
        "type": "system",
        "subtype": "init",
        "session_id": session,
        "model": MODEL,
        "tools": ["Read", "Bash"],
    }
    out.write(stamped(json_line(init)))
    bursts = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        phase_end = min(deadline, now + rng.uniform(*QUIET_S))
        t = now
        while True:
            t += rng.expovariate(QUIET_RATE)
            if t >= phase_end:
                break
            delay = t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            out.write(stamped(next_line()))
        delay = phase_end - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if phase_end < deadline and rng.random() < BURST_P:
            bursts += 1
            for _ in range(rng.randint(*BURST_LINES)):
                out.write(stamped(next_line()))
    tokens_out = out.nbytes // 4
    result = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "session_id": session,
        "num_turns": bursts + 1,
        "usage": {"input_tokens": 12000 + seed, "output_tokens": tokens_out},
        "total_cost_usd": round(tokens_out * 15e-6, 6),
    }
    out.write(stamped(json_line(result)))
    times["ended_at"] = time.time()
    err.write(b"llm_stream: done, %d lines, %d bursts\n" % (out.lines, bursts))
    return bursts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to stream (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="pacing and text offset (default 0)")
    ap.add_argument("--count-file", help="write the counts here as JSON at the end")
    args = ap.parse_args(argv)

    out, err = Out(1), Out(2)
    t0 = time.monotonic()
    rc = 0
    bursts = -1
    times: dict[str, float] = {}
    try:
        bursts = run(args.seconds, args.seed, out, err, times)
    except BrokenPipeError:
        rc = 141
    if args.count_file:
        counts = {
            "seed": args.seed,
            "stdout_lines": out.lines,
            "stdout_bytes": out.nbytes,
            "stdout_sha256": out.sha.hexdigest(),
            "stderr_lines": err.lines,
            "stderr_bytes": err.nbytes,
            "bursts": bursts,
            "started_at": times.get("started_at"),
            "ended_at": times.get("ended_at"),
            "seconds": round(time.monotonic() - t0, 3),
            "broken_pipe": rc == 141,
        }
        tmp = f"{args.count_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump(counts, fh)
        os.replace(tmp, args.count_file)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
