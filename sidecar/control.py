"""The control channel ``run:{run_id}:control``: commands from the API to a running agent.

A command is one JSON object on that pub/sub channel::

    {"cmd": "cancel"}                          stop: SIGTERM, SIGKILL after --kill-grace
    {"cmd": "signal", "signal": "SIGUSR1"}     forward one allowed signal (name, any case, SIG optional)
    {"cmd": "pause"}  /  {"cmd": "resume"}     SIGSTOP / SIGCONT

Optional ``variation_id`` and ``agent_id`` address a subset of the run's agents: an agent
ignores a command naming another variation or agent (compared as strings).

With a control secret (``--control-secret-file`` / ``SIDECAR_CONTROL_SECRET``) every command
must also carry ``ts`` (Unix seconds) and ``sig``, the lowercase hex HMAC-SHA256 under the
secret of the object without ``sig``, serialised as Python's
``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` (keys sorted, no spaces, non-ASCII
escaped as ``\\uXXXX``). ``ts`` must be within 60 s of the agent's clock and a signature is
accepted once. :func:`sign` produces such an object.

Pub/sub keeps nothing: a command published while the sidecar is reconnecting is lost, so a
sender that must be sure watches the run's status stream for the effect and publishes again.
"""

from __future__ import annotations

import re
import signal as _signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace

from agent_wrapper.values import Frozen

from . import log
from .config import Settings
from .protocol import json_depth, json_unsafe
from .resp import Connection, ReplyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SKEW_S = 60.0
REPLAY_TTL_S = 120.0
REPLAY_MAX_ENTRIES = 10_000
COMMANDS = ("cancel", "signal", "pause", "resume")
ALLOWED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")
_FORBIDDEN_SIGNALS = {"SIGKILL": "cancel", "SIGSTOP": "pause"}
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

# With no traffic for this long, PING the server; no answer within the socket timeout: reconnect.
HEALTH_CHECK_S = 15.0
_STOP_JOIN_S = 2.0


class Command(Frozen):
    cmd: str  # cancel, signal, pause, resume
    signal: int | None  # the signal number for cmd "signal", else None
    raw: dict[str, Any]
    __slots__ = tuple(__annotations__)


class Rejection(Frozen):
    reason: str
    raw: dict[str, Any] | None  # the object, when the payload was one
    __slots__ = tuple(__annotations__)


def control_channel(settings: Settings) -> str:
    return f"run:{settings.run_key}:control"


class ReplayCache:
    """Signatures accepted recently; each is remembered ``ttl_s`` seconds, at most ``max_entries``.

    A signature is acceptable while its ``ts`` is within ``MAX_SKEW_S`` either way, so at
    most 2 * MAX_SKEW_S after it was first seen: that is the default ``ttl_s``.
    """

    def __init__(self, ttl_s: float = REPLAY_TTL_S, max_entries: int = REPLAY_MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # signature -> expiry, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, sig: object) -> bool:
        return sig in self._seen

    def add(self, sig: str, now: float) -> bool:
        """Remember ``sig``; False when it was already remembered (a replay)."""
        with self._lock:
            self._expire(now)
            if sig in self._seen:
                return False
            while len(self._seen) >= self.max_entries:
                self._seen.popitem(last=False)
            self._seen[sig] = now + self.ttl_s
            return True

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            sig, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[sig]


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes that are signed: the object without ``sig``, keys sorted, no spaces."""
    import json  # only with a control secret: start-up does without it

    body = {k: v for k, v in obj.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signature(obj: dict[str, Any], secret: bytes | str) -> str:
    """HMAC-SHA256 of ``obj``'s canonical form; a str secret is taken as its UTF-8 bytes."""
    import hashlib  # only with a control secret: OpenSSL's start-up is not paid without one
    import hmac

    if isinstance(secret, str):
        secret = secret.encode("utf-8", "surrogateescape")
    return hmac.new(secret, canonical(obj), hashlib.sha256).hexdigest()


def sign(obj: dict[str, Any], secret: bytes | str) -> dict[str, Any]:
    """``obj`` with ``sig`` added (any old ``sig`` replaced). Put ``ts`` in first: it is signed too.
    ``secret``: the secret file's bytes without its trailing newline (as the sidecar reads it),
    or the same as a str. ValueError for an object the sidecar would refuse whatever its
    signature: an integer beyond 64 bits, NaN or an infinity, nesting past MAX_DEPTH levels."""
    # the sidecar parses integers beyond 64 bits as floats and refuses NaN, infinities and
    # deep nesting: the signature it computes would never match
    reason = json_unsafe(obj, MAX_DEPTH)
    if reason is not None:
        raise ValueError(f"cannot sign this command: {reason}")
    signed = {k: v for k, v in obj.items() if k != "sig"}
    signed["sig"] = signature(signed, secret)
    return signed


# A shorter control secret is warned about: HMAC signatures on the channel let it be guessed offline.
MIN_SECRET_BYTES = 16


def insecure_warning(settings: Settings) -> str | None:
    """The warning to log once at start when control commands are not authenticated, or only
    with a short secret."""
    if settings.control_secret is not None:
        if len(settings.control_secret) < MIN_SECRET_BYTES:
            return (f"the control secret has fewer than {MIN_SECRET_BYTES} bytes: from one signed command seen on "
                    f"{control_channel(settings)} it can be guessed offline (use 32 random bytes, e.g. "
                    "`openssl rand -hex 32`)")
        return None
    return (
        f"control commands on {control_channel(settings)} are not authenticated: anyone who may publish "
        "there can cancel, pause or signal the agent (set --control-secret-file or SIDECAR_CONTROL_SECRET)"
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _addressed_elsewhere(obj: dict[str, Any], settings: Settings) -> bool:
    for key, ours in (("variation_id", settings.variation_id), ("agent_id", settings.agent_id)):
        value = obj.get(key)
        if value is not None and str(value) != str(ours):
            return True
    return False


def _authenticate(obj: dict[str, Any], secret: bytes, now: float, seen: ReplayCache, run_id: str) -> str | None:
    """None when authentic, fresh and signed for this run, else the reason to reject."""
    sig = obj.get("sig")
    if sig is None:
        return "missing signature"
    if not isinstance(sig, str) or not _HEX_SHA256.fullmatch(sig.lower()):
        return "bad signature"
    sig = sig.lower()
    import hmac

    if not hmac.compare_digest(sig, signature(obj, secret)):
        return "bad signature"
    ts = obj.get("ts")
    if ts is None:
        return "missing ts"
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "ts must be Unix seconds (a number)"
    if ts < now - MAX_SKEW_S:
        return f"stale command (ts {round(now - ts, 1)} s old, limit {MAX_SKEW_S:g} s)"
    if ts > now + MAX_SKEW_S:
        return f"ts in the future ({round(ts - now, 1)} s ahead, limit {MAX_SKEW_S:g} s)"
    # The secret is shared by every run: a command names its run, or it could be replayed on another.
    signed_for = obj.get("run_id")
    if signed_for is None:
        return "missing run_id (a signed command names its run)"
    if str(signed_for) != run_id:
        return f"signed for run {_short(str(signed_for))}, not this one"
    if not seen.add(sig, now):
        return "replayed command (signature already used)"
    return None


def _signal_number(value: Any) -> int | str:
    """The number of an allowed signal name, or the reason it is refused."""
    if value is None:
        return "missing signal"
    if isinstance(value, bool) or isinstance(value, int | float):
        return "signal must be a name such as SIGTERM, not a number"
    if not isinstance(value, str):
        return "signal must be a name such as SIGTERM"
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name in _FORBIDDEN_SIGNALS:
        return f"{name} is not allowed through cmd 'signal'; use cmd '{_FORBIDDEN_SIGNALS[name]}'"
    if name not in ALLOWED_SIGNALS:
        return f"signal {_short(value)} not allowed (allowed: {', '.join(ALLOWED_SIGNALS)})"
    return int(_signal.Signals[name])


# A command is a flat object; this leaves room for an API's own fields and stays far below
# what the signature check (json.dumps) and a status message (orjson) can encode.
MAX_DEPTH = 32


def parse(payload: bytes, *, settings: Settings, now: float, seen: ReplayCache) -> Command | Rejection | None:
    """One control message: a Command, a Rejection with a short reason, or None when it is a
    valid message addressed to another variation or agent. ``now`` is wall-clock Unix seconds."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejection(f"payload too large ({len(payload)} bytes, limit {MAX_PAYLOAD_BYTES})", None)
    import orjson  # at the first command: its import costs every start ~10 ms

    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson stops past 1024 levels
            return Rejection(f"nested deeper than {MAX_DEPTH} levels", None)
        return Rejection("malformed JSON", None)
    if not isinstance(obj, dict):
        return Rejection("not a JSON object", None)
    if json_depth(obj) > MAX_DEPTH:
        return Rejection(f"nested deeper than {MAX_DEPTH} levels", None)
    if _addressed_elsewhere(obj, settings):
        return None
    if settings.control_secret is not None:
        reason = _authenticate(obj, settings.control_secret, now, seen, settings.run_id)
        if reason is not None:
            return Rejection(reason, obj)
    cmd = obj.get("cmd")
    if cmd is None:
        return Rejection("missing cmd", obj)
    if not isinstance(cmd, str):
        return Rejection("cmd must be a string", obj)
    if cmd not in COMMANDS:
        return Rejection(f"unknown cmd {_short(cmd)} (known: {', '.join(COMMANDS)})", obj)
    if cmd == "signal":
        number = _signal_number(obj.get("signal"))
        if isinstance(number, str):
            return Rejection(number, obj)
        return Command(cmd, number, obj)
    if "signal" in obj:
        return Rejection(f"cmd {cmd!r} takes no signal", obj)
    return Command(cmd, None, obj)


def _backoff(max_s: float) -> Callable[[Any], float]:
    from tenacity import wait_exponential_jitter

    try:
        return wait_exponential_jitter(multiplier=0.1, max=max_s, jitter=0.2)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # older tenacity names the first wait `initial` (deprecated since)
        return wait_exponential_jitter(initial=0.1, max=max_s, jitter=0.2)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"


def _at(conn: Connection, addr: tuple[str, int]) -> Connection:
    """A new connection like ``conn`` (credentials, TLS, timeouts, name), to another server."""
    return Connection(conn.endpoint.replace(host=addr[0], port=addr[1]), socket_timeout=conn.socket_timeout,
                      connect_timeout=conn.connect_timeout, ssl_context=conn.ssl_context,
                      client_name=conn.client_name)


class Control:
    """Listens on the control channel from a daemon thread with its own connection.

    ``on_command`` / ``on_reject`` are called from that thread and must return quickly
    (queue the work for the main thread). The subscription is renewed after any connection
    loss, with exponential backoff and jitter capped at --retry-max-backoff; at once, with no
    backoff, when ``master_moved`` says the sentinels name another master (a failover: the old
    master keeps its subscribers until the sentinels demote it, seconds later, and commands
    published on the new one would reach no one meanwhile).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        connect: Callable[[], Connection],
        on_command: Callable[[Command], None],
        on_reject: Callable[[Rejection], None],
    ) -> None:
        self.settings = settings
        self.channel = control_channel(settings)
        self._connect = connect
        self.on_command = on_command
        self.on_reject = on_reject
        self.seen = ReplayCache()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._down_since: float | None = None
        self._moved_to: tuple[str, int] | None = None  # set by master_moved, read by the thread
        self._next: Connection | None = None  # the connection to try next, instead of connect()
        self.subscribed = threading.Event()  # set while subscribed (tests, diagnostics)
        self.subscriptions = 0  # successful SUBSCRIBEs, the first included

    def start(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the listener: at once when it is reading, within a connect timeout at worst."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        conn = self._conn
        if conn is not None:
            conn.interrupt()  # wake a blocked read now
        thread.join(_STOP_JOIN_S)

    def master_moved(self, addr: tuple[str, int]) -> None:
        """The sentinels name ``addr`` as the master now (any thread): a subscription on
        another server is given up and made again at once, on the master they name."""
        conn = self._conn
        if conn is None or (conn.endpoint.host, conn.endpoint.port) == addr:
            return  # connecting (it asks the sentinels), or there already
        self._moved_to = addr
        conn.interrupt()

    # -- thread --------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0  # consecutive failed attempts
        wait: Callable[[Any], float] | None = None
        while not self._stop.is_set():
            try:
                self._listen()
                return  # stopped
            except Exception as exc:  # OSError, ReplyError, or a bug: never out of the thread
                if self._stop.is_set():
                    return
                moved, self._moved_to = self._moved_to, None
                if moved is not None and self._conn is not None:
                    log.info("the sentinels name another master; moving the control subscription",
                             channel=self.channel, new=f"{moved[0]}:{moved[1]}")
                    self.subscribed.clear()
                    failures = 0
                    # straight to it: a sentinel asked now may not know of the failover yet
                    self._next = _at(self._conn, moved)
                    continue
                if self.subscribed.is_set():  # it worked until now: a fresh outage
                    failures = 0
                    self.subscribed.clear()
                failures += 1
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("control channel unavailable; resubscribing with backoff",
                                channel=self.channel, error=_describe(exc))
                if not isinstance(exc, OSError | ReplyError):
                    log.error("control listener error", error=repr(exc))
                if wait is None:
                    wait = _backoff(self.settings.retry_max_s)
                delay = wait(SimpleNamespace(attempt_number=failures))
            finally:
                self._drop()
            if self._stop.wait(delay):
                return

    def _listen(self) -> None:
        conn, self._next = self._next, None
        conn = self._conn = conn or self._connect()
        if self._stop.is_set():  # stop() came before there was a connection to interrupt
            return
        conn.connect()
        conn.send(("SUBSCRIBE", self.channel))
        last_rx = time.monotonic()
        ping_sent: float | None = None
        confirmed = False
        timeout_s = self.settings.socket_timeout_s
        while not self._stop.is_set():
            # The next check: a reply to PING or SUBSCRIBE overdue, or a health check due.
            # Until then wait for a message; stop() interrupts the read.
            if ping_sent is not None:
                due = ping_sent + timeout_s
            else:
                due = last_rx + (HEALTH_CHECK_S if confirmed else timeout_s)
            msg = conn.read(max(0.01, due - time.monotonic() + 0.01))
            now = time.monotonic()
            if msg is None:
                if now <= due:
                    continue
                if ping_sent is not None:
                    raise TimeoutError("no reply to PING on the control connection")
                if not confirmed:
                    raise TimeoutError("no reply to SUBSCRIBE")
                conn.send(("PING",))
                ping_sent = now
                continue
            last_rx = now
            ping_sent = None
            if isinstance(msg, ReplyError):
                raise msg
            if not isinstance(msg, list) or not msg:
                continue
            kind = msg[0]
            if kind == b"subscribe":
                if not confirmed:
                    confirmed = True
                    self._on_subscribed()
            elif kind == b"message" and len(msg) >= 3:
                self._dispatch(msg[2])

    def _on_subscribed(self) -> None:
        self.subscriptions += 1
        self.subscribed.set()
        if self._down_since is not None:
            log.info("control channel subscribed again", channel=self.channel,
                     after_s=round(time.time() - self._down_since, 3))
            self._down_since = None
        else:
            log.debug("listening for control commands", channel=self.channel)

    def _dispatch(self, data: Any) -> None:
        if not isinstance(data, bytes):
            data = str(data).encode()
        try:
            result = parse(data, settings=self.settings, now=time.time(), seen=self.seen)
            if isinstance(result, Command):
                self.on_command(result)
            elif isinstance(result, Rejection):
                self.on_reject(result)
        except Exception as exc:
            log.error("control command handling failed", error=repr(exc))

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
