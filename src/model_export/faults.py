"""Crash injection for the resume tests and the crash soak: die with SIGKILL at a named point.

MODEL_EXPORT_CRASH_AT=tensor:5 kills the process right after the 5th tensor is written, as an
out-of-memory killer or a power cut would; nothing is flushed or cleaned up. Unset, it costs one
dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Count this pass through ``name``; die if MODEL_EXPORT_CRASH_AT names this pass."""
    target = os.environ.get("MODEL_EXPORT_CRASH_AT")
    if not target:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if target == f"{name}:{_counts[name]}":
        os.kill(os.getpid(), signal.SIGKILL)
