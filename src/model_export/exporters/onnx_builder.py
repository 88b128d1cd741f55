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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import i18n
from ..errors import ExportFormatError
from ..faults import crash_point
from ..hf_layout import rope_inv_freq
from ..monitoring import Progress
from ..tensor_io import read_header, torch_row_chunks

__all__ = ["build_onnx", "BuildResult", "SUPPORTED_ARCHITECTURES", "WEIGHT_TYPES"]

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4")
DATA_FILE = "model.onnx.data"
_ALIGN = 4096  # large tensors start on page boundaries, so onnxruntime can map them
_ALIGN_SMALL = 64  # small ones (norms, scales of small layers) are not worth a page each
_CHUNK_BYTES = 64 << 20  # rows of one tensor converted at a time


@dataclass
class BuildResult:
    path: str
    weight_type: str
    opset: int
    bytes_written: int
    tensors: int
    io_dtype: str
    axes: dict[str, list[str | int]] = field(default_factory=dict)


class _Weights:
    """Merged safetensors, read one tensor (or a few rows of one) at a time."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, tuple[Path, Any]] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            for name, info in read_header(shard).tensors.items():
                self.where[name] = (shard, info)
        self.files: dict[Path, Any] = {}
        total = sum(info.nbytes for _, info in self.where.values())
        self.meter = Progress(i18n.ui("progress_export", format="ONNX"), total)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str):
        return self.where[name][1]

    def raw_chunks(self, name: str) -> Iterator[Any]:
        """The tensor in its stored dtype as torch tensors of at most _CHUNK_BYTES of float32 each (whole rows)."""
        path, info = self.where[name]
        fh = self.files.get(path) or self.files.setdefault(path, open(path, "rb"))  # noqa: SIM115 - closed in close()
        for chunk in torch_row_chunks(fh, info, _CHUNK_BYTES):
            self.meter.advance(chunk.numel() * chunk.element_size())
            yield chunk

    def row_chunks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor as float32 arrays of at most _CHUNK_BYTES each (whole rows); torch widens bf16 on every core."""
        import torch

        for chunk in self.raw_chunks(name):
            yield chunk.to(torch.float32).numpy()

    def close(self) -> None:
        self.meter.close()
        for fh in self.files.values():
            fh.close()


class _DataFile:
    """Appends tensors to the external data file and returns TensorProtos that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0
        self.count = 0

    def add(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks) -> Any:
        from onnx import TensorProto, helper

        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        pad = (-self.offset) % (_ALIGN if expected >= (1 << 20) else _ALIGN_SMALL)
        self.fh.write(b"\0" * pad)
        start = self.offset = self.offset + pad
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            self.fh.write(memoryview(data).cast("B"))
            self.offset += data.nbytes
        length = self.offset - start
        if length != expected:  # a bug, not a user error: never write a tensor that lies about its size
            raise AssertionError(f"{name}: wrote {length} bytes, expected {expected}")
        crash_point("export_tensor")
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.count += 1
        return tensor

    def close(self) -> None:
        self.fh.close()


class _Graph:
    """Nodes, initializers and names of the graph being built."""

    def __init__(self, data: _DataFile, opset: int) -> None:
        self.data, self.opset = data, opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.constants: dict[tuple, str] = {}

    def op(
        self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs
    ) -> Any:
        from onnx import helper

        names = (
            outputs
            if isinstance(outputs, list)
            else [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        )
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"/const/{len(self.constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def weight(self, name: str, dtype, shape, chunks) -> str:
        self.initializers.append(self.data.add(name, dtype, tuple(shape), chunks))
        return name

    def copy(self, weights: _Weights, name: str, dtype) -> str:
        """A merged tensor as an initializer of the same name, in ``dtype`` (fp32 or fp16), streamed in row chunks."""
        return self.weight(name, dtype, weights.info(name).shape, weights.row_chunks(name))


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


def _spec(folder: Path, weights: _Weights) -> tuple[_Spec, dict[str, Any]]:
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


class _Linear:
    """Writes one linear layer's weight and emits its node: Gemm(transB) for float, MatMulNBits for int8/int4."""

    def __init__(
        self,
        graph: _Graph,
        weights: _Weights,
        weight_type: str,
        block_size: int,
        accuracy_level: int,
        gptq: Any = None,
        keep: Any = None,
        symmetric: bool = False,
    ) -> None:
        self.graph, self.weights, self.weight_type = graph, weights, weight_type
        self.symmetric = symmetric  # blocks without zero points (MatMulNBits then centres on 2**(bits-1))
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self.keep = keep or (lambda tensor: False)  # quantization_keep_modules: float Gemm instead of blocks
        self.gptq = gptq if weight_type == "int4" else None  # GptqLayers: GPTQ's levels instead of rounding
        self.float_dtype = np.float16 if weight_type == "fp16" else np.float32

    def float_weight(self, tensor: str) -> str:
        return self.graph.copy(self.weights, tensor, self.float_dtype)

    def __call__(self, x: str, tensor: str, name: str, bias: str | None = None) -> str:
        if self.weight_type in ("fp32", "fp16") or self.keep(tensor):
            inputs = [x, self.float_weight(tensor)] + ([self.float_weight(bias)] if bias else [])
            return self.graph.op("Gemm", inputs, name, transB=1)
        out = self.quantized(x, tensor, name)
        return self.graph.op("Add", [out, self.float_weight(bias)], f"{name}/bias") if bias else out

    def from_gptq(self, x: str, tensor: str, name: str) -> str:
        """GPTQ's symmetric int4 levels and scales as MatMulNBits blocks (one block per GPTQ group, the default zero
        point 8 of unsigned 4-bit: the values are exactly those of the int4 safetensors)."""
        levels, scales = self.gptq.levels(tensor.removesuffix(".weight"))
        n, k = levels.shape
        group = k // scales.shape[1]
        unsigned = (levels.numpy().astype(np.int16) + 8).astype(np.uint8).reshape(n, k // group, group)
        packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
        q = self.graph.weight(f"{tensor}.q4", np.uint8, packed.shape, [packed])
        s = self.graph.weight(f"{tensor}.scales", np.float32, tuple(scales.shape), [scales.numpy()])
        return self.graph.op(
            "MatMulNBits",
            [x, q, s],
            name,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=group,
            accuracy_level=self.accuracy_level,
        )

    def quantized(self, x: str, tensor: str, name: str) -> str:
        if self.gptq is not None and ".layers." in tensor:  # GPTQ covers the decoder's matrices; the head is rounded
            return self.from_gptq(x, tensor, name)
        bits = 4 if self.weight_type == "int4" else 8
        n, k = self.weights.info(tensor).shape
        scales, zeros = [], []

        def packed_chunks():
            for rows in self.weights.raw_chunks(tensor):
                packed, scale, zero = quantize_blocks(rows, bits, self.block_size, self.symmetric)
                scales.append(scale)
                zeros.append(zero)
                yield packed

        k_blocks = -(-k // self.block_size)
        blob = self.block_size * bits // 8
        q = self.graph.weight(f"{tensor}.q{bits}", np.uint8, (n, k_blocks, blob), packed_chunks())
        s = self.graph.weight(f"{tensor}.scales", np.float32, (n, k_blocks), scales)
        z = self.graph.weight(f"{tensor}.zero_points", np.uint8, (n, -(-k_blocks * bits // 8)), zeros)
        return self.graph.op(
            "MatMulNBits",
            [x, q, s] if self.symmetric else [x, q, s, z],
            name,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=self.block_size,
            accuracy_level=self.accuracy_level,
        )


def _keeper(patterns: list[str] | None, spec: Any) -> Any:
    if not patterns:
        return None
    from ..config import kept_module

    return lambda tensor: kept_module(patterns, tensor, tied=spec.tied)


def _gptq_layers(folder: str | Path | None) -> Any:
    if folder is None:
        return None
    from ..gptq import GptqLayers

    return GptqLayers(folder)


def quantize_blocks(
    rows, bits: int, block_size: int, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest blocks along K of a [N, K] weight (numpy or torch, any float dtype), asymmetric (a zero point
    per block) or symmetric (none: MatMulNBits then centres on 2**(bits-1)), by onnxruntime's own quantizer kernel.

    Returns (packed [N, k_blocks, block_size*bits/8] uint8, scales [N, k_blocks] float32, zero points uint8),
    exactly what onnxruntime's MatMulNBitsQuantizer stores for the same weight.
    """
    import torch
    from onnxruntime.capi import _pybind_state as ort_c

    n, k = rows.shape
    k_blocks = -(-k // block_size)
    # The kernel reads [K, N]: widen and transpose in one torch copy (numpy's strided transpose is 4x slower).
    padded = torch.empty((k_blocks * block_size, n), dtype=torch.float32)
    padded[k:].zero_()
    padded[:k].copy_(torch.as_tensor(rows).t())
    source = padded.numpy()
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zeros = np.zeros((n, -(-k_blocks * bits // 8)), dtype=np.uint8)
    kernel = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    kernel(packed, source, scales, zeros, block_size, n, k, symmetric)
    return packed, scales, zeros


def _rms_norm(graph: _Graph, x: str, weight: str, eps: float, name: str) -> str:
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
) -> BuildResult:
    """Write ``out/model.onnx`` and ``out/model.onnx.data`` from the merged safetensors folder ``merged``.

    ``weight_type``: fp32, fp16, int8 or int4 (MatMulNBits blocks of ``block_size`` along K, rounded to nearest; with
    ``gptq``, the folder calibrate_gptq wrote, int4 blocks are GPTQ's levels and groups).
    Raises ExportFormatError for an architecture the builder does not know.
    """
    from onnx import TensorProto, helper

    merged, out = Path(merged), Path(out)
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    weights = _Weights(merged)
    spec, config = _spec(merged, weights)
    out.mkdir(parents=True, exist_ok=True)
    data = _DataFile(out / DATA_FILE)
    graph = _Graph(data, opset)
    io_dtype = np.float16 if weight_type == "fp16" else np.float32
    io_type = helper.np_dtype_to_tensor_dtype(np.dtype(io_dtype))
    try:
        axes = _axes(dynamic_axes, spec)
        logits = _decoder(
            graph,
            weights,
            spec,
            _Linear(
                graph,
                weights,
                weight_type,
                block_size,
                accuracy_level,
                _gptq_layers(gptq),
                _keeper(keep, spec),
                symmetric,
            ),
            merged,
            io_dtype,
        )
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, axes["input_ids"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, axes["attention_mask"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, axes["position_ids"]),
        ]
        outputs = [helper.make_tensor_value_info(logits, io_type, axes["logits"])]
        for i in range(spec.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", io_type, axes["past"]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", io_type, axes["present"]))
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


def _decoder(graph: _Graph, weights: _Weights, spec: _Spec, linear: _Linear, folder: Path, io_dtype) -> str:
    """Emit the whole decoder; returns the logits' name."""
    from onnx import TensorProto

    # Shapes and attention lengths computed once from the inputs.
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
    total = graph.op(
        "Cast",
        [
            graph.op(
                "Gather",
                [graph.op("Shape", ["attention_mask"], "/model/mask_shape"), graph.const(1)],
                "/model/total64",
                axis=0,
            )
        ],
        "/model/total_seq_len",
        to=TensorProto.INT32,
    )
    cos, sin = _rotary_cache(folder, spec, io_dtype)
    cos_name = graph.weight("/model/rotary/cos_cache", io_dtype, cos.shape, [cos])
    sin_name = graph.weight("/model/rotary/sin_cache", io_dtype, sin.shape, [sin])

    embed_dtype = np.float16 if linear.weight_type == "fp16" else np.float32
    hidden = _embedding(graph, weights, spec, linear, flat_ids, embed_dtype)
    norm_dtype = embed_dtype
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        n = f"/model/layers.{i}"

        def norm_weight(tensor):
            return graph.copy(weights, tensor, norm_dtype)

        x = _rms_norm(graph, hidden, norm_weight(f"{p}.input_layernorm.weight"), spec.eps, f"{n}/input_layernorm")
        qkv = {}
        for proj in ("q", "k", "v"):
            bias = f"{p}.self_attn.{proj}_proj.bias"
            qkv[proj] = linear(
                x, f"{p}.self_attn.{proj}_proj.weight", f"{n}/attn/{proj}_proj", bias if bias in weights else None
            )
        for proj, heads in (("q", spec.heads), ("k", spec.kv_heads)):
            if spec.qk_norm:
                per_head = graph.op("Reshape", [qkv[proj], graph.const([-1, spec.head_dim])], f"{n}/attn/{proj}_heads")
                qkv[proj] = _rms_norm(
                    graph, per_head, norm_weight(f"{p}.self_attn.{proj}_norm.weight"), spec.eps, f"{n}/attn/{proj}_norm"
                )
            shaped = graph.op("Reshape", [qkv[proj], bs_hidden], f"{n}/attn/{proj}_3d")
            qkv[proj] = graph.op(
                "RotaryEmbedding",
                [shaped, "position_ids", cos_name, sin_name],
                f"{n}/attn/{proj}_rotary",
                domain="com.microsoft",
                interleaved=0,
                num_heads=heads,
            )
        value = graph.op("Reshape", [qkv["v"], bs_hidden], f"{n}/attn/v_3d")
        attn, _, _ = graph.op(
            "GroupQueryAttention",
            [qkv["q"], qkv["k"], value, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total],
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
        o_bias = f"{p}.self_attn.o_proj.bias"
        hidden = graph.op(
            "Add",
            [
                hidden,
                linear(
                    attn2d, f"{p}.self_attn.o_proj.weight", f"{n}/attn/o_proj", o_bias if o_bias in weights else None
                ),
            ],
            f"{n}/attn_residual",
        )
        x = _rms_norm(
            graph,
            hidden,
            norm_weight(f"{p}.post_attention_layernorm.weight"),
            spec.eps,
            f"{n}/post_attention_layernorm",
        )
        gate = linear(x, f"{p}.mlp.gate_proj.weight", f"{n}/mlp/gate_proj")
        up = linear(x, f"{p}.mlp.up_proj.weight", f"{n}/mlp/up_proj")
        act = graph.op("Mul", [gate, graph.op("Sigmoid", [gate], f"{n}/mlp/sigmoid")], f"{n}/mlp/silu")
        down = linear(graph.op("Mul", [act, up], f"{n}/mlp/gated"), f"{p}.mlp.down_proj.weight", f"{n}/mlp/down_proj")
        hidden = graph.op("Add", [hidden, down], f"{n}/mlp_residual")
    final = _rms_norm(graph, hidden, graph.copy(weights, "model.norm.weight", norm_dtype), spec.eps, "/model/norm")
    head = _lm_head(graph, linear, final, spec)
    return graph.op(
        "Reshape",
        [head, graph.op("Concat", [ids_shape, graph.const([spec.vocab])], "/lm_head/shape", axis=0)],
        "/lm_head/logits",
        outputs=["logits"],
    )


def _embedding(graph: _Graph, weights: _Weights, spec: _Spec, linear: _Linear, ids: str, dtype) -> str:
    """Gather rows of the embedding. A tied quantized model gathers from the head's blocks (GatherBlockQuantized),
    so the matrix is stored once, quantized, as onnxruntime-genai does; otherwise the embedding is float."""
    embed = "model.embed_tokens.weight"
    if not (spec.tied and linear.weight_type in ("int8", "int4")) or linear.keep(embed):
        graph.copy(weights, embed, dtype)
        return graph.op("Gather", [embed, ids], "/model/embed_tokens", axis=0)
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


def _lm_head(graph: _Graph, linear: _Linear, hidden: str, spec: _Spec) -> str:
    """Tied float heads reuse the embedding's initializer (Gemm transB=1); quantized heads get their own blocks."""
    if spec.tied and (linear.weight_type in ("fp32", "fp16") or linear.keep("model.embed_tokens.weight")):
        return graph.op("Gemm", [hidden, "model.embed_tokens.weight"], "/lm_head/gemm", transB=1)
    source = "model.embed_tokens.weight" if spec.tied else "lm_head.weight"
    if linear.weight_type in ("fp32", "fp16") or linear.keep(source):
        return linear(hidden, source, "/lm_head/gemm")
    return linear.quantized(hidden, source, "/lm_head/matmul")
