"""The cost of one lone line: the path a line takes when it comes alone on a quiet pipe.

    python bench/lone_line.py [--redis-url URL] [--lines N]
    python bench/lone_line.py --callgrind [--redis-url URL]

An in-process loop builds the sidecar's runtime as a run does (batcher, outbox, sender,
redaction on), hands the pipe reader one line at a time as its loop hands on a short read
that ends a quiet spell, and waits until Redis has confirmed the line: the reader then
writes it itself (what happens at 100 lines/s; the first line goes through the sender
thread, which opens the connection). Without --callgrind it prints the CPU time a line takes in this
process (all threads), which moves with the machine. With --callgrind it runs itself twice
under `valgrind --tool=callgrind` (200 and 700 lines) and prints the difference per line in
instructions, which does not move: the way to compare two versions of the path.
Needs a Redis (a throwaway one is started when --redis-url is not given).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def run_lines(url: str, lines: int) -> float:
    """Ship ``lines`` lone lines; the process CPU seconds they took."""
    from agent_wrapper.events import STDOUT
    from agent_wrapper.pipes import PipeReader
    from sidecar import _native, app, config

    run_id = f"lone-{os.getpid()}-{lines}"
    s = config.build({"run_id": run_id, "redis_url": url}, {}, ("true",))
    rt = app.Runtime(s)
    gc.freeze()  # as app.run does once the agent runs
    gc.set_threshold(app.GC_THRESHOLD, 20, 20)
    rt.sender.start()
    rt.batcher.start()
    r, w = os.pipe()
    count_lf = _native.speedups.count_lf if _native.speedups is not None else None
    reader = PipeReader({STDOUT: r}, rt.sink, on_quiet=rt.batcher.on_quiet, filter=rt.redactor, count_lf=count_lf,
                        lone=rt.batcher.lone_read)

    def one(i: int) -> None:
        # as the reader's loop hands on a short read that ends a quiet spell
        if not reader._handle(STDOUT, b"%.6f token %d of the model's answer, streamed as it comes\n"
                              % (time.time(), i), time.time(), True):
            rt.batcher.on_quiet(True)
        while rt.sender.stats.records_shipped < i + 1:  # the first goes through the sender thread
            time.sleep(0.0005)

    one(0)
    start = time.process_time()
    for i in range(1, lines + 1):
        one(i)
    spent = time.process_time() - start
    os.close(r)
    os.close(w)
    return spent


def callgrind(url: str) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found")
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (200, 700):
            out = os.path.join(tmp, f"cg.{n}")
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                            os.path.abspath(__file__), "--redis-url", url, "--lines", str(n)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                counts[n] = int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]
    print(f"instructions a lone line: {(counts[700] - counts[200]) / 500:,.0f} "
          f"(200 lines: {counts[200]:,}; 700 lines: {counts[700]:,})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url")
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--callgrind", action="store_true")
    args = ap.parse_args()
    server = None
    url = args.redis_url
    if url is None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    try:
        if args.callgrind:
            callgrind(url)
        else:
            spent = run_lines(url, args.lines)
            print(f"{args.lines} lone lines: {spent / args.lines * 1e6:.1f} µs of CPU a line (all threads)")
    finally:
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
