"""safetensors: the merge itself (hard links to its shards) at none/bf16/fp16; compressed-tensors int8/int4 blocks."""

from __future__ import annotations

import shutil
from typing import Any

from ..files import link_or_copy
from .base import ExportContext, ExportFormat

__all__ = ["FORMAT"]


def export(ctx: ExportContext) -> dict[str, Any]:
    level = ctx.config.quantization_level
    if level in ("int8", "int4"):
        from ..config import parse_size
        from .safetensors_quant import export_quantized_safetensors

        return export_quantized_safetensors(
            ctx.merged,
            ctx.out,
            bits=8 if level == "int8" else 4,
            max_shard_size=parse_size(ctx.config.max_shard_size),
            gptq=ctx.gptq if level == "int4" else None,
            group_size=ctx.config.quantization_group_size,
            keep=ctx.config.quantization_keep_modules,
            symmetric=ctx.config.quantization_symmetric is not False,  # unset: symmetric, as W4A16/W8A16 serve
        )
    shutil.copytree(ctx.merged, ctx.out, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*"))
    return {}


def _bytes(config: Any, base_size: float) -> float:
    return {"int8": 1.03, "int4": 0.56}.get(config.quantization_level, 0.0)  # hard links to the merge unless quantized


FORMAT = ExportFormat(
    name="safetensors",
    levels={
        "none": "the merge's dtype",
        "bf16": "bf16",
        "fp16": "fp16",
        "int8": "int8 per channel (compressed-tensors)",
        "int4": "int4 groups of 128 (compressed-tensors)",
    },
    bytes_per_param=_bytes,
    export=export,
    runnables=lambda folder: [("safetensors", folder)],
    keys=(
        "quantization_level",
        "max_shard_size",
        "quantization_group_size",
        "quantization_keep_modules",
        "quantization_symmetric",
    ),
    extra="quant",
    description="Hugging Face layout (transformers, vLLM); hard links to the merge unless quantized",
)
