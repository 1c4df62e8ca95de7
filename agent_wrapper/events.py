"""The typed events that are the only link between the wrapper and whatever ships output."""

from __future__ import annotations

from .values import Frozen, Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .lines import Segment

STDOUT = "stdout"
STDERR = "stderr"


class Started(Frozen):
    pid: int
    ts: float
    __slots__ = tuple(__annotations__)


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
    stream: str
    forced: bool  # reading stopped before the end (--pipe-grace, or a stop) although the pipe was open
    unread: int  # bytes still in the pipe when a forced close stopped reading it
    __slots__ = tuple(__annotations__)
    _defaults = {"unread": 0}


class Exited(Frozen):
    pid: int
    code: int
    signal: int | None
    ts: float
    __slots__ = tuple(__annotations__)


class SpawnFailed(Frozen):
    code: int  # 126 or 127
    reason: str
    __slots__ = tuple(__annotations__)
