"""The merge's tensors as a GGUF holds them: llama.cpp's names, the rows of q and k reordered for its llama rope, the
rope frequency table, and float rows read in chunks (for the export and its read-back alike)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.hf_layout import rope_inv_freq, rope_parameters
from ..errors import ExportFormatError
from ..faults import crash_point
from ..files import copy_range, write_sliced
from ..quantize.gguf_types import SUPPORTED_ARCHITECTURES
from ..tensor_io import byte_row_chunks, read_bytes, read_header, torch_row_chunks

_CHUNK_BYTES = 64 << 20


@dataclass
class Source:
    name: str  # Hugging Face name
    target: str  # GGUF name
    shape: tuple[int, ...]
    info: Any
    path: Path
    heads: int | None = None  # rows to reorder per head for llama.cpp's llama rope (q and k of the llama architecture)


def rope_heads(arch_name: str, config: dict[str, Any], name: str) -> int | None:
    """llama.cpp's llama architecture rotates adjacent pairs, transformers' Llama the two halves of each head: the rows
    of q_proj and k_proj (weights and biases) are reordered per head, as llama.cpp's converter does. Qwen2/Qwen3 rotate
    halves in llama.cpp too (NEOX), so they are written as they are."""
    if SUPPORTED_ARCHITECTURES.get(arch_name) != "LLAMA":
        return None
    heads = config["num_attention_heads"]
    if ".self_attn.q_proj." in name:
        return heads
    if ".self_attn.k_proj." in name:
        return config.get("num_key_value_heads") or heads
    return None


def permute_heads(rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [half 0 | half 1] -> interleaved pairs (0, d/2), (1, d/2 + 1), ..."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_sources(merged: Path, arch: Any, config: dict[str, Any]) -> list[Source]:
    import gguf

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    arch_name = (config.get("architectures") or ["?"])[0]
    sources = []
    for shard in sorted(merged.glob("*.safetensors")):
        for name, info in read_header(shard).tensors.items():
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ExportFormatError("gguf_unknown_tensor", tensor=name)
            sources.append(Source(name, target, tuple(info.shape), info, shard, rope_heads(arch_name, config, name)))
    return sources


class Chunks:
    """A tensor that GGUFWriter.write_tensor_data can write (it asks for nbytes and tofile) without holding it whole.
    ``stored``: (open file, TensorInfo) of a merged tensor whose bytes are the GGUF's as they are (STORED_AS, rows in
    place), copied file to file by the kernel (files.copy_range); the chunks are written where it cannot."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray], stored: tuple[Any, Any] | None = None) -> None:
        self.nbytes, self.chunks, self.stored = nbytes, chunks, stored

    def tofile(self, fout) -> None:
        if self.stored is None or not copy_range(self.stored[0], fout, self.stored[1].start, self.nbytes):
            written = 0
            for chunk in self.chunks:
                write_sliced(fout, np.ascontiguousarray(chunk))
                written += chunk.nbytes
            if written != self.nbytes:  # a bug, not a user error
                raise AssertionError(f"wrote {written} bytes, declared {self.nbytes}")
        crash_point("export_tensor")


def float_chunks(source: Source, fh) -> Iterator[np.ndarray]:
    """The merged tensor as float32 row chunks (torch widens bf16 on every core); a tensor whose rows are reordered
    per head comes whole (one attention projection)."""
    import torch

    chunks = (chunk.to(torch.float32).numpy() for chunk in torch_row_chunks(fh, source.info, _CHUNK_BYTES))
    if source.heads:
        yield permute_heads(np.concatenate(list(chunks)), source.heads)
        return
    for values in chunks:
        yield values if source.shape else values.reshape(1)


# GGUF tensor types whose bytes are those of a safetensors dtype: a merged tensor of that dtype is written as it is
STORED_AS = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def stored_chunks(source: Source, fh) -> Iterator[np.ndarray]:
    """The merged tensor's own bytes in row chunks, for a GGUF type that stores them unchanged (STORED_AS): a bf16
    merge written as a bf16 GGUF was widened to float32 and rounded back, an identity that took most of the 0.6B
    shape's export; rows reordered per head move as they are."""
    info = source.info
    if source.heads:
        whole = np.frombuffer(read_bytes(fh, info), np.uint8)
        yield permute_heads(whole.reshape(info.shape[0], -1), source.heads)
        return
    for _, raw in byte_row_chunks(fh, info, _CHUNK_BYTES):
        yield np.frombuffer(raw, np.uint8)


ROPE_FREQS = "rope_freqs.weight"


_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rope_freq_table(config: dict[str, Any], merged: Path) -> np.ndarray | None:
    """Llama 3 rope: the per-frequency divisors llama.cpp reads from a ``rope_freqs`` tensor, taken from transformers'
    own
    frequencies (the default ones over the scaled ones). None for the types GGUF metadata describes (default, linear,
    yarn); ExportFormatError for any other."""
    rope_type, _ = rope_parameters(config)
    if rope_type not in _ROPE_TYPES:
        raise ExportFormatError(
            "gguf_unsupported", what=f"rope scaling {rope_type}", supported=", ".join(_ROPE_TYPES) + " rope"
        )
    if rope_type != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    default, _ = rope_inv_freq(merged, config, head_dim, "default")
    scaled, _ = rope_inv_freq(merged, config, head_dim)
    return (default / scaled).numpy().astype(np.float32)
