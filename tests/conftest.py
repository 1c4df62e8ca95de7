"""Shared fixtures: real redis-server processes on free loopback ports, and sidecar runners.

Tests never touch a Redis on 6379; each server they use is started here and torn down after
the test, as is every process started through ``tests.helpers``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import helpers, process_registry
from tests.redis_harness import RedisServer, find_free_port, redis_server_binary


def _require_redis_server() -> None:
    if redis_server_binary() is not None:
        return
    msg = "redis-server binary not found on PATH (apt-get install redis-server)"
    # CI must never turn a missing dependency into a green run.
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    yield
    errors = process_registry.cleanup_all()
    if errors:
        raise RuntimeError(f"teardown of test processes failed: {errors!r}")


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(extra_args=(), *, port=None, start=True) -> RedisServer``, each in its own dir."""
    _require_redis_server()
    servers: list[RedisServer] = []
    counter = itertools.count()

    def make(extra_args: Sequence[str] = (), *, port: int | None = None, start: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{next(counter)}", port=port, extra_args=extra_args)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            server.shutdown()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def run_sidecar() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """:func:`tests.helpers.run_sidecar`."""
    return helpers.run_sidecar


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Callable[..., helpers.ManagedProcess]:
    """:func:`tests.helpers.start_sidecar` with output files kept under ``tmp_path/sidecar``."""

    def start(
        args: Sequence[str], env: Mapping[str, str | None] | None = None, **kwargs: Any
    ) -> helpers.ManagedProcess:
        kwargs.setdefault("output_dir", tmp_path / "sidecar")
        return helpers.start_sidecar(args, env, **kwargs)

    return start
