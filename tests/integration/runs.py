"""Reading back what a run left in Redis, through the project's own consumer and `tail`."""

from __future__ import annotations

import sys
from typing import Any

import redis

from sidecar import protocol
from sidecar.consumer import Gap, RunReader, Status
from sidecar.protocol import Record
from tests.helpers import REPO_ROOT, run_process

EMIT = str(REPO_ROOT / "tests" / "agents" / "emit.py")


def keys(run_id: str, variation: str = "0") -> dict[str, str]:
    return {
        "stdout": f"run:{run_id}:output:{variation}",
        "stderr": f"run:{run_id}:logs:{variation}",
        "status": f"run:{run_id}:status",
    }


def events(client: redis.Redis, key: str) -> list[Any]:
    return list(RunReader(client, [key]).stored())


def records(client: redis.Redis, key: str) -> list[Record]:
    return [e for e in events(client, key) if isinstance(e, Record)]


def gaps(client: redis.Redis, key: str) -> list[Gap]:
    return [e for e in events(client, key) if isinstance(e, Gap)]


def statuses(client: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    return [e.msg for e in events(client, keys(run_id)["status"]) if isinstance(e, Status)]


def stream_bytes(client: redis.Redis, key: str) -> bytes:
    return b"".join(r.data for r in records(client, key))


def raw_payloads(client: redis.Redis, key: str) -> list[bytes]:
    return [fields[b"d"] for _id, fields in client.xrange(key, "-", "+")]


def decoded(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [protocol.decode(p) for p in raw_payloads(client, key)]


def tail(url: str, run_id: str, *args: str, timeout: float = 120) -> tuple[bytes, bytes, int]:
    cp = run_process([sys.executable, "-m", "sidecar", "tail", run_id, "--redis-url", url, *args], timeout=timeout)
    return cp.stdout, cp.stderr, cp.returncode


def emit_cmd(stdout: str | None = None, stderr: str | None = None, *extra: str) -> list[str]:
    cmd = [sys.executable, EMIT]
    if stdout:
        cmd += ["--stdout", stdout]
    if stderr:
        cmd += ["--stderr", stderr]
    return [*cmd, *extra]
