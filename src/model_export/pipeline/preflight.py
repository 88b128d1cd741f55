"""What a run checks before it writes anything: the disk space its artifacts need, from the base model's parameters and
each format's bytes per parameter."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .. import i18n
from ..config import ExportConfiguration
from ..errors import ResourceError
from ..monitoring import human_bytes


def disk_needed(config: ExportConfiguration, info: Any) -> dict[str, int]:
    """The bytes each part of the run will write under output_dir, from the base model's parameter count and dtypes
    and each format's declared bytes per parameter."""
    from ..exporters import FORMATS

    params = sum(math.prod(t.shape) for t in info.tensors.values())
    base_size = info.weight_bytes / max(params, 1)  # bytes per parameter of the base (2 for bf16)
    needs = {"merge": {"bf16": 2.0, "fp16": 2.0}.get(config.quantization_level, base_size)}
    for fmt in config.formats:
        needs[fmt] = FORMATS[fmt].bytes_per_param(config, base_size)
    return {part: int(per * params) for part, per in needs.items()}


def check_disk_space(config: ExportConfiguration, info: Any, out: Path, adapters: int = 1) -> None:
    """Stop before writing anything when output_dir's disk cannot hold what the run will write (ME404), with the
    numbers; a batch asks for its ``adapters`` still to run at once, as side by side they share the disk."""
    needs = disk_needed(config, info)
    free = shutil.disk_usage(out).free
    total = sum(needs.values()) * adapters
    if total > free:
        parts = ", ".join(f"{part} {human_bytes(size)}" for part, size in needs.items())
        if adapters > 1:
            parts = i18n.ui("batch_disk_parts", count=adapters, parts=parts)
        raise ResourceError(
            "disk_too_small", path=str(out), free=human_bytes(free), need=human_bytes(total), parts=parts
        )
