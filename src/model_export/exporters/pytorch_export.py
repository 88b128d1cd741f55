"""PyTorch: the merge written again as pytorch_model*.bin shards (a plain state dict, no packed ints)."""

from __future__ import annotations

from typing import Any

from .base import ExportContext, ExportFormat

__all__ = ["FORMAT"]


def export(ctx: ExportContext) -> dict[str, Any]:
    from ..merging.merger import STATE_FILE, merge, merge_settings

    merge(
        ctx.checkpoint,
        ctx.base,
        ctx.out,
        **{**merge_settings(ctx.config), "device": "cpu"},
        format="pytorch",
        validate=False,
    )
    (ctx.out / STATE_FILE).unlink(missing_ok=True)
    return {}


def _bytes(config: Any, base_size: float) -> float:
    return {"bf16": 2.0, "fp16": 2.0}.get(config.quantization_level, base_size)


FORMAT = ExportFormat(
    name="pytorch",
    levels={"none": "the merge's dtype", "bf16": "bf16", "fp16": "fp16"},
    bytes_per_param=_bytes,
    export=export,
    runnables=lambda folder: [("pytorch", folder)],
    # merge_settings reads these (it merges again, writing .bin shards)
    keys=(
        "quantization_level",
        "max_shard_size",
        "compress_weights",
        "remove_training_artifacts",
        "device_map",
        "checkpoint_selection",
        "enable_progress_monitoring",
    ),
    description="pytorch_model*.bin shards (torch.load with weights_only=True reads them)",
)
