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


def _sidecar(url: str, run_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "--redis-url", url, "--run-id", run_id, *extra]


def test_an_unread_echo_never_holds_up_capture_or_signals(redis_server: RedisServer, tmp_path: Path) -> None:
    """The sidecar's own stdout is a pipe nobody reads: the agent's 4 MB still reach Redis in
    full, and the sidecar exits with the agent's code."""
    import os

    from tests.integration import runs

    r, w = os.pipe()
    try:
        agent = [sys.executable, "-c", "import sys\nfor i in range(50000): print('x' * 70, i)\nsys.exit(4)"]
        proc = subprocess.Popen(_sidecar(redis_server.url, "unread", "--spool-dir", str(tmp_path), "--", *agent),
                                stdout=w,
                                stderr=subprocess.DEVNULL, env=child_env(), cwd=str(Path(__file__).parents[2]))
        os.close(w)
        w = -1
        assert proc.wait(60) == 4
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    recs = runs.records(redis_server.client(), "run:unread:output:0")
    assert len(recs) == 50000 and recs[-1].data == b"x" * 70 + b" 49999\n"


def test_a_grandchild_that_keeps_writing_is_cut_off_after_pipe_grace(redis_server: RedisServer) -> None:
    agent = ["sh", "-c", f"({sys.executable} -c 'import os, time\nend = time.time() + 8\n"
             f"while time.time() < end: os.write(1, b\"still here\\n\" * 1000)' &) ; exit 0"]
    t0 = time.monotonic()
    cp = subprocess.run(_sidecar(redis_server.url, "daemon", "--no-echo", "--pipe-grace", "0.5", "--", *agent),
                        capture_output=True, env=child_env(), cwd=str(Path(__file__).parents[2]), timeout=60)
    assert cp.returncode == 0
    assert time.monotonic() - t0 < 5, "reading went on past --pipe-grace while data kept coming"
    assert b"still held open" in cp.stderr


def test_after_a_stop_the_rest_of_the_agents_group_goes_with_it(redis_server: RedisServer) -> None:
    import signal as sig

    marker = "sleep 27.123"
    agent = ["sh", "-c", f"trap 'exit 0' TERM; (trap '' TERM; exec {marker}) >/dev/null 2>&1 & wait"]
    proc = start_sidecar(_sidecar(redis_server.url, "grp", "--no-echo", "--kill-grace", "5", "--", *agent)[3:])
    time.sleep(1.0)
    proc.send_signal(sig.SIGTERM)
    cp = proc.finish(timeout=30)
    assert cp.returncode == 0, cp.stderr
    time.sleep(0.3)
    left = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []) == marker]
    for p in left:
        p.kill()
    assert not left, "a member of the agent's group outlived the stop"


def test_a_prompt_without_newline_is_echoed_at_once(redis_server: RedisServer) -> None:
    agent = ["sh", "-c", "printf 'Loading'; sleep 3; echo ' done'"]  # could begin a token: held back
    proc = subprocess.Popen(_sidecar(redis_server.url, "prompt", "--", *agent), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=child_env(), cwd=str(Path(__file__).parents[2]))
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + 2.5  # released after 1 s of quiet, before the agent's newline at 3 s
    import os

    os.set_blocking(proc.stdout.fileno(), False)
    while b"Loading" not in got and time.monotonic() < deadline:
        got += proc.stdout.read() or b""
        time.sleep(0.02)
    try:
        assert got == b"Loading"
    finally:
        proc.wait(30)
        proc.stdout.close()


def test_an_echo_whose_reader_went_away_stops_and_is_told_so(redis_server: RedisServer) -> None:
    """The sidecar's own stdout is a pipe whose reader closed (`| head -1`): the echo of
    stdout stops, with one warning saying so; stderr's echo and the capture go on."""
    import os

    from tests.integration import runs

    r, w = os.pipe()
    os.close(r)
    try:
        agent = [sys.executable, "-c",
                 "import sys, time\nfor i in range(3000):\n    print('out', i, flush=True)\n"
                 "    if i % 1000 == 0: print('err', i, file=sys.stderr, flush=True); time.sleep(0.05)\n"]
        cp = subprocess.run(_sidecar(redis_server.url, "gone", "--", *agent), stdout=w, stderr=subprocess.PIPE,
                            env=child_env(), cwd=str(Path(__file__).parents[2]), timeout=60)
    finally:
        os.close(w)
    assert cp.returncode == 0
    err = cp.stderr
    assert err.count(b"the sidecar's own stdout could not be written any more (its reader went away)") == 1, err
    assert b"did not keep up" not in err
    assert b"err 0\nerr 1000\nerr 2000\n" in err  # the echo of stderr went on
    out = runs.stream_bytes(redis_server.client(), "run:gone:output:0")
    assert out == b"".join(b"out %d\n" % i for i in range(3000))
