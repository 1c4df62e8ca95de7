"""Secrets never reach Redis nor the container's own output (unless --no-redact)."""

from __future__ import annotations

import sys

from tests.helpers import run_sidecar
from tests.integration import runs
from tests.redis_harness import RedisServer

SECRET = "sk-ant-api03-ThisIsATestKeyNotARealOne0123456789"
DB = "correct-horse-battery"
AGENT = (
    "import os, sys, time\n"
    "os.write(1, b'env: ' + os.environ['ANTHROPIC_API_KEY'].encode() + b'\\n')\n"
    "os.write(2, b'db password ' + os.environ['DB_PASSWORD'].encode() + b' rejected\\n')\n"
    "os.write(1, b'split: AKIAIOSFOD')\n"
    "time.sleep(0.3)\n"
    "os.write(1, b'NN7EXAMPLE done\\n')\n"
    "os.write(1, b'ticket T-4242 closed\\n')\n"
)


def _run(url: str, run_id: str, *extra: str) -> object:
    return run_sidecar(["--redis-url", url, "--run-id", run_id, *extra, "--", sys.executable, "-c", AGENT],
                       env={"ANTHROPIC_API_KEY": SECRET, "DB_PASSWORD": DB})


def test_secrets_are_masked_in_records_and_echo(redis_server: RedisServer) -> None:
    cp = _run(redis_server.url, "red", "--redact-pattern", r"T-[0-9]{4}")
    assert cp.returncode == 0, cp.stderr  # type: ignore[attr-defined]
    client = redis_server.client()
    out = runs.stream_bytes(client, "run:red:output:0")
    err = runs.stream_bytes(client, "run:red:logs:0")
    assert out == b"env: [REDACTED]\nsplit: [REDACTED] done\nticket [REDACTED] closed\n"
    assert err == b"db password [REDACTED] rejected\n"
    assert cp.stdout == out  # type: ignore[attr-defined]
    assert b"db password [REDACTED] rejected\n" in cp.stderr  # type: ignore[attr-defined]
    everything = b"".join(p for key in client.keys("*") if client.type(key) == b"stream"
                          for p in runs.raw_payloads(client, key.decode()))
    for secret in (SECRET, DB, "AKIAIOSFODNN7EXAMPLE"):
        assert secret.encode() not in everything + cp.stdout + cp.stderr  # type: ignore[attr-defined]


def test_no_redact_publishes_as_written(redis_server: RedisServer) -> None:
    cp = _run(redis_server.url, "raw", "--no-redact", "--no-echo")
    assert cp.returncode == 0  # type: ignore[attr-defined]
    out = runs.stream_bytes(redis_server.client(), "run:raw:output:0")
    assert out == (f"env: {SECRET}\nsplit: AKIAIOSFODNN7EXAMPLE done\nticket T-4242 closed\n").encode()


def test_a_secret_read_from_a_file_is_masked_too(redis_server: RedisServer, tmp_path: object) -> None:
    from pathlib import Path

    secret_file = Path(str(tmp_path)) / "control-secret"
    secret_file.write_text("file-secret-0123456789\n")
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "fsec", "--control-secret-file", str(secret_file),
                      "--", "sh", "-c", f"echo \"secret: $(cat {secret_file})\""])
    assert cp.returncode == 0, cp.stderr  # type: ignore[attr-defined]
    out = runs.stream_bytes(redis_server.client(), "run:fsec:output:0")
    assert out == b"secret: [REDACTED]\n"
    assert cp.stdout == out  # type: ignore[attr-defined]
