"""The typed events that are the only link between the wrapper and whatever ships output."""

from __future__ import annotations

from .values import Frozen, Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .lines import Segment

STDOUT = "stdout"
STDERR = "stderr"


class Started(Frozen):
    __slots__ = ("pid", "ts")
    pid: int
    ts: float


class Output(Value):
    """Records of one stream read in one go: ``ts`` is the capture time of the read.

    ``segments`` are runs of records as LineSplitter returns them (see lines.Segment).
    """

    __slots__ = ("stream", "ts", "segments", "records", "nbytes")

    def __init__(self, stream: str, ts: float, segments: list[Segment], records: int, nbytes: int) -> None:
        self.stream = stream
        self.ts = ts
        self.segments = segments
        self.records = records
        self.nbytes = nbytes


class StreamClosed(Frozen):
    __slots__ = ("stream", "forced")
    stream: str
    forced: bool  # reading stopped after --pipe-grace although the pipe was still open


class Exited(Frozen):
    __slots__ = ("pid", "code", "signal", "ts")
    pid: int
    code: int
    signal: int | None
    ts: float


class SpawnFailed(Frozen):
    __slots__ = ("code", "reason")
    code: int  # 126 or 127
    reason: str
