"""A real ``redis-server`` process owned by a test: own port, own directory, signals on demand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests import process_registry

REDIS_SERVER_BIN = os.environ.get("SIDECAR_TEST_REDIS_SERVER") or "redis-server"
DEFAULT_START_TIMEOUT = 15.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# Attempts with a fresh port when an auto-picked port is taken between probe and bind.
_PORT_RETRIES = 3


def find_free_port(host: str = "127.0.0.1") -> int:
    """A loopback port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which(REDIS_SERVER_BIN)


class RedisServerError(RuntimeError):
    pass


def _no_retry() -> Retry:
    # redis-py retries with backoff by default, which turns a 0.5 s timeout into seconds.
    return Retry(NoBackoff(), 0)


class RedisServer:
    """One ``redis-server`` bound to 127.0.0.1 with data in ``tmp_dir``.

    Snapshots are disabled; pass ``extra_args=("--appendonly", "yes", "--appendfsync", "always")``
    for durability across :meth:`kill` / :meth:`restart`.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.dir = Path(tmp_dir)
        self._fixed_port = port is not None
        self._port = port if port is not None else find_free_port(self.host)
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self._stopped = False

    # -- addressing ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def stdout_path(self) -> Path:
        return self.dir / "redis.stdout"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """The process exists (it may be SIGSTOPped)."""
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError(f"{REDIS_SERVER_BIN!r} not found on PATH")
        return [
            binary,
            "--port", str(self._port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> RedisServer:
        """Spawn the server and block until PING answers (at most ``timeout`` seconds)."""
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self._port}")
        self.dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else _PORT_RETRIES
        for attempt in range(attempts):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except RedisServerError:
                log = self.log_tail()
                self._reap()
                if attempt + 1 < attempts and "Address already in use" in log:
                    self._port = find_free_port(self.host)
                    continue
                raise
        raise AssertionError("unreachable")

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> RedisServer:
        """Start again on the same port and directory, so an AOF written before is reloaded."""
        if self.running:
            self._terminate(DEFAULT_SHUTDOWN_TIMEOUT)
        self._fixed_port = True
        return self.start(timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is flushed beyond what fsync already wrote."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    def stop(self) -> None:
        """SIGSTOP: the port still accepts TCP connections but nothing is answered."""
        self._signal(signal.SIGSTOP)
        self._stopped = True

    def cont(self) -> None:
        self._signal(signal.SIGCONT)
        self._stopped = False

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Terminate cleanly (SIGTERM, SIGKILL after ``timeout``) and close our clients. Idempotent."""
        self.close_clients()
        self._terminate(timeout)

    # Name used by the process registry.
    cleanup = shutdown

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- clients ---------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` on this server (bytes replies); closed by :meth:`shutdown`."""
        kwargs.setdefault("decode_responses", False)
        client = redis.Redis(host=self.host, port=self._port, db=0, **kwargs)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:
                pass

    def ping(self, timeout: float = 1.0) -> bool:
        probe = redis.Redis(
            host=self.host,
            port=self._port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=_no_retry(),
        )
        try:
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            probe.close()

    # -- diagnostics -----------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.stdout_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if text.strip():
                parts.append(f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no redis output)"

    def __repr__(self) -> str:
        state = "running" if self.running else "down"
        return f"RedisServer(port={self._port}, dir={str(self.dir)!r}, {state})"

    # -- internals -------------------------------------------------------------------------

    def _spawn(self) -> None:
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self._stopped = False
        process_registry.register(self)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server on port {self._port} exited with code {self.proc.returncode} "
                    f"during startup\n{self.log_tail()}"
                )
            if self.ping(timeout=0.5):
                return
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"redis-server on port {self._port} did not answer PING within {timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise RedisServerError(f"redis-server on port {self._port} is not running")
        assert self.proc is not None
        self.proc.send_signal(sig)

    def _terminate(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._stopped:
                # A stopped process only acts on SIGTERM once it is continued.
                proc.send_signal(signal.SIGCONT)
                self._stopped = False
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._stopped:
                proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()
        self._stopped = False
        process_registry.unregister(self)
