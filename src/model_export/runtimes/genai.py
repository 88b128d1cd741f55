"""onnxruntime-genai: a base graph with LoRA inputs, run as a user serves it, with one .onnx_adapter active (or none).

``og.Model`` on the base graph's folder (its genai_config.json), ``og.Adapters.load`` on the adapter file and
``Generator.set_active_adapter``, as onnxruntime-genai's multi-LoRA serving does; scoring appends a whole sequence to
a fresh generator and reads the graph's logits at every position (``get_output("logits")``), so every artifact is
judged on the reference's own tokens in the runtime that serves it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .base import Runtime, threads

__all__ = ["GenaiRuntime", "genai_folder", "adapter_base", "ADAPTER_FILE", "PAIR_FILE", "LORA_FILE"]

ADAPTER_FILE = "adapter.onnx_adapter"
PAIR_FILE = "onnx_adapter.json"  # beside an adapter: the base graph's folder it loads on (relative) and its targets
LORA_FILE = "lora.json"  # in a base graph's folder: the modules that take LoRA inputs, and their float type
_ADAPTER = "adapter"  # the name the adapter is loaded under


def adapter_base(adapter: Path) -> Path:
    """The base graph's folder an .onnx_adapter loads on, from the onnx_adapter.json beside it. Raises
    ExportFormatError when it is missing or names no base graph."""
    from ..errors import ExportFormatError

    pair = Path(adapter).parent / PAIR_FILE
    try:
        base = (pair.parent / json.loads(pair.read_text(encoding="utf-8"))["base"]).resolve()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportFormatError("onnx_adapter_no_base", path=str(pair), error=str(exc)[:200]) from exc
    if not (base / "genai_config.json").is_file():
        raise ExportFormatError("onnx_adapter_no_base", path=str(pair), error=f"no genai_config.json in {base}")
    return base


def genai_folder(path: Path) -> tuple[Path, Path | None]:
    """(the base graph's folder, the adapter file or None) of an .onnx_adapter or of a base graph's folder."""
    path = Path(path)
    if path.suffix == ".onnx_adapter":
        return adapter_base(path), path
    return path, None


class GenaiRuntime(Runtime):
    """An .onnx_adapter active on its base graph in onnxruntime-genai (CPU), or the base graph with none."""

    name = "onnxruntime-genai"
    batches = False

    def __init__(self, path: Path) -> None:
        import onnxruntime_genai as og

        self.path, self.device = Path(path), "cpu"
        folder, adapter = genai_folder(self.path)
        config = og.Config(str(folder))
        config.clear_providers()  # the CPU, as every other artifact here runs
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads()}}}}
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.adapters = None
        if adapter is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), _ADAPTER)

    def _generator(self, length: int) -> Any:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False, batch_size=1)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, _ADAPTER)
        return generator

    def score(self, sequences: list[Any], batch_size: int = 1) -> list[Any]:
        import numpy as np
        import torch

        results = []
        for ids in sequences:
            tokens = np.asarray([[int(i) for i in ids]], dtype=np.int32)
            generator = self._generator(tokens.shape[1] + 1)
            generator.append_tokens(tokens)
            logits = np.array(generator.get_output("logits"), dtype=np.float32)
            results.append(torch.from_numpy(logits.reshape(tokens.shape[1], -1)))
            del generator
        return results

    def generate(self, ids: list[int], new_tokens: int) -> list[int]:
        """onnxruntime-genai's own greedy continuation (its search, its stop tokens)."""
        import numpy as np

        generator = self._generator(len(ids) + new_tokens)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(ids) :]]

    def timed(self, ids: list[int], new_tokens: int, batch: int = 1) -> tuple[float, float]:
        import numpy as np

        generator = self._generator(len(ids) + new_tokens + 1)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            if generator.is_done():  # an end-of-sequence token: the time so far
                break
            generator.generate_next_token()
        return ttft, time.perf_counter() - start

    def close(self) -> None:
        self.adapters = None
        self.model = None
