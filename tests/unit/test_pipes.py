"""PipeReader on real pipes: what it hands on, and when it says the pipes are quiet."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent_wrapper import pipes
from agent_wrapper.events import Output, StreamClosed
from agent_wrapper.pipes import PipeReader


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []  # Output, StreamClosed, or ("quiet", bool)
        self.closed = threading.Event()

    def sink(self, ev: Output | StreamClosed) -> None:
        self.events.append(ev)
        if isinstance(ev, StreamClosed):
            self.closed.set()

    def on_quiet(self, quiet: bool) -> None:
        self.events.append(("quiet", quiet))

    def data(self) -> bytes:
        return b"".join(seg[0] for ev in self.events if isinstance(ev, Output) for seg in ev.segments)

    def reads(self) -> int:
        return sum(isinstance(ev, Output) for ev in self.events)


def eventually(done: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether ``done()`` came true within ``seconds`` (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def open_reader(**kwargs: Any) -> tuple[Recorder, PipeReader, int]:
    """A started PipeReader on a new pipe whose write end (returned) the test holds open."""
    rec = Recorder()
    r, w = os.pipe()
    reader = PipeReader({"stdout": r}, rec.sink, on_quiet=rec.on_quiet, **kwargs)
    reader.start()
    return rec, reader, w


def read_child(code: str) -> Recorder:
    """Runs ``code`` in a child whose stdout is a pipe that a PipeReader reads to the end."""
    rec = Recorder()
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=w)
    os.close(w)
    reader = PipeReader({"stdout": r}, rec.sink, on_quiet=rec.on_quiet)
    reader.start()
    assert child.wait(timeout=60) == 0
    assert reader.join(30)
    return rec


def test_a_burst_of_small_writes_is_read_in_a_few_gulps_whole_and_in_order() -> None:
    n = 20_000
    # Two writes per line, back to back: an unbuffered print("line", i).
    rec = read_child(f"import os\nfor i in range({n}):\n    os.write(1, b'line ')\n    os.write(1, b'%d\\n' % i)\n")
    expected = b"".join(b"line %d\n" % i for i in range(n))
    assert rec.data() == expected
    assert sum(ev.records for ev in rec.events if isinstance(ev, Output)) == n
    # Woken by every write, a reader takes thousands of reads for this; gathering, the
    # reads are GATHER_S apart once the burst is seen.
    assert rec.reads() < n // 20, rec.reads()


def test_the_end_of_a_burst_is_reported_quiet() -> None:
    rec = read_child("import os, time\nfor i in range(5000):\n    os.write(1, b'x%d\\n' % i)\ntime.sleep(0.3)\n")
    outputs = [i for i, ev in enumerate(rec.events) if isinstance(ev, Output)]
    after_last = rec.events[outputs[-1] + 1:]
    assert ("quiet", True) in after_last, after_last[:3]


def test_a_stream_that_closes_during_a_burst_is_reported_quiet() -> None:
    """The agent exits in the middle of a burst: what the reader hands on last (the end of
    the stream) is followed by quiet=True, not left for the linger."""
    for _ in range(3):
        rec = read_child("import os\nfor i in range(20000):\n    os.write(1, b'x%d\\n' % i)\nos._exit(0)\n")
        assert rec.data().count(b"\n") == 20000
        flags = [ev for ev in rec.events if isinstance(ev, tuple)]
        assert flags[-1] == ("quiet", True), rec.events[-4:]


@pytest.mark.parametrize("pieces", [1, 3])
def test_lines_written_apart_are_each_reported_quiet_at_once(pieces: int) -> None:
    """An LLM's stream: a few writes per line, lines milliseconds apart. Every line is
    followed by quiet=True as soon as it is read: nothing is held back to gather more."""
    code = ("import os, time\n"
            "for i in range(20):\n"
            f"    for p in range({pieces}):\n"
            "        os.write(1, b'tok%d ' % p)\n"
            "    os.write(1, b'\\n')\n"
            "    time.sleep(0.02)\n")
    rec = read_child(code)
    assert rec.data().count(b"\n") == 20
    quiet_flags = [ev[1] for ev in rec.events if isinstance(ev, tuple)]
    assert False not in quiet_flags, rec.events[:12]


def test_gathering_starts_only_above_the_busy_rate() -> None:
    assert pipes.BUSY_READS / pipes.BUSY_WINDOW_S >= 1000  # reads per second
    assert pipes.GATHER_S <= 0.002


def test_gathering_adds_at_most_a_few_gather_periods_to_a_line_at_the_end_of_a_burst() -> None:
    """The last line of a burst is handed on and reported quiet within a few GATHER_S of
    being written (not after the batcher's linger)."""
    rec = Recorder()
    r, w = os.pipe()
    reader = PipeReader({"stdout": r}, rec.sink, on_quiet=rec.on_quiet)
    reader.start()
    try:
        for i in range(3000):
            os.write(w, b"b%d\n" % i)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.write(w, b"last\n")
        deadline = t0 + 5
        while time.monotonic() < deadline:
            evs = list(rec.events)
            if evs and evs[-1] == ("quiet", True) and b"last\n" in rec.data():
                break
            time.sleep(0.0005)
        waited = time.monotonic() - t0
    finally:
        os.close(w)
        reader.join(10)
    assert rec.data().endswith(b"last\n")
    assert waited < 1.0, waited  # generous: only a reader that waited for a timeout would fail


def test_stop_after_wakes_a_reader_waiting_on_a_silent_pipe() -> None:
    # The writer stays open and writes nothing: the reader waits on the pipe with no timeout,
    # and only the wake-up of stop_after lets it see its deadline.
    rec, reader, w = open_reader()
    try:
        os.write(w, b"first\n")
        assert eventually(lambda: rec.data() == b"first\n")
        time.sleep(0.3)
        reader.stop_after(0)
        assert reader.join(10), "the reader did not notice stop_after"
        assert rec.closed.is_set()
        closed = [ev for ev in rec.events if isinstance(ev, StreamClosed)]
        assert [(ev.stream, ev.forced) for ev in closed] == [("stdout", True)]
    finally:
        os.close(w)
    reader.stop_after(0)  # after the reader ended: its wake-up pipe is gone, nothing is written


def test_what_a_filter_holds_back_goes_out_once_the_pipes_are_quiet() -> None:
    # A filter holding back what follows the last newline (as the redactor holds the start
    # of a possible secret) is asked for it once after RELEASE_AFTER_S of silence, not again
    # and again while the pipe stays silent.
    finals: list[float] = []
    held: dict[str, bytes] = {}

    def holding_filter(stream: str, chunk: bytes, final: bool) -> bytes:
        data = held.pop(stream, b"") + chunk
        if final:
            finals.append(time.monotonic())
            return data
        cut = data.rfind(b"\n") + 1
        held[stream] = data[cut:]
        return data[:cut]

    rec, reader, w = open_reader(filter=holding_filter)
    try:
        os.write(w, b"whole\npart")
        written = time.monotonic()
        assert eventually(lambda: bool(finals))
        assert finals[0] - written >= pipes.RELEASE_AFTER_S * 0.9
        assert rec.data() == b"whole\n"  # the released "part" waits in the splitter for its newline
        time.sleep(pipes.RELEASE_AFTER_S * 1.5)
        assert len(finals) == 1
        os.write(w, b"more\n")  # new data: the next quiet spell releases again
        assert eventually(lambda: len(finals) == 2)
    finally:
        os.close(w)
    assert reader.join(10)
    assert rec.data() == b"whole\npartmore\n"


def test_a_deadline_years_ahead_is_waited_for_in_pieces() -> None:
    # --pipe-grace takes up to ~3 years; poll() takes at most ~24 days of milliseconds.
    rec, reader, w = open_reader()
    try:
        reader.stop_after(30 * 86400.0)
        time.sleep(0.2)
        assert reader.thread.is_alive()
        os.write(w, b"still read\n")
        assert eventually(lambda: rec.data() == b"still read\n")
        reader.stop_after(0)
        assert reader.join(10)
    finally:
        os.close(w)


# -- lone: a short read that ends a quiet spell, taken whole by the consumer ------------------

class LoneRecorder(Recorder):
    def __init__(self, accept: bool) -> None:
        super().__init__()
        self.accept = accept

    def lone(self, name: str, data: bytes, ts: float) -> bool:
        assert name == "stdout" and ts > 0
        self.events.append(("lone", data))
        return self.accept

    def all_data(self) -> bytes:
        """What went to the sink and what lone took, in the order it was handed on."""
        out = []
        for ev in self.events:
            if isinstance(ev, Output):
                out.extend(seg[0] for seg in ev.segments)
            elif isinstance(ev, tuple) and ev[0] == "lone" and self.accept:
                out.append(ev[1])
        return b"".join(out)


def read_child_lone(code: str, accept: bool) -> LoneRecorder:
    rec = LoneRecorder(accept)
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=w)
    os.close(w)
    reader = PipeReader({"stdout": r}, rec.sink, on_quiet=rec.on_quiet, lone=rec.lone)
    reader.start()
    assert child.wait(timeout=60) == 0
    assert reader.join(30)
    return rec


STREAMED = ("import os, time\n"
            "for i in range(20):\n"
            "    os.write(1, b'token %d of the answer\\n' % i)\n"
            "    time.sleep(0.02)\n")


def test_lines_written_apart_are_each_taken_whole_by_lone() -> None:
    rec = read_child_lone(STREAMED, accept=True)
    expected = b"".join(b"token %d of the answer\n" % i for i in range(20))
    taken = [ev[1] for ev in rec.events if isinstance(ev, tuple) and ev[0] == "lone"]
    assert b"".join(taken) == expected and all(t.endswith(b"\n") for t in taken)
    assert rec.reads() == 0  # nothing went to the sink: lone took every read
    end = next(i for i, ev in enumerate(rec.events) if isinstance(ev, StreamClosed))
    assert ("quiet", True) not in rec.events[:end]  # lone stands for on_quiet(True), until the end


def test_what_lone_declines_goes_the_usual_way() -> None:
    rec = read_child_lone(STREAMED, accept=False)
    assert rec.all_data() == rec.data() == b"".join(b"token %d of the answer\n" % i for i in range(20))
    offered = [ev for ev in rec.events if isinstance(ev, tuple) and ev[0] == "lone"]
    assert len(offered) == rec.reads()  # each read was offered, then handed on
    quiet_after = [rec.events[i + 2] for i, ev in enumerate(rec.events[:-2])
                   if isinstance(ev, tuple) and ev[0] == "lone"]
    assert quiet_after == [("quiet", True)] * len(offered)  # offered, handed to the sink, reported quiet


def test_a_line_in_pieces_and_a_burst_keep_their_bytes_and_order() -> None:
    """A read without a line end is never offered (its rest would follow in another read);
    nor is a read of a burst being gathered. Whatever lone took and the sink got, in order,
    is the agent's output."""
    code = ("import os, time\n"
            "for i in range(10):\n"
            "    os.write(1, b'part of line %d, ' % i)\n"
            "    time.sleep(0.01)\n"
            "    os.write(1, b'its end\\n')\n"
            "    time.sleep(0.01)\n"
            "for i in range(20000):\n"
            "    os.write(1, b'x%d\\n' % i)\n")
    rec = read_child_lone(code, accept=True)
    expected = b"".join(b"part of line %d, its end\n" % i for i in range(10)) + \
        b"".join(b"x%d\n" % i for i in range(20000))
    assert rec.all_data() == expected
    offered = [ev[1] for ev in rec.events if isinstance(ev, tuple) and ev[0] == "lone"]
    assert all(d.endswith(b"\n") and not d.startswith(b"its end") for d in offered)
    assert rec.reads() > 0  # the pieces and the burst went to the sink
