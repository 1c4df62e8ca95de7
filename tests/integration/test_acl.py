"""The Redis ACL users of the Kubernetes deployment, against a real redis-server.

The server loads k8s/base/redis/users.acl itself (``--aclfile``), the file the Secret
redis-acl is made of, with its CHANGE-ME placeholders replaced by test passwords. Then:
the sidecar ships a run as user ``sidecar`` without a single refused command, ``tail`` reads
it back as user ``api``, and each user is refused what it must not do.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import REPO_ROOT, run_process, run_sidecar
from tests.integration import runs
from tests.redis_harness import RedisServer, redis_server_binary

ACL_FILE = REPO_ROOT / "k8s" / "base" / "redis" / "users.acl"
PLACEHOLDER = re.compile(r">CHANGE-ME-[A-Za-z0-9_-]+")
USERS = ("default", "admin", "probe", "sidecar", "api")

# What the sidecar's agent writes: plain lines, a token report (run:ID:tokens, published on
# metrics:agent:tokens) and an agent status (run:ID:variation:N), so that every script and
# key family of the write path is exercised.
AGENT = r"""
import sys
for i in range(200):
    print(f"out {i}")
    print(f"err {i}", file=sys.stderr)
print('{"sidecar_event": "tokens", "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.25}')
print('{"sidecar_event": "status", "state": "planning"}')
print("last line", flush=True)
"""


def acl_lines() -> list[str]:
    return [line for line in ACL_FILE.read_text().splitlines() if line.strip()]


def render_acl(passwords: dict[str, str]) -> str:
    """users.acl with each user's CHANGE-ME placeholder replaced by ``passwords[user]``."""
    out = []
    for line in acl_lines():
        user = line.split(" ")[1]
        out.append(PLACEHOLDER.sub(lambda _m, u=user: ">" + passwords[u], line))
    return "\n".join(out) + "\n"


class _AclRedisServer(RedisServer):
    """A harness server whose readiness check authenticates, as the Kubernetes probes do."""

    def __init__(self, tmp_dir: Path, aclfile: Path, probe_password: str) -> None:
        super().__init__(tmp_dir, extra_args=("--aclfile", str(aclfile)))
        self.probe_password = probe_password

    def ping(self, timeout: float = 1.0) -> bool:
        probe = redis.Redis(
            host=self.host,
            port=self.port,
            username="probe",
            password=self.probe_password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            probe.close()


@dataclass
class AclServer:
    server: RedisServer
    passwords: dict[str, str]
    tmp_path: Path

    @property
    def url(self) -> str:
        return self.server.url

    def connect(self, username: str | None, password: str | None, **kwargs: Any) -> redis.Redis:
        # No retries: a refused login must fail at once, not after redis-py's backoff.
        return self.server.client(username=username, password=password, retry=Retry(NoBackoff(), 0), **kwargs)

    def client(self, user: str, **kwargs: Any) -> redis.Redis:
        return self.connect(user, self.passwords[user], **kwargs)

    def password_file(self, user: str) -> str:
        path = self.tmp_path / f"{user}-password"
        path.write_text(self.passwords[user] + "\n")
        path.chmod(0o600)
        return str(path)

    def env(self, user: str) -> dict[str, str | None]:
        """What the manifests give a pod: the user name and a password file, no password in the URL
        (and, for the sidecar, a single server: k8s/base/agent/job.yaml sets SIDECAR_REDIS_MODE)."""
        return {
            "REDIS_USERNAME": user,
            "REDIS_PASSWORD_FILE": self.password_file(user),
            "REDIS_PASSWORD": None,
            "SIDECAR_REDIS_MODE": "standalone",
        }

    def acl_log(self, user: str) -> list[dict[Any, Any]]:
        admin = self.client("admin", decode_responses=True)
        entries = [e for e in admin.acl_log() if e.get("username") == user]
        # redis-py announces itself with CLIENT SETINFO (Redis >= 7.2) and ignores a refusal.
        return [e for e in entries if e.get("object") != "client|setinfo"]


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[AclServer]:
    if redis_server_binary() is None:
        msg = "redis-server binary not found on PATH (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    passwords = {user: f"test-{user}-{secrets.token_hex(8)}" for user in USERS if user != "default"}
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(render_acl(passwords))
    server = _AclRedisServer(tmp_path / "redis", aclfile, passwords["probe"])
    try:
        server.start()
        yield AclServer(server, passwords, tmp_path)
    finally:
        server.shutdown()


def assert_refused(action: Callable[[], Any]) -> None:
    """``action`` fails for lack of permission (top level: NOPERM; inside a Lua script, 7.0
    says "The user executing the script can't run this command")."""
    with pytest.raises(redis.ResponseError) as info:
        action()
    text = str(info.value)
    assert (
        isinstance(info.value, redis.exceptions.NoPermissionError)
        or "NOPERM" in text
        or "can't run this command" in text
        or "no permissions" in text
    ), text


def subscribe(client: redis.Redis, *, pattern: bool = False, sharded: bool = False, channel: str) -> Any:
    """Subscribe and return the pubsub object once the server confirmed; raises if refused."""
    ps = client.pubsub()
    if sharded:
        ps.ssubscribe(channel)
    elif pattern:
        ps.psubscribe(channel)
    else:
        ps.subscribe(channel)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
        if msg is not None:
            assert msg["type"] in ("subscribe", "psubscribe", "ssubscribe"), msg
            return ps
    ps.close()
    raise AssertionError(f"no confirmation for subscribing to {channel!r}")


def refused_subscribe(client: redis.Redis, channel: str, *, pattern: bool = False) -> None:
    def attempt() -> None:
        ps = subscribe(client, channel=channel, pattern=pattern)
        ps.close()

    assert_refused(attempt)


# -- the file ------------------------------------------------------------------------------


def test_acl_file_defines_the_expected_users_with_placeholders_only() -> None:
    lines = acl_lines()
    assert [line.split(" ")[1] for line in lines] == list(USERS)
    for line in lines:
        # Redis' ACL file format: "user NAME rules...", single spaces, no comments.
        assert line.startswith("user ") and "  " not in line and line == line.strip(), line
        assert "nopass" not in line.split(), line
    default = lines[0].split(" ")
    assert default[:3] == ["user", "default", "off"]
    assert "resetpass" in default and "-@all" in default and not PLACEHOLDER.search(lines[0])
    for line in lines[1:]:
        assert line.split(" ")[2] == "on", line
        assert len(PLACEHOLDER.findall(line)) == 1, f"exactly one placeholder password expected: {line}"
        assert not re.search(r"(?:^| )[>#<][^ ]*", PLACEHOLDER.sub("", line)), f"a real password? {line}"


def test_default_user_is_off(acl_server: AclServer) -> None:
    with pytest.raises(redis.AuthenticationError):
        acl_server.connect(None, None).ping()
    with pytest.raises(redis.AuthenticationError):
        acl_server.connect("default", "").ping()
    with pytest.raises(redis.AuthenticationError):
        acl_server.connect("default", acl_server.passwords["admin"]).ping()


# -- user sidecar ------------------------------------------------------------------------------


def test_sidecar_ships_a_run_as_user_sidecar_and_api_reads_it_back(acl_server: AclServer) -> None:
    run_id = "acl-run"
    cp = run_sidecar(
        [
            "--redis-url",
            acl_server.url,
            "--run-id",
            run_id,
            "--no-echo",
            "--heartbeat-interval",
            "0.2",
            "--",
            sys.executable,
            "-c",
            AGENT,
        ],
        env=acl_server.env("sidecar"),
        timeout=120,
    )
    stderr = cp.stderr.decode(errors="replace")
    assert cp.returncode == 0, stderr
    assert "noperm" not in stderr.lower() and "permission" not in stderr.lower(), stderr
    assert acl_server.acl_log("sidecar") == []

    k = runs.keys(run_id)
    admin = acl_server.client("admin")
    expected_out = "".join(f"out {i}\n" for i in range(200)).encode()
    out = runs.stream_bytes(admin, k["stdout"])
    assert out.startswith(expected_out) and out.endswith(b"last line\n"), out[-300:]
    assert runs.stream_bytes(admin, k["stderr"]) == "".join(f"err {i}\n" for i in range(200)).encode()
    assert [m["status"] for m in runs.statuses(admin, run_id)][-1] == "exited"
    # The token script and the variation hash ran too, and the API may read both.
    api = acl_server.client("api")
    assert api.hget(f"run:{run_id}:tokens", "input_tokens") == b"10"
    assert api.hgetall(f"run:{run_id}:variation:0").get(b"status") == b"exited"

    # The reader as the API would run it: user api, password from a file.
    cp = run_process(
        [sys.executable, "-m", "sidecar", "tail", run_id, "--raw", "--redis-url", acl_server.url],
        env=acl_server.env("api"),
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    assert b"NOPERM" not in cp.stderr
    assert cp.stdout == out
    assert acl_server.acl_log("api") == []


def test_sidecar_user_may_write_its_state_keys_and_channels(acl_server: AclServer) -> None:
    """What the write path does besides the append script: heartbeat, liveness key, variation
    hash, token totals, the metrics channel, and listening on the run's control channel."""
    c = acl_server.client("sidecar")
    assert c.ping()
    assert c.set("agent:pod-1:alive", "1", ex=30)
    assert c.publish("agent:pod-1:heartbeat", "{}") == 0
    assert c.hset("run:R:variation:0", mapping={"status": "running", "agent_id": "pod-1"}) == 2
    assert c.expire("run:R:variation:0", 60)
    assert c.hincrby("run:R:tokens", "input_tokens", 10) == 10
    assert float(c.hincrbyfloat("run:R:tokens", "cost_usd", 0.5)) == 0.5
    assert c.hget("run:R:tokens", "input_tokens") == b"10"
    assert c.expire("run:R:tokens", 60)
    assert c.publish("metrics:agent:tokens", "{}") == 0
    assert c.xadd("run:R:output:0", {"d": b"x"})
    sha = c.script_load("return redis.call('XADD', KEYS[1], '*', 'd', ARGV[1])")
    assert c.evalsha(sha, 1, "run:R:output:0", "y")
    ps = subscribe(c, channel="run:R:control")
    acl_server.client("api").publish("run:R:control", "cancel")
    deadline = time.monotonic() + 5
    msg = None
    while msg is None and time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
    ps.close()
    assert msg is not None and msg["data"] == b"cancel"
    assert acl_server.acl_log("sidecar") == []


def test_sidecar_user_is_refused_everything_else(acl_server: AclServer) -> None:
    admin = acl_server.client("admin")
    admin.set("other:x", "secret")
    admin.xadd("other:s", {"d": "secret"})
    admin.set("run:R:kept", "1")
    c = acl_server.client("sidecar")

    for action in (
        c.flushall,
        c.flushdb,
        lambda: c.keys("*"),
        lambda: c.scan(0),
        lambda: c.config_get("*"),
        lambda: c.config_set("appendonly", "no"),
        c.acl_list,
        c.client_list,
        lambda: c.execute_command("CLIENT", "KILL", "TYPE", "normal"),
        c.script_flush,
        lambda: c.eval("return 1", 0),
        lambda: c.delete("run:R:kept"),
        lambda: c.get("other:x"),
        lambda: c.xrange("other:s"),
        lambda: c.set("other:x", "y"),
        lambda: c.xadd("other:s", {"d": "y"}),
        lambda: c.hset("other:h", "f", "v"),
        lambda: c.publish("other:channel", "x"),
        lambda: c.get("run:R:kept"),
    ):
        assert_refused(action)
    refused_subscribe(c, "other:channel")
    refused_subscribe(c, "run:*", pattern=True)

    # Scripts run with the caller's permissions: loading one does not widen them.
    escape = c.script_load("return redis.call('SET', KEYS[1], 'pwned')")
    assert_refused(lambda: c.evalsha(escape, 1, "other:x"))
    undeclared = c.script_load("return redis.call('GET', 'other:x')")
    assert_refused(lambda: c.evalsha(undeclared, 1, "run:R:kept"))
    wipe = c.script_load("return redis.call('FLUSHALL')")
    assert_refused(lambda: c.evalsha(wipe, 0))

    assert admin.get("other:x") == b"secret" and admin.get("run:R:kept") == b"1"


# -- user api ----------------------------------------------------------------------------------


def test_api_user_reads_subscribes_and_publishes_control(acl_server: AclServer) -> None:
    admin = acl_server.client("admin")
    first = admin.xadd("run:R:output:0", {"d": "one"})
    admin.xadd("run:R:output:0", {"d": "two"})
    admin.hset("run:R:variation:0", "status", "running")
    admin.set("agent:pod-1:alive", "1", ex=30)
    api = acl_server.client("api")

    assert [f[b"d"] for _id, f in api.xrange("run:R:output:0")] == [b"one", b"two"]
    assert [f[b"d"] for _id, f in api.xrevrange("run:R:output:0", count=1)] == [b"two"]
    assert api.xread({"run:R:output:0": first}, count=10)[0][1][0][1] == {b"d": b"two"}
    assert api.xlen("run:R:output:0") == 2
    assert api.hgetall("run:R:variation:0") == {b"status": b"running"}
    assert api.hget("run:R:variation:0", "status") == b"running"
    assert api.get("agent:pod-1:alive") == b"1"
    assert api.exists("run:R:output:0") == 1
    assert api.type("run:R:output:0") == b"stream"
    assert api.ttl("agent:pod-1:alive") > 0
    _cursor, names = api.scan(0, match="run:R:*", count=1000)
    assert b"run:R:output:0" in names

    ps = subscribe(api, channel="run:R:output:0")
    subscribe(api, channel="metrics:agent:tokens").close()
    subscribe(api, channel="agent:pod-1:heartbeat").close()
    subscribe(api, channel="run:*", pattern=True).close()
    subscribe(api, channel="run:R:logs:0", sharded=True).close()
    assert acl_server.client("sidecar").publish("run:R:output:0", "live") == 1
    deadline = time.monotonic() + 5
    msg = None
    while msg is None and time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
    ps.close()
    assert msg is not None and msg["data"] == b"live"

    assert api.publish("run:R:control", '{"command": "cancel"}') == 0
    assert acl_server.acl_log("api") == []


def test_api_user_is_read_only_and_publishes_nowhere_else(acl_server: AclServer) -> None:
    admin = acl_server.client("admin")
    admin.xadd("run:R:output:0", {"d": "one"})
    admin.set("other:x", "secret")
    api = acl_server.client("api")

    for action in (
        lambda: api.xadd("run:R:output:0", {"d": "forged"}),
        lambda: api.set("run:R:x", "1"),
        lambda: api.hset("run:R:variation:0", "status", "exited"),
        lambda: api.delete("run:R:output:0"),
        lambda: api.expire("run:R:output:0", 1),
        lambda: api.xtrim("run:R:output:0", maxlen=0),
        lambda: api.set("agent:pod-1:alive", "0"),
        lambda: api.get("other:x"),
        lambda: api.xrange("other:x"),
        lambda: api.publish("run:R:output:0", "forged"),
        lambda: api.publish("metrics:agent:tokens", "forged"),
        lambda: api.publish("agent:pod-1:heartbeat", "forged"),
        lambda: api.publish("other:control", "x"),
        api.flushall,
        lambda: api.keys("*"),
        lambda: api.config_get("*"),
        lambda: api.eval("return 1", 0),
        lambda: api.script_load("return 1"),
        api.acl_list,
    ):
        assert_refused(action)
    refused_subscribe(api, "other:channel")
    # Documented limitation: PSUBSCRIBE patterns are compared literally with the ACL's.
    refused_subscribe(api, "run:R:*", pattern=True)
    assert admin.xlen("run:R:output:0") == 1


# -- users probe and admin ---------------------------------------------------------------------


def test_probe_user_may_only_ping(acl_server: AclServer) -> None:
    probe = acl_server.client("probe")
    assert probe.ping()
    for action in (
        lambda: probe.get("run:R:x"),
        lambda: probe.info(),
        lambda: probe.publish("run:R:control", "x"),
        lambda: probe.set("run:R:x", "1"),
        probe.acl_list,
    ):
        assert_refused(action)


def test_password_rotation_as_documented(acl_server: AclServer) -> None:
    """docs/DEPLOY.md: add the new password beside the old one, move the clients, drop the old one."""
    admin = acl_server.client("admin")
    old = acl_server.passwords["sidecar"]
    new = f"rotated-{secrets.token_hex(8)}"
    assert admin.execute_command("ACL", "SETUSER", "sidecar", f">{new}") == b"OK"
    for password in (old, new):
        assert acl_server.connect("sidecar", password).xadd("run:R:output:0", {"d": "x"})
    assert admin.execute_command("ACL", "SETUSER", "sidecar", f"<{old}") == b"OK"
    with pytest.raises(redis.AuthenticationError):
        acl_server.connect("sidecar", old).ping()
    c = acl_server.connect("sidecar", new)
    assert c.xadd("run:R:output:0", {"d": "y"})
    assert_refused(lambda: c.get("other:x"))


def test_a_user_refused_publish_inside_the_script_gets_the_stream_written_and_a_clear_warning(
        redis_server: RedisServer) -> None:
    """The append script's XADD and HSET run before its PUBLISH: the retry finds the batch
    written, so the stream is complete; the warning names the ACL and the scripts."""
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "nopub", "on", ">nopub-password", "~*", "&*", "+@all", "-publish")
    try:
        agent = ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done"]
        cp = run_sidecar(["--redis-url", redis_server.url.replace("redis://", "redis://nopub:nopub-password@"),
                          "--run-id", "nopub", "--no-echo", "--heartbeat-interval", "0", "--", *agent])
    finally:
        client.execute_command("ACL", "DELUSER", "nopub")
    assert cp.returncode == 0
    assert runs.stream_bytes(client, "run:nopub:output:0") == b"".join(b"line %d\n" % i for i in range(1, 6))
    assert cp.stderr.count(b"the ACL user may not run a command of the sidecar's scripts") == 1, cp.stderr


# -- a user per agent (python -m sidecar acl-rules) ----------------------------------------


def _agent_user(acl_server: AclServer, name: str, *opts: str) -> tuple[str, list[str]]:
    """Create user ``name`` with the rules acl-rules prints for ``opts``; its password and rules."""
    cp = run_process([sys.executable, "-m", "sidecar", "acl-rules", *opts], env={"RUN_ID": None, "AGENT_ID": None})
    assert cp.returncode == 0, cp.stderr
    rules = cp.stdout.decode().splitlines()
    password = secrets.token_hex(16)
    assert acl_server.client("admin").execute_command("ACL", "SETUSER", name, "on", f">{password}", *rules) == b"OK"
    acl_server.passwords[name] = password
    return password, rules


@pytest.mark.parametrize("hash_tag", [False, True])
def test_a_user_per_agent_from_acl_rules_ships_its_run_and_nothing_else(acl_server: AclServer,
                                                                        hash_tag: bool) -> None:
    run_id, agent_id = "acl-own[1]*", "pod-7"
    opts = ["--run-id", run_id, "--agent-id", agent_id, "--variation-id", "2", *(["--cluster-hash-tag"] * hash_tag)]
    _agent_user(acl_server, "sidecar-own", *opts)
    cp = run_sidecar([*opts, "--redis-url", acl_server.url, "--no-echo", "--heartbeat-interval", "0.2", "--",
                      sys.executable, "-c", AGENT + "import time; time.sleep(0.5)\n"],
                     env=acl_server.env("sidecar-own"), timeout=120)
    stderr = cp.stderr.decode(errors="replace")
    assert cp.returncode == 0, stderr
    assert "noperm" not in stderr.lower() and "permission" not in stderr.lower() and "refused" not in stderr, stderr
    assert acl_server.acl_log("sidecar-own") == []
    admin = acl_server.client("admin")
    run_key = f"{{{run_id}}}" if hash_tag else run_id
    out = runs.stream_bytes(admin, f"run:{run_key}:output:2")
    assert out.startswith(b"out 0\nout 1\n") and out.endswith(b"last line\n") and out.count(b"\n") == 203
    assert admin.hget(f"run:{run_key}:tokens", "input_tokens") == b"10"
    assert admin.hget(f"run:{run_key}:variation:2", "status") == b"exited"
    assert admin.hget(f"run:{run_key}:variation:2", "last_heartbeat")  # the heartbeat's HSET went through

    # With the agent's password: no other run, variation or agent, no publishing on control.
    c = acl_server.client("sidecar-own")
    for action in (
        lambda: c.xadd(f"run:{run_key}x:output:2", {"d": "x"}),
        lambda: c.xadd(f"run:{run_key}:output:3", {"d": "x"}),
        lambda: c.xadd("run:acl-own1:output:2", {"d": "x"}),  # the [1] and * of the id match only themselves
        lambda: c.hset("run:other:variation:0", "status", "x"),
        lambda: c.expire("run:other:status", 1),
        lambda: c.set("agent:pod-8:alive", "1"),
        lambda: c.set(f"run:{run_key}:output:2", "x"),  # SET only on its liveness key
        lambda: c.publish(f"run:{run_key}:control", "{}"),
        lambda: c.publish("run:other:output:0", "{}"),
        lambda: c.publish("agent:pod-8:heartbeat", "{}"),
        lambda: c.xrange(f"run:{run_key}:output:2"),
    ):
        assert_refused(action)
    refused_subscribe(c, "run:other:control")
    assert c.set("agent:pod-7:alive", "1", ex=5)
    subscribe(c, channel=f"run:{run_key}:control").close()


def test_acl_rules_needs_the_ids_and_takes_no_agent_command() -> None:
    env = {"RUN_ID": None, "AGENT_ID": None, "POD_NAME": None}
    for args in (["acl-rules"], ["acl-rules", "--run-id", "r"], ["acl-rules", "--run-id", "r", "--agent-id", "a",
                                                                  "--", "true"], ["acl-rules", "--bogus"]):
        cp = run_process([sys.executable, "-m", "sidecar", *args], env=env)
        assert cp.returncode == 2 and len(cp.stderr.decode().strip().splitlines()) == 1, (args, cp.stderr)
        assert cp.stdout == b""
    cp = run_process([sys.executable, "-m", "sidecar", "acl-rules"], env={**env, "RUN_ID": "r", "POD_NAME": "p"})
    assert cp.returncode == 0 and "~run:r:output:0" in cp.stdout.decode().splitlines()
