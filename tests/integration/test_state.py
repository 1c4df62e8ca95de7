"""Agent events, token totals, the variation hash, retention and stream caps, against a real redis-server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson

from tests.helpers import REPO_ROOT, run_sidecar
from tests.integration import runs
from tests.redis_harness import RedisServer

TRANSCRIPT = [
    {"type": "system", "subtype": "init", "session_id": "s1", "model": "claude-sonnet-4-5"},
    {"type": "assistant", "message": {"usage": {"input_tokens": 900, "output_tokens": 40}}},
    {"type": "user", "message": {"content": [{"type": "tool_result", "content": "ok"}]}},
    {"type": "assistant", "message": {"usage": {"input_tokens": 950, "output_tokens": 60}}},
    {"type": "result", "subtype": "success", "num_turns": 2,
     "usage": {"input_tokens": 1850, "output_tokens": 100, "cache_read_input_tokens": 300},
     "total_cost_usd": 0.0123},
]


def _file(tmp_path: Path, lines: list[bytes]) -> str:
    p = tmp_path / "out.jsonl"
    p.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(p)


def test_token_totals_from_a_claude_code_transcript(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    sub = redis_server.client().pubsub()
    sub.subscribe("metrics:agent:tokens")
    sub.get_message(timeout=1)
    path = _file(tmp_path, [orjson.dumps(o) for o in TRANSCRIPT])
    for variation in ("0", "1"):
        cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "cc", "--variation-id", variation,
                          "--no-echo", "--", "cat", path])
        assert cp.returncode == 0, cp.stderr
    totals = {k.decode(): v.decode() for k, v in client.hgetall("run:cc:tokens").items()}
    # only the final result counts (the per-message usage is part of it), once per variation
    assert int(totals["input_tokens"]) == 2 * 1850
    assert int(totals["output_tokens"]) == 2 * 100
    assert int(totals["cache_read_input_tokens"]) == 2 * 300
    assert abs(float(totals["cost_usd"]) - 2 * 0.0123) < 1e-9
    assert int(totals["reports"]) == 2
    assert int(totals["variation:1:input_tokens"]) == 1850
    msgs = []
    deadline = time.monotonic() + 5
    while len(msgs) < 2 and time.monotonic() < deadline:
        m = sub.get_message(timeout=0.2)
        if m and m["type"] in ("message", b"message"):
            msgs.append(orjson.loads(m["data"]))
    sub.close()
    assert [(m["run_id"], m["variation_id"], m["input_tokens"], m["source"]) for m in msgs] == [
        ("cc", "0", 1850, "claude_result"), ("cc", "1", 1850, "claude_result")]
    assert all(m["agent_id"] for m in msgs)
    # the transcript itself stays in the output stream, byte for byte
    assert runs.stream_bytes(client, "run:cc:output:0") == Path(path).read_bytes()


def test_openai_usage_and_routed_events(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    lines = [
        b'{"sidecar_event":"status","state":"planning","step":1}',
        b'{"id":"c1","object":"chat.completion","usage":{"prompt_tokens":12,"completion_tokens":5}}',
        b'{"sidecar_event":"tokens","input_tokens":7,"output_tokens":3,"cost_usd":0.5,"model":"m"}',
        b'{"sidecar_event":"bogus"}',
        b'not json {"usage":{"prompt_tokens":99}}',
        # keys that are also the sidecar's own parameter names stay plain metadata
        b'{"sidecar_event":"status","state":"x","status":"evil","terminal":true,"agent_meta":1}',
    ]
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "oa", "--no-echo", "--", "cat",
                      _file(tmp_path, lines)])
    assert cp.returncode == 0
    totals = {k.decode(): v.decode() for k, v in client.hgetall("run:oa:tokens").items()}
    assert int(totals["input_tokens"]) == 19 and int(totals["output_tokens"]) == 8
    assert float(totals["cost_usd"]) == 0.5 and int(totals["reports"]) == 2
    agent = [m for m in runs.statuses(client, "oa") if m["status"] == "agent"]
    assert [m["metadata"] for m in agent] == [{"state": "planning", "step": 1},
                                              {"state": "x", "status": "evil", "terminal": True, "agent_meta": 1}]
    assert client.hget("run:oa:variation:0", "agent_state") == b"x"
    assert runs.statuses(client, "oa")[-1]["status"] == "exited"
    assert runs.stream_bytes(client, "run:oa:output:0") == b"".join(x + b"\n" for x in lines)


def test_variation_hash_across_the_lifecycle(redis_server: RedisServer, start_sidecar: object) -> None:
    client = redis_server.client()
    key = "run:life:variation:3"
    proc = start_sidecar(["--redis-url", redis_server.url, "--run-id", "life", "--variation-id", "3",  # type: ignore[operator]
                          "--agent-id", "pod-7", "--no-echo", "--", "sh", "-c", "sleep 1; exit 4"])
    deadline = time.monotonic() + 10
    while client.hget(key, "status") != b"running" and time.monotonic() < deadline:
        time.sleep(0.05)
    state = client.hgetall(key)
    assert state[b"status"] == b"running" and state[b"agent_id"] == b"pod-7"
    assert b"exit_code" not in state and int(state[b"pid"]) > 0
    assert proc.finish(timeout=30).returncode == 4  # type: ignore[attr-defined]
    state = client.hgetall(key)
    assert state[b"status"] == b"exited" and state[b"exit_code"] == b"4"
    assert state[b"updated_at"].endswith(b"Z")
    assert 0 < client.ttl(key) <= 86400


def test_every_key_gets_the_retention_ttl_and_streams_are_capped(redis_server: RedisServer) -> None:
    client = redis_server.client()
    n = 20_000
    cmd = [sys.executable, "-c", f"import os\nfor i in range({n}): os.write(1, b'line %d\\n' % i)"]
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "ret", "--no-echo", "--retention", "2h",
                      "--max-stream-len", "50", "--batch-max-records", "10", "--", *cmd])
    assert cp.returncode == 0
    keys = sorted(k.decode() for k in client.keys("*"))
    assert "run:ret:output:0" in keys and "run:ret:status" in keys and "run:ret:variation:0" in keys
    for k in keys:
        ttl = client.ttl(k)
        if k.endswith(":alive"):
            assert 0 < ttl <= 15, (k, ttl)  # liveness: three heartbeat intervals, not the retention
        else:
            assert 7000 < ttl <= 7200, (k, ttl)
    length = client.xlen("run:ret:output:0")
    assert 50 <= length < 200, length  # approximate trimming keeps about the cap
    # what was trimmed is reported: the output is not all there
    out, _err, rc = runs.tail(redis_server.url, "ret", "--raw")
    assert rc == 3 and out.endswith(b"line %d\n" % (n - 1)) and not out.startswith(b"line 0\n")
    _text, err, rc = runs.tail(redis_server.url, "ret")
    assert rc == 0 and err.decode().startswith("[agent-sidecar] gap: records 1..") and b" missing" in err, err


def test_a_quiet_key_outlives_the_retention_while_the_run_goes_on(redis_server: RedisServer) -> None:
    """stderr written once at the start, then a run twice as long as --retention: the heartbeat
    renews the TTL of the run's keys, so the quiet logs stream is still there at the end."""
    client = redis_server.client()
    agent = "import os, time\nos.write(2, b'early\\n'); os.write(1, b'a\\n'); time.sleep(6); os.write(1, b'b\\n')"
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "quiet", "--no-echo", "--retention", "3",
                      "--heartbeat-interval", "0.5", "--", sys.executable, "-c", agent])
    assert cp.returncode == 0, cp.stderr
    keys = runs.keys("quiet")
    assert runs.stream_bytes(client, keys["stderr"]) == b"early\n"
    assert runs.stream_bytes(client, keys["stdout"]) == b"a\nb\n"
    for key in (keys["stderr"], keys["stderr"] + ":idem", keys["stdout"] + ":idem", keys["status"]):
        assert 0 < client.pttl(key) <= 3000, key
    assert not client.exists(keys["stderr"] + "}:idem") and not client.exists("{" + keys["stderr"] + "}:idem")


def test_retention_zero_means_no_ttl(redis_server: RedisServer) -> None:
    client = redis_server.client()
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "keep", "--no-echo", "--retention", "0",
                      "--", "echo", "x"])
    assert cp.returncode == 0
    assert client.ttl("run:keep:output:0") == -1


def test_late_joiner_reads_state_then_replays(redis_server: RedisServer) -> None:
    client = redis_server.client()
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "late", "--no-echo", "--", sys.executable,
                      str(REPO_ROOT / "examples" / "llm_agent.py"), "--fast", "--lines", "20"])
    assert cp.returncode == 0
    assert client.hget("run:late:variation:0", "status") == b"exited"
    out, _err, rc = runs.tail(redis_server.url, "late", "--raw")
    assert rc == 0 and out == runs.stream_bytes(client, "run:late:output:0") and out.count(b"\n") >= 20


def test_hostile_event_lines_neither_stop_the_data_path_nor_spoil_a_batch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Counts past 64 bits, status events too deep to serialise, an object too deep to splice:
    every line still arrives byte for byte, later lines too, and the statuses stay in order."""
    client = redis_server.client()
    deep_status = b'{"sidecar_event":"status","state":"deep","x":' + b"[" * 300 + b"]" * 300 + b"}"
    deep_line = b'{"a":' + b"[" * 1020 + b"]" * 1020 + b"}"
    lines = [
        b"before",
        b'{"sidecar_event":"tokens","input_tokens":1e30,"output_tokens":5}',
        b'{"type":"result","usage":{"input_tokens":100000000000000000000000,"output_tokens":1}}',
        b'{"sidecar_event":"status","state":"big","n":100000000000000000000000}',
        deep_status,
        b"middle",
        deep_line,
        b'{"sidecar_event":"tokens","input_tokens":7,"output_tokens":2}',
        b"after",
    ]
    script = tmp_path / "agent.py"
    # one write per line with pauses: some lines go out alone (reader thread), some in batches
    script.write_text(
        "import os, sys, time\n"
        f"for i, line in enumerate(open({str(_file(tmp_path, lines))!r}, 'rb')):\n"
        "    os.write(1, line)\n"
        "    if i % 2: time.sleep(0.05)\n"
        "sys.exit(3)\n"
    )
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "ev", "--no-echo", "--", sys.executable,
                      str(script)])
    assert cp.returncode == 3, cp.stderr
    assert b"Traceback" not in cp.stderr
    assert runs.stream_bytes(client, "run:ev:output:0") == b"".join(x + b"\n" for x in lines)
    recs = runs.records(client, "run:ev:output:0")
    # objects nested deeper than 200 levels stay plain lines (and carry no event)
    assert [r.json is not None for r in recs] == [False, True, True, True, False, False, False, True, False]
    statuses = runs.statuses(client, "ev")
    assert [m["seq"] for m in statuses] == list(range(1, len(statuses) + 1))
    assert statuses[-1]["status"] == "exited" and statuses[-1]["metadata"]["records"] == len(lines)
    agent = [m["metadata"] for m in statuses if m["status"] == "agent"]
    assert agent == [{"state": "big", "n": 1e23}]  # orjson reads an integer past 64 bits as a float
    totals = {k.decode(): v.decode() for k, v in client.hgetall("run:ev:tokens").items()}
    # the 1e30 count is ignored (its output_tokens still counts), the 10^23 result counts its output only
    assert int(totals["input_tokens"]) == 7 and int(totals["output_tokens"]) == 8, totals
    told = [x for x in cp.stderr.decode().splitlines() if "token report fields ignored" in x]
    assert len(told) == 2 and all("fields=input_tokens" in x and "the rest counted" in x for x in told), cp.stderr
    out, err, code = runs.tail(redis_server.url, "ev", "--json")
    assert code == 0 and b"Traceback" not in err
    printed = [orjson.loads(x) for x in out.splitlines()]
    assert [p["text"].encode() for p in printed if p.get("stream") == "stdout"] == lines


def test_unusable_token_reports_count_nothing_and_are_logged_a_few_times(redis_server: RedisServer) -> None:
    client = redis_server.client()
    line = '{"sidecar_event":"tokens","input_tokens":"lots","output_tokens":-5}'
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "badtok", "--no-echo", "--", sys.executable, "-c",
                      f"for _ in range(8): print({line!r})"])
    assert cp.returncode == 0, cp.stderr
    told = [x for x in cp.stderr.decode().splitlines() if "token report fields ignored" in x]
    assert len(told) == 5, cp.stderr  # IGNORED_REPORTS_TOLD, then silence
    assert all("nothing counted" in x and "fields=input_tokens,output_tokens" in x for x in told)
    assert "more=not logged again" in told[-1] and "more=" not in told[0]
    assert not client.exists("run:badtok:tokens")
    assert runs.stream_bytes(client, "run:badtok:output:0") == (line + "\n").encode() * 8


def test_replaying_an_earlier_attempt_does_not_roll_the_variation_hash_back(redis_factory: object,
                                                                            tmp_path: Path) -> None:
    from tests.helpers import run_process
    from tests.redis_harness import find_free_port

    port = find_free_port()
    url = f"redis://127.0.0.1:{port}/0"
    spool = tmp_path / "spool"
    common = ["--redis-url", url, "--run-id", "att", "--no-echo", "--spool-dir", str(spool), "--socket-timeout", "1",
              "--drain-timeout", "0.5"]
    cp = run_sidecar([*common, "--", "sh", "-c", "echo first; exit 1"])  # Redis down: spooled
    assert cp.returncode == 1
    srv = redis_factory(port=port)  # type: ignore[operator]
    client = srv.client()
    cp = run_sidecar([*common, "--spool-dir", str(tmp_path / "other-spool"), "--", "sh", "-c", "echo second"])
    assert cp.returncode == 0, cp.stderr
    assert client.hget("run:att:variation:0", "exit_code") == b"0"
    second = client.hget("run:att:variation:0", "producer")
    rp = run_process([sys.executable, "-m", "sidecar", "replay", "--spool-dir", str(spool), "--redis-url", url])
    assert rp.returncode == 0, rp.stderr
    assert runs.stream_bytes(client, "run:att:output:0") == b"second\nfirst\n"  # delivered late, all of it
    state = client.hgetall("run:att:variation:0")
    assert state[b"status"] == b"exited" and state[b"exit_code"] == b"0" and state[b"producer"] == second


def test_a_flood_of_agent_states_is_thinned_and_the_latest_always_goes_out(redis_server: RedisServer) -> None:
    """The status stream is the run's, shared by its variations and capped by
    --max-stream-len: 20 states, then 2 a second pass on, and the latest state is never lost."""
    client = redis_server.client()
    agent = [sys.executable, "-c",
             "import json, sys, time\n"
             "for i in range(2000): print(json.dumps({'sidecar_event': 'status', 'state': f's{i}'}), flush=True)\n"
             "time.sleep(2.5)\n"
             "for i in range(3): print(json.dumps({'sidecar_event': 'status', 'state': f'late{i}'}), flush=True)\n"]
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "chat", "--no-echo", "--", *agent])
    assert cp.returncode == 0, cp.stderr
    statuses = runs.statuses(client, "chat")
    states = [m["metadata"]["state"] for m in statuses if m["status"] == "agent"]
    # the first 20 at once; then, while the agent sleeps, the latest held one (s1999) within a
    # second; the late ones go out as the budget allows, the last one before `exited`
    assert states[:20] == [f"s{i}" for i in range(20)]
    assert "s1999" in states and states[-1] == "late2"
    assert len(states) <= 20 + 2 * 4 + 3
    assert statuses[-1]["status"] == "exited"
    assert client.hget("run:chat:variation:0", "agent_state") == b"late2"
    assert cp.stderr.count(b"agent states over 2 a second") == 1
    out = runs.stream_bytes(client, "run:chat:output:0")  # every line stays in the output
    assert out.count(b"sidecar_event") == 2003
