"""Every process a test starts is registered here and torn down after the test, pass or fail."""

from __future__ import annotations

import atexit
import threading
from typing import Protocol


class Cleanable(Protocol):
    def cleanup(self) -> None: ...


_lock = threading.Lock()
_live: list[Cleanable] = []


def register(obj: Cleanable) -> None:
    with _lock:
        if not any(o is obj for o in _live):
            _live.append(obj)


def unregister(obj: Cleanable) -> None:
    with _lock:
        _live[:] = [o for o in _live if o is not obj]


def live() -> list[Cleanable]:
    with _lock:
        return list(_live)


def cleanup_all() -> list[Exception]:
    """Clean up everything still registered, newest first; return the errors instead of raising."""
    errors: list[Exception] = []
    # Sidecars usually depend on servers started before them, so stop them first.
    for obj in reversed(live()):
        try:
            obj.cleanup()
        except Exception as exc:  # keep going so one failure does not leak the rest
            errors.append(exc)
        finally:
            unregister(obj)
    return errors


atexit.register(cleanup_all)
