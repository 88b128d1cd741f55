"""TensorRT (experimental): an engine run on the GPU through the same decoder interface as onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ExportFormatError
from .base import Runtime
from .ort import OnnxDecoder, config_file, eos_ids

__all__ = ["TensorRTDecoder", "TensorRTRuntime", "precision_of_engine"]

_SIDECAR = "engine.json"


def precision_of_engine(engine: Path) -> str:
    """'full' for an fp32 engine, 'reduced' for fp16 (from engine.json)."""
    info = json.loads((Path(engine).parent / _SIDECAR).read_text(encoding="utf-8"))
    return "full" if info["precision"] == "fp32" else "reduced"


class TensorRTDecoder(OnnxDecoder):
    """An engine in TensorRT: the same prompt logits and greedy continuation as OnnxDecoder, on the GPU."""

    def __init__(self, engine: str | Path) -> None:  # noqa: D107 - OnnxDecoder's onnxruntime session is not made
        import tensorrt as trt
        import torch

        engine = Path(engine)
        self.torch, self.trt = torch, trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise ExportFormatError(
                "tensorrt_failed", stage="load", error=f"{engine} does not deserialize on this GPU / TensorRT"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        config = config_file(engine.parent / "config.json")
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.kv_shape, self.kv_dtype, self.step = [1, heads, 0, head_dim], np.float32, None
        self.eos = eos_ids(engine.parent)
        self._spare = torch.empty(1, device="cuda")  # an address for empty tensors (the first call's cache)

    def forward(
        self, tokens: np.ndarray, past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        torch, trt = self.torch, self.trt
        batch, count = tokens.shape
        feeds = {
            "input_ids": tokens,
            "attention_mask": np.ones((batch, start + count), dtype=np.int64),
            "position_ids": np.tile(np.arange(start, start + count, dtype=np.int64), (batch, 1)),
            **past,
        }
        keep = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            keep[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._spare.data_ptr())
        results = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            results[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ExportFormatError("tensorrt_failed", stage="run", error="execute_async_v3 returned false")
        torch.cuda.synchronize()
        present = {
            name: results[name.replace("past_key_values.", "present.")].cpu().numpy() for name in self.past_names
        }
        return results["logits"].float().cpu().numpy(), present


class TensorRTRuntime(Runtime):
    """An engine in TensorRT, on the GPU."""

    name = "tensorrt"

    def __init__(self, path: Path) -> None:
        self.path, self.device = Path(path), "cuda"
        self.decoder = TensorRTDecoder(path)
