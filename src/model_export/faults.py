"""Crash injection for the resume tests and the crash soak: die with SIGKILL at a named point.

MODEL_EXPORT_CRASH_AT=tensor:5 kills the process right after the 5th tensor is written, as an
out-of-memory killer or a power cut would; nothing is flushed or cleaned up. Unset, it costs one
dictionary lookup per call. MODEL_EXPORT_CRASH_COUNTS=FILE writes, at exit, how many times each
point was passed (the crash soak learns from a clean run where it can kill the next ones).

MODEL_EXPORT_CRASH_ONCE=FILE makes the kill happen once among all processes that share it: the first to reach the point
creates FILE and dies; every later pass (a retried task, the other workers of a batch) goes on.

Points: tensor (a merged tensor written), shard, layout (the merge's folder), export_tensor (an
ONNX or GGUF tensor written), step (a pipeline step recorded).
"""

from __future__ import annotations

import atexit
import json
import os
import signal

_counts: dict[str, int] = {}


def _write_counts() -> None:
    path = os.environ.get("MODEL_EXPORT_CRASH_COUNTS")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(_counts, fh)


atexit.register(_write_counts)


def crash_point(name: str) -> None:
    """Count this pass through ``name``; die if MODEL_EXPORT_CRASH_AT names this pass."""
    target = os.environ.get("MODEL_EXPORT_CRASH_AT")
    if not target and not os.environ.get("MODEL_EXPORT_CRASH_COUNTS"):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if target == f"{name}:{_counts[name]}":
        once = os.environ.get("MODEL_EXPORT_CRASH_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
