"""The export formats. Adding one: write its module with a ``FORMAT = ExportFormat(...)`` (see exporters/base.py and
docs/design.md) and add it to FORMATS below; the pipeline, the configuration rules, the disk preflight, verification,
the benchmark and the docs' format table read it from here."""

from __future__ import annotations

from . import gguf_export, onnx_export, pytorch_export, safetensors_export, tensorrt_export
from .base import WEIGHT_SUFFIXES, ExportContext, ExportFormat

__all__ = ["FORMATS", "ExportFormat", "ExportContext", "WEIGHT_SUFFIXES", "format_table"]

FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        safetensors_export.FORMAT,
        pytorch_export.FORMAT,
        onnx_export.FORMAT,
        gguf_export.FORMAT,
        tensorrt_export.FORMAT,
    )
}


def format_table() -> str:
    """The docs' table of formats (docs/configuration.md), from the registry."""
    lines = ["| format | quantization_level: what it becomes | extra | what it is |", "|---|---|---|---|"]
    for f in FORMATS.values():
        levels = "; ".join(f"`{level}`: {what}" for level, what in f.levels.items())
        extra = f"`{f.extra}`" if f.extra else "-"
        lines.append(f"| `{f.name}` | {levels} | {extra} | {f.description} |")
    return "\n".join(lines) + "\n"
