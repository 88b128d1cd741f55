"""Files written so that a killed run never leaves one half-written, and JSON that every parser reads.

write_atomic(out / "config.json", text)   # written as config.json.partial, then renamed
strict_json({"kl": float("nan")})          # '{"kl": null}': NaN is not JSON
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "strict_json", "finite"]


def write_atomic(path: Path, data: str | bytes) -> None:
    """``data`` into ``path`` under a temporary name, renamed when complete."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(partial, path)


def finite(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None, so json.dumps(allow_nan=False) accepts it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def strict_json(data: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null (json.dumps would write NaN, which is not
    JSON)."""
    return json.dumps(finite(data), indent=2, default=str, allow_nan=False)
