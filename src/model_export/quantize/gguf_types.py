"""GGUF tensor types as llama-quantize chooses them: the mixtures, the type of each tensor, the encoding.

The quantization side of the GGUF export (exporters/gguf_export.py writes the file): which type a run's settings give
(gguf_type_for, uses_importance), which type each tensor gets in a K mixture (llama.cpp's llama_tensor_get_type,
followed rule by rule), and the encoding of rows into blocks (kquants.py, with an importance matrix where given)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .ggml_quants import GGML_TYPES, ggml_library, ggml_quantize
from .kquants import K_TYPES, LEGACY_BYTES, QK_K
from .kquants import quantize as k_quantize

__all__ = [
    "gguf_type_for",
    "gguf_names",
    "read_importance",
    "uses_importance",
    "GGUF_TYPES",
    "K_MIXTURES",
    "SUPPORTED_ARCHITECTURES",
]

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "QWEN3", "Qwen2ForCausalLM": "QWEN2", "LlamaForCausalLM": "LLAMA"}


# llama.cpp's mixtures of K-quants (llama-quantize's names): the type most tensors get
K_MIXTURES = {
    "q2_k": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", *K_MIXTURES)


_LEVEL_TYPES = {"bf16": "bf16", "fp16": "f16", "int8": "q8_0", "int4": "q4_k_m"}


FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    **{mixture: f"MOSTLY_{mixture.upper()}" for mixture in K_MIXTURES},
}


# where a row is not whole 256-value blocks, llama.cpp falls back to these (then to f16)
_K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_type_for(level: str, merged: Path, requested: str = "auto") -> str:
    """The GGUF tensor type: gguf_type when set, else from quantization_level ('none' keeps the merge's dtype)."""
    if requested != "auto":
        return requested
    if level in _LEVEL_TYPES:
        return _LEVEL_TYPES[level]
    dtype = json.loads((merged / "config.json").read_text(encoding="utf-8")).get("dtype") or "float32"
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def gguf_names(config: Any, names: list[str]) -> dict[str, str]:
    """transformers' module names (model.layers.N.self_attn.q_proj) -> llama.cpp's (blk.N.attn_q.weight)."""
    import gguf

    arch_name = SUPPORTED_ARCHITECTURES.get((config.architectures or ["?"])[0], "LLAMA")
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), config.num_hidden_layers)
    return {n: table.get_name(n + ".weight", try_suffixes=(".weight",)) for n in names}


def read_importance(path: str | Path) -> dict[str, np.ndarray]:
    """{tensor name: importance per column} from an imatrix.gguf, as llama-quantize computes it (in_sum2 / count in
    float32; 1 where the count is 0)."""
    import gguf

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in gguf.GGUFReader(str(path)).tensors}
    importance = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key.removesuffix(".in_sum2")
        count = np.float32(round(float(tensors[f"{name}.counts"][0])))
        importance[name] = sums / count if count > 0 else np.ones_like(sums)
    return importance


def uses_importance(config: Any) -> bool:
    """Whether the run's GGUF type takes an importance matrix (K mixtures, q4_0 ... q5_1; not f16/bf16/q8_0)."""
    requested = config.gguf_type if config.gguf_type != "auto" else _LEVEL_TYPES.get(config.quantization_level)
    return requested in K_MIXTURES or requested in LEGACY_BYTES


def block_values(ttype: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, ttype.upper())][0]


@dataclass(frozen=True)
class TypePlan:
    """What llama.cpp's choice of types per tensor looks at."""

    layers: int
    tied: bool  # no output.weight: token_embd is also the output
    gqa: int  # attention heads per KV head
    output_type: str | None = None  # llama-quantize --output-tensor-type (a tied token_embd too)
    token_embd_type: str | None = None  # llama-quantize --token-embedding-type
    keep: tuple[str, ...] = ()  # quantization_keep_modules: these stay in the merge's precision
    full: str = "f16"  # the merge's precision as a GGUF type (f32, f16 or bf16)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mixture_type(target: str, mixture: str, model: TypePlan, columns: int) -> str:
    """The type llama.cpp's quantizer (llama_tensor_get_type) gives GGUF tensor ``target`` in K mixture ``mixture``
    for the dense architectures we export: the output (and a tied token embedding) in Q6_K, more bits for attn_v and
    ffn_down in chosen layers, then a 32-value type where the rows are not whole 256-value blocks."""
    kind = K_MIXTURES[mixture]
    layer = int(target.split(".")[1]) if target.startswith("blk.") else -1
    role = target.split(".")[-2] if layer >= 0 else target.removesuffix(".weight")
    if role == "output" or (model.tied and role == "token_embd"):
        kind = "q8_0" if columns % QK_K else "q6_k"
    elif role == "attn_v":
        kind = {
            "q2_k": "q4_k" if model.gqa >= 4 else "q3_k",
            "q3_k_m": "q5_k" if layer < 2 else "q4_k",
            "q3_k_l": "q5_k",
            "q4_k_m": "q6_k" if _more_bits(layer, model.layers) else kind,
            "q5_k_m": "q6_k" if _more_bits(layer, model.layers) else kind,
            "q4_k_s": "q5_k" if layer < 4 else kind,
        }.get(mixture, kind)
    elif role == "ffn_down":
        kind = {
            "q2_k": "q3_k",
            "q3_k_m": "q5_k" if layer < model.layers // 16 else "q4_k",
            "q3_k_l": "q5_k",
            "q4_k_m": "q6_k" if _more_bits(layer, model.layers) else kind,
            "q5_k_m": "q6_k" if _more_bits(layer, model.layers) else kind,
            "q4_k_s": "q5_k" if layer < model.layers // 8 else kind,
        }.get(mixture, kind)
    elif role == "attn_output":
        kind = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mixture, kind)
    return fitting_type(kind, columns)


def fitting_type(kind: str, columns: int) -> str:
    """``kind``, or llama.cpp's fallback where a row is not whole blocks of it (then f16)."""
    if columns % block_values(kind):
        kind = _K_FALLBACK.get(kind, kind)
    return kind if columns % block_values(kind) == 0 else "f16"


K_CHUNK_VALUES = 1 << 19  # K-quants work on this many values at a time (measured: 128 Ki-2 Mi, this was fastest)


_K_POOL: list[Any] = []


def _k_pool() -> Any:
    """Threads for the K-quants, one per core this process may use: numpy releases the GIL inside each operation
    and ctypes for llama.cpp's call, so row chunks quantize side by side."""
    if not _K_POOL:
        from concurrent.futures import ThreadPoolExecutor

        from ..monitoring import THREADS_ENV, threads

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cores = threads() if os.environ.get(THREADS_ENV) else cores  # a batch's share of the cores
        _K_POOL.append(ThreadPoolExecutor(max(1, cores), thread_name_prefix="k-quants"))
    return _K_POOL[0]


def encode_rows(values: np.ndarray, ttype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows in GGUF type ``ttype``: f32/f16 by cast; the quantized types by llama.cpp's own quantizer where
    the llamacpp extra installed it (ggml_quants.py), else K-quants by our kquants (with the tensor's importance per
    column when an importance matrix has it) and the legacy types through gguf.quants: the same bytes either way."""
    import gguf

    if ttype == "f32":
        return values
    if ttype == "f16":
        return values.astype(np.float16)
    if ggml_library() is not None and ttype in GGML_TYPES:
        return _in_chunks(values, lambda part: ggml_quantize(part, ttype, importance))
    if ttype in K_TYPES or (importance is not None and ttype in LEGACY_BYTES):
        return _in_chunks(values, lambda part: k_quantize(part, ttype, importance))
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, ttype.upper()))


def _in_chunks(values: np.ndarray, encode: Any) -> np.ndarray:
    """``encode`` over row chunks of about K_CHUNK_VALUES values, side by side on the K-quant threads."""
    rows = values.reshape(-1, values.shape[-1])
    step = max(1, K_CHUNK_VALUES // rows.shape[1])
    parts = [rows[i : i + step] for i in range(0, len(rows), step)]
    return np.concatenate(list(_k_pool().map(encode, parts)))


def importance_for(imatrix: Mapping[str, np.ndarray] | None, target: str, ttype: str) -> np.ndarray | None:
    """The importance matrix's entry for a tensor, where its type uses one (as in llama.cpp: not f16, q8_0)."""
    return imatrix.get(target) if imatrix and (ttype in K_TYPES or ttype in LEGACY_BYTES) else None


def type_nbytes(shape: tuple[int, ...], ttype: str) -> int:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1] or (1,)) * (shape[-1] if shape else 1) // block * size
