"""The ONNX artifact: choose a backend, add what onnxruntime-genai reads, save the optimized graph, run it.

The folder holds ``model.onnx`` + ``model.onnx.data`` (weights always in external data, as
onnxruntime-genai's builder writes them, so the graph file stays small whatever the model's size),
``model.optimized.onnx`` (+ data) when onnx_optimize_graph is on, ``genai_config.json``, the
tokenizer with its chat template, ``config.json`` and ``generation_config.json``.

``OnnxDecoder`` runs such a folder in onnxruntime on the CPU: the prompt, then a greedy loop that
feeds ``present.*`` back as ``past_key_values.*``; verify/artifacts.py compares it with the reference.
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
from ..monitoring import logger
from ..runtimes.ort import OnnxDecoder, config_file
from .base import ExportContext, ExportFormat

__all__ = [
    "export_onnx",
    "choose_backend",
    "onnx_weight_type",
    "onnx_settings",
    "base_graph",
    "OnnxDecoder",
    "MODEL_FILE",
    "OPTIMIZED_FILE",
]

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"
_GENAI_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}


def choose_backend(requested: str, merged: Path) -> str:
    """builder or torch: ``auto`` picks the builder when it knows the architecture."""
    from .onnx_builder import SUPPORTED_ARCHITECTURES

    if requested != "auto":
        return requested
    arch = (_config(merged).get("architectures") or ["?"])[0]
    return "builder" if arch in SUPPORTED_ARCHITECTURES else "torch"


def onnx_weight_type(level: str, merged: Path) -> str:
    """fp32, fp16, int8 or int4 for a quantization_level: 'none' keeps fp32 and fp16 and widens bf16 (no CPU kernels)
    to fp32."""
    if level in ("fp16", "int8", "int4"):
        return level
    config = _config(merged)
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return "fp16" if dtype == "float16" else "fp32"


def export_onnx(
    merged: str | Path,
    out: str | Path,
    *,
    backend: str = "auto",
    level: str = "none",
    opset: int = 17,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    optimize: bool = True,
    block_size: int = 32,
    accuracy_level: int = 4,
    tokenizer_dirs: list[Path] | None = None,
    gptq: str | Path | None = None,
    keep: list[str] | None = None,
    symmetric: bool = False,
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the merged model in ``merged`` to an ONNX folder ``out``; return what was written. With ``lora``
    (onnx_lora.lora_targets), ``merged`` is the base and the graph takes an adapter's A and B for those modules
    (our builder only).

    Raises MissingDependencyError without the onnx extra, ExportFormatError / OnnxExportError when the export fails.
    """
    extras.require("onnx", "ONNX export")
    extras.require("onnxruntime", "ONNX export")
    merged, out = Path(merged), Path(out)
    chosen = choose_backend(backend, merged)
    weight_type = onnx_weight_type(level, merged)
    logger.info("ONNX export: backend %s, weights %s, opset %d", chosen, weight_type, opset)
    kwargs = dict(weight_type=weight_type, opset=opset, block_size=block_size, accuracy_level=accuracy_level)
    kwargs["dynamic_axes"] = dynamic_axes
    with_gptq = gptq is not None and weight_type == "int4" and chosen == "builder"
    if chosen == "builder":
        from .onnx_builder import build_onnx

        build_onnx(merged, out, **kwargs, gptq=gptq if with_gptq else None, keep=keep, symmetric=symmetric, lora=lora)
    elif lora:
        raise ExportFormatError("onnx_adapter_backend", backend=chosen)
    else:
        from .onnx_torch import export_torch

        export_torch(merged, out, **kwargs)
    if (merged / "config.json").is_file():
        shutil.copyfile(merged / "config.json", out / "config.json")
    sources = [*(tokenizer_dirs or []), merged]  # a base graph for adapters: the training run's tokenizer first
    copy_generation_config(out, sources)
    copy_tokenizer(out, sources)
    write_genai_config(out, _config(merged))
    files = [MODEL_FILE]
    if optimize:
        optimize_graph(out / MODEL_FILE, out / OPTIMIZED_FILE)
        files.append(OPTIMIZED_FILE)
    details = {"path": str(out), "backend": chosen, "weight_type": weight_type, "opset": opset, "graphs": files}
    if weight_type in ("int8", "int4"):
        details["method"] = "gptq" if with_gptq else "round-to-nearest"
    return details


def base_graph(base_dir: Path, out: Path, targets: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The base model as an ONNX graph (our builder; ``settings`` as onnx_settings gives them) that takes LoRA inputs
    for ``targets`` (onnx_lora.lora_targets), with its genai_config.json, tokenizer and lora.json; one graph, no
    optimized copy (a second base to keep in step with the adapters)."""
    from .onnx_lora import write_targets

    details = export_onnx(base_dir, out, **{**settings, "optimize": False}, lora=targets)
    write_targets(out, targets, "float16" if details["weight_type"] == "fp16" else "float32", base_dir)
    return {**details, "lora_targets": len(targets)}


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def optimize_graph(source: Path, target: Path) -> None:
    """onnxruntime's offline graph optimization (extended level: fusions that every CPU runs), saved beside the plain
    graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # Prepacked weights (onnxruntime's copies of the int4/int8 blocks in its kernels' layout) are not saved in the
    # optimized file: making them only doubled this step's memory (4.1 GiB at the 4B shape; 0.78 -> 0.25 GB at 0.6B).
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportFormatError("onnx_optimize_failed", error=f"{type(exc).__name__}: {exc}"[:400]) from exc


# onnxruntime-genai's search settings for greedy decoding (what verification compares with the reference)
_GREEDY_SEARCH = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "past_present_share_buffer": False,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 1,
    "top_p": 1.0,
}


def write_genai_config(out: Path, config: dict[str, Any]) -> None:
    """genai_config.json, so onnxruntime-genai can load the folder (decoder with separate past and present)."""
    import onnx

    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim
    heads = config["num_attention_heads"]
    generation = config_file(out / "generation_config.json")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    bos = config.get("bos_token_id")
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    if eos is None or pad is None:  # a config that names none: the tokenizer's (genai_config takes no null)
        eos, pad = _tokenizer_ids(out, eos, pad)
    context = int(config.get("max_position_embeddings", 4096))
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    genai = {
        "model": {
            "bos_token_id": first_eos if bos is None else bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": dims[3].dim_value or config.get("head_dim") or config["hidden_size"] // heads,
                "hidden_size": config["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": len(past) // 2,
                "num_key_value_heads": dims[1].dim_value or config.get("num_key_value_heads") or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": first_eos if pad is None else pad,
            "type": _GENAI_TYPES.get((config.get("architectures") or ["?"])[0], config.get("model_type", "decoder")),
            "vocab_size": config["vocab_size"],
        },
        "search": {**_GREEDY_SEARCH, "max_length": context},
    }
    write_atomic(out / "genai_config.json", json.dumps(genai, indent=2) + "\n")


def _tokenizer_ids(folder: Path, eos: Any, pad: Any) -> tuple[Any, Any]:
    """The end-of-sequence and padding ids the folder's tokenizer names, where the model's configs name none
    (onnxruntime-genai refuses a genai_config.json with a null id: "Expected a number but saw a null")."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return eos, pad
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if pad is None else pad
    return eos, pad


def onnx_settings(c: Any) -> dict[str, Any]:
    """export_onnx's settings from the configuration: the keys FORMAT declares but onnx_optimize_graph (a base graph
    for adapters is written without the optimized copy)."""
    return dict(
        backend=c.onnx_backend,
        level=c.quantization_level,
        opset=c.onnx_opset_version,
        dynamic_axes=c.onnx_dynamic_axes,
        block_size=c.onnx_block_size,
        accuracy_level=c.onnx_accuracy_level,
        keep=c.quantization_keep_modules,
        symmetric=bool(c.quantization_symmetric),  # unset: asymmetric blocks, as onnxruntime-genai's builder writes
    )


def _export(ctx: ExportContext) -> dict[str, Any]:
    c = ctx.config
    return export_onnx(ctx.merged, ctx.out, **onnx_settings(c), optimize=c.onnx_optimize_graph, gptq=ctx.gptq)


def _runnables(folder: Path) -> list[tuple[str, Path]]:
    """The plain graph, and onnxruntime's optimized one when it was saved: each is verified and benchmarked."""
    graphs = [("onnx", folder / MODEL_FILE)]
    if (folder / OPTIMIZED_FILE).is_file():
        graphs.append(("onnx-optimized", folder / OPTIMIZED_FILE))
    return graphs


def _bytes(config: Any, base_size: float) -> float:
    per = {"fp16": 2.0, "int8": 1.07, "int4": 0.57}.get(config.quantization_level, 4.0)  # none/bf16: fp32 on the CPU
    return per * (2 if config.onnx_optimize_graph else 1)  # the optimized graph is a second copy


FORMAT = ExportFormat(
    name="onnx",
    levels={
        "none": "fp32 (bf16 widened exactly: no bf16 CPU kernels)",
        "fp16": "fp16",
        "int8": "MatMulNBits 8-bit blocks",
        "int4": "MatMulNBits 4-bit blocks",
    },
    bytes_per_param=_bytes,
    export=_export,
    runnables=_runnables,
    keys=(
        "quantization_level",
        "onnx_backend",
        "onnx_opset_version",
        "onnx_optimize_graph",
        "onnx_dynamic_axes",
        "onnx_block_size",
        "onnx_accuracy_level",
        "quantization_keep_modules",
        "quantization_symmetric",
    ),
    extra="onnx",
    description="decoder with KV cache for onnxruntime and onnxruntime-genai",
    second_copy=OPTIMIZED_FILE,
)
