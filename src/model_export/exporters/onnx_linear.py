"""The decoder's projections in the graph: float MatMul, int8 and int4 as MatMulNBits blocks (round to nearest, or the
levels GPTQ chose), and the modules quantization_keep_modules keeps in float."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import Graph, Weights


class Linear:
    """Writes one linear layer's weight and emits its node: Gemm(transB) for float, MatMulNBits for int8/int4."""

    def __init__(
        self,
        graph: Graph,
        weights: Weights,
        weight_type: str,
        block_size: int,
        accuracy_level: int,
        gptq: Any = None,
        keep: Any = None,
        symmetric: bool = False,
        lora: dict[str, Any] | None = None,
    ) -> None:
        self.graph, self.weights, self.weight_type = graph, weights, weight_type
        self.lora = lora or {}  # onnx_lora.LoraTarget by base tensor: the modules that take an adapter's A and B
        self.symmetric = symmetric  # blocks without zero points (MatMulNBits then centres on 2**(bits-1))
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self.keep = keep or (lambda tensor: False)  # quantization_keep_modules: float Gemm instead of blocks
        self.gptq = gptq if weight_type == "int4" else None  # GptqLayers: GPTQ's levels instead of rounding
        self.float_dtype = np.float16 if weight_type == "fp16" else np.float32

    def float_weight(self, tensor: str) -> str:
        return self.graph.copy(self.weights, tensor, self.float_dtype)

    def __call__(self, x: str, tensor: str, name: str, bias: str | None = None, lora: bool = True) -> str:
        if self.weight_type in ("fp32", "fp16") or self.keep(tensor):
            inputs = [x, self.float_weight(tensor)] + ([self.float_weight(bias)] if bias else [])
            out = self.graph.op("Gemm", inputs, name, transB=1)
        else:
            out = self.quantized(x, tensor, name)
            out = self.graph.op("Add", [out, self.float_weight(bias)], f"{name}/bias") if bias else out
        return self.adapted(x, tensor, name, out) if lora else out

    def adapted(self, x: str, tensor: str, name: str, out: str) -> str:
        """``out`` plus x·A·B where the graph takes an adapter for ``tensor`` (onnx_lora: A and B are inputs, of rank 0
        while no adapter is active); an embedding's A is gathered by the token ids ``x``."""
        from .onnx_lora import lora_inputs

        target = self.lora.get(tensor)
        if target is None:
            return out
        a, b = lora_inputs(self.graph, tensor.removesuffix(".weight"), target, self.float_dtype)
        if target.kind == "embedding":
            low = self.graph.op("Gather", [a, x], f"{name}/lora_A", axis=0)
        else:
            low = self.graph.op("MatMul", [x, a], f"{name}/lora_A")
        return self.graph.op("Add", [out, self.graph.op("MatMul", [low, b], f"{name}/lora_B")], f"{name}/lora")

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


def keeper(patterns: list[str] | None, spec: Any) -> Any:
    if not patterns:
        return None
    from ..quantize.keep import kept_module

    return lambda tensor: kept_module(patterns, tensor, tied=spec.tied)


def gptq_layers(folder: str | Path | None) -> Any:
    if folder is None:
        return None
    from ..quantize.gptq import GptqLayers

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
