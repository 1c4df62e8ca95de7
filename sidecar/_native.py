"""The optional native module (sidecar/_speedups.c), or None.

None when it was not built (no C compiler at install time) or when SIDECAR_PURE_PYTHON is set
to anything but "", "0", "false", "no" or "off": the Python code then does the same work, slower.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("SIDECAR_PURE_PYTHON", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups  # type: ignore[no-any-return]


speedups = _load()
