"""Hostile agent output: every case reproduces byte for byte through `tail --raw`, in bounded memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import child_env, start_sidecar
from tests.redis_harness import RedisServer

# Peak RSS of the sidecar process while it ships each case (Redis healthy, default settings).
RSS_BOUND = 120 * 1024 * 1024

GENERATORS = {
    # 100 MB with no newline at all
    "no_newline_100mb": "import os\nb = b'y' * (1 << 20)\nfor _ in range(100): os.write(1, b)",
    # 1 GB in 4 KiB lines, as fast as the pipe takes it
    "one_gigabyte": "import os\nb = (b'z' * 4095 + b'\\n') * 256\nfor _ in range(1024): os.write(1, b)",
    # tqdm-style progress: 100,000 carriage-return updates, then a newline
    "progress_cr": "import os\nfor i in range(100000): os.write(1, b'\\r%6d/100000 [%s]' % (i, b'#' * (i % 40)))\n"
                   "os.write(1, b'\\n')",
}


def _expected_digest(code: str) -> tuple[str, int]:
    """Run the generator alone and hash what it writes."""
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        for block in iter(lambda: p.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _tail_raw_digest(url: str, run_id: str, stream: str = "stdout") -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    cmd = [sys.executable, "-m", "sidecar", "tail", run_id, "--redis-url", url, "--raw", "--stream", stream]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
                          stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
                          env=child_env()) as p:
        pipe = p.stdout if stream == "stdout" else p.stderr
        assert pipe is not None
        for block in iter(lambda: pipe.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    assert p.returncode == 0
    return h.hexdigest(), size


def _run_measuring_rss(args: list[str], tmp_path: Path) -> tuple[int, int]:
    proc = start_sidecar(args, output_dir=tmp_path / "out")
    peak = 0
    stop = threading.Event()
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    try:
        rc = proc.finish(timeout=240).returncode
    finally:
        stop.set()
        t.join()
        proc.cleanup()
    return rc, peak


@pytest.mark.parametrize("case", sorted(GENERATORS))
def test_hostile_output_is_byte_exact_in_bounded_memory(
    redis_server: RedisServer, tmp_path: Path, case: str
) -> None:
    code = GENERATORS[case]
    rc, peak = _run_measuring_rss(
        ["--redis-url", redis_server.url, "--run-id", case, "--no-echo", "--spool-dir", str(tmp_path / "spool"),
         "--", sys.executable, "-c", code],
        tmp_path,
    )
    assert rc == 0
    assert peak < RSS_BOUND, f"sidecar peak RSS {peak / 2**20:.1f} MiB"
    assert _tail_raw_digest(redis_server.url, case) == _expected_digest(code)


def test_agent_closes_stdout_early_and_goes_on_with_stderr(redis_server: RedisServer, tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "os.write(1, b'last stdout line\\n')\n"
        "os.close(1)\n"
        "for i in range(200):\n"
        "    os.write(2, b'stderr %d\\n' % i)\n"
        "    if i % 50 == 0: time.sleep(0.05)\n"
    )
    rc, _peak = _run_measuring_rss(
        ["--redis-url", redis_server.url, "--run-id", "closed", "--no-echo", "--spool-dir",
         str(tmp_path / "spool"), "--", sys.executable, "-c", code],
        tmp_path,
    )
    assert rc == 0
    expected_err = b"".join(b"stderr %d\n" % i for i in range(200))
    assert _tail_raw_digest(redis_server.url, "closed", "stdout") == (
        hashlib.sha256(b"last stdout line\n").hexdigest(), 17)
    assert _tail_raw_digest(redis_server.url, "closed", "stderr") == (
        hashlib.sha256(expected_err).hexdigest(), len(expected_err))
