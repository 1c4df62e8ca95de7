"""Control commands (parsing, targeting, HMAC authentication, replay) and the heartbeat message."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from sidecar import config, control, heartbeat
from sidecar.control import Command, Rejection, ReplayCache, parse

NOW = 1_700_000_000.0
SECRET = b"s3cret-key"


def sign(obj: dict[str, Any], secret: bytes | str) -> dict[str, Any]:
    """control.sign, naming the run of the settings below unless ``obj`` names one."""
    return control.sign({"run_id": "r1", **obj}, secret)


@pytest.fixture
def settings() -> config.Settings:
    return config.build({"run_id": "r1", "agent_id": "a1", "variation_id": "v1"}, {}, ("true",))


@pytest.fixture
def secure(settings: config.Settings) -> config.Settings:
    return settings.replace(control_secret=SECRET)


def run(payload: bytes | dict[str, Any], s: config.Settings, *, now: float = NOW,
        seen: ReplayCache | None = None) -> Command | Rejection | None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse(data, settings=s, now=now, seen=seen if seen is not None else ReplayCache())


def rejected(result: Command | Rejection | None) -> str:
    assert isinstance(result, Rejection), result
    assert result.reason and len(result.reason) < 200
    return result.reason


# -- commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["cancel", "pause", "resume"])
def test_commands_without_arguments(settings: config.Settings, cmd: str) -> None:
    result = run({"cmd": cmd, "id": "req-1"}, settings)
    assert result == Command(cmd, None, {"cmd": cmd, "id": "req-1"})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SIGINT", signal.SIGINT),
        ("SIGTERM", signal.SIGTERM),
        ("SIGHUP", signal.SIGHUP),
        ("SIGQUIT", signal.SIGQUIT),
        ("SIGUSR1", signal.SIGUSR1),
        ("SIGUSR2", signal.SIGUSR2),
        ("SIGWINCH", signal.SIGWINCH),
        ("SIGCONT", signal.SIGCONT),
        ("term", signal.SIGTERM),
        ("usr1", signal.SIGUSR1),
        ("sigHup", signal.SIGHUP),
        ("Winch", signal.SIGWINCH),
    ],
)
def test_signal_by_name_any_case_with_or_without_prefix(settings: config.Settings, name: str,
                                                        expected: int) -> None:
    result = run({"cmd": "signal", "signal": name}, settings)
    assert isinstance(result, Command)
    assert result.cmd == "signal"
    assert result.signal == int(expected)
    assert type(result.signal) is int
    assert result.raw == {"cmd": "signal", "signal": name}


# -- targeting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        {},
        {"variation_id": "v1"},
        {"agent_id": "a1"},
        {"variation_id": "v1", "agent_id": "a1"},
        {"variation_id": None},
    ],
)
def test_addressed_to_us(settings: config.Settings, target: dict[str, Any]) -> None:
    assert isinstance(run({"cmd": "cancel", **target}, settings), Command)


@pytest.mark.parametrize(
    "target",
    [
        {"variation_id": "v2"},
        {"agent_id": "a2"},
        {"variation_id": "v1", "agent_id": "a2"},
        {"variation_id": "v2", "agent_id": "a1"},
        {"variation_id": ""},
    ],
)
def test_addressed_to_another_agent_is_ignored(settings: config.Settings, target: dict[str, Any]) -> None:
    assert run({"cmd": "cancel", **target}, settings) is None


def test_ids_are_compared_as_strings(settings: config.Settings) -> None:
    numeric = settings.replace(variation_id="3", agent_id="7")
    assert isinstance(run({"cmd": "pause", "variation_id": 3, "agent_id": 7}, numeric), Command)
    assert run({"cmd": "pause", "variation_id": 4}, numeric) is None


def test_a_bad_command_for_another_agent_is_not_ours_to_reject(settings: config.Settings) -> None:
    assert run({"cmd": "explode", "agent_id": "a2"}, settings) is None
    assert run({"cmd": "signal", "signal": "KILL", "variation_id": "v9"}, settings) is None


# -- rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"{", b"cancel", b"{'cmd': 'cancel'}", b'{"cmd": "cancel"} x',
                                     b'{"cmd": "\xff"}', b"NaN"])
def test_malformed_json(settings: config.Settings, payload: bytes) -> None:
    result = run(payload, settings)
    assert rejected(result) == "malformed JSON"
    assert isinstance(result, Rejection) and result.raw is None


@pytest.mark.parametrize("payload", [b"[]", b'["cancel"]', b'"cancel"', b"1", b"null", b"true"])
def test_not_an_object(settings: config.Settings, payload: bytes) -> None:
    result = run(payload, settings)
    assert rejected(result) == "not a JSON object"
    assert isinstance(result, Rejection) and result.raw is None


def test_oversize_payload(settings: config.Settings) -> None:
    body = {"cmd": "cancel", "pad": ""}
    base = len(json.dumps(body))
    body["pad"] = "x" * (control.MAX_PAYLOAD_BYTES - base)
    exact = json.dumps(body).encode()
    assert len(exact) == 64 * 1024
    assert isinstance(run(exact, settings), Command)
    body["pad"] += "x"
    reason = rejected(run(body, settings))
    assert "too large" in reason and "65537" in reason


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({}, "missing cmd"),
        ({"command": "cancel"}, "missing cmd"),
        ({"cmd": None}, "missing cmd"),
        ({"cmd": 1}, "cmd must be a string"),
        ({"cmd": ["cancel"]}, "cmd must be a string"),
        ({"cmd": "kill"}, "unknown cmd 'kill'"),
        ({"cmd": "CANCEL"}, "unknown cmd"),
        ({"cmd": "x" * 500}, "unknown cmd"),
    ],
)
def test_bad_cmd(settings: config.Settings, obj: dict[str, Any], needle: str) -> None:
    result = run(obj, settings)
    reason = rejected(result)
    assert needle in reason
    assert isinstance(result, Rejection) and result.raw == obj


@pytest.mark.parametrize(
    ("sig", "needle"),
    [
        (None, "missing signal"),
        (15, "not a number"),
        (15.0, "not a number"),
        (True, "not a number"),
        ("15", "not allowed"),
        (["SIGTERM"], "must be a name"),
        ("", "not allowed"),
        ("SIGSEGV", "not allowed"),
        ("SIGALRM", "not allowed"),
        ("SIGTERMX", "not allowed"),
        ("SIGKILL", "use cmd 'cancel'"),
        ("kill", "use cmd 'cancel'"),
        ("SIGSTOP", "use cmd 'pause'"),
        ("stop", "use cmd 'pause'"),
    ],
)
def test_bad_signal(settings: config.Settings, sig: Any, needle: str) -> None:
    obj: dict[str, Any] = {"cmd": "signal"}
    if sig is not None:
        obj["signal"] = sig
    assert needle in rejected(run(obj, settings))


def test_missing_signal_key(settings: config.Settings) -> None:
    assert rejected(run({"cmd": "signal"}, settings)) == "missing signal"


@pytest.mark.parametrize("cmd", ["cancel", "pause", "resume"])
def test_signal_argument_on_another_command(settings: config.Settings, cmd: str) -> None:
    assert "takes no signal" in rejected(run({"cmd": cmd, "signal": "SIGKILL"}, settings))


def test_without_secret_ts_and_sig_are_ignored(settings: config.Settings) -> None:
    result = run({"cmd": "cancel", "ts": "yesterday", "sig": "nonsense"}, settings)
    assert isinstance(result, Command)
    assert control.insecure_warning(settings) is not None
    assert "run:r1:control" in str(control.insecure_warning(settings))


# -- authentication ----------------------------------------------------------------------------


def independent_sig(obj: dict[str, Any], secret: bytes) -> str:
    body = {k: v for k, v in obj.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def test_canonical_serialisation_matches_an_independent_computation() -> None:
    obj = {"ts": NOW, "cmd": "signal", "signal": "SIGUSR1", "variation_id": "v1", "note": "é ü \u2603",
           "nested": {"b": [1, 2.5, None, True], "a": "x"}}
    signed = control.sign(obj, SECRET)
    assert signed["sig"] == independent_sig(obj, SECRET)
    assert set(signed) == set(obj) | {"sig"}
    assert obj.get("sig") is None  # the input is not modified
    expected = b'{"cmd":"signal","nested":{"a":"x","b":[1,2.5,null,true]},"note":"\\u00e9 \\u00fc \\u2603",' \
               b'"signal":"SIGUSR1","ts":1700000000.0,"variation_id":"v1"}'
    assert control.canonical(signed) == expected
    assert hmac.new(SECRET, expected, hashlib.sha256).hexdigest() == signed["sig"]
    # Re-signing replaces the old signature rather than signing it.
    assert control.sign(signed, SECRET)["sig"] == signed["sig"]


def test_a_secret_given_as_text_signs_as_its_utf8_bytes(secure: config.Settings) -> None:
    signed = sign({"cmd": "cancel", "ts": NOW}, SECRET.decode())
    assert signed == sign({"cmd": "cancel", "ts": NOW}, SECRET)
    assert isinstance(run(signed, secure), Command)
    text = "s\u00e9cret-\u00fc"
    assert sign({"cmd": "cancel", "ts": NOW}, text) == sign({"cmd": "cancel", "ts": NOW}, text.encode())
    assert isinstance(run(sign({"cmd": "cancel", "ts": NOW}, text), secure.replace(control_secret=text.encode())),
                      Command)


def test_signed_command_is_accepted(secure: config.Settings) -> None:
    for obj in ({"cmd": "cancel", "ts": NOW}, {"cmd": "signal", "signal": "term", "ts": int(NOW) - 30},
                {"cmd": "pause", "ts": NOW + 59.5, "agent_id": "a1"}, {"cmd": "resume", "ts": NOW - 60}):
        result = run(sign(obj, SECRET), secure)
        assert isinstance(result, Command), (obj, result)
        assert result.cmd == obj["cmd"]


def test_signature_survives_the_wire_through_orjson(secure: config.Settings) -> None:
    """The sender serialises with any JSON library; the check re-canonicalises what was parsed."""
    signed = sign({"cmd": "cancel", "ts": NOW + 0.123456789, "reason": "ünïcode"}, SECRET)
    assert isinstance(run(orjson.dumps(signed), secure), Command)
    assert isinstance(run(json.dumps(signed, indent=2, ensure_ascii=False).encode(), secure), Command)


def test_signed_integers_at_the_64_bit_limits_are_accepted(secure: config.Settings) -> None:
    for value in ((1 << 64) - 1, -(1 << 63), 0, True):
        result = run(orjson.dumps(sign({"cmd": "cancel", "ts": NOW, "n": [value]}, SECRET)), secure)
        assert isinstance(result, Command), (value, result)


@pytest.mark.parametrize(
    ("value", "needle"),
    [(1 << 64, "beyond 64 bits"), (-(1 << 63) - 1, "beyond 64 bits"), (float("nan"), "not a JSON number"),
     (float("inf"), "not a JSON number"), ({"a": 10**30}, "beyond 64 bits"),
     (json.loads("[" * 40 + "]" * 40), "nested deeper than 32")],
)
def test_sign_refuses_what_the_sidecar_would_refuse(secure: config.Settings, value: Any, needle: str) -> None:
    obj = {"cmd": "cancel", "ts": NOW, "run_id": "r1", "extra": value}
    with pytest.raises(ValueError, match=needle):
        control.sign(obj, SECRET)
    # Signed anyway, by hand, such a command never passes the check: the refusal is not too strict.
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    obj["sig"] = hmac.new(SECRET, body.encode(), hashlib.sha256).hexdigest()
    assert not isinstance(run(body[:-1].encode() + b',"sig":"' + obj["sig"].encode() + b'"}', secure), Command)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.pop("sig"), "missing signature"),
        (lambda o: o.__setitem__("sig", None), "missing signature"),
        (lambda o: o.__setitem__("sig", 123), "bad signature"),
        (lambda o: o.__setitem__("sig", ""), "bad signature"),
        (lambda o: o.__setitem__("sig", "zz" * 32), "bad signature"),
        (lambda o: o.__setitem__("sig", "é" * 64), "bad signature"),
        (lambda o: o.__setitem__("sig", o["sig"][:-1]), "bad signature"),
        (lambda o: o.__setitem__("sig", independent_sig(o, b"wrong-key")), "bad signature"),
        (lambda o: o.__setitem__("cmd", "pause"), "bad signature"),  # tampered after signing
        (lambda o: o.__setitem__("ts", o["ts"] + 1), "bad signature"),
        (lambda o: o.__setitem__("extra", 1), "bad signature"),
    ],
)
def test_bad_or_missing_signature(secure: config.Settings, mutate: Any, reason: str) -> None:
    obj = sign({"cmd": "cancel", "ts": NOW}, SECRET)
    mutate(obj)
    result = run(obj, secure)
    assert rejected(result) == reason
    assert isinstance(result, Rejection) and result.raw == obj


def test_unsigned_command_is_rejected_with_a_secret(secure: config.Settings) -> None:
    assert rejected(run({"cmd": "cancel"}, secure)) == "missing signature"
    assert rejected(run({"cmd": "cancel", "ts": NOW}, secure)) == "missing signature"
    assert "fewer than 16 bytes" in str(control.insecure_warning(secure))  # SECRET: 10 bytes
    assert control.insecure_warning(secure.replace(control_secret=b"k" * 16)) is None


def test_ts_missing_or_not_a_number(secure: config.Settings) -> None:
    assert rejected(run(sign({"cmd": "cancel"}, SECRET), secure)) == "missing ts"
    for ts in ("1700000000", True, [NOW], {"t": NOW}):
        assert "number" in rejected(run(sign({"cmd": "cancel", "ts": ts}, SECRET), secure))


def test_stale_command(secure: config.Settings) -> None:
    reason = rejected(run(sign({"cmd": "cancel", "ts": NOW - 60.5}, SECRET), secure))
    assert "stale" in reason
    assert "stale" in rejected(run(sign({"cmd": "cancel", "ts": 0}, SECRET), secure))


def test_command_from_the_future(secure: config.Settings) -> None:
    assert "future" in rejected(run(sign({"cmd": "cancel", "ts": NOW + 60.5}, SECRET), secure))
    assert "future" in rejected(run(sign({"cmd": "cancel", "ts": NOW + 3600}, SECRET), secure))


def test_replayed_command(secure: config.Settings) -> None:
    seen = ReplayCache()
    obj = sign({"cmd": "signal", "signal": "SIGUSR1", "ts": NOW}, SECRET)
    assert isinstance(run(obj, secure, seen=seen), Command)
    assert "replayed" in rejected(run(obj, secure, now=NOW + 1, seen=seen))
    # The same signature in capitals is the same signature.
    upper = dict(obj, sig=obj["sig"].upper())
    assert "replayed" in rejected(run(upper, secure, now=NOW + 2, seen=seen))
    # A fresh command (new ts) is a new signature.
    assert isinstance(run(sign(dict(obj, ts=NOW + 1), SECRET), secure, now=NOW + 2, seen=seen), Command)


def test_replay_is_caught_for_as_long_as_the_ts_is_acceptable(secure: config.Settings) -> None:
    seen = ReplayCache()
    obj = sign({"cmd": "cancel", "ts": NOW + 59}, SECRET)  # a clock ahead of ours
    assert isinstance(run(obj, secure, now=NOW, seen=seen), Command)
    assert "replayed" in rejected(run(obj, secure, now=NOW + 118, seen=seen))
    assert "stale" in rejected(run(obj, secure, now=NOW + 120, seen=seen))


def test_a_signed_command_names_its_run(secure: config.Settings) -> None:
    """The secret is shared by all runs: a command captured on one run's channel and published
    on another's is refused there."""
    assert rejected(run(control.sign({"cmd": "cancel", "ts": NOW}, SECRET), secure)).startswith("missing run_id")
    other = sign({"cmd": "cancel", "ts": NOW, "run_id": "r2"}, SECRET)
    assert rejected(run(other, secure)) == "signed for run 'r2', not this one"
    assert isinstance(run(other, secure.replace(run_id="r2")), Command)
    assert isinstance(run(sign({"cmd": "cancel", "ts": NOW}, SECRET), secure), Command)


def test_rejected_signatures_are_not_remembered(secure: config.Settings) -> None:
    seen = ReplayCache()
    obj = sign({"cmd": "cancel", "ts": NOW + 61}, SECRET)
    assert "future" in rejected(run(obj, secure, seen=seen))
    assert len(seen) == 0
    assert isinstance(run(obj, secure, now=NOW + 2, seen=seen), Command)


def test_replay_cache_expires_and_is_bounded() -> None:
    cache = ReplayCache(ttl_s=120.0, max_entries=3)
    assert cache.add("a", 0.0)
    assert not cache.add("a", 119.0)
    assert cache.add("a", 120.0)  # expired, remembered again from now
    for i, sig in enumerate("bcd"):
        assert cache.add(sig, 121.0 + i)
    assert len(cache) == 3
    assert "a" not in cache  # the oldest made room
    assert "d" in cache
    cache.add("e", 1000.0)
    assert len(cache) == 1


def test_authentication_comes_after_targeting(secure: config.Settings) -> None:
    """Commands for other agents are not checked (nor their signatures remembered) here."""
    seen = ReplayCache()
    assert run({"cmd": "cancel", "agent_id": "a2"}, secure, seen=seen) is None
    assert len(seen) == 0


def test_channel_name(settings: config.Settings) -> None:
    assert control.control_channel(settings) == "run:r1:control"
    tagged = settings.replace(cluster_hash_tag=True)
    assert control.control_channel(tagged) == "run:{r1}:control"


# -- heartbeat message -------------------------------------------------------------------------

STATS = {"records_shipped": 12, "bytes_shipped": 3456, "records_waiting": 0, "spool_bytes": 0,
         "redis_connected": True, "last_write_age_s": 0.25}


def test_heartbeat_build_fields_and_types(settings: config.Settings) -> None:
    msg = heartbeat.build(settings, pid=4242, tree_metrics={"cpu_percent": 12.345, "rss_bytes": 1 << 20,
                                                            "num_procs": 3},
                          stats=STATS, started_at=NOW - 90.5, now=NOW)
    assert msg["agent_id"] == "a1" and msg["run_id"] == "r1" and msg["variation_id"] == "v1"
    assert msg["type"] == "heartbeat"
    assert msg["timestamp"].endswith("Z")
    assert datetime.strptime(msg["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() == NOW
    assert msg["pid"] == 4242
    assert msg["uptime_s"] == 90.5 and isinstance(msg["uptime_s"], float)
    assert msg["cpu_percent"] == 12.3 and isinstance(msg["cpu_percent"], float)
    assert msg["rss_bytes"] == 1 << 20 and type(msg["rss_bytes"]) is int
    assert msg["num_procs"] == 3 and type(msg["num_procs"]) is int
    assert msg["interval_s"] == settings.heartbeat_interval_s
    for key, value in STATS.items():
        assert msg[key] == value
    # One JSON object, uncompressed.
    assert orjson.loads(orjson.dumps(msg)) == msg


def test_heartbeat_build_before_the_agent_runs(settings: config.Settings) -> None:
    msg = heartbeat.build(settings, pid=None, tree_metrics={}, stats={}, started_at=NOW, now=NOW)
    assert msg["pid"] is None
    assert (msg["cpu_percent"], msg["rss_bytes"], msg["num_procs"], msg["uptime_s"]) == (0.0, 0, 0, 0.0)


def test_heartbeat_stats_do_not_override_identity(settings: config.Settings) -> None:
    stats = {"agent_id": "forged", "pid": 9, "extra": 1}
    msg = heartbeat.build(settings, pid=1, tree_metrics={}, stats=stats, started_at=NOW, now=NOW)
    assert msg["agent_id"] == "a1" and msg["pid"] == 1 and msg["extra"] == 1


def test_heartbeat_commands(settings: config.Settings) -> None:
    s = settings.replace(heartbeat_interval_s=5.0, retention_s=3600.0)
    msg = heartbeat.build(s, pid=1, tree_metrics={}, stats={}, started_at=NOW, now=NOW)
    payload = orjson.dumps(msg)
    assert heartbeat.commands(s, msg, payload) == [
        ("PUBLISH", "agent:a1:heartbeat", payload),
        ("SET", "agent:a1:alive", payload, "EX", 15),
        ("HSET", "run:r1:variation:v1", "last_heartbeat", msg["timestamp"], "agent_id", "a1"),
        ("EXPIRE", "run:r1:variation:v1", 3600),
    ]
    no_retention = s.replace(retention_s=0.0)
    assert [c[0] for c in heartbeat.commands(no_retention, msg, payload)] == ["PUBLISH", "SET", "HSET"]
    assert heartbeat.commands(s, msg, payload, ("k1", "k2"))[-3:] == [
        ("EXPIRE", "run:r1:variation:v1", 3600), ("EXPIRE", "k1", 3600), ("EXPIRE", "k2", 3600)]
    assert len(heartbeat.commands(no_retention, msg, payload, ("k1",))) == 3


def test_heartbeat_renews_the_run_keys_once_a_period(settings: config.Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: clock[0])
    sent: list[list[tuple[Any, ...]]] = []

    class Conn:
        connected = True

        def pipeline(self, cmds: list[tuple[Any, ...]]) -> list[int]:
            sent.append(cmds)
            return [1] * len(cmds)

    s = settings.replace(heartbeat_interval_s=5.0, retention_s=40.0)  # a refresh every 10 s
    hb = heartbeat.Heartbeat(s, connect=Conn, pid=lambda: None, stats=dict, started_at=0.0,
                             keep_alive=("k1", "k2"))
    sampler = heartbeat.TreeSampler(None)
    renewed = []
    for _ in range(7):  # beats at 1000, 1005, ... 1030
        hb._beat(sampler)
        renewed.append([c[1] for c in sent[-1] if c[0] == "EXPIRE" and c[1].startswith("k")])
        clock[0] += 5.0
    assert renewed == [[], [], ["k1", "k2"], [], ["k1", "k2"], [], ["k1", "k2"]]


@pytest.mark.parametrize(("interval", "retention", "period"),
                         [(5.0, 86400.0, 21600.0), (5.0, 8.0, 5.0), (0.5, 3.0, 0.75), (5.0, 0.0, 0.0)])
def test_heartbeat_refresh_period(settings: config.Settings, interval: float, retention: float,
                                  period: float) -> None:
    s = settings.replace(heartbeat_interval_s=interval, retention_s=retention)
    assert heartbeat.refresh_period(s) == period


@pytest.mark.parametrize(("interval", "ttl"), [(0.1, 1), (0.2, 1), (1 / 3, 1), (0.34, 2), (1.0, 3), (1.1, 4),
                                               (5.0, 15), (10.0, 30)])
def test_alive_ttl(interval: float, ttl: int) -> None:
    assert heartbeat.alive_ttl(interval) == ttl
    assert ttl >= max(1, 3 * interval - 1e-9) and ttl == max(1, math.ceil(round(3 * interval, 6)))


def test_tree_sampler_on_this_process() -> None:
    import psutil

    sampler = heartbeat.TreeSampler(psutil)
    first = sampler.sample(os.getpid())
    assert first["num_procs"] >= 1 and first["rss_bytes"] > 0 and first["cpu_percent"] >= 0.0
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    second = sampler.sample(os.getpid())
    assert second["cpu_percent"] > 0.0  # measured since the first sample, on the same objects
    assert sampler.sample(None) == {"cpu_percent": 0.0, "rss_bytes": 0, "num_procs": 0}


def test_tree_sampler_on_a_vanished_process() -> None:
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    empty = {"cpu_percent": 0.0, "rss_bytes": 0, "num_procs": 0}
    assert heartbeat.TreeSampler(psutil).sample(proc.pid) == empty


@pytest.mark.parametrize("depth", [33, 300, 1000, 20000])
def test_a_deeply_nested_command_is_rejected_before_any_check(secure: config.Settings, depth: int) -> None:
    """The signature check serialises the command (json.dumps recurses) and a status message
    carries it (orjson stops at 255 levels): too deep a command is refused first, and alone."""
    payload = (b'{"cmd":"signal","signal":"usr1","ts":%d,"x":' % NOW + b"[" * depth + b"]" * depth
               + b',"sig":"' + b"a" * 64 + b'"}')
    result = run(payload, secure)
    assert "nested deeper than 32 levels" in rejected(result)
    assert isinstance(result, Rejection) and result.raw is None


def test_a_command_nested_32_levels_still_goes_through_the_checks(secure: config.Settings) -> None:
    inner: Any = []
    for _ in range(30):
        inner = [inner]
    assert isinstance(run(sign({"cmd": "cancel", "ts": NOW, "x": inner}, SECRET), secure), Command)


def test_the_signed_command_in_the_protocol_document_verifies() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith('{"cmd": "pause", "ts": '))
    obj = json.loads(line)
    s = config.build({"run_id": obj["run_id"]}, {}, ("true",)).replace(control_secret=b"example-secret-0123456789")
    assert isinstance(run(obj, s, now=obj["ts"]), Command)


def test_resubscribing_backs_off_up_to_retry_max_backoff(settings: config.Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait between attempts to subscribe again grows to --retry-max-backoff, as the data
    path's does (PROTOCOL §13)."""
    caps: list[float] = []
    real = control._backoff

    def recording(cap_s: float) -> Any:
        caps.append(cap_s)
        return real(cap_s)

    monkeypatch.setattr(control, "_backoff", recording)
    s = settings.replace(retry_max_s=0.25)
    attempts: list[float] = []

    def refused() -> Any:
        attempts.append(time.monotonic())
        raise ConnectionRefusedError("no Redis")

    ctl = control.Control(s, connect=refused, on_command=lambda _c: None, on_reject=lambda _r: None)
    ctl.start()
    try:
        deadline = time.monotonic() + 10
        while len(attempts) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ctl.stop()
    assert caps == [0.25]
    assert len(attempts) >= 8
    assert max(b - a for a, b in zip(attempts, attempts[1:], strict=False)) < 2.0
