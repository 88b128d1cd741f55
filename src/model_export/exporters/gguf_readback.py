"""Reading a written GGUF back: every tensor against the merge it came from, and a LoRA GGUF against its adapter.

A float tensor must be byte-equal to the merge in its type; a quantized one byte-equal to the merge encoded again (on
sampled rows for large tensors) and, dequantized, within the type's error of the merge."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportFormatError
from ..quantize.gguf_types import SUPPORTED_ARCHITECTURES, encode_rows, importance_for
from ..runtimes.gguf_file import read_gguf
from .gguf_lora import lora_b
from .gguf_tensors import ROPE_FREQS, Source, float_chunks, gguf_sources, rope_freq_table

__all__ = ["read_back", "read_back_lora"]

READBACK_SAMPLE_BYTES = 4 << 20  # float32 bytes of a large quantized tensor's rows re-encoded by the read-back


def _checked_rows(source: Source, ttype: str, fh) -> Iterator[tuple[int | None, np.ndarray]]:
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
        for values in float_chunks(source, fh):
            yield None, values
        return
    take = max(1, READBACK_SAMPLE_BYTES // (4 * row_floats * 4))
    for start in sorted({round(i * (rows - take) / 3) for i in range(4)}):
        raw = read_bytes(fh, source.info, start, start + take)
        values = torch.frombuffer(raw, dtype=torch_dtype(source.info.dtype)).to(torch.float32)
        yield start, values.reshape(take, *source.shape[1:]).numpy()


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
    reader = read_gguf(gguf_path)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[(config.get("architectures") or ["?"])[0]])
    sources = {s.target: s for s in gguf_sources(merged, arch, config)}
    stored = {t.name: t for t in reader.tensors}
    rope_freqs = rope_freq_table(config, merged)
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
            fh = handles.get(source.path) or handles.setdefault(source.path, open(source.path, "rb"))  # noqa: SIM115
            _check_tensor(gguf, gguf_path, stored[target], source, fh, importance_for_target(imatrix, target), worst)
            reader.release()  # reading a 2 GB file back must not leave 2 GB resident (the pages stay cached)
    finally:
        for fh in handles.values():
            fh.close()
    fields = set(reader.fields)
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        if key not in fields:
            raise ExportFormatError("gguf_readback_failed", path=str(gguf_path), detail=f"metadata {key} is missing")
    return {"tensors": len(stored) + (rope_freqs is not None), "max_abs_diff_by_type": worst}


def importance_for_target(imatrix: Mapping[str, np.ndarray] | None, target: str) -> Any:
    """The importance of ``target``'s columns for a tensor type, as the export used it."""
    return lambda ttype: importance_for(imatrix, target, ttype)


def _check_tensor(gguf: Any, path: Any, tensor: Any, source: Source, fh: Any, importance: Any, worst: dict) -> None:
    """One tensor against the merge: its shape, its bytes equal to the merge's rows encoded again (sampled rows of a
    large quantized tensor), and the largest difference of its dequantized values per type into ``worst``."""
    ttype = tensor.tensor_type.name.lower()
    if tuple(reversed([int(d) for d in tensor.shape])) != source.shape:
        raise ExportFormatError(
            "gguf_readback_failed", path=str(path), detail=f"{tensor.name} has shape {list(tensor.shape)}"
        )
    data, offset = np.asarray(tensor.data).reshape(-1).view(np.uint8), 0
    if _SAME_BYTES.get(source.info.dtype) == ttype and not source.heads:
        _check_bytes(path, tensor.name, data, source, fh)  # written as stored: the bytes themselves, no difference
        worst[ttype] = max(worst.get(ttype, 0.0), 0.0)
        return
    for first, values in _checked_rows(source, ttype, fh):
        encoded = np.asarray(encode_rows(values, ttype, importance(ttype))).reshape(-1).view(np.uint8)
        start = offset if first is None else first * (data.size // source.shape[0])
        offset = start + encoded.size
        got = data[start:offset]
        if not np.array_equal(got, encoded):
            raise ExportFormatError(
                "gguf_readback_failed", path=str(path), detail=f"{tensor.name} differs from the merge"
            )
        back = gguf.quants.dequantize(got, tensor.tensor_type).reshape(-1).astype(np.float32)
        difference = float(np.abs(back - values.reshape(-1)).max()) if values.size else 0.0
        worst[ttype] = max(worst.get(ttype, 0.0), difference)


_SAME_BYTES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # a merged dtype a GGUF type stores byte for byte
_COMPARE_BYTES = 64 << 20


def _check_bytes(path: Any, name: str, data: np.ndarray, source: Source, fh: Any) -> None:
    """A tensor GGUF stores in the merge's own float type: its bytes equal to the merge's, read in row chunks (what
    encoding each row again and comparing would find, without widening, encoding and decoding every value)."""
    from ..tensor_io import read_bytes, row_bytes

    size = row_bytes(source.info) if source.info.shape else source.info.nbytes
    rows = source.info.shape[0] if source.info.shape else 1
    step = max(1, _COMPARE_BYTES // max(size, 1))
    chunks = (
        (start, np.frombuffer(read_bytes(fh, source.info, start, min(rows, start + step)), np.uint8))
        for start in range(0, rows, step)
    )
    if data.size != source.info.nbytes or not all(
        np.array_equal(data[start * size : start * size + merged.size], merged) for start, merged in chunks
    ):
        raise ExportFormatError("gguf_readback_failed", path=str(path), detail=f"{name} differs from the merge")


def read_back_lora(gguf_path: str | Path, checkpoint: str | Path, base: str | Path) -> dict[str, Any]:
    """Read a LoRA GGUF back: every module's lora_a equal to PEFT's A and lora_b to B * scaling * rank (rows reordered
    as the base's q/k rows are), under the names llama.cpp looks up. Raises ExportFormatError when one is missing or
    differs."""
    import gguf

    from ..checkpoint.adapter_format import load_adapter_state, read_adapter_config
    from ..merging.plan import lora_modules

    checkpoint = Path(checkpoint)
    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch_name]), config["num_hidden_layers"]
    )
    modules = lora_modules(read_adapter_config(checkpoint), load_adapter_state(checkpoint)[0])
    stored = {t.name: np.asarray(t.data).astype(np.float32) for t in read_gguf(gguf_path).tensors}
    expected = {}
    for module, update in modules.items():
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        expected[f"{target}.lora_a"] = np.asarray(update.A, dtype=np.float32)
        expected[f"{target}.lora_b"] = lora_b(update, arch_name, config, module)
    if set(stored) != set(expected) or any(
        stored[n].shape != e.shape or stored[n].tobytes() != e.tobytes() for n, e in expected.items()
    ):
        raise ExportFormatError(
            "gguf_readback_failed", path=str(gguf_path), detail="the LoRA tensors differ from the adapter's"
        )
    return {"tensors": len(stored), "modules": len(modules)}
