"""Test agent: writes the bytes of given files to stdout/stderr in chunks, then exits with a code."""

import argparse
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--stdout")
p.add_argument("--stderr")
p.add_argument("--chunk", type=int, default=65536)
p.add_argument("--exit", type=int, default=0)
p.add_argument("--sleep", type=float, default=0.0, help="pause between chunks")
a = p.parse_args()
jobs = [(1, a.stdout), (2, a.stderr)]
for fd, path in jobs:
    if not path:
        continue
    with open(path, "rb") as fh:
        while True:
            block = fh.read(a.chunk)
            if not block:
                break
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
            if a.sleep:
                time.sleep(a.sleep)
os._exit(a.exit)
