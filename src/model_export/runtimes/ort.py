"""onnxruntime: an exported decoder graph run on the CPU, prompt logits and greedy decoding with its KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .base import Runtime, threads

__all__ = ["OnnxDecoder", "OnnxRuntime", "eos_ids"]

MODEL_FILE = "model.onnx"


def _dim(value: Any, fallback: Any) -> Any:
    return value if isinstance(value, int) else fallback


def config_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def eos_ids(folder: Path) -> set[int]:
    """The end-of-sequence ids a decoder in ``folder`` stops at (generation_config.json, else config.json)."""
    eos = (config_file(folder / "generation_config.json") or config_file(folder / "config.json")).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


class OnnxDecoder:
    """An exported decoder in onnxruntime (CPU): prompt logits and greedy continuation with the KV cache."""

    def __init__(self, graph: str | Path, optimized: bool | None = None) -> None:
        import onnxruntime as ort

        graph = Path(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        if optimized is False or (optimized is None and graph.name == MODEL_FILE):
            # The plain graph is run as written, so a fault in it is not hidden (or caused) by a fusion.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        first = self.inputs[self.past_names[0]]
        self.kv_shape = first.shape
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32
        step = self.inputs["input_ids"].shape[1]
        self.step = step if isinstance(step, int) else None  # a fixed sequence axis: feed that many tokens per call
        genai = config_file(graph.parent / "genai_config.json").get("model", {}).get("decoder", {})
        # Graphs from other builders may leave the cache's head axes symbolic: genai_config.json says what they are.
        self.kv_shape = [
            self.kv_shape[0],
            _dim(self.kv_shape[1], genai.get("num_key_value_heads")),
            0,
            _dim(self.kv_shape[3], genai.get("head_size")),
        ]
        self.eos = eos_ids(graph.parent)

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """An empty cache for ``batch`` sequences."""
        shape = [batch, self.kv_shape[1], 0, self.kv_shape[3]]
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"the cache's shape {self.kv_shape} is not known: no genai_config.json beside the graph")
        return {name: np.zeros(shape, dtype=self.kv_dtype) for name in self.past_names}

    def forward(
        self, tokens: np.ndarray, past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: ``tokens`` [batch, new] at positions start.. after ``past``; (logits as the graph gives them, the
        cache)."""
        batch, count = tokens.shape
        feeds = {"input_ids": tokens, "attention_mask": np.ones((batch, start + count), dtype=np.int64), **past}
        if "position_ids" in self.inputs:  # graphs that rotate inside attention take positions from the mask
            feeds["position_ids"] = np.tile(np.arange(start, start + count, dtype=np.int64), (batch, 1))
        results = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = {name: results[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return results["logits"], present

    def _forward(
        self, tokens: list[int], past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits, present = self.forward(np.array([tokens], dtype=np.int64), past, start)
        return logits[0].astype(np.float32, copy=False), present  # no copy of a graph that gives float32

    def prompt(self, tokens: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for every prompt position ([len, vocab], float32) and the cache after it."""
        past, rows, step = self.empty_past(), [], self.step or len(tokens)
        for start in range(0, len(tokens), step):
            logits, past = self._forward(tokens[start : start + step], past, start)
            rows.append(logits)
        # one call (the usual case) is returned as it came: at 4B the held-out text's logits are 155 MB, and two
        # copies of them at the end of the pass set the verify step's peak
        return (rows[0] if len(rows) == 1 else np.concatenate(rows)), past

    def generate(self, tokens: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
        """(prompt logits, greedy continuation of up to ``new_tokens``, stopping after an end-of-sequence token)."""
        logits, past = self.prompt(tokens)
        generated, last = [], logits[-1]
        for _ in range(new_tokens):
            token = int(last.argmax())
            generated.append(token)
            if token in self.eos:
                break
            step, past = self._forward([token], past, len(tokens) + len(generated) - 1)
            last = step[-1]
        return logits, generated


class OnnxRuntime(Runtime):
    """An ONNX graph in onnxruntime (the plain graph unoptimized, so a fault is not hidden by a fusion)."""

    name = "onnxruntime"

    def __init__(self, path: Path, optimized: bool | None = None) -> None:
        self.path, self.device = Path(path), "cpu"
        self.decoder = OnnxDecoder(path, optimized=optimized)
