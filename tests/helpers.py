"""Running ``python -m sidecar`` (or any command) from tests without leaking processes or env.

Every child starts in its own session, so its process group (the sidecar plus the agent it
spawns) can be killed as a whole at teardown.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from tests import process_registry

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a runtime dependency of the project
    psutil = None

REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables the sidecar reads from the environment; a developer's shell must not leak them in.
SCRUBBED_ENV_VARS = ("REDIS_URL", "RUN_ID", "VARIATION_ID", "AGENT_ID", "REDIS_PASSWORD")

_DRAIN_TIMEOUT = 10.0
_output_counter = itertools.count(1)

T = TypeVar("T")


# One spool directory for the sidecars of this test session (unless a test names its own):
# leftovers of another session, or of other users of the machine, must not be adopted.
_SESSION_SPOOL = tempfile.mkdtemp(prefix="agent-sidecar-test-spool-")
atexit.register(shutil.rmtree, _SESSION_SPOOL, True)


def child_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` minus :data:`SCRUBBED_ENV_VARS`, plus ``env`` (a ``None`` value removes a key),
    with a spool directory of this test session."""
    result = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV_VARS}
    result["SIDECAR_SPOOL_DIR"] = _SESSION_SPOOL
    for key, value in (env or {}).items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def sidecar_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``, its process group and every descendant still attached, then reap ``proc``."""
    descendants = []
    if psutil is not None and proc.poll() is None:
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
    try:
        # start_new_session=True made the pgid equal to the child's pid.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        # psutil checks the creation time, so a recycled pid is never hit.
        try:
            child.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _close_pipes(proc: subprocess.Popen[Any]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class _RunGuard:
    """Registry entry for a :func:`run_process` child, in case the test is interrupted mid-run."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def cleanup(self) -> None:
        kill_tree(self.proc)
        _close_pipes(self.proc)


def run_process(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 60,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] = REPO_ROOT,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to completion with stdout/stderr captured.

    On timeout the whole process tree is killed and :class:`subprocess.TimeoutExpired` is raised
    carrying the output so far. Whatever the child left behind in its process group is killed
    when it returns.
    """
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=child_env(env),
        start_new_session=True,
    )
    guard = _RunGuard(proc)
    process_registry.register(guard)
    try:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            try:
                out, err = proc.communicate(timeout=_DRAIN_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Some process outside the group still holds the pipes open.
                out, err = b"", b""
            raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    finally:
        guard.cleanup()
        process_registry.unregister(guard)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_sidecar(
    args: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 60,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] = REPO_ROOT,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m sidecar ARGS`` to completion; see :func:`run_process`."""
    return run_process(sidecar_command(args), env=env, timeout=timeout, input=input, cwd=cwd)


class ManagedProcess(subprocess.Popen[bytes]):
    """A ``Popen`` whose stdout/stderr go to files, so a chatty child can never block on a full pipe.

    Read the output at any time with :meth:`read_stdout` / :meth:`read_stderr`. Registered for
    teardown: :meth:`cleanup` kills the whole tree. Used as a context manager it is cleaned up
    on exit (unlike plain ``Popen``, which would wait forever for a child that does not exit).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] = REPO_ROOT,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        output_dir: str | os.PathLike[str] | None = None,
        name: str = "proc",
    ) -> None:
        self._own_dir: Path | None = None
        if output_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="sidecar-test-"))
            output_dir = self._own_dir
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n = next(_output_counter)
        self.stdout_path = out_dir / f"{name}-{n}.stdout"
        self.stderr_path = out_dir / f"{name}-{n}.stderr"
        try:
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                super().__init__(
                    list(cmd),
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    env=child_env(env),
                    start_new_session=True,
                )
        except BaseException:
            self._remove_own_dir()
            raise
        process_registry.register(self)

    def read_stdout(self) -> bytes:
        return self.stdout_path.read_bytes()

    def read_stderr(self) -> bytes:
        return self.stderr_path.read_bytes()

    def wait_for_output(self, needle: bytes | str, *, stream: str = "stderr", timeout: float = 10.0) -> bytes:
        """Block until ``needle`` appears in ``stream`` ("stdout" or "stderr"); return that stream."""
        if isinstance(needle, str):
            needle = needle.encode()
        read = {"stdout": self.read_stdout, "stderr": self.read_stderr}[stream]
        deadline = time.monotonic() + timeout
        while True:
            data = read()
            if needle in data:
                return data
            if self.poll() is not None:
                data = read()
                if needle in data:
                    return data
                raise AssertionError(
                    f"process exited with {self.returncode} before {needle!r} appeared on {stream}\n"
                    + self.describe_output()
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{needle!r} did not appear on {stream} within {timeout}s\n" + self.describe_output()
                )
            time.sleep(0.02)

    def finish(self, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Close stdin, wait for exit and return the result; on timeout kill the tree and raise."""
        if self.stdin is not None and not self.stdin.closed:
            try:
                self.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self)
            raise subprocess.TimeoutExpired(
                self.args, timeout, output=self.read_stdout(), stderr=self.read_stderr()
            ) from None
        return subprocess.CompletedProcess(self.args, self.returncode, self.read_stdout(), self.read_stderr())

    def kill_tree(self) -> None:
        kill_tree(self)

    def describe_output(self, limit: int = 4000) -> str:
        out, err = self.read_stdout(), self.read_stderr()
        return (
            f"--- stdout ({len(out)} bytes, tail) ---\n{out[-limit:].decode(errors='replace')}\n"
            f"--- stderr ({len(err)} bytes, tail) ---\n{err[-limit:].decode(errors='replace')}"
        )

    def cleanup(self) -> None:
        """Kill whatever is left of the tree, reap, close stdin. Idempotent."""
        try:
            kill_tree(self)
            if self.stdin is not None:
                try:
                    self.stdin.close()
                except OSError:
                    pass
        finally:
            process_registry.unregister(self)
            self._remove_own_dir()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _remove_own_dir(self) -> None:
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None


def start_process(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] = REPO_ROOT,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    output_dir: str | os.PathLike[str] | None = None,
) -> ManagedProcess:
    return ManagedProcess(cmd, env=env, cwd=cwd, stdin=stdin, output_dir=output_dir)


def start_sidecar(
    args: Sequence[str],
    env: Mapping[str, str | None] | None = None,
    *,
    cwd: str | os.PathLike[str] = REPO_ROOT,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    output_dir: str | os.PathLike[str] | None = None,
) -> ManagedProcess:
    """Start ``python -m sidecar ARGS`` in the background; pass ``stdin=subprocess.PIPE`` to feed it."""
    return ManagedProcess(
        sidecar_command(args), env=env, cwd=cwd, stdin=stdin, output_dir=output_dir, name="sidecar"
    )


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (which is returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)
