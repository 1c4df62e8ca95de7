"""The RESP client's command encoding."""

from __future__ import annotations

import random
from typing import Any

from sidecar.resp import pack, pack_many, pack_py


def _arg(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 1:
        return "".join(rng.choice("aZ09 :{}-é漢\U0001f600\r\n") for _ in range(rng.randrange(20)))
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**70, rng.randrange(-(10**9), 10**9)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, 0.1, 1e-7, 1e300, float("inf"), float("nan"), rng.random()])
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return "EVALSHA"
    return b""


def test_pack_matches_the_python_encoding_byte_for_byte() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        cmd = tuple(_arg(rng) for _ in range(rng.randrange(1, 14)))
        assert pack(cmd) == pack_py(cmd), cmd
    assert pack(("SET", "k", "v")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"


def test_pack_many_joins_commands_in_order() -> None:
    cmds = [("PING",), ("PUBLISH", "c", b"m"), ("EVALSHA", "x", 1, "k", 2.5)]
    assert pack_many(cmds) == b"".join(pack_py(c) for c in cmds)
    assert pack_many(cmds[:1]) == pack_py(cmds[0])


def test_client_names_are_printable_ascii_whatever_the_agent_id() -> None:
    from sidecar.resp import client_name

    assert client_name("agent-sidecar", "pod-7") == "agent-sidecar:pod-7"
    assert client_name("agent-sidecar", "agent-ü") == "agent-sidecar:agent-%C3%BC"
    assert client_name("r", "a b%c\x7f") == "r:a%20b%25c%7F"  # % escaped too: the name maps back to one id
