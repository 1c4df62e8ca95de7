"""Test agent: prints numbered lines at a steady rate, so a test can act mid-run and count what arrived."""

import argparse
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--lines", type=int, default=1000)
p.add_argument("--rate", type=float, default=1000.0, help="lines per second (0: as fast as possible)")
p.add_argument("--stderr-every", type=int, default=0, help="also write every Nth line to stderr")
p.add_argument("--pad", type=int, default=0, help="pad each line with this many bytes")
a = p.parse_args()
pad = "." * a.pad
start = time.monotonic()
for i in range(1, a.lines + 1):
    os.write(1, f"line {i}{pad}\n".encode())
    if a.stderr_every and i % a.stderr_every == 0:
        os.write(2, f"err {i}\n".encode())
    if a.rate:
        delay = start + i / a.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
sys.exit(0)
