"""GGUF for llama.cpp and Ollama, written from the merged safetensors one tensor at a time.

The ``gguf`` package (llama.cpp's own Python library) does the format: GGUFWriter's state machine
(header, key-values, tensor infos, then the data tensor by tensor), llama.cpp's tensor names
(``get_tensor_name_map``), its quantizers (``gguf.quants``, tested bit for bit against ggml's C code)
and the tokenizer's special tokens, merges and chat template (``SpecialVocab``). What we add is the
streaming: every tensor's info is declared from the safetensors headers before any data exists, and
the data is then produced one tensor at a time (large ones in row chunks), so memory stays at a
few chunks whatever the model's size. The token list and types follow llama.cpp's converter
(padded to the embedding's rows with ``[PADn]`` tokens of type UNUSED, special added tokens CONTROL,
other added tokens USER_DEFINED).

    export_gguf(merged_dir, out_dir, gguf_type="q8_0")  ->  out_dir/model-q8_0.gguf + Modelfile
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import extras, i18n
from ..errors import ExportFormatError
from ..faults import crash_point
from ..hf_layout import rope_inv_freq, rope_parameters, write_atomic
from ..monitoring import Progress
from ..tensor_io import read_header, torch_row_chunks
from .base import ExportContext, ExportFormat
from .kquants import K_TYPES, LEGACY_BYTES, QK_K
from .kquants import quantize as k_quantize

__all__ = [
    "export_gguf",
    "read_back",
    "read_importance",
    "gguf_names",
    "gguf_type_for",
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
_FILE_TYPES = {
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
_PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}
_CHUNK_BYTES = 64 << 20


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


@dataclass
class _Source:
    name: str  # Hugging Face name
    target: str  # GGUF name
    shape: tuple[int, ...]
    info: Any
    path: Path
    heads: int | None = None  # rows to reorder per head for llama.cpp's llama rope (q and k of the llama architecture)


def _rope_heads(arch_name: str, config: dict[str, Any], name: str) -> int | None:
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


def _permute_heads(rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [half 0 | half 1] -> interleaved pairs (0, d/2), (1, d/2 + 1), ..."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _sources(merged: Path, arch: Any, config: dict[str, Any]) -> list[_Source]:
    import gguf

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    arch_name = (config.get("architectures") or ["?"])[0]
    sources = []
    for shard in sorted(merged.glob("*.safetensors")):
        for name, info in read_header(shard).tensors.items():
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ExportFormatError("gguf_unknown_tensor", tensor=name)
            sources.append(_Source(name, target, tuple(info.shape), info, shard, _rope_heads(arch_name, config, name)))
    return sources


def _block(ttype: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, ttype.upper())][0]


@dataclass(frozen=True)
class _Model:
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


def _mixture_type(target: str, mixture: str, model: _Model, columns: int) -> str:
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
    return _fitting(kind, columns)


def _fitting(kind: str, columns: int) -> str:
    """``kind``, or llama.cpp's fallback where a row is not whole blocks of it (then f16)."""
    if columns % _block(kind):
        kind = _K_FALLBACK.get(kind, kind)
    return kind if columns % _block(kind) == 0 else "f16"


def _tensor_type(source: _Source, gguf_type: str, model: _Model) -> str:
    """1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; the output and token embedding take the types
    asked for them (as llama-quantize's --output-tensor-type, --token-embedding-type); in a K mixture each tensor gets
    llama.cpp's type for it; rows that are not whole blocks fall back to f16."""
    if len(source.shape) < 2:
        return "f32"
    columns = source.shape[-1]
    if model.keep and gguf_type not in ("f32", "f16", "bf16"):
        from ..config import kept_module

        if kept_module(list(model.keep), source.name, tied=model.tied):
            return model.full
    if model.token_embd_type and source.target == "token_embd.weight":
        return _fitting(model.token_embd_type, columns)
    if model.output_type and (
        source.target == "output.weight" or (model.tied and source.target == "token_embd.weight")
    ):
        return _fitting(model.output_type, columns)
    if gguf_type == "f32":
        return "f32"
    if gguf_type in K_MIXTURES:
        return _mixture_type(source.target, gguf_type, model, columns)
    return gguf_type if columns % _block(gguf_type) == 0 else "f16"


class _Chunks:
    """A tensor that GGUFWriter.write_tensor_data can write (it asks for nbytes and tofile) without holding it whole."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray]) -> None:
        self.nbytes, self.chunks = nbytes, chunks

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self.chunks:
            fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            written += chunk.nbytes
        if written != self.nbytes:  # a bug, not a user error
            raise AssertionError(f"wrote {written} bytes, declared {self.nbytes}")
        crash_point("export_tensor")


def _float_chunks(source: _Source, fh) -> Iterator[np.ndarray]:
    """The merged tensor as float32 row chunks (torch widens bf16 on every core); a tensor whose rows are reordered
    per head comes whole (one attention projection)."""
    import torch

    chunks = (chunk.to(torch.float32).numpy() for chunk in torch_row_chunks(fh, source.info, _CHUNK_BYTES))
    if source.heads:
        yield _permute_heads(np.concatenate(list(chunks)), source.heads)
        return
    for values in chunks:
        yield values if source.shape else values.reshape(1)


READBACK_SAMPLE_BYTES = 4 << 20  # float32 bytes of a large quantized tensor's rows re-encoded by the read-back


def _checked_rows(source: _Source, ttype: str, fh) -> Iterator[tuple[int | None, np.ndarray]]:
    """(first row, float32 rows) of the merged tensor that the read-back encodes again and compares (first row None:
    the chunk follows the one before). Every row of
    f32/f16/bf16 tensors (a cast), of small tensors and of those reordered per head; of a larger quantized tensor,
    four evenly spread row ranges (first and last rows included) of READBACK_SAMPLE_BYTES in all, because
    re-quantizing every block in numpy would cost more than the export did (llama.cpp then runs the whole file)."""
    import torch

    from ..tensor_io import read_bytes, torch_dtype

    rows = source.shape[0] if len(source.shape) > 1 else 1
    row_floats = math.prod(source.shape[1:]) if len(source.shape) > 1 else math.prod(source.shape or (1,))
    whole = ttype in ("f32", "f16", "bf16") or source.heads or rows * row_floats * 4 <= READBACK_SAMPLE_BYTES
    if whole:
        for values in _float_chunks(source, fh):
            yield None, values
        return
    take = max(1, READBACK_SAMPLE_BYTES // (4 * row_floats * 4))
    for start in sorted({round(i * (rows - take) / 3) for i in range(4)}):
        raw = read_bytes(fh, source.info, start, start + take)
        values = torch.frombuffer(raw, dtype=torch_dtype(source.info.dtype)).to(torch.float32)
        yield start, values.reshape(take, *source.shape[1:]).numpy()


def _release_pages(reader: Any) -> None:
    """Drop the GGUF file's pages read so far from this process's resident memory (they stay in the page cache):
    reading a 2 GB file back must not leave 2 GB resident."""
    import mmap

    mapped = getattr(getattr(reader, "data", None), "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


K_CHUNK_VALUES = 1 << 19  # K-quants work on this many values at a time (measured: 128 Ki-2 Mi, this was fastest)
_K_POOL: list[Any] = []


def _k_pool() -> Any:
    """Threads for the K-quants, one per core this process may use: numpy releases the GIL inside each operation,
    so row chunks quantize side by side."""
    if not _K_POOL:
        from concurrent.futures import ThreadPoolExecutor

        from ..runtimes.base import THREADS_ENV, threads

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cores = threads() if os.environ.get(THREADS_ENV) else cores  # a batch's share of the cores
        _K_POOL.append(ThreadPoolExecutor(max(1, cores), thread_name_prefix="k-quants"))
    return _K_POOL[0]


def _encode(values: np.ndarray, ttype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows in GGUF type ``ttype``: f32/f16 by cast, K-quants by our kquants (with the tensor's importance
    per column when an importance matrix has it), the legacy types through gguf.quants (llama.cpp's quantizers)."""
    import gguf

    if ttype == "f32":
        return values
    if ttype == "f16":
        return values.astype(np.float16)
    if ttype in K_TYPES or (importance is not None and ttype in LEGACY_BYTES):
        rows = values.reshape(-1, values.shape[-1])
        step = max(1, K_CHUNK_VALUES // rows.shape[1])
        parts = [rows[i : i + step] for i in range(0, len(rows), step)]
        return np.concatenate(list(_k_pool().map(lambda part: k_quantize(part, ttype, importance), parts)))
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, ttype.upper()))


def _encoded(source: _Source, ttype: str, fh, importance: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The tensor in GGUF type ``ttype``, in row chunks."""
    return (_encode(values, ttype, importance) for values in _float_chunks(source, fh))


def _importance(imatrix: Mapping[str, np.ndarray] | None, target: str, ttype: str) -> np.ndarray | None:
    """The importance matrix's entry for a tensor, where its type uses one (as in llama.cpp: not f16, q8_0)."""
    return imatrix.get(target) if imatrix and (ttype in K_TYPES or ttype in LEGACY_BYTES) else None


def _model(
    sources: list[_Source], config: dict[str, Any], types: Mapping[str, str | None], keep: list[str] | None = None
) -> _Model:
    keep = keep or []
    heads = config["num_attention_heads"]
    return _Model(
        layers=config["num_hidden_layers"],
        tied=not any(s.target == "output.weight" for s in sources),
        gqa=heads // (config.get("num_key_value_heads") or heads),
        output_type=types.get("output"),
        token_embd_type=types.get("token_embd"),
        keep=tuple(keep),
        full={"bfloat16": "bf16", "float32": "f32"}.get(config.get("dtype") or "float32", "f16"),
    )


def _nbytes(shape: tuple[int, ...], ttype: str) -> int:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1] or (1,)) * (shape[-1] if shape else 1) // block * size


def export_gguf(
    merged: str | Path,
    out: str | Path,
    *,
    gguf_type: str = "f16",
    name: str | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    keep: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``out/model-<type>.gguf`` and an Ollama ``Modelfile`` from the merged model in ``merged``.

    ``gguf_type`` is a tensor type (f32 ... q5_1) or one of llama.cpp's K mixtures (q2_k ... q6_k, q4_k_m), each tensor
    then getting the type llama.cpp's quantizer gives it; ``imatrix`` (importance per input column, by GGUF tensor
    name, as llama.cpp's imatrix holds it) steers the K-quants; ``output_type`` and ``token_embedding_type`` are
    tensor types (f16 ... q6_k) for those two tensors, as llama-quantize's --output-tensor-type and
    --token-embedding-type.

    Raises MissingDependencyError without the gguf extra, ExportFormatError for an architecture, rope type or
    tokenizer the GGUF export does not handle.
    """
    gguf = extras.require("gguf", "GGUF export")
    merged, out = Path(merged), Path(out)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ExportFormatError(
            "gguf_unsupported", what=f"the architecture {arch_name}", supported=", ".join(SUPPORTED_ARCHITECTURES)
        )
    rope_freqs = _rope_freqs(config, merged)
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch_name])
    sources = _sources(merged, arch, config)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-{gguf_type}.gguf"
    partial = out / f"{path.name}.partial"
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, gguf, config, merged, gguf_type, name or merged.name)
    types = {}
    model = _model(sources, config, {"output": output_type, "token_embd": token_embedding_type}, keep)
    for source in sources:
        ttype = types[source.name] = _tensor_type(source, gguf_type, model)
        qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
        if ttype in ("f32", "f16"):
            writer.add_tensor_info(
                source.target,
                source.shape,
                np.dtype(np.float32 if ttype == "f32" else np.float16),
                _nbytes(source.shape, ttype),
            )
        else:
            byte_shape = (*source.shape[:-1], _nbytes(source.shape[-1:], ttype))
            writer.add_tensor_info(
                source.target, byte_shape, np.dtype(np.uint8), _nbytes(source.shape, ttype), raw_dtype=qtype
            )
    if rope_freqs is not None:
        writer.add_tensor_info(ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, Any] = {}
    meter = Progress(i18n.ui("progress_export", format=f"GGUF {gguf_type}"), sum(s.info.nbytes for s in sources))
    try:
        for source in sources:
            fh = handles.get(source.path) or handles.setdefault(source.path, open(source.path, "rb"))  # noqa: SIM115
            ttype = types[source.name]
            importance = _importance(imatrix, source.target, ttype)
            writer.write_tensor_data(_Chunks(_nbytes(source.shape, ttype), _encoded(source, ttype, fh, importance)))
            meter.advance(source.info.nbytes)
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        writer.close()
    finally:
        meter.close()
        for fh in handles.values():
            fh.close()
    os.replace(partial, path)
    modelfile = write_modelfile(out, path.name, merged)
    return {
        "path": str(path),
        "gguf_type": gguf_type,
        "tensors": len(sources) + (rope_freqs is not None),
        "modelfile": str(modelfile) if modelfile else None,
        "types": {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))},
    }


ROPE_FREQS = "rope_freqs.weight"
_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _rope_freqs(config: dict[str, Any], merged: Path) -> np.ndarray | None:
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


def _metadata(writer: Any, gguf: Any, config: dict[str, Any], merged: Path, gguf_type: str, name: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope_type, rope = rope_parameters(config)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(getattr(gguf.RopeScalingType, rope_type.upper()))
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope_type == "yarn":
        original = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, gguf, config, merged)


def _tokenizer(writer: Any, gguf: Any, config: dict[str, Any], merged: Path) -> None:
    """Tokens padded to the embedding's rows, their types as llama.cpp's converter assigns them, merges and special
    ids."""
    from transformers import AutoTokenizer

    tokenizer_file = merged / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportFormatError(
            "gguf_unsupported", what="a model without tokenizer.json", supported="BPE tokenizers (tokenizer.json)"
        )
    kind = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("model", {}).get("type")
    if kind != "BPE":
        raise ExportFormatError(
            "gguf_unsupported", what=f"a {kind} tokenizer", supported="BPE tokenizers (tokenizer.json)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    vocab_size = config["vocab_size"]
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(config.get("model_type", ""), "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(merged), load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)


_CHATML = '''TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
'''


def write_modelfile(out: Path, gguf_name: str, merged: Path, adapter: str | None = None) -> Path | None:
    """An Ollama Modelfile: FROM the GGUF (a file name in ``out``, or a path relative to it), ADAPTER a LoRA GGUF in
    ``out`` when given, the ChatML template for chat templates that use it, and stop tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    generation = merged / "generation_config.json"
    eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file() else None
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [f"FROM {gguf_name if '/' in gguf_name else './' + gguf_name}\n"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}\n")
    if "<|im_start|>" in template:
        lines.append(_CHATML)
        if "<|im_end|>" not in stops:
            stops.append("<|im_end|>")
    lines += [f'PARAMETER stop "{stop}"\n' for stop in stops if stop]
    path = out / "Modelfile"
    write_atomic(path, "".join(lines))
    return path


def read_back(
    gguf_path: str | Path, merged: str | Path, imatrix: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Read the GGUF back and compare every tensor with the merged model: names, shapes and types as declared, and
    data equal to the merged tensor encoded again (f32/f16 exactly; quantized types re-quantized, with the importance
    matrix the export used).

    Returns counts and the largest difference between the dequantized GGUF and the merged weights, per type.
    Raises ExportFormatError when a tensor is missing, misshapen or differs.
    """
    import gguf

    merged = Path(merged)
    reader = gguf.GGUFReader(str(gguf_path))
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[(config.get("architectures") or ["?"])[0]])
    sources = {s.target: s for s in _sources(merged, arch, config)}
    stored = {t.name: t for t in reader.tensors}
    rope_freqs = _rope_freqs(config, merged)
    if rope_freqs is not None:  # computed from the config, not a merged tensor
        freqs = stored.pop(ROPE_FREQS, None)
        if freqs is None or not np.array_equal(np.asarray(freqs.data).reshape(-1), rope_freqs):
            raise ExportFormatError(
                "gguf_readback_failed", path=str(gguf_path), detail=f"{ROPE_FREQS} is missing or differs"
            )
    if set(stored) != set(sources):
        missing = sorted(set(sources) - set(stored)) or sorted(set(stored) - set(sources))
        raise ExportFormatError(
            "gguf_readback_failed", path=str(gguf_path), detail=f"tensors differ: {', '.join(missing[:5])}"
        )
    worst: dict[str, float] = {}
    handles: dict[Path, Any] = {}
    try:
        for target, source in sources.items():
            tensor = stored[target]
            ttype = tensor.tensor_type.name.lower()
            if tuple(reversed([int(d) for d in tensor.shape])) != source.shape:
                raise ExportFormatError(
                    "gguf_readback_failed", path=str(gguf_path), detail=f"{target} has shape {list(tensor.shape)}"
                )
            fh = handles.get(source.path) or handles.setdefault(source.path, open(source.path, "rb"))  # noqa: SIM115
            data, offset = np.asarray(tensor.data).reshape(-1).view(np.uint8), 0
            for first, values in _checked_rows(source, ttype, fh):
                encoded = np.asarray(_encode(values, ttype, _importance(imatrix, target, ttype)))
                encoded = encoded.reshape(-1).view(np.uint8)
                start = offset if first is None else first * (data.size // source.shape[0])
                offset = start + encoded.size
                got = data[start:offset]
                if not np.array_equal(got, encoded):
                    raise ExportFormatError(
                        "gguf_readback_failed", path=str(gguf_path), detail=f"{target} differs from the merge"
                    )
                back = gguf.quants.dequantize(got, tensor.tensor_type).reshape(-1).astype(np.float32)
                difference = float(np.abs(back - values.reshape(-1)).max()) if values.size else 0.0
                worst[ttype] = max(worst.get(ttype, 0.0), difference)
            _release_pages(reader)
    finally:
        for fh in handles.values():
            fh.close()
    fields = {f.name for f in reader.fields.values()}
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        if key not in fields:
            raise ExportFormatError("gguf_readback_failed", path=str(gguf_path), detail=f"metadata {key} is missing")
    return {"tensors": len(stored) + (rope_freqs is not None), "max_abs_diff_by_type": worst}


def export_gguf_lora(checkpoint: str | Path, base: str | Path, out: str | Path) -> dict[str, Any]:
    """A LoRA-only GGUF adapter (``adapter-lora-f32.gguf``) for llama.cpp's ``--lora`` on a GGUF of the base model.

    llama.cpp scales each update by ``alpha / rank`` of that tensor. PEFT's scaling (alpha/r, alpha/sqrt(r) for
    rsLoRA, per-module rank and alpha patterns) cannot all be one alpha, so the file says alpha = 1 and each
    ``lora_b`` carries ``scaling * rank``: llama.cpp then applies exactly PEFT's update. Raises ExportFormatError
    for what llama.cpp's adapters cannot hold (DoRA, LoRA on embeddings, lora_bias, modules_to_save).
    """
    gguf = extras.require("gguf", "GGUF export")
    from ..adapter_format import load_adapter_state, read_adapter_config
    from ..merge_plan import _lora_modules, check_supported

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out)
    adapter_config = read_adapter_config(checkpoint)
    lora, full, _ = load_adapter_state(checkpoint)
    check_supported(adapter_config, list(lora) + list(full))
    modules = _lora_modules(adapter_config, lora)
    unsupported = sorted(
        {"DoRA" for m in modules.values() if m.magnitude is not None}
        | {"LoRA on embeddings" for m in modules.values() if m.kind != "linear"}
        | {"lora_bias" for m in modules.values() if m.bias is not None}
        | ({"modules_to_save"} if full else set())
    )
    if unsupported:
        raise ExportFormatError(
            "gguf_unsupported",
            what=f"an adapter with {', '.join(unsupported)}",
            supported="plain LoRA on linear layers",
        )
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ExportFormatError(
            "gguf_unsupported", what=f"the architecture {arch_name}", supported=", ".join(SUPPORTED_ARCHITECTURES)
        )
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch_name])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "adapter-lora-f32.gguf"
    partial = out / f"{path.name}.partial"
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    for module, update in sorted(modules.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportFormatError("gguf_unknown_tensor", tensor=module + ".weight")
        a = np.ascontiguousarray(update.A, dtype=np.float32)
        b = _lora_b(update, arch_name, config, module)
        writer.add_tensor(f"{target}.lora_a", a)
        writer.add_tensor(f"{target}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return {"path": str(path), "modules": len(modules)}


def _lora_b(update: Any, arch_name: str, config: dict[str, Any], module: str) -> np.ndarray:
    """B * scaling * rank, its rows reordered per head where the base's q/k rows are (the llama architecture)."""
    b = np.ascontiguousarray(update.B, dtype=np.float32) * np.float32(update.scaling * np.asarray(update.A).shape[0])
    heads = _rope_heads(arch_name, config, module + ".weight")
    return np.ascontiguousarray(_permute_heads(b, heads)) if heads else b


def read_back_lora(gguf_path: str | Path, checkpoint: str | Path, base: str | Path) -> dict[str, Any]:
    """Read a LoRA GGUF back: every module's lora_a equal to PEFT's A and lora_b to B * scaling * rank (rows reordered
    as the base's q/k rows are), under the names llama.cpp looks up. Raises ExportFormatError when one is missing or
    differs."""
    import gguf

    from ..adapter_format import load_adapter_state, read_adapter_config
    from ..merge_plan import _lora_modules

    checkpoint = Path(checkpoint)
    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch_name]), config["num_hidden_layers"]
    )
    modules = _lora_modules(read_adapter_config(checkpoint), load_adapter_state(checkpoint)[0])
    stored = {t.name: np.asarray(t.data).astype(np.float32) for t in gguf.GGUFReader(str(gguf_path)).tensors}
    expected = {}
    for module, update in modules.items():
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        expected[f"{target}.lora_a"] = np.asarray(update.A, dtype=np.float32)
        expected[f"{target}.lora_b"] = _lora_b(update, arch_name, config, module)
    if set(stored) != set(expected) or any(
        stored[n].shape != e.shape or stored[n].tobytes() != e.tobytes() for n, e in expected.items()
    ):
        raise ExportFormatError(
            "gguf_readback_failed", path=str(gguf_path), detail="the LoRA tensors differ from the adapter's"
        )
    return {"tensors": len(stored), "modules": len(modules)}


def _export(ctx: ExportContext) -> dict[str, Any]:
    c = ctx.config
    gguf_type = gguf_type_for(c.quantization_level, ctx.merged, c.gguf_type)
    imatrix = None
    if ctx.imatrix is not None and uses_importance(c):
        imatrix = read_importance(ctx.imatrix)
    details = export_gguf(
        ctx.merged,
        ctx.out,
        gguf_type=gguf_type,
        name=ctx.checkpoint.parent.name,
        imatrix=imatrix,
        output_type=c.gguf_output_type,
        token_embedding_type=c.gguf_token_embedding_type,
        keep=c.quantization_keep_modules,
    )
    if gguf_type in K_MIXTURES or gguf_type in LEGACY_BYTES or gguf_type == "q8_0":
        details["method"] = "imatrix" if imatrix else "data-free"
    if imatrix:
        details["imatrix"] = str(ctx.imatrix)
    if c.gguf_lora_adapter:
        from ..base_model import resolve_base_model

        base = resolve_base_model(ctx.base)
        lora = export_gguf_lora(ctx.checkpoint, base, ctx.out)
        details["lora_adapter"] = {**read_back_lora(lora["path"], ctx.checkpoint, base), "path": lora["path"]}
    return details


_TYPE_BYTES = {  # per parameter; K mixtures as llama.cpp reports them for 7B-class models
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 1.0625,
    "q4_0": 0.5625,
    "q4_1": 0.625,
    "q5_0": 0.6875,
    "q5_1": 0.75,
    "q2_k": 0.42,
    "q3_k_s": 0.44,
    "q3_k_m": 0.49,
    "q3_k_l": 0.53,
    "q4_k_s": 0.57,
    "q4_k_m": 0.61,
    "q5_k_s": 0.69,
    "q5_k_m": 0.71,
    "q6_k": 0.82,
}


def _bytes(config: Any, base_size: float) -> float:
    if config.gguf_type != "auto":
        return _TYPE_BYTES[config.gguf_type]
    return {"fp16": 2.0, "bf16": 2.0, "int8": 1.0625, "int4": _TYPE_BYTES["q4_k_m"]}.get(
        config.quantization_level, base_size
    )


FORMAT = ExportFormat(
    name="gguf",
    levels={
        "none": "the merge's dtype (f32, f16 or bf16)",
        "bf16": "bf16",
        "fp16": "f16",
        "int8": "q8_0",
        "int4": "q4_k_m (llama.cpp's Q4_K_M mixture)",
    },
    bytes_per_param=_bytes,
    export=_export,
    runnables=lambda folder: [("gguf", p) for p in sorted(folder.glob("model-*.gguf"))],
    keys=(
        "quantization_level",
        "gguf_type",
        "gguf_lora_adapter",
        "gguf_output_type",
        "gguf_token_embedding_type",
        "quantization_keep_modules",
    ),
    extra="gguf",
    description="one file for llama.cpp and Ollama (with a Modelfile); run in llama.cpp with the llamacpp extra",
)
