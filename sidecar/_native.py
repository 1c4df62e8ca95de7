"""The optional native module (sidecar/_speedups.c), or None.

None when it was not built (no C compiler at install time) or when SIDECAR_PURE_PYTHON is set
to anything but "" or "0": the Python code then does the same work, slower.
"""

from __future__ import annotations

import os
from types import ModuleType

speedups: ModuleType | None = None
if os.environ.get("SIDECAR_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _speedups as speedups
    except ImportError:
        speedups = None
