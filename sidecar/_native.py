"""The optional native module (sidecar/_speedups.c), or None.

None when it was not built (no C compiler at install time) or when SIDECAR_PURE_PYTHON is set
to anything but "", "0", "false", "no" or "off": the Python code then does the same work, slower.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType


def pure_python_asked(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("SIDECAR_PURE_PYTHON", "").strip().lower() not in ("", "0", "false", "no", "off")


def _load() -> ModuleType | None:
    if pure_python_asked():
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups  # type: ignore[no-any-return]


speedups = _load()
