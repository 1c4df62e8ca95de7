"""Cluster routing: the slot map."""

from __future__ import annotations

from typing import Any


def test_a_cluster_slot_map_with_a_hole_is_read_again() -> None:
    """A slot not served when the map was read is looked up afresh on the next write."""
    import pytest

    from sidecar.resp import Endpoint, ReplyError
    from sidecar.topology import ClusterTarget, key_slot

    key = "run:cd1:output:0"
    hole = key_slot(key)
    maps = [[[0, hole - 1, [b"127.0.0.1", 7000]], [hole + 1, 16383, [b"127.0.0.1", 7000]]],
            [[0, 16383, [b"127.0.0.1", 7000]]]]

    class FakeConn:
        def __init__(self, _ep: Endpoint) -> None:
            pass

        def connect(self) -> None:
            pass

        def call(self, *args: Any) -> Any:
            return maps[0] if len(maps) == 1 else maps.pop(0)

        def pipeline(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
            return [b"OK" for _ in cmds]

        def close(self) -> None:
            pass

    target = ClusterTarget(Endpoint("127.0.0.1", 7000), FakeConn, lambda _c: None)  # type: ignore[arg-type]
    with pytest.raises(ReplyError, match="CLUSTERDOWN"):
        target.execute([("SET", key, "v")])
    assert target.execute([("SET", key, "v")]) == [b"OK"]  # the slot is served by now
