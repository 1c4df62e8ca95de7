"""The typed events that are the only link between the wrapper and whatever ships output."""

from __future__ import annotations

from dataclasses import dataclass

from .lines import Segment

STDOUT = "stdout"
STDERR = "stderr"


@dataclass(slots=True, frozen=True)
class Started:
    pid: int
    ts: float


@dataclass(slots=True)
class Output:
    """Records of one stream read in one go: ``ts`` is the capture time of the read.

    ``segments`` are runs of records as LineSplitter returns them (see lines.Segment).
    """

    stream: str
    ts: float
    segments: list[Segment]
    records: int
    nbytes: int


@dataclass(slots=True, frozen=True)
class StreamClosed:
    stream: str
    forced: bool  # reading stopped after --pipe-grace although the pipe was still open


@dataclass(slots=True, frozen=True)
class Exited:
    pid: int
    code: int
    signal: int | None
    ts: float


@dataclass(slots=True, frozen=True)
class SpawnFailed:
    code: int  # 126 or 127
    reason: str
