"""Profile the hot path: py-spy samples the sidecar while it ships the bulk workload.

    python bench/hotpath.py [--lines 4000000] [--redis-url URL]

Prints the share of samples per thread and the top functions by own time. Needs py-spy
(`pip install py-spy`) and, without --redis-url, a redis-server binary to start a throwaway one.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import ThrowawayRedis  # noqa: E402  (the benchmark's throwaway server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=4_000_000)
    ap.add_argument("--mode", choices=("bulk", "flush"), default="bulk")
    ap.add_argument("--redis-url")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    beside = Path(sys.executable).with_name("py-spy")  # installed in this interpreter's venv
    pyspy = str(beside) if beside.exists() else shutil.which("py-spy")
    if pyspy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 1
    server = ThrowawayRedis() if a.redis_url is None else None
    url = a.redis_url or server.__enter__().url  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "profile.txt")
            cmd = [pyspy, "record", "--threads", "-r", "250", "-f", "raw", "-o", raw, "--",
                   sys.executable, "-m", "sidecar", "--no-echo", "--redis-url", url, "--run-id", "profile", "--",
                   sys.executable, str(HERE / "writer.py"), "--lines", str(a.lines), "--mode", a.mode]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=HERE.parent)
            threads: collections.Counter[str] = collections.Counter()
            own: collections.Counter[str] = collections.Counter()
            total = 0
            for line in open(raw):
                stack, _, count = line.rstrip().rpartition(" ")
                n = int(count)
                frames = stack.split(";")
                total += n
                threads[frames[0].split(":")[-1].strip() if ":" in frames[0] else frames[0]] += n
                own[frames[-1]] += n
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    print(f"{total} samples ({a.mode}, {a.lines:,} lines)")
    print("by thread:")
    for name, n in threads.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("by own time:")
    for name, n in own.most_common(a.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
