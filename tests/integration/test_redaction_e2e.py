"""Secrets never reach Redis nor the container's own output (unless --no-redact)."""

from __future__ import annotations

import json
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
    cp = _run(redis_server.url, "raw", "--no-redact", "--no-echo", "--redact-pattern", r"T-[0-9]{4}")
    assert cp.returncode == 0  # type: ignore[attr-defined]
    out = runs.stream_bytes(redis_server.client(), "run:raw:output:0")
    assert out == (f"env: {SECRET}\nsplit: AKIAIOSFODNN7EXAMPLE done\nticket T-4242 closed\n").encode()
    # a pattern given with --no-redact masks nothing, and the start says so
    assert b"the --redact-pattern and SIDECAR_REDACT_PATTERNS patterns mask nothing" in cp.stderr  # type: ignore


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


def test_the_password_of_the_url_is_masked_like_the_others(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.acl_setuser("urlu", enabled=True, passwords=["+UrlOnlyPw5555"], keys=["*"], channels=["*"],
                       commands=["+@all"])
    host_port = redis_server.url.split("://", 1)[1]
    url = f"redis://urlu:UrlOnlyPw5555@{host_port}"
    cp = run_sidecar(["--redis-url", url, "--run-id", "urlpw", "--", "sh", "-c", "echo 'a UrlOnlyPw5555 b'"])
    assert cp.returncode == 0, cp.stderr
    assert runs.stream_bytes(client, "run:urlpw:output:0") == b"a [REDACTED] b\n"
    assert b"UrlOnlyPw5555" not in cp.stdout + cp.stderr


def test_status_messages_are_masked_too(redis_server: RedisServer) -> None:
    """What reaches the status stream decoded (an agent's event, escaped in its line) or from
    outside the output (the command's name, the reason it could not start) is masked as well."""
    token = "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    escaped = "\\u0067" + token[1:]  # JSON for the same text, which the output filter cannot see
    db_escaped = "".join(f"\\u{ord(c):04x}" for c in DB)
    line = f'{{"sidecar_event": "status", "state": "s", "tok": "{escaped}", "db": "{db_escaped}"}}'
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "stm", "--no-echo", "--", "sh", "-c",
                      f"echo '{line}'"], env={"DB_PASSWORD": DB})
    assert cp.returncode == 0, cp.stderr
    client = redis_server.client()
    agent = [m for m in runs.statuses(client, "stm") if m["status"] == "agent"]
    assert agent and agent[0]["metadata"] == {"state": "s", "tok": "[REDACTED]", "db": "[REDACTED]"}
    missing = f"/opt/{DB}/{token}"
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "stf", "--", missing], env={"DB_PASSWORD": DB})
    assert cp.returncode == 127
    everything = b"".join(runs.raw_payloads(client, "run:stf:status")) + cp.stderr
    assert token.encode() not in everything and DB.encode() not in everything
    assert [m["status"] for m in runs.statuses(client, "stf")] == ["starting", "failed"]
    assert b"[REDACTED]" in cp.stderr


def test_token_reports_are_masked_too(redis_server: RedisServer) -> None:
    token = "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    escaped = "\\u0067" + token[1:]
    line = f'{{"sidecar_event": "tokens", "input_tokens": 5, "model": "m-{escaped}"}}'
    sub = redis_server.client().pubsub()
    sub.subscribe("metrics:agent:tokens")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "tkm", "--no-echo", "--", "sh", "-c",
                      f"echo '{line}'"])
    assert cp.returncode == 0, cp.stderr
    msg = sub.get_message(timeout=5)
    sub.close()
    assert msg is not None and msg["type"] == "message"
    report = json.loads(msg["data"])
    assert report["input_tokens"] == 5 and report["model"] == "m-[REDACTED]"
    assert token.encode() not in b"".join(str(v).encode() for v in redis_server.client().hgetall("run:tkm:tokens"))


def test_a_bearer_jwt_written_in_two_parts_and_a_google_key_in_an_event_are_masked(
        redis_server: RedisServer) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    google = "AIzaSyD-AbCdEfGhIjKlMnOpQrStUvWxYz_0123"
    cut = jwt.index(".") + 1
    agent = (
        "import os, time\n"
        f"os.write(1, b'curl -H \"Authorization: Bearer {jwt[:cut]}')\n"
        "time.sleep(0.3)\n"
        f"os.write(1, b'{jwt[cut:]}\" https://api\\n')\n"
        f"os.write(1, b'{{\"type\":\"tool_result\",\"content\":\"GOOGLE_API_KEY={google}\\\\n\"}}\\n')\n"
    )
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "jwt", "--", sys.executable, "-c", agent])
    assert cp.returncode == 0, cp.stderr  # type: ignore[attr-defined]
    out = runs.stream_bytes(redis_server.client(), "run:jwt:output:0")
    assert out == (b'curl -H "Authorization: Bearer [REDACTED]" https://api\n'
                   b'{"type":"tool_result","content":"GOOGLE_API_KEY=[REDACTED]\\n"}\n')
    assert cp.stdout == out  # type: ignore[attr-defined]


def test_a_private_key_printed_from_a_file_reaches_redis_with_its_key_lines_masked(
        redis_server: RedisServer, tmp_path: object) -> None:
    import base64
    import os
    from pathlib import Path

    body = base64.b64encode(os.urandom(48 * 8)).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END OPENSSH PRIVATE KEY-----\n"
    path = Path(str(tmp_path)) / "id_ed25519"
    path.write_text(key)
    # cat writes it at once; the Python agent writes half a line, waits, then the rest
    agent = (f"import os, time, subprocess\nsubprocess.run(['cat', {str(path)!r}])\n"
             f"k = open({str(path)!r}, 'rb').read()\nh = k.index(b'\\n') + 40\n"
             "os.write(1, k[:h]); time.sleep(0.3); os.write(1, k[h:])\n")
    cp = run_sidecar(["--redis-url", redis_server.url, "--run-id", "pem", "--", sys.executable, "-c", agent])
    assert cp.returncode == 0, cp.stderr  # type: ignore[attr-defined]
    out = runs.stream_bytes(redis_server.client(), "run:pem:output:0")
    masked = ("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "[REDACTED]\n" * len(lines)
              + "-----END OPENSSH PRIVATE KEY-----\n").encode()
    assert out == masked * 2
    assert cp.stdout == out  # type: ignore[attr-defined]
