"""The real-redis harness: start, crash and restart with AOF, freeze and thaw, teardown."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests import process_registry
from tests.redis_harness import RedisServer, RedisServerError

AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_server_starts_and_round_trips_a_key(redis_server: RedisServer) -> None:
    assert redis_server.running
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"

    client = redis_server.client()
    assert client.set("harness:key", b"\x00value\xff")
    assert client.get("harness:key") == b"\x00value\xff"
    info = client.info("server")
    assert int(info["tcp_port"]) == redis_server.port
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("save") == {"save": ""}

    with redis.Redis.from_url(redis_server.url) as by_url:
        assert by_url.get("harness:key") == b"\x00value\xff"


def test_redis_url_and_client_fixtures(redis_url: str, redis_client: redis.Redis) -> None:
    redis_client.rpush("harness:list", b"a", b"b")
    with redis.Redis.from_url(redis_url) as other:
        assert other.lrange("harness:list", 0, -1) == [b"a", b"b"]


def test_kill_and_restart_with_aof_keeps_data(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(AOF_ALWAYS)
    client = server.client()
    client.set("durable", b"1")
    client.xadd("durable:stream", {b"f": b"v"})
    old_pid, port = server.pid, server.port

    server.kill()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        server.client(retry=Retry(NoBackoff(), 0)).ping()

    server.restart()
    assert server.running
    assert server.pid != old_pid
    assert server.port == port
    assert client.get("durable") == b"1"
    assert client.xlen("durable:stream") == 1


def test_kill_and_restart_without_aof_loses_data(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("volatile", b"1")
    redis_server.kill()
    redis_server.restart()
    assert client.get("volatile") is None


def test_stop_makes_client_time_out_and_cont_resumes(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    assert client.ping()

    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert time.monotonic() - started < 5

    redis_server.cont()
    assert client.ping()
    assert client.set("after-cont", b"ok")
    assert client.get("after-cont") == b"ok"


def test_shutdown_is_idempotent_and_frees_the_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.shutdown()
    redis_server.shutdown()
    assert not redis_server.running
    assert _port_is_free(port)


def test_shutdown_of_a_stopped_server(redis_server: RedisServer) -> None:
    redis_server.stop()
    started = time.monotonic()
    redis_server.shutdown()
    assert not redis_server.running
    assert time.monotonic() - started < 5


def test_factory_servers_are_independent(redis_factory: Callable[..., RedisServer]) -> None:
    a = redis_factory()
    b = redis_factory(("--maxmemory", "10mb"))
    assert a.port != b.port
    assert a.dir != b.dir
    a.client().set("k", b"a")
    assert b.client().get("k") is None
    assert b.client().config_get("maxmemory") == {"maxmemory": str(10 * 1024 * 1024)}


def test_restart_on_a_fixed_port(tmp_path: Path, free_port: int) -> None:
    server = RedisServer(tmp_path, port=free_port, extra_args=AOF_ALWAYS).start()
    try:
        assert server.port == free_port
        server.client().set("k", b"v")
        server.restart()
        assert server.port == free_port
        assert server.client().get("k") == b"v"
    finally:
        server.shutdown()


def test_bad_config_fails_fast_with_log_tail(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_args=("--no-such-directive", "x"))
    with pytest.raises(RedisServerError, match="exited with code") as info:
        server.start(timeout=10)
    assert "no-such-directive" in str(info.value)
    assert not server.running


def test_registry_tears_down_servers_started_by_hand(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    assert any(p is server for p in process_registry.live())
    assert process_registry.cleanup_all() == []
    assert not server.running
    assert process_registry.live() == []
