"""The core data path against a real redis-server: byte-exactness, exit codes, batching, formats."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from sidecar import _native, protocol
from tests.helpers import REPO_ROOT, run_process, run_sidecar
from tests.integration import runs
from tests.redis_harness import RedisServer

CASES: dict[str, tuple[bytes, bytes]] = {
    "plain": (b"hello\nworld\n", b"log one\nlog two\n"),
    "no_final_newline": (b"first\nlast without newline", b"err tail"),
    "crlf_and_bare_cr": (b"windows\r\nline\r\nprogress 1\rprogress 2\rdone\n", b"a\r\n\r\n"),
    "invalid_utf8": (b"ok \xff\xfe bad\n\xc3\x28 half\n\xed\xa0\x80 surrogate\n", b"\x80\x81\x82\n"),
    "nul_bytes": (b"a\x00b\x00\n\x00\x00\x00\n", b"\x00"),
    "empty_lines": (b"\n\n\nx\n\n", b""),
    "json_lines": (b'{"type":"assistant","n":1}\n[1,2]\n{"broken": \n', b'{"level":"info"}\n'),
    "ansi": (b"\x1b[31mred\x1b[0m\n\x1b[2K\rspinner\n", b"\x1b[33mwarn\x1b[0m\n"),
}


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _run(url: str, run_id: str, cmd: list[str], *extra: str, timeout: float = 120) -> Any:
    return run_sidecar(["--redis-url", url, "--run-id", run_id, *extra, "--", *cmd], timeout=timeout)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [1 << 16, 3])
def test_byte_exact_round_trip_through_tail_raw(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path, case: str, chunk: int
) -> None:
    out, err = CASES[case]
    cmd = runs.emit_cmd(_write(tmp_path, "o", out), _write(tmp_path, "e", err), "--chunk", str(chunk))
    cp = _run(redis_server.url, f"rt-{case}-{chunk}", cmd, "--no-echo")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == b""
    k = runs.keys(f"rt-{case}-{chunk}")
    assert runs.stream_bytes(redis_client, k["stdout"]) == out
    assert runs.stream_bytes(redis_client, k["stderr"]) == err
    t_out, t_err, rc = runs.tail(redis_server.url, f"rt-{case}-{chunk}", "--raw")
    assert rc == 0
    assert t_out == out
    assert t_err == err


def test_random_binary_and_long_line_round_trip(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(7)
    binary = bytes(rng.getrandbits(8) for _ in range(300_000))
    long_line = b"x" * (50 * 1024 * 1024)  # 50 MB, no newline
    out = binary + b"\n" + long_line
    cmd = runs.emit_cmd(_write(tmp_path, "o", out), None)
    cp = _run(redis_server.url, "long", cmd, "--no-echo", "--max-line-bytes", "1MiB", timeout=180)
    assert cp.returncode == 0, cp.stderr
    recs = runs.records(redis_client, runs.keys("long")["stdout"])
    assert b"".join(r.data for r in recs) == out
    assert max(len(r.data) for r in recs) <= 1024 * 1024 + 1
    # the long line arrives as 50 chunks of 1 MiB, all but the last marked as continued
    tail_chunks = [r for r in recs if r.data and set(r.data[:16]) == {ord("x")}]
    assert len(tail_chunks) == 50
    assert all(r.partial for r in tail_chunks)
    t_out, _t_err, rc = runs.tail(redis_server.url, "long", "--raw")
    assert rc == 0 and t_out == out


def test_echo_by_default_and_no_echo(redis_server: RedisServer, tmp_path: Path) -> None:
    out, err = b"to stdout\nmore", b"to stderr\n"
    cmd = runs.emit_cmd(_write(tmp_path, "o", out), _write(tmp_path, "e", err))
    cp = _run(redis_server.url, "echo", cmd)
    assert cp.returncode == 0
    assert cp.stdout == out
    # the sidecar's own diagnostics are marked and come in whole lines beside the agent's bytes
    agent_err = b"".join(line for line in cp.stderr.splitlines(keepends=True) if b"[agent-sidecar]" not in line)
    assert agent_err == err
    cp2 = _run(redis_server.url, "echo2", cmd, "--no-echo")
    assert cp2.stdout == b""
    assert b"to stderr" not in cp2.stderr


@pytest.mark.parametrize(
    ("cmd", "code", "status"),
    [
        (["true"], 0, "exited"),
        (["false"], 1, "exited"),
        ([sys.executable, "-c", "raise SystemExit(3)"], 3, "exited"),
        (["/etc/passwd"], 126, "failed"),
        (["no-such-command-anywhere"], 127, "failed"),
        (["sh", "-c", "kill -TERM $$"], 143, "killed"),
        (["sh", "-c", "kill -KILL $$"], 137, "killed"),
    ],
)
def test_exit_codes_and_final_status(
    redis_server: RedisServer, redis_client: redis.Redis, cmd: list[str], code: int, status: str
) -> None:
    run_id = f"exit-{code}"
    cp = _run(redis_server.url, run_id, cmd, "--no-echo")
    assert cp.returncode == code, cp.stderr
    seen = runs.statuses(redis_client, run_id)
    states = [m["status"] for m in seen]
    if status == "failed":
        assert states == ["starting", "failed"]
        assert seen[-1]["metadata"]["exit_code"] == code
        assert seen[-1]["metadata"]["reason"]
    else:
        assert states == ["starting", "running", status]
        assert isinstance(seen[1]["metadata"]["pid"], int)
        assert seen[-1]["metadata"]["exit_code"] == code
    for msg in seen:
        assert msg["run_id"] == run_id and msg["variation_id"] == "0" and msg["agent_id"]
        assert msg["timestamp"].endswith("Z") and "T" in msg["timestamp"]
        assert isinstance(msg["metadata"], dict)
    if status == "killed":
        assert seen[-1]["metadata"]["signal"] in ("SIGTERM", "SIGKILL")


def test_batching_and_compression(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    n = 200_000
    code = f"import sys\nsys.stdout.write(''.join(f'line {{i}} of agent text here\\n' for i in range({n})))"
    cmd = [sys.executable, "-c", code]
    cp = _run(redis_server.url, "batch", cmd, "--no-echo")
    assert cp.returncode == 0, cp.stderr
    key = runs.keys("batch")["stdout"]
    recs = runs.records(redis_client, key)
    assert [r.seq for r in recs] == list(range(1, n + 1))
    assert recs[122].data == b"line 122 of agent text here\n"
    entries = redis_client.xlen(key)
    assert entries <= n // 100, f"{entries} entries for {n} lines: not batched"
    payloads = runs.raw_payloads(redis_client, key)
    big = [p for p in payloads if len(protocol.decompress(p)) > 1024]
    assert big and all(p[:4] == protocol.ZSTD_MAGIC for p in big)
    assert sum(len(p) for p in payloads) < sum(len(protocol.decompress(p)) for p in payloads) / 3


def test_small_payloads_stay_uncompressed(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    cp = _run(redis_server.url, "small", ["sh", "-c", "echo one; sleep 0.2; echo two"], "--no-echo")
    assert cp.returncode == 0
    payloads = runs.raw_payloads(redis_client, runs.keys("small")["stdout"])
    assert len(payloads) == 2  # a lone line on a quiet pipe goes out at once, not batched with the next
    assert all(p[:1] == b"{" for p in payloads)
    status = runs.raw_payloads(redis_client, runs.keys("small")["status"])
    assert all(p[:1] == b"{" for p in status)


def _imported(stderr: bytes) -> set[str]:
    """The modules a ``python -X importtime`` run imported, from its stderr."""
    return {line.rsplit(b"|", 1)[1].strip().decode() for line in stderr.splitlines()
            if line.startswith(b"import time:") and line.count(b"|") == 2}


def test_a_plain_text_run_imports_neither_orjson_nor_zstandard(redis_server: RedisServer,
                                                              redis_client: redis.Redis) -> None:
    """Their imports would cost every start ~15 ms: output the native module encodes, in
    payloads below the compression threshold, needs neither (PROTOCOL: the same bytes)."""
    agent = ["sh", "-c", "echo one; echo 'two {\"a\": 1'; printf three"]
    argv = ["--redis-url", redis_server.url, "--run-id", "imp", "--no-echo", "--", *agent]
    cp = run_process([sys.executable, "-X", "importtime", "-m", "sidecar", *argv])
    assert cp.returncode == 0
    modules = _imported(cp.stderr)
    assert {"sidecar.app", "sidecar.protocol", "json"} <= modules  # what the check reads is there
    if _native.speedups is not None:
        assert not {"orjson", "zstandard"} & modules
    recs = runs.records(redis_client, runs.keys("imp")["stdout"])
    assert b"".join(r.data for r in recs) == b'one\ntwo {"a": 1\nthree'
    assert [m["status"] for m in runs.statuses(redis_client, "imp")] == ["starting", "running", "exited"]
    # An object that may carry an event is parsed (orjson); a large batch is compressed.
    agent = ["sh", "-c", "echo '{\"type\": \"x\"}'; echo '{\"usage\": {\"input_tokens\": 5}}'; seq 1 2000"]
    cp = run_process([sys.executable, "-X", "importtime", "-m", "sidecar", "--redis-url", redis_server.url,
                      "--run-id", "imp2", "--no-echo", "--", *agent])
    assert cp.returncode == 0
    assert {"orjson", "zstandard"} <= _imported(cp.stderr)
    recs = runs.records(redis_client, runs.keys("imp2")["stdout"])
    assert [r.json for r in recs[:3]] == [{"type": "x"}, {"usage": {"input_tokens": 5}}, None]
    assert len(recs) == 2002


def test_structured_json_lines_stay_structured(redis_server: RedisServer, redis_client: redis.Redis,
                                               tmp_path: Path) -> None:
    out = b'{"type":"assistant","message":{"content":"hi"}}\nplain\n{"type":"result","usage":{"input_tokens":5}}\r\n'
    cp = _run(redis_server.url, "js", runs.emit_cmd(_write(tmp_path, "o", out)), "--no-echo")
    assert cp.returncode == 0
    recs = runs.records(redis_client, runs.keys("js")["stdout"])
    assert [r.json for r in recs] == [
        {"type": "assistant", "message": {"content": "hi"}},
        None,
        {"type": "result", "usage": {"input_tokens": 5}},
    ]
    assert b"".join(r.data for r in recs) == out
    t_out, _e, _rc = runs.tail(redis_server.url, "js", "--json", "--no-status")
    lines = [orjson.loads(x) for x in t_out.splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3]
    assert lines[0]["json"]["type"] == "assistant" and lines[1]["text"] == "plain"
    for x in lines:
        assert {"channel", "stream", "seq", "ts", "text"} <= set(x)


def test_per_line_json_wire(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    sub = redis_server.client().pubsub()
    sub.subscribe("run:plj:output:7", "run:plj:logs:7", "run:plj:status")
    sub.get_message(timeout=1)
    got: list[tuple[bytes, bytes]] = []
    done = threading.Event()

    def listen() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not done.is_set():
            m = sub.get_message(timeout=0.2)
            if m and m["type"] == b"message" or m and m["type"] == "message":
                got.append((m["channel"], m["data"]))

    th = threading.Thread(target=listen)
    th.start()
    try:
        cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "plj", "--variation-id", "7", "--wire",
                          "per-line-json", "--no-echo", "--", "sh", "-c", "echo a; echo b; echo oops >&2"])
        assert cp.returncode == 0
        time.sleep(0.5)
    finally:
        done.set()
        th.join()
        sub.close()
    out = [orjson.loads(d) for c, d in got if c == b"run:plj:output:7"]
    err = [orjson.loads(d) for c, d in got if c == b"run:plj:logs:7"]
    assert [m["content"] for m in out] == ["a", "b"]
    assert [m["content"] for m in err] == ["oops"]
    for m in out + err:
        assert m["variation_id"] == "7"
        assert m["timestamp"].endswith("Z")
    status = [orjson.loads(d)["status"] for c, d in got if c == b"run:plj:status"]
    assert status == ["starting", "running", "exited"]
    # the stream keeps the batch format: replay and tail still work
    assert runs.stream_bytes(redis_client, "run:plj:output:7") == b"a\nb\n"


def test_transport_choices(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    cp = _run(redis_server.url, "only-stream", ["echo", "x"], "--no-echo", "--transport", "stream")
    assert cp.returncode == 0
    assert runs.stream_bytes(redis_client, runs.keys("only-stream")["stdout"]) == b"x\n"
    cp = _run(redis_server.url, "only-pubsub", ["echo", "x"], "--no-echo", "--transport", "pubsub")
    assert cp.returncode == 0
    assert redis_client.exists(runs.keys("only-pubsub")["stdout"]) == 0


def test_pubsub_subscriber_receives_batches(redis_server: RedisServer) -> None:
    sub = redis_server.client().pubsub()
    sub.subscribe("run:live:output:0")
    sub.get_message(timeout=1)
    cp = _run(redis_server.url, "live", ["sh", "-c", "for i in 1 2 3; do echo line$i; done"], "--no-echo")
    assert cp.returncode == 0
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and data.count(b"\n") < 3:
        m = sub.get_message(timeout=0.2)
        if m and m["type"] in (b"message", "message"):
            msg = protocol.decode(m["data"])
            data += b"".join(r.data for r in protocol.iter_records(msg))
    sub.close()
    assert data == b"line1\nline2\nline3\n"


def test_malformed_url_is_usage_error_and_agent_not_started(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    for url in ("foo://localhost", "redis://localhost:notaport/0", "redis://localhost/db"):
        cp = run_sidecar(["--redis-url", url, "--", "touch", str(marker)])
        assert cp.returncode == 2
        lines = cp.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in cp.stderr.decode()
        assert not marker.exists()


def test_missing_packages_stop_the_sidecar_before_the_agent_starts(tmp_path: Path) -> None:
    """Without site-packages (python -S) the packages the run imports late are missing: one
    line names them and the agent is not started (it would run with its output going nowhere)."""
    marker = tmp_path / "started"
    env = {"PYTHONPATH": str(REPO_ROOT)}
    cp = run_process([sys.executable, "-S", "-m", "sidecar", "--run-id", "m", "--", "touch", str(marker)], env=env)
    assert cp.returncode == 1
    assert cp.stderr.decode().splitlines() == [
        "agent-sidecar: error: Python packages missing: hiredis, orjson, zstandard (install agent-sidecar with "
        "its dependencies, e.g. pip install .); the agent was not started"]
    assert not marker.exists()
    cp = run_process([sys.executable, "-S", "-m", "sidecar", "tail", "m"], env=env)
    assert cp.returncode == 1
    assert cp.stderr.decode().splitlines() == [
        "agent-sidecar: error: Python packages missing: orjson, redis, zstandard (install agent-sidecar with "
        "its dependencies, e.g. pip install .)"]


def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    for args in (["--transport", "carrier-pigeon"], ["--linger-ms", "soon"], ["--nope"],
                 ["--output-channel", "run:{bogus}"], ["--drain-timeout", "inf"], ["--socket-timeout", "nan"],
                 ["--output-channel", "{run_id:>99999999999}"],
                 ["--logs-channel", "run:{run_id}:output:{variation_id}"],
                 ["--redact-pattern", "(secret)?"], ["--redis-url", "unix:///tmp/r.sock?db=x"]):
        cp = run_sidecar([*args, "--", "touch", str(marker)])
        assert cp.returncode == 2, args
        assert len(cp.stderr.decode().strip().splitlines()) == 1
    cp = run_sidecar([])
    assert cp.returncode == 2
    assert not marker.exists()


def test_env_configures_and_flags_win(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    env = {"REDIS_URL": redis_server.url, "RUN_ID": "from-env", "VARIATION_ID": "4", "AGENT_ID": "agent-e"}
    cp = run_sidecar(["--no-echo", "--", "echo", "hi"], env=env)
    assert cp.returncode == 0, cp.stderr
    recs = runs.records(redis_client, "run:from-env:output:4")
    assert [r.data for r in recs] == [b"hi\n"] and recs[0].agent_id == "agent-e"
    cp = run_sidecar(["--no-echo", "--variation-id", "5", "--", "echo", "hi"], env=env)
    assert runs.stream_bytes(redis_client, "run:from-env:output:5") == b"hi\n"


def test_generated_run_id_is_printed(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    cp = run_sidecar(["--redis-url", redis_server.url, "--no-echo", "--log-level", "warning", "--", "echo", "x"])
    assert cp.returncode == 0
    line = next(x for x in cp.stderr.decode().splitlines() if "run_id=" in x)
    assert "WARNING" in line
    run_id = line.split("run_id=")[1].split()[0]
    assert runs.stream_bytes(redis_client, runs.keys(run_id)["stdout"]) == b"x\n"


def test_unreachable_redis_does_not_block_the_agent(free_port: int, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    cp = run_sidecar(["--redis-url", f"redis://127.0.0.1:{free_port}/0", "--drain-timeout", "1", "--spool-dir",
                      str(tmp_path / "spool"), "--no-echo", "--", "sh", "-c", f"touch {marker}; exit 5"])
    assert cp.returncode == 5
    assert marker.exists()
    assert time.monotonic() - t0 < 20
    assert b"Traceback" not in cp.stderr


def test_custom_channel_templates(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    cp = _run(redis_server.url, "tpl", ["sh", "-c", "echo o; echo e >&2"], "--no-echo", "--output-channel",
              "agents:{agent_id}:{run_id}:out", "--logs-channel", "agents:{run_id}:err", "--agent-id", "a1")
    assert cp.returncode == 0
    assert runs.stream_bytes(redis_client, "agents:a1:tpl:out") == b"o\n"
    assert runs.stream_bytes(redis_client, "agents:tpl:err") == b"e\n"


def test_tail_follow_streams_live_output(redis_server: RedisServer, start_sidecar: Any) -> None:
    from tests.helpers import start_process

    follower = start_process([sys.executable, "-m", "sidecar", "tail", "fol", "--redis-url", redis_server.url,
                              "--follow", "--raw"])
    try:
        proc = start_sidecar(["--redis-url", redis_server.url, "--run-id", "fol", "--no-echo", "--", "sh", "-c",
                              "for i in 1 2 3 4 5; do echo tick$i; sleep 0.1; done"])
        assert proc.finish(timeout=30).returncode == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and follower.read_stdout().count(b"\n") < 5:
            time.sleep(0.05)
        assert follower.read_stdout() == b"".join(b"tick%d\n" % i for i in range(1, 6))
        assert follower.poll() is None  # still following
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130  # Ctrl-C, and nothing was missing
    finally:
        follower.kill_tree()


def test_tail_follow_raw_reports_a_gap_by_its_exit_status_when_stopped(redis_server: RedisServer,
                                                                       redis_client: redis.Redis) -> None:
    """With --raw, stderr is the agent's and a gap shows only in the exit status: a --follow
    stopped with Ctrl-C (its only way to end) must still say output was missing."""
    from tests.helpers import start_process

    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "fgap", "--no-echo", "--", "echo", "kept"])
    assert cp.returncode == 0
    (_id, fields), = redis_client.xrange("run:fgap:output:0")
    first = protocol.decode(fields[b"d"])
    gap = {k: first[k] for k in ("v", "run_id", "variation_id", "agent_id", "producer", "channel", "stream")}
    gap.update(type="gap", seq=2, n=3, timestamp="2024-01-01T00:00:00.000000Z", **{"from": 2, "to": 4})
    follower = start_process([sys.executable, "-m", "sidecar", "tail", "fgap", "--redis-url", redis_server.url,
                              "--follow", "--raw"])
    try:
        follower.wait_for_output(b"kept\n", stream="stdout", timeout=15)
        redis_client.xadd("run:fgap:output:0", {"d": protocol.encode_object(gap)})
        time.sleep(1.5)  # read by the follower's next XREAD
        assert follower.poll() is None
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 3
        assert follower.read_stdout() == b"kept\n" and follower.read_stderr() == b""
    finally:
        follower.kill_tree()


def test_help_lists_options_with_env_and_defaults() -> None:
    cp = run_sidecar(["--help"])
    assert cp.returncode == 0
    text = cp.stdout.decode()
    pairs = (("--redis-url", "REDIS_URL"), ("--run-id", "RUN_ID"), ("--variation-id", "VARIATION_ID"),
             ("--agent-id", "AGENT_ID"), ("--no-echo", "SIDECAR_NO_ECHO"), ("--transport", "SIDECAR_TRANSPORT"),
             ("--drain-timeout", "SIDECAR_DRAIN_TIMEOUT"), ("--wire", "SIDECAR_WIRE"))
    for flag, env in pairs:
        assert flag in text and env in text
    assert "redis://localhost:6379/0" in text


def test_tail_against_a_server_that_is_not_what_the_mode_says_is_one_line(redis_server: RedisServer) -> None:
    for extra in (["--redis-mode", "cluster"], ["--redis-url", "redis://127.0.0.1:1/0", "--redis-mode", "cluster"]):
        out, err, code = runs.tail(redis_server.url, "nothing", *extra)
        assert code == 1 and out == b""
        assert len(err.decode().strip().splitlines()) == 1 and b"Traceback" not in err, err


def test_tail_interleaves_stdout_stderr_and_status_by_time(redis_server: RedisServer) -> None:
    agent = ["sh", "-c", "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; sleep 0.1; echo err2 >&2"]
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "mix", "--no-echo", "--", *agent])
    assert cp.returncode == 0, cp.stderr
    out, err, code = runs.tail(redis_server.url, "mix")
    assert code == 0, err
    lines = [line.split(" ", 1)[1] for line in out.decode().splitlines()]
    body = [x for x in lines if not x.startswith("---")]
    assert body == ["out | out1", "err | err1", "out | out2", "err | err2"]
    assert lines[-1].startswith("--- exited")


def test_tail_of_a_run_whose_channels_name_the_agent_takes_its_agent_id(redis_server: RedisServer) -> None:
    template = ["--output-channel", "out:{run_id}:{agent_id}"]
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "ag", "--agent-id", "pod-7", "--no-echo",
                      *template, "--", "echo", "hello"])
    assert cp.returncode == 0, cp.stderr
    out, err, code = runs.tail(redis_server.url, "ag", "--raw", *template, "--agent-id", "pod-7")
    assert (out, code) == (b"hello\n", 0), err
    # without it, tail would read "out:ag:" and find nothing: a usage error instead
    out, err, code = runs.tail(redis_server.url, "ag", *template)
    assert code == 2 and out == b"" and b"--agent-id" in err and len(err.splitlines()) == 1, err


def test_tail_follow_goes_on_across_a_redis_restart(redis_server: RedisServer) -> None:
    from tests.helpers import start_process

    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "rs", "--no-echo", "--", "echo", "before"])
    assert cp.returncode == 0
    proc = start_process([sys.executable, "-m", "sidecar", "tail", "rs", "--follow", "--raw", "--redis-url",
                          redis_server.url])
    try:
        time.sleep(1.0)
        redis_server.restart()  # no persistence: what follows is new
        cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "rs", "--no-echo", "--", "echo", "after"])
        assert cp.returncode == 0
        out = proc.wait_for_output(b"after\n", stream="stdout", timeout=15)
        assert out == b"before\nafter\n"
        assert proc.poll() is None  # still following
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_sidecar_yields_to_the_agent_on_wake_up(redis_server: RedisServer) -> None:
    """Every thread of the sidecar runs under SCHED_BATCH (waking up, it does not preempt the
    agent or Redis); the agent keeps the normal policy, and so do its children."""
    probe = ("import os, time\n"
             "time.sleep(0.5)\n"
             "parent = os.getppid()\n"
             "policies = {os.sched_getscheduler(int(t)) for t in os.listdir(f'/proc/{parent}/task')}\n"
             "print(os.sched_getscheduler(0), sorted(policies), len(policies))\n")
    cp = _run(redis_server.url, "sched", [sys.executable, "-c", probe])
    assert cp.returncode == 0, cp.stderr
    mine, theirs = cp.stdout.decode().split(" ", 1)
    assert int(mine) == os.SCHED_OTHER
    assert theirs.split("]")[0] + "]" == f"[{os.SCHED_BATCH}]", cp.stdout
