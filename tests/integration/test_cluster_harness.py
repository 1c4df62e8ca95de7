"""The multi-process harness: a real Redis Cluster and a real Sentinel setup, with failover."""

from __future__ import annotations

from pathlib import Path

import redis

from tests import process_registry
from tests.cluster_harness import ClusterNode, RedisClusterTopology, SentinelServer, SentinelTopology

# One key per hash tag; with 3 masters these land on several slots owned by different masters.
KEYS = [f"{{tag{i}}}:k" for i in range(12)]


def _wait_one_replica(client: redis.Redis) -> None:
    acked = client.wait(1, 1000)
    assert acked >= 1, "the write did not reach a replica within 1 s"


def test_cluster_starts_with_masters_and_replicas(redis_cluster: RedisClusterTopology) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert len(redis_cluster.nodes) == 6
    assert redis_cluster.url == f"redis://127.0.0.1:{masters[0].port}/0"
    assigned = []
    for master in masters:
        replicas = redis_cluster.replicas_of(master)
        assert len(replicas) == 1
        assert replicas[0] not in masters
        assigned.extend(replicas)
        with master.client(decode_responses=True) as conn:
            assert conn.execute_command("ROLE")[0] == "master"
            assert conn.config_get("appendonly") == {"appendonly": "yes"}
            assert conn.config_get("appendfsync") == {"appendfsync": "always"}
            assert conn.config_get("save") == {"save": ""}
            assert conn.config_get("cluster-node-timeout") == {"cluster-node-timeout": "1000"}
    assert len({id(r) for r in assigned}) == 3
    # Each node has its own directory with its own node config file.
    assert len({node.dir for node in redis_cluster.nodes}) == 6
    for node in redis_cluster.nodes:
        assert (node.dir / f"nodes-{node.port}.conf").exists()
    # Every node is registered so that teardown kills it, pass or fail.
    live = process_registry.live()
    assert all(any(obj is node for obj in live) for node in redis_cluster.nodes)


def test_cluster_client_writes_and_reads_across_slots(redis_cluster: RedisClusterTopology) -> None:
    client = redis_cluster.client()
    for i, key in enumerate(KEYS):
        assert client.set(key, f"value-{i}".encode())
    for i, key in enumerate(KEYS):
        assert client.get(key) == f"value-{i}".encode()

    slots = {redis_cluster.keyslot(key) for key in KEYS}
    owners = {redis_cluster.node_for_key(key).port for key in KEYS}
    assert len(slots) == len(KEYS)
    assert len(owners) == 3, "the keys should be spread over every master"

    # node_for_key is the node that really holds the key: reading it directly needs no redirect.
    for i, key in enumerate(KEYS):
        owner = redis_cluster.node_for_key(key)
        assert isinstance(owner, ClusterNode)
        with owner.client() as direct:
            assert direct.get(key) == f"value-{i}".encode()


def test_cluster_failover_keeps_a_replicated_key(redis_cluster: RedisClusterTopology) -> None:
    key = "failover:{k}"
    old_master = redis_cluster.node_for_key(key)
    (replica,) = redis_cluster.replicas_of(old_master)
    with old_master.client() as direct:
        direct.set(key, b"survives")
        _wait_one_replica(direct)

    killed = redis_cluster.kill_master_of(key)
    assert killed is old_master
    assert not killed.running

    new_master = redis_cluster.wait_for_failover(key, old_master)
    assert new_master is not old_master
    assert new_master is replica
    assert redis_cluster.node_for_key(key) is new_master
    with new_master.client(decode_responses=True) as direct:
        assert direct.execute_command("ROLE")[0] == "master"
        assert direct.get(key) == "survives"

    # The killed master no longer serves slots; the survivors still cover all of them.
    redis_cluster.wait_state_ok(10)
    assert len(redis_cluster.masters()) == 3
    assert old_master not in redis_cluster.masters()


def test_cluster_client_follows_failover(redis_cluster: RedisClusterTopology) -> None:
    client = redis_cluster.client()
    key = "follow:{x}"
    client.set(key, b"before")
    with redis_cluster.node_for_key(key).client() as direct:
        _wait_one_replica(direct)
    old_master = redis_cluster.kill_master_of(key)
    redis_cluster.wait_for_failover(key, old_master)
    assert client.get(key) == b"before"
    client.set(key, b"after")
    assert client.get(key) == b"after"


def test_sentinel_topology_is_ready(redis_sentinel: SentinelTopology) -> None:
    master, replica = redis_sentinel.master, redis_sentinel.replica
    assert redis_sentinel.master_name == "mymaster"
    assert redis_sentinel.current_master_addr() == ("127.0.0.1", master.port)
    assert len(redis_sentinel.sentinels) == 3
    ports = [port for _host, port in redis_sentinel.sentinels]
    assert len(set(ports)) == 3
    assert redis_sentinel.url == (
        "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/mymaster/0"
    )
    with replica.client(decode_responses=True) as conn:
        info = conn.info("replication")
        assert info["role"] == "slave"
        assert info["master_port"] == master.port
        assert info["master_link_status"] == "up"
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
    for sentinel in redis_sentinel.sentinel_servers:
        assert isinstance(sentinel, SentinelServer)
        conf = sentinel.config_path.read_text()
        assert f"sentinel monitor mymaster 127.0.0.1 {master.port} 2" in conf
        with sentinel.client() as conn:
            state = conn.sentinel_master("mymaster")
            assert state["num-slaves"] >= 1
            assert state["num-other-sentinels"] >= 2
            assert state["down-after-milliseconds"] == 1000
            assert state["failover-timeout"] == 3000
            assert state["parallel-syncs"] == 1
    live = process_registry.live()
    for server in (master, replica, *redis_sentinel.sentinel_servers):
        assert any(obj is server for obj in live)


def test_sentinel_failover_keeps_a_replicated_key(redis_sentinel: SentinelTopology) -> None:
    old_addr = redis_sentinel.current_master_addr()
    with redis_sentinel.master.client() as direct:
        direct.set("sentinel:key", b"survives")
        _wait_one_replica(direct)

    killed = redis_sentinel.kill_master()
    assert killed is redis_sentinel.master
    assert not killed.running

    new_addr = redis_sentinel.wait_for_failover(old_addr)
    assert new_addr != old_addr
    assert new_addr == ("127.0.0.1", redis_sentinel.replica.port)
    assert redis_sentinel.current_master_addr() == new_addr
    with redis.Redis(host=new_addr[0], port=new_addr[1], decode_responses=True) as conn:
        assert conn.execute_command("ROLE")[0] == "master"
        assert conn.get("sentinel:key") == "survives"
        assert conn.set("sentinel:after", "1")


def test_topologies_leave_no_process_behind(tmp_path: Path) -> None:
    cluster = RedisClusterTopology(tmp_path / "c")
    sentinel = SentinelTopology(tmp_path / "s")
    with cluster, sentinel:
        servers = [*cluster.nodes, *sentinel.data_nodes, *sentinel.sentinel_servers]
        assert len(servers) == 6 + 2 + 3
        assert all(s.running and s.pid for s in servers)
        live = process_registry.live()
        assert all(any(obj is s for obj in live) for s in servers)
    assert not any(s.running for s in servers)
    live = process_registry.live()
    assert not any(any(obj is s for obj in live) for s in servers)
