"""The format interface: what every export format declares, and what an export hands to the steps after it.

Each format is one ``ExportFormat`` object beside its exporter (``FORMAT`` in its module) and one line of
``exporters.FORMATS``. The pipeline, the configuration rules, the disk preflight, verification and the benchmark read
these declarations instead of deciding by a format's name or a file's suffix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ExportFormat", "ExportContext", "WEIGHT_SUFFIXES"]

# Files that hold weights, in any format (sizes against the base count these, not tokenizer or config files).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".gguf", ".engine")


@dataclass(frozen=True)
class ExportContext:
    """What an exporter gets: the merged model (``merged``), the folder to write (``out``, a partial folder the
    pipeline renames when the export is complete), the run's configuration, the checkpoint, the base model and the
    importance matrix from the calibration data (if any)."""

    merged: Path
    out: Path
    config: Any  # the configuration as this format sees it: steps.ConfigView of its declared keys
    checkpoint: Path
    base: str
    imatrix: Path | None = None  # calibrate/imatrix.gguf when the run has calibration data for a format that uses it
    gptq: Path | None = None  # calibrate/gptq/: GPTQ's int4 levels per layer, for the int4 safetensors


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    ``levels`` maps each quantization_level the format takes to what it becomes (a dtype or block type, in words for
    the docs). ``bytes_per_param(config, base_bytes_per_param)`` is what the artifact writes per parameter (the disk
    preflight). ``export(ctx)`` writes the artifact into ``ctx.out`` and returns its details (paths under ``ctx.out``).
    ``runnables(folder)`` lists what verification and the benchmark run in a finished artifact, as (label, path):
    the folder itself for transformers, a graph, an engine or a GGUF file. ``keys`` are the configuration keys its
    export reads: it is given a view of the configuration that refuses any other (steps.ConfigView), and its values
    of them are part of its resume key (``settings(config)``). ``extra`` is the optional install it needs.
    """

    name: str
    levels: dict[str, str]
    bytes_per_param: Callable[[Any, float], float]
    export: Callable[[ExportContext], dict[str, Any]]
    runnables: Callable[[Path], list[tuple[str, Path]]] = lambda folder: []
    keys: tuple[str, ...] = ()
    extra: str | None = None
    description: str = ""
    second_copy: str | None = None  # a file name prefix in the folder that is a second copy of the artifact
    notes: dict[str, Any] = field(default_factory=dict)

    def settings(self, config: Any) -> list[Any]:
        """The values of its declared keys, in their order."""
        return [getattr(config, key) for key in self.keys]
