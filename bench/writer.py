"""Benchmark child: writes generated agent text to fd 1 as fast as asked.

    python bench/writer.py --lines N --mode bulk          # 64 KiB os.write calls
    python bench/writer.py --lines N --mode flush         # one os.write per line
    python bench/writer.py --lines N --rate R             # R lines/s, each line starts
                                                          # with its write time (time.time())

All text is generated before the first write. The bytes written in bulk and flush mode are
exactly ``agent_text.make_block(N, avg_len, seed)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import agent_text  # noqa: E402

CHUNK = 64 * 1024


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_bulk(fd: int, n: int, avg_len: int, seed: int) -> int:
    unit, size = agent_text.block_period(n, avg_len, seed)
    if not size:
        return 0
    period = len(unit)
    # Enough copies back to back that a 64 KiB window starting in the first one is contiguous.
    buf = memoryview(unit * (1 + -(-CHUNK // period)))
    pos = 0
    while pos < size:
        k = min(CHUNK, size - pos)
        off = pos % period
        _write_all(fd, buf[off : off + k])
        pos += k
    return size


def write_flush(fd: int, n: int, avg_len: int, seed: int) -> int:
    lines = agent_text.make_lines(n, avg_len, seed)
    write = os.write
    total = 0
    for line in lines:
        done = write(fd, line)
        if done != len(line):
            _write_all(fd, line[done:])
        total += len(line)
    return total


def write_paced(fd: int, n: int, avg_len: int, seed: int, rate: float) -> int:
    """One write per line at ``rate`` lines/s; the first token is the time of the write."""
    lines = agent_text.make_lines(n, avg_len, seed)
    total = 0
    start = time.monotonic()
    for i, line in enumerate(lines):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        data = b"%.6f %s" % (time.time(), line)
        _write_all(fd, data)
        total += len(data)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--mode", choices=("bulk", "flush"), default="bulk")
    ap.add_argument("--rate", type=float, default=0.0, help="lines per second; 0 = as fast as possible")
    ap.add_argument("--avg-len", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print lines, bytes and seconds to stderr")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        if args.rate > 0:
            nbytes = write_paced(1, args.lines, args.avg_len, args.seed, args.rate)
        elif args.mode == "bulk":
            nbytes = write_bulk(1, args.lines, args.avg_len, args.seed)
        else:
            nbytes = write_flush(1, args.lines, args.avg_len, args.seed)
    except BrokenPipeError:
        # Reader went away; mirror what a shell pipeline would do.
        return 141
    if args.report:
        dt = time.perf_counter() - t0
        print(f"writer: {args.lines} lines {nbytes} bytes {dt:.3f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
