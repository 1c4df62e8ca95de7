"""Settings: one read-only value, built from flags with the environment as fallback."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

from agent_wrapper.values import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_OUTPUT = "run:{run_id}:output:{variation_id}"
DEFAULT_LOGS = "run:{run_id}:logs:{variation_id}"
DEFAULT_STATUS = "run:{run_id}:status"
TEMPLATE_FIELDS = ("run_id", "variation_id", "agent_id")


class UsageError(ValueError):
    """A bad flag, value or URL: reported in one line, exit 2, agent not started."""


class Option(Frozen):
    _defaults = {"kind": "str", "choices": ()}
    dest: str
    flag: str
    env: str | None
    default: Any
    help: str
    kind: str  # str, int, float, bool, choice, bytes (default: str)
    choices: tuple[str, ...]
    __slots__ = tuple(__annotations__)


def _temp_dir() -> str:
    """The directory tempfile.gettempdir() picks (TMPDIR, TEMP, TMP, then /tmp, /var/tmp,
    /usr/tmp, then the working directory), taking the first one this process may write to;
    without importing tempfile, which costs every start-up a few milliseconds."""
    candidates = [os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")]
    for d in [*candidates, "/tmp", "/var/tmp", "/usr/tmp"]:
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return os.path.abspath(d)
    return os.getcwd()


def _default_spool_dir() -> str:
    return os.path.join(_temp_dir(), "agent-sidecar-spool")


DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# Every option of the run command. Used for argparse, --help and the README table.
OPTIONS: tuple[Option, ...] = (
    Option("redis_url", "--redis-url", "REDIS_URL", DEFAULT_REDIS_URL,
           "Redis URL (redis://, rediss://, unix:// or redis+sentinel://; redis://HOST:PORT,HOST:PORT/0 names "
           "cluster nodes); the password is better given by REDIS_PASSWORD"),
    Option("run_id", "--run-id", "RUN_ID", None, "run id; when absent, generated and printed to stderr (a warning)"),
    Option("variation_id", "--variation-id", "VARIATION_ID", "0", "variation id within the run"),
    Option("agent_id", "--agent-id", "AGENT_ID", None, "agent id (default: POD_NAME, else hostname-pid)"),
    Option("echo", "--no-echo", "SIDECAR_NO_ECHO", True,
           "do not copy the agent's output to the sidecar's own stdout/stderr", kind="negbool"),
    Option("log_format", "--log-format", "SIDECAR_LOG_FORMAT", "text", "format of the sidecar's own diagnostics",
           kind="choice", choices=("text", "json")),
    Option("log_level", "--log-level", "SIDECAR_LOG_LEVEL", "info", "level of the sidecar's own diagnostics",
           kind="choice", choices=("debug", "info", "warning", "error")),
    Option("transport", "--transport", "SIDECAR_TRANSPORT", "both",
           "stream: XADD only; pubsub: PUBLISH only (live subscribers only, no replay); both", kind="choice",
           choices=("stream", "pubsub", "both")),
    Option("wire", "--wire", "SIDECAR_WIRE", "batch",
           "batch: v1 batches; per-line-json: one JSON object per line on pub/sub (streams keep batches)",
           kind="choice", choices=("batch", "per-line-json")),
    Option("output_channel", "--output-channel", "SIDECAR_OUTPUT_CHANNEL", DEFAULT_OUTPUT,
           "stream key and pub/sub channel for stdout"),
    Option("logs_channel", "--logs-channel", "SIDECAR_LOGS_CHANNEL", DEFAULT_LOGS,
           "stream key and pub/sub channel for stderr"),
    Option("status_channel", "--status-channel", "SIDECAR_STATUS_CHANNEL", DEFAULT_STATUS,
           "stream key and pub/sub channel for lifecycle status"),
    Option("batch_max_records", "--batch-max-records", "SIDECAR_BATCH_MAX_RECORDS", 1000,
           "a batch is sealed at this many records", kind="int"),
    Option("batch_max_bytes", "--batch-max-bytes", "SIDECAR_BATCH_MAX_BYTES", 256 * 1024,
           "... or at this many bytes of output", kind="bytes"),
    Option("linger_ms", "--linger-ms", "SIDECAR_LINGER_MS", 5.0,
           "... or this long after its first record while the pipe keeps delivering", kind="float"),
    Option("compress_threshold", "--compress-threshold", "SIDECAR_COMPRESS_THRESHOLD", 1024,
           "payloads larger than this many bytes are zstd-compressed (-1: never)", kind="bytes"),
    Option("max_line_bytes", "--max-line-bytes", "SIDECAR_MAX_LINE_BYTES", 1 << 20,
           "longer lines are cut into continuation chunks", kind="bytes"),
    Option("buffer_max_bytes", "--buffer-max-bytes", "SIDECAR_BUFFER_MAX_BYTES", 64 << 20,
           "memory buffer for records waiting for Redis", kind="bytes"),
    Option("spool_dir", "--spool-dir", "SIDECAR_SPOOL_DIR", None,
           "disk spool for records waiting for Redis (default: <tmp>/agent-sidecar-spool)"),
    Option("spool_max_bytes", "--spool-max-bytes", "SIDECAR_SPOOL_MAX_BYTES", 1 << 30,
           "size limit of this sidecar's spool (0: no spool)", kind="bytes"),
    Option("when_full", "--when-full", "SIDECAR_WHEN_FULL", "block",
           "block: stop reading the agent's pipes; drop: drop the oldest waiting records, write a gap marker",
           kind="choice", choices=("block", "drop")),
    Option("drain_timeout_s", "--drain-timeout", "SIDECAR_DRAIN_TIMEOUT", 10.0,
           "seconds to deliver what is waiting after the agent exits; the rest stays in the spool",
           kind="duration"),
    Option("kill_grace_s", "--kill-grace", "SIDECAR_KILL_GRACE", 10.0,
           "seconds between SIGTERM/SIGINT to the agent and SIGKILL", kind="duration"),
    Option("pipe_grace_s", "--pipe-grace", "SIDECAR_PIPE_GRACE", 2.0,
           "seconds to keep reading after the agent exits when a grandchild holds its pipes", kind="duration"),
    Option("socket_timeout_s", "--socket-timeout", "SIDECAR_SOCKET_TIMEOUT", 5.0,
           "seconds before a silent Redis counts as down", kind="duration"),
    Option("retry_max_s", "--retry-max-backoff", "SIDECAR_RETRY_MAX_BACKOFF", 5.0,
           "cap of the exponential reconnect backoff, seconds", kind="duration"),
    Option("retention_s", "--retention", "SIDECAR_RETENTION", 86400.0,
           "TTL of every key written, refreshed on write and by the heartbeat while the run goes on "
           "(s, or with m/h/d suffix; rounded up to whole s; 0: none)",
           kind="duration"),
    Option("max_stream_len", "--max-stream-len", "SIDECAR_MAX_STREAM_LEN", 1_000_000,
           "approximate cap on entries per stream (0: none)", kind="int"),
    Option("heartbeat_interval_s", "--heartbeat-interval", "SIDECAR_HEARTBEAT_INTERVAL", 5.0,
           "seconds between heartbeats on agent:{agent_id}:heartbeat (0: none; else at least 0.1)", kind="duration"),
    Option("redis_username", "--redis-username", "REDIS_USERNAME", None, "ACL user name"),
    Option("redis_password_file", "--redis-password-file", "REDIS_PASSWORD_FILE", None,
           "file holding the Redis password (a mounted Kubernetes Secret)"),
    Option("redis_ca_file", "--redis-ca-file", "REDIS_CA_FILE", None,
           "CA bundle to verify the Redis server's TLS certificate (rediss://)"),
    Option("redis_cert_file", "--redis-cert-file", "REDIS_CERT_FILE", None, "TLS client certificate (PEM)"),
    Option("redis_key_file", "--redis-key-file", "REDIS_KEY_FILE", None, "TLS client private key (PEM)"),
    Option("control_secret_file", "--control-secret-file", "SIDECAR_CONTROL_SECRET_FILE", None,
           "file holding the HMAC secret that control commands must be signed with (or the secret itself in "
           "SIDECAR_CONTROL_SECRET)"),
    Option("redis_mode", "--redis-mode", "SIDECAR_REDIS_MODE", "auto",
           "auto: detect a cluster (redis+sentinel:// URLs use Sentinel); or force standalone, cluster, sentinel",
           kind="choice", choices=("auto", "standalone", "cluster", "sentinel")),
    Option("pubsub", "--pubsub", "SIDECAR_PUBSUB", "classic",
           "classic: PUBLISH; sharded: SPUBLISH (Redis 7 cluster: the message stays on the key's shard)",
           kind="choice", choices=("classic", "sharded")),
    Option("cluster_hash_tag", "--cluster-hash-tag", "SIDECAR_CLUSTER_HASH_TAG", False,
           "wrap the run id in a hash tag in key names (run:{RUN}:output:0): all keys of a run on one shard",
           kind="bool"),
    Option("min_replicas_ack", "--min-replicas-ack", "SIDECAR_MIN_REPLICAS_ACK", 0,
           "count a batch delivered only once this many replicas hold it (WAIT)", kind="int"),
    Option("redact", "--no-redact", "SIDECAR_NO_REDACT", True,
           "publish and echo secrets unmasked (redaction is on by default)", kind="negbool"),
)


class Settings(Frozen):
    _defaults = {"control_secret": None, "redact_patterns": (), "command": ()}
    _hidden = ("redis_password", "control_secret")
    redis_url: str
    redis_url_empty: bool  # given empty (flag or REDIS_URL), so the default applies
    redis_password: str | None
    run_id: str
    run_id_generated: bool
    agent_id_generated: bool  # none given and no POD_NAME: host name and pid
    variation_id: str
    agent_id: str
    echo: bool
    log_format: str
    log_level: str
    transport: str
    wire: str
    output_channel: str
    logs_channel: str
    status_channel: str
    batch_max_records: int
    batch_max_bytes: int
    linger_ms: float
    compress_threshold: int
    max_line_bytes: int
    buffer_max_bytes: int
    spool_dir: str
    spool_max_bytes: int
    when_full: str
    drain_timeout_s: float
    kill_grace_s: float
    pipe_grace_s: float
    socket_timeout_s: float
    retry_max_s: float
    retention_s: float
    max_stream_len: int
    heartbeat_interval_s: float
    redis_username: str | None
    redis_password_file: str | None
    redis_ca_file: str | None
    redis_cert_file: str | None
    redis_key_file: str | None
    control_secret_file: str | None
    redis_mode: str
    pubsub: str
    cluster_hash_tag: bool
    min_replicas_ack: int
    redact: bool
    control_secret: bytes | None
    redact_patterns: tuple[str, ...]
    command: tuple[str, ...]
    __slots__ = tuple(__annotations__)

    def _field_repr(self, name: str, value: Any) -> str:
        return repr(mask_url(value) if name == "redis_url" else value)

    @property
    def run_key(self) -> str:
        """The run id as it appears in key names: in braces with --cluster-hash-tag."""
        return f"{{{self.run_id}}}" if self.cluster_hash_tag else self.run_id

    def channel(self, template: str) -> str:
        return template.format(run_id=self.run_key, variation_id=self.variation_id, agent_id=self.agent_id)

    @property
    def heartbeat_channel(self) -> str:
        return f"agent:{self.agent_id}:heartbeat"

    @property
    def alive_key(self) -> str:
        return f"agent:{self.agent_id}:alive"

    @property
    def ttl_s(self) -> int:
        """--retention as EXPIRE takes it: whole seconds, rounded up (0: no TTL)."""
        return math.ceil(self.retention_s) if self.retention_s > 0 else 0

    @property
    def use_stream(self) -> bool:
        return self.transport in ("stream", "both")

    @property
    def use_pubsub(self) -> bool:
        return self.transport in ("pubsub", "both")


_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
           "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bytes(text: str) -> float:
    """Bytes: a whole number, or a number with a suffix (``1.5k``; ``convert`` then checks it is
    finite, in range, and takes its whole part)."""
    t = text.strip().lower()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if t.endswith(suffix) and t[: -len(suffix)].strip():
            num = t[: -len(suffix)].strip()
            return float(num) * _SUFFIX[suffix]
    return int(t)


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    if t and t[-1] in _DURATION:
        return float(t[:-1]) * _DURATION[t[-1]]
    return float(t)


# Upper bounds for numeric options: far above any sensible value, low enough that no timer,
# TTL or counter overflows downstream (thread waits, EXPIRE, JSON doubles).
MAX_SECONDS = 1e8  # about three years
MAX_COUNT = 1 << 53
_INT_MIN = {"compress_threshold": -1, "batch_max_records": 1}
_WHAT = {"int": "a whole number", "float": "a number", "bytes": "a size (a number, with k, m, g, KiB, MiB or GiB if "
         "you like; KB, MB or GB: powers of 1000)", "duration": "a duration (seconds, or a number with s, m, h or d)"}


def _number(value: float, limit: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value < 0:
        raise ValueError("must not be negative")
    if value > limit:
        raise ValueError(f"must be at most {limit:g}")
    return value


def _source(opt: Option) -> str:
    """Where an option's value comes from, as errors name it: ``--flag / VARIABLE``."""
    return opt.flag if opt.env is None else f"{opt.flag} / {opt.env}"


def convert(opt: Option, raw: Any) -> Any:
    """Turn a flag or environment string into the option's type; UsageError when it cannot."""
    if not isinstance(raw, str):
        return raw
    try:
        if opt.kind in _WHAT:
            try:
                parsed = {"int": int, "float": float, "bytes": parse_bytes, "duration": parse_duration}[opt.kind](raw)
            except ValueError:
                raise ValueError(f"not {_WHAT[opt.kind]}") from None
        if opt.kind == "int":
            value_i = parsed
            low = _INT_MIN.get(opt.dest, 0)
            if not low <= value_i <= MAX_COUNT:
                raise ValueError(f"must be between {low} and {MAX_COUNT}")
            return value_i
        if opt.kind == "float":
            return _number(parsed, MAX_SECONDS)
        if opt.kind == "bytes":
            if parsed == -1 and _INT_MIN.get(opt.dest) == -1:  # --compress-threshold -1: never
                return -1
            return int(_number(parsed, MAX_COUNT))
        if opt.kind == "duration":
            return _number(parsed, MAX_SECONDS)
        if opt.kind in ("bool", "negbool"):
            word = raw.strip().lower()
            if word not in _TRUE and word not in _FALSE:
                raise ValueError("use 1, true, yes or on; 0, false, no or off")
            return (word in _TRUE) == (opt.kind == "bool")
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"invalid value {raw!r} for {_source(opt)}: {exc}") from None
    if opt.kind == "choice" and raw not in opt.choices:
        word = raw.strip().lower()  # a variable's value, as for booleans (flags are checked by argparse)
        if word in opt.choices:
            return word
        raise UsageError(f"invalid value {raw!r} for {_source(opt)}: choose from {', '.join(opt.choices)}")
    return raw


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


MAX_DB = (1 << 31) - 1  # Redis counts its databases in an int


def _db_ok(text: str) -> bool:
    """A database number Redis could have: ASCII digits, at most MAX_DB."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_DB


def plain_url(url: str) -> bool:
    """Whether ``url`` is redis[s]://HOST[:PORT][/DB] with a host of letters, digits, dots,
    dashes and underscores, a port of 1 to 65535 and a numeric database: a URL that
    validate_url accepts and that holds no password, known without urllib.parse (which
    imports re and ipaddress: milliseconds of every start before the agent is spawned)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        return False
    hostport, slash, db = rest.partition("/")
    host, colon, port = hostport.partition(":")
    if not host or not _HOST_CHARS.issuperset(host) or (slash and db and not _db_ok(db)):
        return False
    return not colon or (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536)


def split_hosts(url: str) -> list[str] | None:
    """For redis[s]://[user[:password]@]HOST[:PORT],HOST[:PORT]...[/DB], the seed nodes of a
    cluster: one URL per node, with the same credentials and database. None for any other URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        return None
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return None
    return [f"{scheme}://{auth}{at}{host}{slash}{path}" for host in hosts.split(",")]


def _split_auth(url: str) -> tuple[str, str, str]:
    """(what precedes the user info, the user info, the rest after its "@"); the user info is
    empty without one. It ends at the last "@" (so a password holding "/", "?", "#" or "@",
    which a URL must %-escape, is taken whole even in a malformed URL), except in a unix://
    URL, whose socket path may hold "@": there it ends before the path."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if scheme == "unix":
        head, slash, path = rest.partition("/")
        auth, at, host = head.rpartition("@")
        if at:
            return f"{scheme}{sep}", auth, f"{host}{slash}{path}"
        if ":" not in head or "@" not in path:
            return f"{scheme}{sep}", "", rest
        # user:pass/word@/path: a password holding "/" (refused by validate_url, masked whole)
    auth, at, hosts = rest.rpartition("@")
    return (f"{scheme}{sep}", auth, hosts) if at else (f"{scheme}{sep}", "", rest)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to print."""
    if plain_url(url):
        return url
    head, auth, rest = _split_auth(url)
    if ":" not in auth:
        return url
    return f"{head}{auth.split(':', 1)[0]}:***@{rest}"


def url_password(url: str) -> str | None:
    """The password a URL carries (%-escapes decoded), as mask_url finds it; None without one."""
    from urllib.parse import unquote

    _user, colon, password = _split_auth(url)[1].partition(":")
    return unquote(password) if colon and password else None


def validate_url(url: str) -> None:
    if plain_url(url):
        return
    if any(c.isspace() or c < " " or c == "\x7f" for c in url):  # urlsplit would drop tabs and newlines
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: spaces or control characters")
    auth = _split_auth(url)[1]
    if any(c in auth for c in "/?#"):  # else urlsplit would take part of the password for the port
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: a password holding /, ? or # must be %-escaped "
                         "(or given by REDIS_PASSWORD)")
    import re
    from urllib.parse import parse_qs, urlsplit

    hosts = split_hosts(url)
    if hosts is not None:
        for one in hosts:
            try:
                validate_url(one)
            except UsageError as exc:
                raise UsageError(f"{exc}, in {mask_url(url)!r}") from None
        if url.partition("://")[2].partition("/")[2] not in ("", "0"):
            raise UsageError(f"invalid Redis URL {mask_url(url)!r}: several hosts name a cluster's nodes, "
                             "and a cluster has database 0 only")
        return
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        from .topology import parse_sentinel_url

        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise UsageError(f"invalid Sentinel URL {mask_url(url)!r}: {exc}") from None
        _validate_sentinel_parts(url, auth)
        return
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: scheme must be redis://, rediss://, unix:// "
                         "or redis+sentinel://")
    if parts.scheme == "unix":
        if not parts.path:
            raise UsageError(f"invalid Redis URL {mask_url(url)!r}: unix:// needs a socket path")
        if parts.fragment or url.endswith("#"):
            raise UsageError(f"invalid Redis URL {mask_url(url)!r}: no fragment (#...)")
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"}:
            raise UsageError(f"invalid Redis URL {mask_url(url)!r}: unix:// takes only the query parameter db")
        for db_text in query.get("db", []):
            if not _db_ok(db_text):
                raise UsageError(f"invalid Redis URL {mask_url(url)!r}: database must be a number from 0 to "
                                 f"{MAX_DB}, not {db_text[:20]!r}")
        return
    if parts.query:
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: no query parameters (the database goes in the "
                         "path, TLS files in --redis-ca-file/--redis-cert-file/--redis-key-file)")
    if not parts.hostname:
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: no host")
    ipv6 = ":" in parts.hostname  # in brackets in the URL, maybe with a %-escaped zone
    if not all(c.isalnum() or c in ".-_" or ipv6 and c in ":%" for c in parts.hostname):
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: bad host {parts.hostname!r}")
    if parts.fragment or url.endswith("#"):
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: no fragment (#...)")
    if re.search("%(?![0-9A-Fa-f]{2})", auth):
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: bad %-escape in the user name or password "
                         "(write % as %25)")
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: bad port")
    db = parts.path.lstrip("/")
    if db and not _db_ok(db):
        raise UsageError(f"invalid Redis URL {mask_url(url)!r}: database must be a number from 0 to {MAX_DB}, "
                         f"not {db[:20]!r}")


def _validate_sentinel_parts(url: str, auth: str) -> None:
    """The checks validate_url makes of a redis:// URL, for the parts of a Sentinel URL that
    parse_sentinel_url takes as they come: each sentinel's host, the credentials' %-escapes,
    and a path of master name and database only, without query or fragment."""
    import re

    shown = mask_url(url)
    if "?" in url or "#" in url:
        raise UsageError(f"invalid Sentinel URL {shown!r}: no query parameters or fragment")
    if re.search("%(?![0-9A-Fa-f]{2})", auth):
        raise UsageError(f"invalid Sentinel URL {shown!r}: bad %-escape in the user name or password "
                         "(write % as %25)")
    hosts, _, path = url.partition("://")[2].rpartition("@")[2].partition("/")
    if len([p for p in path.split("/") if p]) > 2:
        raise UsageError(f"invalid Sentinel URL {shown!r}: the path is /master_name[/db]")
    for host in hosts.split(","):
        if not host.strip() or host.strip().startswith(":"):
            raise UsageError(f"invalid Sentinel URL {shown!r}: a sentinel without a host")
        try:
            validate_url(f"redis://{host.strip()}/0")
        except UsageError:
            raise UsageError(f"invalid Sentinel URL {shown!r}: bad sentinel address {host!r}") from None


def validate_template(name: str, template: str) -> None:
    from _string import formatter_parser  # what string.Formatter().parse uses, without importing string

    problem = ""
    try:
        for _text, field_name, spec, conversion in formatter_parser(template):
            if field_name is None:
                continue
            if field_name not in TEMPLATE_FIELDS:
                problem = f"unknown placeholder {{{field_name}}}"
            elif spec or conversion:
                problem = f"no format spec or conversion in {{{field_name}}}"
    except ValueError as exc:
        problem = str(exc)
    if problem:
        raise UsageError(
            f"invalid channel template {template!r} for {name}: use only {{run_id}}, {{variation_id}}, "
            f"{{agent_id}} ({problem})"
        )


def _check_utf8(name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"invalid {name}: not valid UTF-8") from None


def _check_mode_fits_url(mode: str, url: str) -> None:
    """--redis-mode standalone or cluster against what a single-host URL can name."""
    if mode in ("standalone", "cluster") and "+sentinel://" in url:
        raise UsageError(f"--redis-mode {mode}: a redis+sentinel:// URL names Sentinels, which find the master "
                         "(use --redis-mode sentinel or auto)")
    if mode != "cluster" or split_hosts(url) is not None:
        return
    if url.startswith("unix:"):
        raise UsageError(f"--redis-mode cluster: {mask_url(url)!r} is a unix socket, and a cluster's nodes "
                         "are reached over TCP (give a node's redis://HOST:PORT)")
    db = url.partition("://")[2].partition("/")[2].partition("?")[0]
    if db not in ("", "0"):
        raise UsageError(f"--redis-mode cluster: {mask_url(url)!r} names database {db}, and a cluster has "
                         "database 0 only")


def _check_client_cert(cert_file: str, key_file: str | None) -> None:
    """Load the TLS client certificate and key once, so that a wrong file is a usage error
    rather than a handshake failing on every retry ("PEM lib")."""
    import ssl

    try:
        ssl.create_default_context().load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        what = f"--redis-cert-file {cert_file}" + (f" / --redis-key-file {key_file}" if key_file else "")
        raise UsageError(f"{what}: not a usable certificate and private key ({exc})") from None


def _check_ca_file(ca_file: str) -> None:
    """Load the CA file once, as the client certificate: a file without a certificate would
    otherwise fail every handshake, retried for the whole run."""
    import ssl

    try:
        ssl.create_default_context().load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UsageError(f"--redis-ca-file {ca_file}: no usable CA certificate in it ({exc})") from None


def check_id(name: str, value: str) -> None:
    """A run, variation or agent id: UTF-8 text without spaces, braces or control characters
    (it becomes part of key names and of every message)."""
    _check_utf8(name, value)
    if not value:
        raise UsageError(f"invalid {name}: empty")
    if any(c in "{} " or not c.isprintable() for c in value):  # not printable: control, format, any space
        raise UsageError(f"invalid {name} {value!r}: no spaces, braces or control characters")


def default_agent_id(env: dict[str, str]) -> str:
    return env.get("POD_NAME") or f"{os.uname().nodename}-{os.getpid()}"  # as socket.gethostname()


def build(values: dict[str, Any], env: dict[str, str], command: tuple[str, ...]) -> Settings:
    """Settings from parsed flag values (None where not given) and the environment. An empty
    value counts as not given, from a flag as from a variable: ``--run-id "$ID"`` with ``ID``
    unset must not override RUN_ID."""
    merged: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = values.get(opt.dest)
        if raw == "":
            raw = None
        if raw is None and opt.env is not None and env.get(opt.env, "") != "":
            raw = env[opt.env]
        merged[opt.dest] = opt.default if raw is None else convert(opt, raw)
    validate_url(merged["redis_url"])
    if merged["redis_mode"] in ("standalone", "sentinel") and split_hosts(merged["redis_url"]) is not None:
        raise UsageError(f"--redis-mode {merged['redis_mode']}: a URL with several hosts names the nodes of a cluster")
    if merged["redis_mode"] == "sentinel" and "+sentinel://" not in merged["redis_url"]:
        raise UsageError(f"--redis-mode sentinel needs a redis+sentinel:// URL, not {mask_url(merged['redis_url'])!r}")
    _check_mode_fits_url(merged["redis_mode"], merged["redis_url"])
    for opt in OPTIONS:
        if opt.dest in ("output_channel", "logs_channel", "status_channel"):
            validate_template(_source(opt), merged[opt.dest])
    if merged["min_replicas_ack"] < 0:
        raise UsageError("--min-replicas-ack must not be negative")
    if merged["batch_max_records"] < 1:
        raise UsageError("--batch-max-records must be at least 1")
    if merged["batch_max_bytes"] < 1 or merged["max_line_bytes"] < 1:
        raise UsageError("--batch-max-bytes and --max-line-bytes must be at least 1")
    if merged["socket_timeout_s"] <= 0:
        raise UsageError("--socket-timeout must be more than 0")
    if merged["retry_max_s"] < MIN_RETRY_BACKOFF_S:  # 0 would retry in a busy loop while Redis is down
        raise UsageError(f"--retry-max-backoff must be at least {MIN_RETRY_BACKOFF_S:g} s")
    if 0 < merged["heartbeat_interval_s"] < MIN_HEARTBEAT_S:  # a typo must not flood Redis
        raise UsageError(f"--heartbeat-interval must be 0 (none) or at least {MIN_HEARTBEAT_S:g} s")
    run_id = merged["run_id"]
    generated = False
    if not run_id:
        run_id = os.urandom(8).hex()  # 16 hex digits (the uuid module would import platform)
        generated = True
    merged["run_id"] = str(run_id)
    merged["run_id_generated"] = generated
    merged["redis_url_empty"] = merged["redis_url"] == DEFAULT_REDIS_URL and (
        values.get("redis_url") == "" or values.get("redis_url") is None and env.get("REDIS_URL") == "")
    merged["variation_id"] = str(merged["variation_id"])
    from_pod_name = not merged["agent_id"] and bool(env.get("POD_NAME"))
    merged["agent_id_generated"] = not merged["agent_id"] and not from_pod_name
    merged["agent_id"] = merged["agent_id"] or default_agent_id(env)
    merged["spool_dir"] = merged["spool_dir"] or _default_spool_dir()
    merged["redis_password"] = env.get("REDIS_PASSWORD") or None
    if merged["redis_password_file"]:
        password = _read_secret(merged["redis_password_file"], "--redis-password-file")
        try:
            merged["redis_password"] = password.decode()
        except UnicodeDecodeError:
            raise UsageError(f"--redis-password-file {merged['redis_password_file']}: not valid UTF-8") from None
    secret: bytes | None = None
    if merged["control_secret_file"]:
        secret = _read_secret(merged["control_secret_file"], "--control-secret-file")
    elif env.get("SIDECAR_CONTROL_SECRET"):
        secret = env["SIDECAR_CONTROL_SECRET"].encode("utf-8", "surrogateescape")  # the variable's bytes
    merged["control_secret"] = secret
    patterns = tuple(values.get("redact_patterns") or ())
    if env.get("SIDECAR_REDACT_PATTERNS"):
        # One per line, and used together with the flags (unlike other settings, which the flag
        # replaces): a pattern set for every agent must not vanish when a Job adds one of its
        # own. A CRLF file (a ConfigMap written on Windows) must not leave a "\r" at the end of
        # each pattern, which would then never match.
        lines = env["SIDECAR_REDACT_PATTERNS"].replace("\r\n", "\n").split("\n")
        patterns += tuple(p for p in lines if p and p not in patterns)
    if patterns:
        from .redaction import check_patterns

        for pattern in patterns:
            _check_utf8("--redact-pattern", pattern)
        problem = check_patterns(patterns)
        if problem:
            raise UsageError(f"invalid --redact-pattern {problem}")
    merged["redact_patterns"] = tuple(patterns)
    for opt in ("redis_ca_file", "redis_cert_file", "redis_key_file"):
        path = merged[opt]
        if path and not os.path.isfile(path):
            why = "not a file" if os.path.exists(path) else "no such file"
            raise UsageError(f"--{opt.replace('_', '-')} {path}: {why}")
    tls_files = [f"--{opt.replace('_', '-')}" for opt in ("redis_ca_file", "redis_cert_file", "redis_key_file")
                 if merged[opt]]
    if tls_files and not merged["redis_url"].startswith("rediss"):
        raise UsageError(f"{' and '.join(tls_files)} given, but {mask_url(merged['redis_url'])!r} is not a TLS URL "
                         "(rediss:// or rediss+sentinel://): the password would go in plaintext")
    if merged["redis_key_file"] and not merged["redis_cert_file"]:
        raise UsageError("--redis-key-file needs --redis-cert-file (the client certificate)")
    if merged["redis_cert_file"]:
        _check_client_cert(merged["redis_cert_file"], merged["redis_key_file"])
    if merged["redis_ca_file"]:
        _check_ca_file(merged["redis_ca_file"])
    for name in ("run_id", "variation_id", "agent_id"):
        # an agent id taken from POD_NAME is named so: the user never set an agent id
        check_id("agent_id (from POD_NAME)" if name == "agent_id" and from_pod_name else name, merged[name])
    # Text that goes into commands and JSON must be UTF-8 (an argument or variable of other
    # bytes arrives with surrogate escapes). File paths may be any bytes.
    for name, shown in (("redis_url", "--redis-url"), ("output_channel", "--output-channel"),
                        ("logs_channel", "--logs-channel"), ("status_channel", "--status-channel"),
                        ("redis_username", "--redis-username"), ("redis_password", "REDIS_PASSWORD")):
        _check_utf8(shown, merged[name])
    settings = Settings(command=command, **merged)
    _check_distinct_keys(settings, others=bool(command))
    return settings


MIN_HEARTBEAT_S = 0.1
# The backoff's first wait: a smaller cap would retry a Redis that is down in a busy loop.
MIN_RETRY_BACKOFF_S = 0.05

# Where every run's token reports are published (TOKENS_SCRIPT names it too).
TOKENS_CHANNEL = "metrics:agent:tokens"


def _check_distinct_keys(s: Settings, *, others: bool = True) -> None:
    """Output, logs and status need keys of their own: sharing one with each other or with the
    run's other keys would mix sequence numbers of one producer and drop records as repeats,
    and the heartbeat's SET of its alive key would overwrite a stream."""
    ours = {"--output-channel": s.channel(s.output_channel), "--logs-channel": s.channel(s.logs_channel),
            "--status-channel": s.channel(s.status_channel)}
    fixed = {f"run:{s.run_key}:{suffix}" for suffix in ("tokens", "control", f"variation:{s.variation_id}")}
    fixed |= {s.heartbeat_channel, s.alive_key, TOKENS_CHANNEL}
    seen: dict[str, str] = {}
    for flag, key in ours.items():
        if key in seen:
            raise UsageError(f"{flag} and {seen[key]} both resolve to {key!r}: each needs a key of its own")
        if key in fixed or key.endswith(":idem"):
            raise UsageError(f"{flag} resolves to {key!r}, a key the sidecar uses for something else")
        seen[key] = flag
    # The sidecars of the run's other variations use the same templates: none of our keys may be
    # what one of them resolves to there (the defaults cannot). Not checked for readers (tail,
    # replay: ``others`` False), which write nothing of their own.
    defaults = (DEFAULT_OUTPUT, DEFAULT_LOGS, DEFAULT_STATUS)
    if not others or (s.output_channel, s.logs_channel, s.status_channel) == defaults:
        return
    import re

    templates = {"--output-channel": s.output_channel, "--logs-channel": s.logs_channel,
                 "--status-channel": s.status_channel}
    theirs = {flag: _key_pattern(t, s.run_key, s.agent_id) for flag, t in templates.items()}
    theirs["the variation hash"] = re.escape(f"run:{s.run_key}:variation:") + _ANY_VARIATION
    for flag, key in ours.items():
        for other, pattern in theirs.items():
            if other != flag and re.fullmatch(pattern, key):
                raise UsageError(f"{flag} resolves to {key!r}, which is {other} of another variation of the "
                                 "run: each needs a key of its own")


# Another variation's id: taken to be a number, as variations are counted ('run:R:{variation_id}'
# beside a status key 'run:R:status' is not refused for the sake of a variation named 'status').
# {agent_id} stays this sidecar's own: what another agent's id may be is anyone's guess.
_ANY_VARIATION = r"[0-9]+"


def _key_pattern(template: str, run_key: str, agent_id: str) -> str:
    """A regular expression of the keys ``template`` resolves to for any (numbered) variation
    of the run and this sidecar's agent id."""
    import re
    from _string import formatter_parser

    out = []
    for literal, field, _spec, _conv in formatter_parser(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append({"run_id": re.escape(run_key), "variation_id": _ANY_VARIATION}.get(field, re.escape(agent_id)))
    return "".join(out)


# A password or control secret is short; a file larger than this is not one.
MAX_SECRET_FILE_BYTES = 64 << 10


def _read_secret(path: str, flag: str) -> bytes:
    """A secret from a regular file (a Kubernetes Secret's key is one, behind a symlink). Not
    from a FIFO, device or directory: opened without waiting for a writer, and read no further
    than MAX_SECRET_FILE_BYTES, so that /dev/zero or a FIFO nobody writes to cannot hang or fill
    the start-up, which runs with the stop signals blocked."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{flag} {path}: not a regular file")
        data = b""
        while len(data) <= MAX_SECRET_FILE_BYTES:
            more = os.read(fd, MAX_SECRET_FILE_BYTES + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise UsageError(f"{flag} {path}: larger than {MAX_SECRET_FILE_BYTES >> 10} KiB, not a password or secret")
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = data.rstrip(b"\r\n")
    if not data:
        raise UsageError(f"{flag} {path} is empty")
    return data


# With --when-full drop, waiting room (memory and spool) for fewer batches than this drops
# output in any burst, Redis healthy or not: worth a warning at start.
DROP_ROOM_BATCHES = 4


def start_warnings(s: Settings, env: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """What the run command warns about at start (message, fields): settings that are valid
    but likely not what was meant, or that do less than they seem to."""
    out: list[tuple[str, dict[str, Any]]] = []
    if s.run_id_generated:
        # a warning: at --log-level warning the run would otherwise go out under an id nobody knows
        out.append(("no run id given (--run-id, RUN_ID): generated one", {"run_id": s.run_id}))
    unknown = unknown_variables(env)
    if unknown:
        out.append(("unknown SIDECAR_ environment variables, ignored: " + ", ".join(unknown), {}))
    if s.wire == "per-line-json" and s.transport == "stream":
        out.append(("--wire per-line-json shapes the pub/sub messages, and --transport stream publishes none: "
                    "the streams get batches as always", {}))
    if s.agent_id_generated and any("{agent_id}" in t for t in (s.output_channel, s.logs_channel, s.status_channel)):
        out.append(("a channel template uses {agent_id} and no agent id was given (--agent-id, AGENT_ID, POD_NAME): "
                    "the keys carry the generated one, which readers must be told", {"agent_id": s.agent_id}))
    if not s.redact and s.redact_patterns:
        out.append(("--no-redact (SIDECAR_NO_REDACT) turns redaction off: the --redact-pattern and "
                    "SIDECAR_REDACT_PATTERNS patterns mask nothing", {}))
    if s.when_full == "drop" and s.buffer_max_bytes + s.spool_max_bytes < DROP_ROOM_BATCHES * s.batch_max_bytes:
        out.append((f"--when-full drop with room for fewer than {DROP_ROOM_BATCHES} batches (--buffer-max-bytes and "
                    "--spool-max-bytes against --batch-max-bytes): output is dropped whenever the agent writes "
                    "faster than one round trip to Redis, also with Redis healthy", {}))
    if s.redis_url_empty:
        # in a Job, more likely a value that went missing than a wish for localhost
        out.append(("the Redis URL (--redis-url, REDIS_URL) is set but empty: using the default",
                    {"redis": DEFAULT_REDIS_URL}))
    return out


# Variables the sidecar reads that are no option of OPTIONS.
OTHER_VARIABLES = frozenset({"SIDECAR_CONTROL_SECRET", "SIDECAR_REDACT_PATTERNS", "SIDECAR_PURE_PYTHON"})


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``SIDECAR_*`` names in ``env`` that the sidecar does not read (a misspelling, say
    SIDECAR_REDACT_PATTERN), each with the closest known name when there is one."""
    known = {opt.env for opt in OPTIONS if opt.env and opt.env.startswith("SIDECAR_")} | OTHER_VARIABLES
    unknown = sorted(name for name in env if name.startswith("SIDECAR_") and name not in known
                     and not name.startswith("SIDECAR_TEST_"))  # the test suite's own (tests/redis_harness.py)
    if not unknown:
        return []
    from difflib import get_close_matches  # only when there is something to tell

    out = []
    for name in unknown:
        close = get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


# Options that say how to reach Redis: shared by the run, tail and replay commands.
CONNECTION_OPTIONS = ("redis_url", "redis_username", "redis_password_file", "redis_ca_file", "redis_cert_file",
                      "redis_key_file", "redis_mode", "cluster_hash_tag", "socket_timeout_s", "log_format",
                      "log_level")


def build_connection(values: dict[str, Any], env: dict[str, str], used: Iterable[str] = CONNECTION_OPTIONS) -> Settings:
    """Settings for the read and replay commands: the same options and environment, no agent.
    Of the option variables in the environment only those of ``used`` (option names) are
    read, so that a bad value meant for the run command (say SIDECAR_LINGER_MS) does not
    stop them."""
    names = set(used)
    ignored = {o.env for o in OPTIONS if o.env and o.dest not in names}
    return build(values, {k: v for k, v in env.items() if k not in ignored}, ())
