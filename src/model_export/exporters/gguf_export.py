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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import extras, i18n
from ..checkpoint.hf_layout import rope_parameters
from ..errors import ExportFormatError
from ..monitoring import Progress
from ..quantize.ggml_quants import quantizer
from ..quantize.gguf_types import (
    FILE_TYPES,
    K_MIXTURES,
    SUPPORTED_ARCHITECTURES,
    TypePlan,
    block_values,
    encode_rows,
    fitting_type,
    gguf_type_for,
    importance_for,
    mixture_type,
    read_importance,
    type_nbytes,
    uses_importance,
)
from ..quantize.kquants import LEGACY_BYTES
from .base import ExportContext, ExportFormat
from .gguf_tensors import (
    ROPE_FREQS,
    STORED_AS,
    Chunks,
    Source,
    float_chunks,
    gguf_sources,
    rope_freq_table,
    stored_chunks,
)

__all__ = ["export_gguf", "FORMAT"]

_PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}


def _tensor_type(source: Source, gguf_type: str, model: TypePlan) -> str:
    """1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; the output and token embedding take the types
    asked for them (as llama-quantize's --output-tensor-type, --token-embedding-type); in a K mixture each tensor gets
    llama.cpp's type for it; rows that are not whole blocks fall back to f16."""
    if len(source.shape) < 2:
        return "f32"
    columns = source.shape[-1]
    if model.keep and gguf_type not in ("f32", "f16", "bf16"):
        from ..quantize.keep import kept_module

        if kept_module(list(model.keep), source.name, tied=model.tied):
            return model.full
    if model.token_embd_type and source.target == "token_embd.weight":
        return fitting_type(model.token_embd_type, columns)
    if model.output_type and (
        source.target == "output.weight" or (model.tied and source.target == "token_embd.weight")
    ):
        return fitting_type(model.output_type, columns)
    if gguf_type == "f32":
        return "f32"
    if gguf_type in K_MIXTURES:
        return mixture_type(source.target, gguf_type, model, columns)
    return gguf_type if columns % block_values(gguf_type) == 0 else "f16"


def _encoded(source: Source, ttype: str, fh, importance: np.ndarray | None = None) -> Chunks:
    """The tensor in GGUF type ``ttype``, in row chunks; one stored as the merge's own bytes with its rows in place is
    copied file to file where the kernel can (Chunks' ``stored``)."""
    nbytes = type_nbytes(source.shape, ttype)
    if STORED_AS.get(ttype) == source.info.dtype:
        return Chunks(nbytes, stored_chunks(source, fh), None if source.heads else (fh, source.info))
    return Chunks(nbytes, (encode_rows(values, ttype, importance) for values in float_chunks(source, fh)))


def _model(
    sources: list[Source], config: dict[str, Any], types: Mapping[str, str | None], keep: list[str] | None = None
) -> TypePlan:
    keep = keep or []
    heads = config["num_attention_heads"]
    return TypePlan(
        layers=config["num_hidden_layers"],
        tied=not any(s.target == "output.weight" for s in sources),
        gqa=heads // (config.get("num_key_value_heads") or heads),
        output_type=types.get("output"),
        token_embd_type=types.get("token_embd"),
        keep=tuple(keep),
        full={"bfloat16": "bf16", "float32": "f32"}.get(config.get("dtype") or "float32", "f16"),
    )


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
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[supported_architecture(config)])
    rope_freqs = rope_freq_table(config, merged)
    sources = gguf_sources(merged, arch, config)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-{gguf_type}.gguf"
    partial = out / f"{path.name}.partial"
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, gguf, config, merged, gguf_type, name or merged.name)
    model = _model(sources, config, {"output": output_type, "token_embd": token_embedding_type}, keep)
    types = {source.name: _tensor_type(source, gguf_type, model) for source in sources}
    _tensor_infos(writer, gguf, sources, types, rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    meter = Progress(i18n.ui("progress_export", format=f"GGUF {gguf_type}"), sum(s.info.nbytes for s in sources))
    try:
        _tensor_data(writer, sources, types, imatrix, meter)
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        writer.close()
    finally:
        meter.close()
    os.replace(partial, path)
    from .modelfile import write_modelfile

    modelfile = write_modelfile(out, path.name, merged)
    return {
        "path": str(path),
        "gguf_type": gguf_type,
        "tensors": len(sources) + (rope_freqs is not None),
        "modelfile": str(modelfile) if modelfile else None,
        "types": {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))},
        "quantizer": quantizer() if set(types.values()) - {"f32", "f16", "bf16"} else None,
    }


def supported_architecture(config: dict[str, Any]) -> str:
    """The model's architecture (config.json's first), or ExportFormatError naming those the GGUF export takes."""
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ExportFormatError(
            "gguf_unsupported", what=f"the architecture {arch_name}", supported=", ".join(SUPPORTED_ARCHITECTURES)
        )
    return arch_name


def _tensor_infos(writer: Any, gguf: Any, sources: list[Source], types: dict[str, str], rope: Any) -> None:
    """Each tensor's name, shape and type in the header: float types as numpy dtypes, quantized ones as raw bytes."""
    for source in sources:
        ttype = types[source.name]
        if ttype in ("f32", "f16"):
            dtype = np.dtype(np.float32 if ttype == "f32" else np.float16)
            writer.add_tensor_info(source.target, source.shape, dtype, type_nbytes(source.shape, ttype))
        else:
            qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
            byte_shape = (*source.shape[:-1], type_nbytes(source.shape[-1:], ttype))
            nbytes = type_nbytes(source.shape, ttype)
            writer.add_tensor_info(source.target, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    if rope is not None:
        writer.add_tensor_info(ROPE_FREQS, rope.shape, rope.dtype, rope.nbytes)


def _tensor_data(
    writer: Any, sources: list[Source], types: dict[str, str], imatrix: Mapping[str, np.ndarray] | None, meter: Any
) -> None:
    """Each tensor encoded in its type, chunk by chunk (an importance matrix steering the K-quants where given)."""
    handles: dict[Path, Any] = {}
    try:
        for source in sources:
            fh = handles.get(source.path) or handles.setdefault(source.path, open(source.path, "rb"))  # noqa: SIM115
            ttype = types[source.name]
            importance = importance_for(imatrix, source.target, ttype)
            writer.write_tensor_data(_encoded(source, ttype, fh, importance))
            meter.advance(source.info.nbytes)
    finally:
        for fh in handles.values():
            fh.close()


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
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
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
        from ..checkpoint.base_model import resolve_base_model

        base = resolve_base_model(ctx.base)
        from .gguf_lora import export_gguf_lora
        from .gguf_readback import read_back_lora

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
