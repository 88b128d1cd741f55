"""A merged model folder run through the layer-streamed forward pass (streamed.py): transformers' layers, one in
memory at a time, on the CPU. Verification uses it for safetensors artifacts so that no whole model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Runtime

__all__ = ["StreamedRuntime"]


class StreamedRuntime(Runtime):
    name = "transformers (layer-streamed)"

    def __init__(self, path: Path) -> None:
        from ..streamed import StreamedModel

        self.path, self.device = Path(path), "cpu"
        self.model = StreamedModel(path)

    def run(self, inputs: list[tuple[Any, int]], batch_size: int = 1) -> list[tuple[Any, list[int]]]:
        from .hf import run_model

        return run_model(self.model, inputs, batch_size)

    def close(self) -> None:
        self.model.close()
