"""Fixtures for multi-process Redis topologies (Cluster, Sentinel), torn down after each test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_harness import RedisClusterTopology, SentinelTopology, redis_cli_binary
from tests.conftest import _require_redis_server


def _require_redis_cli() -> None:
    if redis_cli_binary() is not None:
        return
    msg = "redis-cli binary not found on PATH (apt-get install redis-tools)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterTopology]:
    """A started 3-master / 1-replica-each Redis Cluster; every node is stopped at teardown."""
    _require_redis_server()
    _require_redis_cli()
    topology = RedisClusterTopology(tmp_path / "cluster")
    try:
        topology.start()
        yield topology
    finally:
        topology.shutdown()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A started master + replica watched by 3 sentinels as ``mymaster``; all stopped at teardown."""
    _require_redis_server()
    topology = SentinelTopology(tmp_path / "sentinel")
    try:
        topology.start()
        yield topology
    finally:
        topology.shutdown()
