"""The sidecar's own diagnostics: stderr only, marked, never mixed into published records."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PREFIX = "[agent-sidecar]"
_format = "text"
_levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_min_level = 20


def configure(fmt: str = "text", level: str = "info") -> None:
    global _format, _min_level
    _format = fmt
    _min_level = _levels.get(level, 20)


def _emit(level: str, msg: str, fields: dict[str, Any]) -> None:
    if _levels[level] < _min_level:
        return
    if _format == "json":
        import orjson

        rec: dict[str, Any] = {"ts": time.time(), "logger": "agent-sidecar", "level": level, "msg": msg}
        rec.update(fields)
        try:
            line = orjson.dumps(rec, default=str) + b"\n"
        except (TypeError, ValueError):  # text of other bytes than UTF-8 (a command name, a path)
            line = orjson.dumps({k: _plain(v) for k, v in rec.items()}) + b"\n"
    else:
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = f"{PREFIX} {level.upper()} {msg}{extra}\n".encode("utf-8", "replace")
    try:
        os.write(2, line)
    except OSError:
        pass


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)) and abs(value) < 2**63:
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


class Budget:
    """At most ``limit`` reports per ``window_s``: a flood (of control commands, say) must not
    flood the sidecar's own log. ``take`` says whether this one may be reported; the first
    one over the budget in a window gets ``over`` logged as a warning, once."""

    def __init__(self, over: str, limit: int = 20, window_s: float = 60.0) -> None:
        self.over = over
        self.limit = limit
        self.window_s = window_s
        self._start = 0.0
        self._count = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self._start > self.window_s:
            self._start, self._count = now, 0
        self._count += 1
        if self._count == self.limit + 1:
            warning(self.over)
        return self._count <= self.limit


def debug(msg: str, **fields: Any) -> None:
    _emit("debug", msg, fields)


def info(msg: str, **fields: Any) -> None:
    _emit("info", msg, fields)


def warning(msg: str, **fields: Any) -> None:
    _emit("warning", msg, fields)


def error(msg: str, **fields: Any) -> None:
    _emit("error", msg, fields)
