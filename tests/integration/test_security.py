"""Authentication, ACL users, TLS and secrecy of the password, against real redis-server processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_process, run_sidecar
from tests.integration import runs
from tests.redis_harness import RedisServer, find_free_port

SECRET = "s3cret-Pa55word-xyz"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _cert(d: Path, ca: str, name: str) -> None:
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    _ca(d, "ca")
    _ca(d, "other-ca")
    _cert(d, "ca", "server")
    _cert(d, "ca", "client")
    return d


def _tls_server(redis_factory: Any, pki: Path, *, require_client_cert: bool = False) -> tuple[RedisServer, int]:
    port = find_free_port()
    srv = redis_factory(["--tls-port", str(port), "--tls-cert-file", str(pki / "server.pem"),
                         "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.pem"),
                         "--tls-auth-clients", "yes" if require_client_cert else "no"])
    return srv, port


def test_tls_with_verification_and_client_certificate(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    srv, port = _tls_server(redis_factory, pki, require_client_cert=True)
    url = f"rediss://127.0.0.1:{port}/0"
    tls = ["--redis-ca-file", str(pki / "ca.pem"), "--redis-cert-file", str(pki / "client.pem"),
           "--redis-key-file", str(pki / "client.key")]
    cp = run_sidecar(["--redis-url", url, *tls, "--run-id", "tls", "--no-echo", "--", "echo", "over tls"])
    assert cp.returncode == 0, cp.stderr
    assert runs.stream_bytes(srv.client(), "run:tls:output:0") == b"over tls\n"
    out = run_process([sys.executable, "-m", "sidecar", "tail", "tls", "--redis-url", url, *tls, "--raw"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"over tls\n"


def test_lines_written_apart_arrive_one_by_one_over_tls(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    """An agent streaming lines: over TLS the pipe reader delivers each lone line through the
    connection's own round trip (the native one needs a plain socket), in order, byte for byte."""
    srv, port = _tls_server(redis_factory, pki)
    code = "import os, time\nfor i in range(20):\n    os.write(1, b'tls line %d\\n' % i)\n    time.sleep(0.02)\n"
    cp = run_sidecar(["--redis-url", f"rediss://127.0.0.1:{port}/0", "--redis-ca-file", str(pki / "ca.pem"),
                      "--run-id", "tlslone", "--no-echo", "--", sys.executable, "-c", code])
    assert cp.returncode == 0, cp.stderr
    client = srv.client()
    assert runs.stream_bytes(client, "run:tlslone:output:0") == b"".join(b"tls line %d\n" % i for i in range(20))
    assert client.xlen("run:tlslone:output:0") >= 10  # sent as they came, not gathered at the end


def test_the_ca_file_adds_to_the_system_cas(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    """SSL_CERT_FILE stands in for the system's CAs, which sign the server's certificate; a CA
    file that does not is added to them, it does not replace them."""
    srv, port = _tls_server(redis_factory, pki)
    url = f"rediss://127.0.0.1:{port}/0"
    tls = ["--redis-ca-file", str(pki / "other-ca.pem")]
    system = {"SSL_CERT_FILE": str(pki / "ca.pem")}
    cp = run_sidecar(["--redis-url", url, *tls, "--run-id", "sysca", "--no-echo", "--drain-timeout", "5",
                      "--spool-dir", str(tmp_path / "sp"), "--", "echo", "system ca"], env=system)
    assert cp.returncode == 0, cp.stderr
    assert runs.stream_bytes(srv.client(), "run:sysca:output:0") == b"system ca\n", cp.stderr
    out = run_process([sys.executable, "-m", "sidecar", "tail", "sysca", "--redis-url", url, *tls, "--raw"],
                      env=system)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"system ca\n"


def test_tls_server_certificate_from_another_ca_is_refused(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    srv, port = _tls_server(redis_factory, pki)
    marker = tmp_path / "agent-ran"
    cp = run_sidecar(["--redis-url", f"rediss://127.0.0.1:{port}/0", "--redis-ca-file", str(pki / "other-ca.pem"),
                      "--run-id", "badca", "--no-echo", "--drain-timeout", "1", "--spool-dir", str(tmp_path / "sp"),
                      "--", "sh", "-c", f"touch {marker}; echo waiting"])
    assert cp.returncode == 0
    assert marker.exists(), "the agent runs even when Redis refuses us"
    err = cp.stderr.decode()
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err
    assert "Traceback" not in err
    assert any((tmp_path / "sp").rglob("*.seg")), "the output waits in the spool"
    assert srv.client().exists("run:badca:output:0") == 0


@pytest.fixture
def acl_server(redis_factory: Any) -> RedisServer:
    srv: RedisServer = redis_factory()
    c = srv.client()
    c.execute_command("ACL", "SETUSER", "writer", "on", f">{SECRET}", "~run:*", "&run:*", "+@all", "-@dangerous")
    c.config_set("requirepass", SECRET)  # after start: the harness pings without a password
    return srv


def test_password_from_file_and_env_never_printed(acl_server: RedisServer, tmp_path: Path) -> None:
    pw_file = tmp_path / "password"
    pw_file.write_text(SECRET + "\n")
    cp = run_sidecar(["--redis-url", acl_server.url, "--redis-password-file", str(pw_file), "--run-id", "pwf",
                      "--no-echo", "--log-level", "debug", "--", "sh", "-c", "echo from-file"])
    assert cp.returncode == 0, cp.stderr
    cp2 = run_sidecar(["--redis-url", acl_server.url, "--run-id", "pwe", "--no-echo", "--", "echo", "from-env"],
                      env={"REDIS_PASSWORD": SECRET})
    assert cp2.returncode == 0, cp2.stderr
    client = acl_server.client(password=SECRET)
    assert runs.stream_bytes(client, "run:pwf:output:0") == b"from-file\n"
    assert runs.stream_bytes(client, "run:pwe:output:0") == b"from-env\n"
    for key in client.keys("run:*"):
        if client.type(key) == b"stream":
            for p in runs.raw_payloads(client, key.decode()):
                assert SECRET.encode() not in p
    assert SECRET.encode() not in cp.stderr + cp2.stderr


def test_acl_user_from_url_and_flag(acl_server: RedisServer) -> None:
    host = f"127.0.0.1:{acl_server.port}"
    cp = run_sidecar(["--redis-url", f"redis://writer:{SECRET}@{host}/0", "--run-id", "u1", "--no-echo", "--",
                      "echo", "via url"])
    assert cp.returncode == 0, cp.stderr
    cp = run_sidecar(["--redis-url", f"redis://{host}/0", "--redis-username", "writer", "--run-id", "u2",
                      "--no-echo", "--", "echo", "via flag"], env={"REDIS_PASSWORD": SECRET})
    assert cp.returncode == 0, cp.stderr
    client = acl_server.client(password=SECRET)
    assert runs.stream_bytes(client, "run:u1:output:0") == b"via url\n"
    assert runs.stream_bytes(client, "run:u2:output:0") == b"via flag\n"


def test_wrong_password_is_one_clear_line_and_masked(acl_server: RedisServer, tmp_path: Path) -> None:
    wrong = "not-the-password-123"
    url = f"redis://writer:{wrong}@127.0.0.1:{acl_server.port}/0"
    cp = run_sidecar(["--redis-url", url, "--run-id", "wp", "--no-echo", "--drain-timeout", "1",
                      "--spool-dir", str(tmp_path / "sp"), "--", "sh", "-c", "echo still runs; sleep 1"])
    assert cp.returncode == 0
    err = cp.stderr.decode()
    assert wrong not in err and "***" in err
    assert "WRONGPASS" in err or "invalid username-password" in err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "cannot write to Redis" in line]
    assert len(warnings) == 1
    # once the credentials work, what waited is delivered (replay with the right password)
    rp = run_process([sys.executable, "-m", "sidecar", "replay", "--spool-dir", str(tmp_path / "sp"),
                      "--redis-url", f"redis://writer:{SECRET}@127.0.0.1:{acl_server.port}/0"])
    assert rp.returncode == 0, rp.stderr
    client = acl_server.client(password=SECRET)
    assert runs.stream_bytes(client, "run:wp:output:0") == b"still runs\n"
    degraded = [m for m in runs.statuses(client, "wp") if m["status"] == "degraded"]
    assert degraded and wrong not in degraded[0]["metadata"]["error"]


def test_missing_files_are_usage_errors(tmp_path: Path) -> None:
    for args in (["--redis-password-file", str(tmp_path / "nope")], ["--redis-ca-file", str(tmp_path / "nope")],
                 ["--control-secret-file", str(tmp_path / "nope")]):
        cp = run_sidecar([*args, "--", "true"])
        assert cp.returncode == 2, args
        assert len(cp.stderr.decode().strip().splitlines()) == 1


def test_tls_sentinels_with_a_password_of_their_own(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    """rediss+sentinel:// speaks TLS to the sentinels too; a sentinel that asks for a password
    is given the URL's (the master's) credentials."""
    from tests.cluster_harness import SentinelServer

    srv, port = _tls_server(redis_factory, pki)
    srv.client().config_set("requirepass", SECRET)
    tls_port = find_free_port()
    tls_conf = [f"tls-port {tls_port}", f"tls-cert-file {pki / 'server.pem'}", f"tls-key-file {pki / 'server.key'}",
                f"tls-ca-cert-file {pki / 'ca.pem'}", "tls-auth-clients no", "tls-replication yes",
                f"sentinel auth-pass tm {SECRET}"]
    sentinel = SentinelServer(tmp_path / "sentinel", "tm", ("127.0.0.1", port), quorum=1, extra_config=tls_conf)
    sentinel.start()
    try:
        sentinel.client().execute_command("ACL", "SETUSER", "default", "resetpass", f">{SECRET}")
        url = f"rediss+sentinel://127.0.0.1:{tls_port}/tm"
        tls = ["--redis-ca-file", str(pki / "ca.pem")]
        cp = run_sidecar(["--redis-url", url, *tls, "--run-id", "tsn", "--no-echo", "--drain-timeout", "10",
                          "--spool-dir", str(tmp_path / "sp"), "--", "echo", "via tls sentinels"],
                         env={"REDIS_PASSWORD": SECRET})
        assert cp.returncode == 0, cp.stderr
        assert runs.stream_bytes(srv.client(password=SECRET), "run:tsn:output:0") == b"via tls sentinels\n", cp.stderr
        out = run_process([sys.executable, "-m", "sidecar", "tail", "tsn", "--redis-url", url, *tls, "--raw"],
                          env={"REDIS_PASSWORD": SECRET})
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"via tls sentinels\n"
    finally:
        sentinel.shutdown()


def test_plaintext_sentinels_in_front_of_a_tls_master(redis_factory: Any, pki: Path, tmp_path: Path) -> None:
    """rediss+sentinel:// with sentinels that listen in plaintext: they are asked that way,
    and the master is reached over TLS."""
    from tests.cluster_harness import SentinelServer

    srv, port = _tls_server(redis_factory, pki)
    tls_conf = [f"tls-cert-file {pki / 'server.pem'}", f"tls-key-file {pki / 'server.key'}",
                f"tls-ca-cert-file {pki / 'ca.pem'}", "tls-auth-clients no", "tls-replication yes"]
    sentinel = SentinelServer(tmp_path / "sentinel", "tm", ("127.0.0.1", port), quorum=1, extra_config=tls_conf)
    sentinel.start()
    try:
        url = f"rediss+sentinel://127.0.0.1:{sentinel.port}/tm"
        tls = ["--redis-ca-file", str(pki / "ca.pem")]
        cp = run_sidecar(["--redis-url", url, *tls, "--run-id", "psn", "--no-echo", "--drain-timeout", "10",
                          "--spool-dir", str(tmp_path / "sp"), "--", "echo", "plain sentinels"])
        assert cp.returncode == 0, cp.stderr
        assert runs.stream_bytes(srv.client(), "run:psn:output:0") == b"plain sentinels\n", cp.stderr
        out = run_process([sys.executable, "-m", "sidecar", "tail", "psn", "--redis-url", url, *tls, "--raw"])
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"plain sentinels\n"
    finally:
        sentinel.shutdown()
