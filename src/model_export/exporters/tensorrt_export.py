"""TensorRT (experimental): an engine built from a standard-operator ONNX graph of the merge, and a decoder for it.

The streaming builder's graph uses onnxruntime's contrib operators (GroupQueryAttention, MatMulNBits,
RotaryEmbedding), which TensorRT's ONNX parser does not read, so this step exports its own graph with the
torch backend (torch.onnx.export; same inputs and outputs, KV cache included) into ``tensorrt/onnx/`` and
builds ``tensorrt/model.engine`` from it with TensorRT's builder: fp32 with TF32 off (so the verify step can
hold it to ``validation_tolerance``) or fp16. One optimization profile covers batch 1..``max_batch`` and
1..``max_sequence`` tokens (the cache 0..``max_sequence`` - 1). The engine is tied to the GPU and the TensorRT
version that built it (``engine.json`` records both).

It needs the ``tensorrt`` Python package and a CUDA GPU; without either, ``check_tensorrt`` stops the run
before anything is written (ME810), naming what is missing. For serving, TensorRT-LLM builds engines with
in-flight batching and paged KV caches; this engine is for checking that the model converts and computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .. import extras
from ..checkpoint.hf_layout import copy_generation_config, copy_tokenizer
from ..errors import ExportFormatError
from ..files import write_atomic
from ..runtimes.tensorrt import TensorRTDecoder
from .base import ExportContext, ExportFormat

__all__ = [
    "check_tensorrt",
    "missing_for_tensorrt",
    "export_standard_graph",
    "export_tensorrt",
    "TensorRTDecoder",
    "ENGINE_FILE",
]

ENGINE_FILE = "model.engine"
_SIDECAR = "engine.json"


def missing_for_tensorrt() -> list[str]:
    """What this machine lacks for the TensorRT export, in words (empty when it has everything)."""
    missing = []
    if not extras.is_available("tensorrt"):
        missing.append("the Python package 'tensorrt' (pip install 'model-export[tensorrt]')")
    import torch

    if not torch.cuda.is_available():
        missing.append(
            "a CUDA GPU (torch.cuda.is_available() is False"
            + (": this PyTorch build has no CUDA)" if torch.version.cuda is None else ")")
        )
    return missing


def check_tensorrt() -> None:
    """Raise ExportFormatError('tensorrt_unavailable', ME810) naming everything the TensorRT export lacks here."""
    missing = missing_for_tensorrt()
    if missing:
        raise ExportFormatError("tensorrt_unavailable", missing="; ".join(missing))


def export_tensorrt(
    merged: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    max_batch: int = 1,
    max_sequence: int = 512,
    workspace_gib: float = 4.0,
) -> dict[str, Any]:
    """Export ``merged`` to ``out/onnx/model.onnx`` (torch backend), build ``out/model.engine``; return what was
    written.

    Raises ExportFormatError: ME810 when tensorrt or CUDA is missing, ME811 when TensorRT cannot parse or build.
    """
    check_tensorrt()
    import tensorrt as trt

    merged, out = Path(merged), Path(out)
    graph = export_standard_graph(merged, out / "onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportFormatError("tensorrt_failed", stage="parse", error=(errors or ["no error reported"])[0])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds matmul inputs to 10 bits
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        low, best, high = _profile(tensor.name, tuple(tensor.shape), max_batch, max_sequence)
        profile.set_shape(tensor.name, low, best, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportFormatError(
            "tensorrt_failed", stage="build", error="the builder returned no engine (see TensorRT's log above)"
        )
    (out / ENGINE_FILE).write_bytes(bytes(plan))
    shutil.copyfile(merged / "config.json", out / "config.json")
    copy_generation_config(out, [merged])
    copy_tokenizer(out, [merged])
    import torch

    info = {
        "precision": "fp16" if fp16 else "fp32",
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "max_batch": max_batch,
        "max_sequence": max_sequence,
    }
    write_atomic(out / _SIDECAR, json.dumps(info, indent=2))
    return {"path": str(out / ENGINE_FILE), "bytes": (out / ENGINE_FILE).stat().st_size, **info}


def export_standard_graph(merged: str | Path, out: str | Path) -> Path:
    """``out/model.onnx``: the decoder (KV cache, batch and sequence dynamic) in standard ONNX operators only, fp32,
    by torch.onnx.export: what TensorRT's parser reads."""
    from ..config import default_dynamic_axes
    from .onnx_torch import export_torch

    export_torch(merged, out, weight_type="fp32", opset=18, dynamic_axes=default_dynamic_axes())
    return Path(out) / "model.onnx"


def _profile(name: str, shape: tuple[int, ...], max_batch: int, max_sequence: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input: batch 1..max_batch, tokens 1..max_sequence, cache 0..max_sequence - 1."""
    past = name.startswith("past_key_values.")
    ranges = []
    for axis, size in enumerate(shape):
        if size >= 0:
            ranges.append((size, size, size))
        elif axis == 0:
            ranges.append((1, 1, max_batch))
        elif past and axis == 2:
            ranges.append((0, max_sequence // 2, max_sequence - 1))
        else:
            ranges.append((1, max_sequence // 2, max_sequence))
    return tuple(tuple(r[k] for r in ranges) for k in range(3))


def _export(ctx: ExportContext) -> dict[str, Any]:
    return export_tensorrt(
        ctx.merged, ctx.out, fp16=ctx.config.quantization_level == "fp16", max_batch=ctx.config.batch_size
    )


FORMAT = ExportFormat(
    name="tensorrt",
    levels={"none": "fp32 engine", "fp16": "fp16 engine"},
    bytes_per_param=lambda config, base_size: {"fp16": 6.0}.get(config.quantization_level, 8.0),  # its graph + engine
    export=_export,
    runnables=lambda folder: [("tensorrt", folder / ENGINE_FILE)],
    keys=("quantization_level", "batch_size"),
    extra="tensorrt",
    description="TensorRT engine (experimental; an NVIDIA GPU and the tensorrt package)",
)
