"""Reading the agent's stdout and stderr concurrently, in one thread, with no waiting on consumers."""

from __future__ import annotations

import math
import os
import select
import stat
import threading
import time
from collections.abc import Callable

from .events import STDERR, STDOUT, Output, StreamClosed
from .lines import DEFAULT_MAX_LINE_BYTES, LineSplitter, Segment

READ_SIZE = 1 << 16
# Pipes silent this long: what a filter holds back (the start of a possible secret) goes out.
# Long enough that a secret written in two parts a moment apart is still seen whole.
RELEASE_AFTER_S = 1.0
# An agent writing in many small pieces (unbuffered print: one write() per argument and
# separator) wakes a waiting reader on every write, and each wake-up costs the agent's write
# as much as the write itself. After BUSY_READS reads within BUSY_WINDOW_S the reader stops
# waiting on the pipes and reads every GATHER_S instead, for as long as each look finds more;
# the agent's writes then gather in the pipe without waking anyone. A line streamed on its
# own (an LLM's tokens: a few writes per line, lines milliseconds apart) is never held back.
BUSY_WINDOW_S = 0.005
BUSY_READS = 10
GATHER_S = 0.001
# The longest single wait on the pipes: poll() takes a C int of milliseconds, and a deadline
# may lie years ahead (--pipe-grace).
MAX_WAIT_MS = 86_400_000
Sink = Callable[[Output | StreamClosed], None]
Quiet = Callable[[bool], None]
Filter = Callable[[str, bytes, bool], bytes]


class PipeReader:
    """Polls both pipes, splits what arrives into records and hands them to ``sink``.

    ``sink`` is called from the reader thread; it may block (back-pressure), in which case
    the agent blocks on its next write once the pipe buffer is full. ``on_quiet(True)`` is
    called whenever reads drained the pipes, so a consumer can ship a lone line at once, and
    ``on_quiet(False)`` when more is known to be waiting.
    ``echo`` maps a stream name to a file descriptor that receives the bytes unchanged
    (after ``filter``, if any). ``filter(stream, chunk, final)`` may rewrite bytes before
    splitting, and may hold some back until the next call (for example a redactor that
    must see across read boundaries). ``count_lf`` counts the LFs of a run of lines, as
    ``bytes.count`` does (see LineSplitter).
    ``lone(stream, data, ts)`` may take the records of a read that ends a quiet spell (one
    stream ready, a short read, not a burst being gathered) when they are whole lines with
    nothing of the stream held in the splitter: it returns True when it took them, standing
    for the sink's Output and ``on_quiet(True)``; False leaves them to the usual way.
    """

    def __init__(
        self,
        fds: dict[str, int],
        sink: Sink,
        *,
        on_quiet: Quiet | None = None,
        echo: dict[str, int] | None = None,
        filter: Filter | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        count_lf: Callable[[bytes], int] | None = None,
        lone: Callable[[str, bytes, float], bool] | None = None,
    ) -> None:
        self._fds = dict(fds)
        self._lone = lone
        self._sink = sink
        self._on_quiet = on_quiet
        self._echo = echo or {}
        self._filter = filter
        self._splitters = {name: LineSplitter(max_line_bytes, count_lf) for name in fds}
        self._deadline: float | None = None
        self._finish_closed = True
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.echo_dropped = 0  # echo bytes the sidecar's own stdout/stderr did not take
        self.echo_closed: list[str] = []  # streams whose echo failed for good (its reader went away)
        self._made_nonblocking = [fd for fd in set(self._echo.values()) if _nonblocking(fd)]
        # Written to by stop_after: the reader waits on the pipes with no timeout while nothing
        # is due, and must see a new deadline at once. Closed (-1) when the reader ends.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self.run, name="pipe-reader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop_after(self, grace_s: float, *, finish_closed: bool = True) -> None:
        """Stop reading ``grace_s`` from now a pipe that some process still holds open for
        writing (a grandchild of the agent). A pipe whose writers are all gone is read to its
        end whenever that comes (what it holds is finite: the reader may have been held up by
        back-pressure), unless ``finish_closed`` is False."""
        with self._lock:
            self._deadline = time.monotonic() + grace_s
            self._finish_closed = finish_closed
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:  # full (BlockingIOError): a wake-up is pending already
                    pass

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def run(self) -> None:
        poller = select.poll()
        by_fd: dict[int, str] = {}
        for name, fd in self._fds.items():
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            by_fd[fd] = name
        wake = self._wake_r
        poller.register(wake, select.POLLIN)
        last_data = time.monotonic()
        window_start, window_reads = last_data, 0
        gathering = False
        # Whether what a filter holds back went out since the last data (RELEASE_AFTER_S).
        released = self._filter is None
        try:
            while by_fd:
                with self._lock:
                    deadline = self._deadline
                    finish_closed = self._finish_closed
                if deadline is not None and time.monotonic() >= deadline:
                    # checked on every round: a grandchild that never stops writing must not
                    # keep the sidecar reading past --pipe-grace
                    for fd, name in list(by_fd.items()):
                        if not (finish_closed and _writers_gone(fd)):
                            self._close(poller, by_fd, fd, name, forced=True)
                    if not by_fd:
                        continue
                ready = poller.poll(0 if gathering else _wait_ms(deadline, None if released else last_data))
                if len(ready) > 1 or ready and ready[0][0] == wake:
                    ready = _without(ready, wake)
                    if not ready:
                        continue  # stop_after: look at the deadline
                if not ready:
                    if gathering:  # the burst is over: what was read goes out now
                        gathering = False
                        if self._on_quiet is not None:
                            self._on_quiet(True)
                    elif not released and time.monotonic() - last_data >= RELEASE_AFTER_S:
                        released = True
                        self._release_held(by_fd)
                    continue
                last_data = time.monotonic()
                released = self._filter is None
                if last_data - window_start > BUSY_WINDOW_S:
                    window_start, window_reads = last_data, 0
                window_reads += 1
                quiet = True
                closed = False
                # A read that may end a quiet spell: quiet, and no pause, follow if it is short
                lone = self._lone is not None and len(ready) == 1 and not gathering and window_reads < BUSY_READS
                for fd, _ev in ready:
                    name = by_fd.get(fd)
                    if name is None:
                        continue
                    try:
                        chunk = os.read(fd, READ_SIZE)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        self._close(poller, by_fd, fd, name, forced=False)
                        closed = True
                        continue
                    if len(chunk) == READ_SIZE:
                        quiet = lone = False
                    if self._handle(name, chunk, time.time(), lone):
                        quiet = None  # taken by lone: on_quiet(True) is not called
                # A stream that just closed handed on its last bytes: report quiet at once.
                pause = quiet and not closed and (gathering or window_reads >= BUSY_READS)
                if pause:
                    gathering = True
                    quiet = False  # more is on its way: look again after GATHER_S
                if self._on_quiet is not None and quiet is not None:
                    self._on_quiet(quiet)
                if pause and by_fd:
                    time.sleep(GATHER_S)
        finally:
            for fd in list(by_fd):
                os.close(fd)
            with self._lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            for fd in self._made_nonblocking:
                try:
                    os.set_blocking(fd, True)
                except OSError:
                    pass

    def _handle(self, name: str, chunk: bytes, ts: float, lone: bool = False) -> bool:
        """True when ``lone`` (see run) took the records."""
        self.bytes_read += len(chunk)
        if self._filter is not None:
            chunk = self._filter(name, chunk, False)
        return self._pass_on(name, chunk, ts, lone)

    def _pass_on(self, name: str, chunk: bytes, ts: float, lone: bool = False) -> bool:
        """Filtered bytes: to the echo, then split into records for the sink, or to ``lone``
        when it may take them and does."""
        if not chunk:
            return False
        echo_fd = self._echo.get(name)
        if echo_fd is not None:
            try:
                self.echo_dropped += _write_all(echo_fd, chunk)
            except EchoClosed as exc:  # no more echo for this stream; the capture goes on
                self.echo_dropped += exc.dropped
                self.echo_closed.append(name)
                del self._echo[name]
        splitter = self._splitters[name]
        if (lone and chunk[-1:] == b"\n" and not splitter._pending and len(chunk) <= splitter.max_line_bytes
                and self._lone(name, chunk, ts)):  # type: ignore[misc]
            return True
        self._emit(name, ts, splitter.feed(chunk))
        return False

    def _release(self, name: str, ts: float) -> None:
        """What the filter holds back for ``name`` goes out now."""
        if self._filter is not None:
            self._pass_on(name, self._filter(name, b"", True), ts)

    def _release_held(self, by_fd: dict[int, str]) -> None:
        """The pipes were quiet for RELEASE_AFTER_S."""
        for name in by_fd.values():
            self._release(name, time.time())

    def _emit(self, name: str, ts: float, segments: list[Segment]) -> None:
        if len(segments) == 1:
            data, count, _p = segments[0]
            self._sink(Output(name, ts, segments, count, len(data)))
        elif segments:
            self._sink(Output(name, ts, segments, sum(s[1] for s in segments), sum(len(s[0]) for s in segments)))

    def _close(self, poller: select.poll, by_fd: dict[int, str], fd: int, name: str, *, forced: bool) -> None:
        poller.unregister(fd)
        del by_fd[fd]
        unread = _pending(fd) if forced else 0
        os.close(fd)
        ts = time.time()
        self._release(name, ts)
        self._emit(name, ts, self._splitters[name].flush())
        self._sink(StreamClosed(name, forced, unread))


def _wait_ms(deadline: float | None, unreleased_since: float | None) -> int:
    """How long the reader may wait on the pipes (poll's timeout, -1: until something
    happens): until ``deadline`` (stop_after), or until what a filter holds back is due to go
    out (RELEASE_AFTER_S after the last data at ``unreleased_since``). Past the deadline
    what is left are pipes without writers, read to their end: a short timeout suffices."""
    now = time.monotonic()
    left = None if unreleased_since is None else unreleased_since + RELEASE_AFTER_S - now
    if deadline is not None:
        after_deadline = deadline - now if deadline > now else 0.1
        left = after_deadline if left is None else min(left, after_deadline)
    if left is None:
        return -1
    if left <= 0:
        return 0
    return min(math.ceil(left * 1000), MAX_WAIT_MS)


def _without(ready: list[tuple[int, int]], wake: int) -> list[tuple[int, int]]:
    """``ready`` without the wake-up pipe, which is emptied if it was among them."""
    rest = [r for r in ready if r[0] != wake]
    if len(rest) != len(ready):
        try:
            while os.read(wake, 64):
                pass
        except OSError:  # BlockingIOError: empty
            pass
    return rest


def _writers_gone(fd: int) -> bool:
    """Whether no process holds the pipe open for writing any more (POLLHUP): what it still
    holds is all there will be."""
    probe = select.poll()
    probe.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _fd, events in probe.poll(0))


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD); 0 where that cannot be asked. Imports here: only
    a forced close needs them, start-up does not."""
    import fcntl
    import struct
    import termios

    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class EchoClosed(Exception):
    """The echo's descriptor failed for good (EPIPE: its reader went away; EBADF, EIO)."""

    def __init__(self, dropped: int) -> None:
        super().__init__(dropped)
        self.dropped = dropped


def _write_all(fd: int, data: bytes) -> int:
    """Echo ``data`` to ``fd`` (made non-blocking by the reader); returns the bytes dropped.

    Whoever reads the sidecar's own stdout/stderr (a container runtime, a terminal, a pipe)
    must never hold up the capture: what the descriptor does not take at once is dropped
    from the echo. The records shipped to Redis are complete either way. A descriptor that
    fails otherwise (its reader gone) raises EchoClosed."""
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BlockingIOError:
        return len(view)
    except OSError:
        # The container's own stdout going away must not stop the capture.
        raise EchoClosed(len(view)) from None
    return 0


def _nonblocking(fd: int) -> bool:
    """Pipes and sockets (what a container runtime gives) only: a terminal shares its open file
    with the shell, which must not find it non-blocking afterwards."""
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) or not os.get_blocking(fd):
            return False
        os.set_blocking(fd, False)
        return True
    except OSError:
        return False


def default_streams(stdout_fd: int, stderr_fd: int) -> dict[str, int]:
    return {STDOUT: stdout_fd, STDERR: stderr_fd}
