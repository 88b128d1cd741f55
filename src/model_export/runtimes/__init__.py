"""The runtimes: the one place that knows which runtime runs an artifact and how (transformers, onnxruntime,
onnxruntime-genai, llama.cpp, TensorRT). Verification and the benchmark call ``runtime_for(path)`` and use its small API
(runtimes/base.py); ``precision_of(path)`` says what precision an artifact's weights are stored in."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Runtime

__all__ = [
    "Runtime",
    "runtime_for",
    "runtime_name",
    "runtime_problem",
    "precision_of",
    "tokenizer_folder",
    "runnables_in",
]

_BY_SUFFIX = {
    ".onnx": "onnxruntime",
    ".onnx_adapter": "onnxruntime-genai",
    ".gguf": "llama.cpp",
    ".engine": "tensorrt",
}
_MODULE = {
    "onnxruntime": "onnxruntime",
    "onnxruntime-genai": "onnxruntime_genai",
    "llama.cpp": "llama_cpp",
    "tensorrt": "tensorrt",
}


def runtime_problem(path: str | Path) -> str | None:
    """Why the runtime of ``path`` cannot start on this machine (its package is missing, or installed but cannot be
    imported), or None. Such an artifact is ``not run`` with this reason, never failed: the runtime could not start,
    the artifact was not at fault."""
    from .. import extras

    module = _MODULE.get(runtime_name(path))
    return extras.import_problem(module) if module else None


def runtime_name(path: str | Path) -> str:
    """transformers for a model folder; onnxruntime for a graph, llama.cpp for a GGUF, TensorRT for an engine;
    onnxruntime-genai for an .onnx_adapter (on its base graph) and for a base graph's folder that takes adapters."""
    from .genai import LORA_FILE

    path = Path(path)
    if path.is_dir() and (path / LORA_FILE).is_file():
        return "onnxruntime-genai"
    return _BY_SUFFIX.get(path.suffix, "transformers")


def runtime_for(
    path: str | Path, device: str = "cpu", *, mmap: bool = True, optimized: bool | None = None, streamed: bool = False
) -> Runtime:
    """Load ``path`` in its runtime. ``device`` places a transformers model (the others run where their runtime does:
    onnxruntime and llama.cpp on the CPU, TensorRT on the GPU); ``mmap`` false reads transformers' weights into
    memory; ``optimized`` asks onnxruntime to optimize a graph (default: the plain graph as written); ``streamed`` runs
    a plain safetensors model folder on the CPU one layer at a time (merging/streamed.py) where the architecture is
    covered."""
    path, name = Path(path), runtime_name(path)
    if name == "transformers" and streamed and device == "cpu" and streamable_folder(path):
        from .streamed import StreamedRuntime

        return StreamedRuntime(path)
    if name == "onnxruntime":
        from .ort import OnnxRuntime

        return OnnxRuntime(path, optimized=optimized)
    if name == "llama.cpp":
        from .llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(path)
    if name == "onnxruntime-genai":
        from .genai import GenaiRuntime

        return GenaiRuntime(path)
    if name == "tensorrt":
        from .tensorrt import TensorRTRuntime

        return TensorRTRuntime(path)
    from .hf import TransformersRuntime

    return TransformersRuntime(path, device, mmap=mmap)


def streamable_folder(path: Path) -> bool:
    """A model folder of safetensors weights (plain, or compressed-tensors int8/int4 as the export writes them) of an
    architecture the layer-streamed pass covers."""
    from ..merging.streamed import streamable

    config = path / "config.json"
    if not config.is_file() or not any(path.glob("*.safetensors")):
        return False
    return streamable(path) is None


def runnables_in(target: str | Path) -> list[tuple[str, Path]]:
    """(label, path) of what runs in ``target`` when it is one artifact rather than a run directory: a graph, GGUF or
    engine file itself; a TensorRT folder's engine; a model folder; an ONNX folder's graph; a GGUF folder's file."""
    target = Path(target)
    if target.is_file():
        return [(target.name, target)] if target.suffix in _BY_SUFFIX else []
    if (target / "model.engine").is_file():  # a TensorRT folder (its config.json is not a model's)
        return [("tensorrt", target / "model.engine")]
    if (target / "model.onnx").is_file():  # before config.json: an ONNX folder holds the model's config too
        graphs = [("onnx", target / "model.onnx")]
        optimized = target / "model.optimized.onnx"
        return graphs + ([("onnx-optimized", optimized)] if optimized.is_file() else [])
    ggufs = sorted(target.glob("model-*.gguf"))
    if ggufs:
        return [("gguf", ggufs[0])]
    return [(target.name, target)] if (target / "config.json").is_file() else []


def tokenizer_folder(path: str | Path) -> Path:
    """Where the Hugging Face tokenizer of an artifact is: the folder itself, the folder of a graph or engine, or an
    adapter's base graph folder."""
    path, name = Path(path), runtime_name(path)
    if name == "onnxruntime-genai":
        from .genai import genai_folder

        return genai_folder(path)[0]
    return path.parent if name != "transformers" else path


def precision_of(artifact: str | Path) -> str:
    """'full' when every floating-point weight is fp32; 'int4' when weights are stored in 5 bits or fewer (GGUF
    q2_k to q5, ONNX MatMulNBits bits=4, compressed-tensors num_bits 4); else 'reduced' (bf16, fp16, 8-bit)."""
    from ..tensor_io import read_header

    artifact, name = Path(artifact), runtime_name(artifact)
    if name == "onnxruntime-genai":  # an adapter is as precise as the base graph it runs on
        from .genai import genai_folder

        artifact, name = genai_folder(artifact)[0] / "model.onnx", "onnxruntime"
    if name == "llama.cpp":
        from .gguf_file import read_gguf
        from .llamacpp import gguf_pair

        artifact = gguf_pair(artifact)[0]  # a LoRA adapter runs on its base GGUF: the base's types bound it
        types = {t.tensor_type.name for t in read_gguf(artifact).tensors}
        if types == {"F32"}:
            return "full"
        return "int4" if any(t.startswith(("Q2", "Q3", "Q4", "Q5")) for t in types) else "reduced"
    if name == "tensorrt":
        from .tensorrt import precision_of_engine

        return precision_of_engine(artifact)
    if name == "onnxruntime":
        import onnx

        graph = onnx.load(str(artifact), load_external_data=False).graph
        bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        if bits and min(bits) <= 5:
            return "int4"
        reduced = bits or any(
            t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for t in graph.initializer
        )
        return "reduced" if reduced else "full"
    quantization = json.loads((artifact / "config.json").read_text()).get("quantization_config")
    if quantization:  # int8/int4 compressed-tensors
        bits = [group.get("weights", {}).get("num_bits", 8) for group in quantization.get("config_groups", {}).values()]
        return "int4" if bits and min(bits) <= 5 else "reduced"
    dtypes = {t.dtype for shard in sorted(artifact.glob("*.safetensors")) for t in read_header(shard).tensors.values()}
    if not dtypes:  # a .bin artifact: its config says
        dtype = json.loads((artifact / "config.json").read_text()).get("dtype") or "float32"
        return "full" if dtype == "float32" else "reduced"
    return "reduced" if dtypes & {"BF16", "F16", "F8_E4M3", "F8_E5M2", "I8", "U8"} else "full"
