"""The streaming ONNX builder: a decoder with KV cache, written straight from merged safetensors.

Why our own: torch.onnx.export and optimum need the model instantiated (and traced), and
onnxruntime-genai's builder loads it through transformers too (21.8 GiB of RAM for a 4B model on
this machine). This builder never instantiates the model. It reads one tensor at a time (row
chunks for the large ones), converts or quantizes it, and appends it to ``model.onnx.data``; only
the graph itself (a few hundred KB) stays in memory until it is saved as ``model.onnx``.

The graph, per layer, keeps hidden states 2-D ([tokens, hidden]) so that every linear layer reads
the Hugging Face weight as stored ([out, in]): Gemm with transB=1 for float weights, MatMulNBits
(int8/int4 blocks) for quantized ones; nothing is transposed.

    RMSNorm -> q/k/v -> (Qwen3: per-head RMSNorm of q and k) -> RotaryEmbedding(position_ids)
        -> GroupQueryAttention(past -> present) -> o_proj -> residual add
    RMSNorm -> SiLU(gate) * up -> down -> residual add

RMSNorm is onnxruntime's SimplifiedLayerNormalization below opset 23 and the standard
RMSNormalization from 23 on; both normalise in fp32 as transformers does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.hf_layout import rope_inv_freq
from ..errors import ExportFormatError
from .onnx_graph import DATA_FILE, DataFile, Graph, Weights
from .onnx_linear import Linear, gptq_layers, keeper

__all__ = ["build_onnx", "BuildResult", "SUPPORTED_ARCHITECTURES", "WEIGHT_TYPES"]

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4")


@dataclass
class BuildResult:
    path: str
    weight_type: str
    opset: int
    bytes_written: int
    tensors: int
    io_dtype: str
    axes: dict[str, list[str | int]] = field(default_factory=dict)


@dataclass
class _Spec:
    """What the graph needs to know about the model, from config.json and the tensor names."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    tied: bool
    qk_norm: bool
    sliding_window: int


def _spec(folder: Path, weights: Weights) -> tuple[_Spec, dict[str, Any]]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportFormatError(
            "onnx_builder_unsupported", architecture=arch, supported=", ".join(SUPPORTED_ARCHITECTURES)
        )
    heads = config["num_attention_heads"]
    window = config.get("sliding_window") if config.get("use_sliding_window", arch == "MistralForCausalLM") else None
    spec = _Spec(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab=weights.info("model.embed_tokens.weight").shape[0],
        eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        tied="lm_head.weight" not in weights,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in weights,
        sliding_window=int(window or -1),
    )
    return spec, config


def _rotary_cache(folder: Path, spec: _Spec, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every position at the angles transformers computes (fp32 frequencies and attention scaling of
    hf_layout.rope_inv_freq, fp32 products), so the tables are the reference's for every rope type. cos and sin are
    taken in float64 by numpy and rounded once: within one fp32 ulp of torch's values, and the same bytes every time
    (torch's fp32 cos gave the upper half of the demo's table 1.5e-4 off in some processes: the crash soak saw two
    different graphs from one configuration)."""
    import torch

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    inv_freq, scaling = rope_inv_freq(folder, config, spec.head_dim)
    positions = torch.arange(spec.max_positions, dtype=torch.float32)
    angles = (positions[:, None] * inv_freq[None, :]).numpy().astype(np.float64)
    return (np.cos(angles) * scaling).astype(dtype), (np.sin(angles) * scaling).astype(dtype)


def _rms_norm(graph: Graph, x: str, weight: str, eps: float, name: str) -> str:
    if graph.opset >= 23:
        return graph.op("RMSNormalization", [x, weight], name, axis=-1, epsilon=eps, stash_type=1)
    return graph.op("SimplifiedLayerNormalization", [x, weight], name, axis=-1, epsilon=eps, stash_type=1)


def build_onnx(
    merged: str | Path,
    out: str | Path,
    *,
    weight_type: str = "fp32",
    opset: int = 17,
    block_size: int = 32,
    accuracy_level: int = 4,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    gptq: str | Path | None = None,
    keep: list[str] | None = None,
    symmetric: bool = False,
    lora: dict[str, Any] | None = None,
) -> BuildResult:
    """Write ``out/model.onnx`` and ``out/model.onnx.data`` from the merged safetensors folder ``merged``.

    ``weight_type``: fp32, fp16, int8 or int4 (MatMulNBits blocks of ``block_size`` along K, rounded to nearest; with
    ``gptq``, the folder calibrate_gptq wrote, int4 blocks are GPTQ's levels and groups).
    Raises ExportFormatError for an architecture the builder does not know.
    """
    from onnx import helper

    merged, out = Path(merged), Path(out)
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    weights = Weights(merged)
    spec, config = _spec(merged, weights)
    out.mkdir(parents=True, exist_ok=True)
    data = DataFile(out / DATA_FILE)
    graph = Graph(data, opset)
    io_dtype = np.float16 if weight_type == "fp16" else np.float32
    linear = Linear(
        graph, weights, weight_type, block_size, accuracy_level, gptq_layers(gptq), keeper(keep, spec), symmetric, lora
    )
    try:
        axes = _axes(dynamic_axes, spec)
        logits = _decoder(graph, weights, spec, linear, merged, io_dtype)
        inputs, outputs = _io(spec, axes, logits, helper.np_dtype_to_tensor_dtype(np.dtype(io_dtype)))
        inputs += graph.inputs
    finally:
        weights.close()
        data.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "model-export decoder", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
        producer_name="model-export",
    )
    model.ir_version = min(model.ir_version, _ir_version(opset))
    partial = out / "model.onnx.partial"
    partial.write_bytes(model.SerializeToString())
    os.replace(partial, out / "model.onnx")
    return BuildResult(
        str(out / "model.onnx"),
        weight_type,
        opset,
        data.offset,
        data.count,
        np.dtype(io_dtype).name,
        {k: list(v) for k, v in axes.items()},
    )


def _io(spec: _Spec, axes: dict[str, list[str | int]], logits: str, io_type: int) -> tuple[list, list]:
    """The graph's inputs and outputs: ids, mask and positions in, logits out, and each layer's cache both ways."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, axes[name])
        for name in ("input_ids", "attention_mask", "position_ids")
    ]
    outputs = [helper.make_tensor_value_info(logits, io_type, axes["logits"])]
    for i in range(spec.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", io_type, axes["past"]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", io_type, axes["present"]))
    return inputs, outputs


def _ir_version(opset: int) -> int:
    from onnx import helper

    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)


def _axes(dynamic_axes: dict[str, dict[int, str]] | None, spec: _Spec) -> dict[str, list[str | int]]:
    """Shapes of the inputs and outputs: named axes are dynamic, the rest fixed (batch and sequence to 1).

    The cache's length axes stay dynamic whatever the config says: the cache grows by one token per step.
    """
    named = {name: dict(axes) for name, axes in (dynamic_axes or {}).items()}

    def dims(name: str, defaults: list[int | str]) -> list[int | str]:
        given = named.get(name, {})
        return [given.get(axis, default) for axis, default in enumerate(defaults)]

    ids = dims("input_ids", [1, 1])
    batch, seq = ids
    mask = dims("attention_mask", [batch, "total_sequence_length"])
    if (
        isinstance(mask[1], int) or mask[1] == seq
    ):  # the mask covers past + new tokens: never fixed, never the sequence's
        mask[1] = "total_sequence_length"
    past = dims("past_key_values.0.key", [batch, spec.kv_heads, "past_sequence_length", spec.head_dim])
    present = dims("present.0.key", [batch, spec.kv_heads, mask[1], spec.head_dim])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": dims("position_ids", [batch, seq]),
        "logits": dims("logits", [batch, seq, spec.vocab]),
        "past": past,
        "present": present,
    }


@dataclass
class _Shared:
    """Names computed once from the graph's inputs and read by every layer."""

    ids_shape: str
    bs_hidden: str  # [batch, sequence, -1]: the 3-d shape attention takes
    flat_ids: str
    seqlens: str  # per sequence, its length in the cache minus one (GroupQueryAttention's seqlens_k)
    total: str  # the attention mask's length: past and new tokens
    cos: str
    sin: str


def _shared(graph: Graph, folder: Path, spec: _Spec, io_dtype) -> _Shared:
    from onnx import TensorProto

    ids_shape = graph.op("Shape", ["input_ids"], "/model/ids_shape")
    bs_hidden = graph.op("Concat", [ids_shape, graph.const([-1])], "/model/bs_minus1", axis=0)
    flat_ids = graph.op("Reshape", ["input_ids", graph.const([-1])], "/model/flat_ids")
    mask_sum = graph.op("ReduceSum", ["attention_mask", graph.const([1])], "/model/mask_sum", keepdims=0)
    seqlens = graph.op(
        "Cast",
        [graph.op("Sub", [mask_sum, graph.const(1)], "/model/seqlens64")],
        "/model/seqlens_k",
        to=TensorProto.INT32,
    )
    mask_shape = graph.op("Shape", ["attention_mask"], "/model/mask_shape")
    total64 = graph.op("Gather", [mask_shape, graph.const(1)], "/model/total64", axis=0)
    total = graph.op("Cast", [total64], "/model/total_seq_len", to=TensorProto.INT32)
    cos, sin = _rotary_cache(folder, spec, io_dtype)
    cos_name = graph.weight("/model/rotary/cos_cache", io_dtype, cos.shape, [cos])
    sin_name = graph.weight("/model/rotary/sin_cache", io_dtype, sin.shape, [sin])
    return _Shared(ids_shape, bs_hidden, flat_ids, seqlens, total, cos_name, sin_name)


def _decoder(graph: Graph, weights: Weights, spec: _Spec, linear: Linear, folder: Path, io_dtype) -> str:
    """Emit the whole decoder; returns the logits' name."""
    shared = _shared(graph, folder, spec, io_dtype)
    norm_dtype = np.float16 if linear.weight_type == "fp16" else np.float32
    hidden = _embedding(graph, weights, spec, linear, shared.flat_ids, norm_dtype)
    for i in range(spec.layers):
        hidden = _attention(graph, weights, spec, linear, shared, hidden, i, norm_dtype)
        hidden = _mlp(graph, weights, spec, linear, hidden, i, norm_dtype)
    final = _rms_norm(graph, hidden, graph.copy(weights, "model.norm.weight", norm_dtype), spec.eps, "/model/norm")
    head = _lm_head(graph, linear, final, spec)
    return graph.op(
        "Reshape",
        [head, graph.op("Concat", [shared.ids_shape, graph.const([spec.vocab])], "/lm_head/shape", axis=0)],
        "/lm_head/logits",
        outputs=["logits"],
    )


def _attention(
    graph: Graph, weights: Weights, spec: _Spec, linear: Linear, shared: _Shared, hidden: str, i: int, norm_dtype
) -> str:
    """Layer ``i``'s attention block and its residual: the hidden state after it."""
    p, n = f"model.layers.{i}", f"/model/layers.{i}"

    def norm_weight(tensor):
        return graph.copy(weights, tensor, norm_dtype)

    def bias(tensor: str) -> str | None:
        return tensor if tensor in weights else None

    x = _rms_norm(graph, hidden, norm_weight(f"{p}.input_layernorm.weight"), spec.eps, f"{n}/input_layernorm")
    qkv = {}
    for proj in ("q", "k", "v"):
        tensor = f"{p}.self_attn.{proj}_proj"
        qkv[proj] = linear(x, f"{tensor}.weight", f"{n}/attn/{proj}_proj", bias(f"{tensor}.bias"))
    for proj, heads in (("q", spec.heads), ("k", spec.kv_heads)):
        if spec.qk_norm:
            per_head = graph.op("Reshape", [qkv[proj], graph.const([-1, spec.head_dim])], f"{n}/attn/{proj}_heads")
            weight = norm_weight(f"{p}.self_attn.{proj}_norm.weight")
            qkv[proj] = _rms_norm(graph, per_head, weight, spec.eps, f"{n}/attn/{proj}_norm")
        shaped = graph.op("Reshape", [qkv[proj], shared.bs_hidden], f"{n}/attn/{proj}_3d")
        qkv[proj] = graph.op(
            "RotaryEmbedding",
            [shaped, "position_ids", shared.cos, shared.sin],
            f"{n}/attn/{proj}_rotary",
            domain="com.microsoft",
            interleaved=0,
            num_heads=heads,
        )
    value = graph.op("Reshape", [qkv["v"], shared.bs_hidden], f"{n}/attn/v_3d")
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    attn, _, _ = graph.op(
        "GroupQueryAttention",
        [qkv["q"], qkv["k"], value, *past, shared.seqlens, shared.total],
        f"{n}/attn/gqa",
        outputs=[f"{n}/attn/gqa/out", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=spec.heads,
        kv_num_heads=spec.kv_heads,
        scale=1.0 / math.sqrt(spec.head_dim),
        local_window_size=spec.sliding_window,
        do_rotary=0,
    )
    attn2d = graph.op("Reshape", [attn, graph.const([-1, spec.heads * spec.head_dim])], f"{n}/attn/flat")
    out = linear(attn2d, f"{p}.self_attn.o_proj.weight", f"{n}/attn/o_proj", bias(f"{p}.self_attn.o_proj.bias"))
    return graph.op("Add", [hidden, out], f"{n}/attn_residual")


def _mlp(graph: Graph, weights: Weights, spec: _Spec, linear: Linear, hidden: str, i: int, norm_dtype) -> str:
    """Layer ``i``'s gated MLP (SiLU) and its residual."""
    p, n = f"model.layers.{i}", f"/model/layers.{i}"
    weight = graph.copy(weights, f"{p}.post_attention_layernorm.weight", norm_dtype)
    x = _rms_norm(graph, hidden, weight, spec.eps, f"{n}/post_attention_layernorm")
    gate = linear(x, f"{p}.mlp.gate_proj.weight", f"{n}/mlp/gate_proj")
    up = linear(x, f"{p}.mlp.up_proj.weight", f"{n}/mlp/up_proj")
    act = graph.op("Mul", [gate, graph.op("Sigmoid", [gate], f"{n}/mlp/sigmoid")], f"{n}/mlp/silu")
    down = linear(graph.op("Mul", [act, up], f"{n}/mlp/gated"), f"{p}.mlp.down_proj.weight", f"{n}/mlp/down_proj")
    return graph.op("Add", [hidden, down], f"{n}/mlp_residual")


def _embedding(graph: Graph, weights: Weights, spec: _Spec, linear: Linear, ids: str, dtype) -> str:
    """Gather rows of the embedding (and add an adapter's, where the graph takes one). A tied quantized model gathers
    from the head's blocks (GatherBlockQuantized), so the matrix is stored once, quantized, as onnxruntime-genai does;
    otherwise the embedding is float."""
    embed = "model.embed_tokens.weight"
    if not (spec.tied and linear.weight_type in ("int8", "int4")) or linear.keep(embed):
        graph.copy(weights, embed, dtype)
        rows = graph.op("Gather", [embed, ids], "/model/embed_tokens", axis=0)
    else:
        rows = _gathered_blocks(graph, spec, linear, ids)
    return linear.adapted(ids, embed, "/model/embed_tokens", rows)


def _gathered_blocks(graph: Graph, spec: _Spec, linear: Linear, ids: str) -> str:
    """Rows of the tied head's int8/int4 blocks, as float."""
    embed = "model.embed_tokens.weight"
    bits = 4 if linear.weight_type == "int4" else 8
    k_blocks = -(-spec.hidden // linear.block_size)
    flat = graph.op(
        "Reshape",
        [f"{embed}.q{bits}", graph.const([spec.vocab, k_blocks * linear.block_size * bits // 8])],
        "/model/embed_tokens/blocks",
    )
    rows = graph.op(
        "GatherBlockQuantized",
        [flat, ids, f"{embed}.scales"] + ([] if linear.symmetric else [f"{embed}.zero_points"]),
        "/model/embed_tokens",
        domain="com.microsoft",
        bits=bits,
        block_size=linear.block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    if k_blocks * linear.block_size != spec.hidden:  # the last block was padded
        rows = graph.op(
            "Slice", [rows, graph.const([0]), graph.const([spec.hidden]), graph.const([1])], "/model/embed_tokens/slice"
        )
    return rows


def _lm_head(graph: Graph, linear: Linear, hidden: str, spec: _Spec) -> str:
    """Tied float heads reuse the embedding's initializer (Gemm transB=1); quantized heads get their own blocks. An
    adapter's head LoRA is added to either (its inputs are named for lm_head, tied or not)."""
    if spec.tied and (linear.weight_type in ("fp32", "fp16") or linear.keep("model.embed_tokens.weight")):
        head = graph.op("Gemm", [hidden, "model.embed_tokens.weight"], "/lm_head/gemm", transB=1)
    else:
        source = "model.embed_tokens.weight" if spec.tied else "lm_head.weight"
        if linear.weight_type in ("fp32", "fp16") or linear.keep(source):
            head = linear(hidden, source, "/lm_head/gemm", lora=False)
        else:
            head = linear.quantized(hidden, source, "/lm_head/matmul")
    return linear.adapted(hidden, "lm_head.weight", "/lm_head", head)
