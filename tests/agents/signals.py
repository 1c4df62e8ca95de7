"""Test agent: reports the signals it receives; SIGTERM handling chosen by flag."""

import argparse
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--on-term", choices=("exit", "ignore", "default"), default="exit")
p.add_argument("--seconds", type=float, default=30)
a = p.parse_args()


def report(sig: int, _frame: object) -> None:
    os.write(1, f"got {signal.Signals(sig).name}\n".encode())
    if sig == signal.SIGTERM and a.on_term == "exit":
        os.write(1, b"cleaning up\n")
        sys.exit(0)


for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT, signal.SIGINT):
    signal.signal(s, report)
if a.on_term == "exit":
    signal.signal(signal.SIGTERM, report)
elif a.on_term == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(1, b"ready\n")
end = time.monotonic() + a.seconds
while time.monotonic() < end:
    time.sleep(0.05)
os.write(1, b"timeout\n")
