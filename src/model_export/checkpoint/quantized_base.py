"""Bases quantized by bitsandbytes, read as the weights a QLoRA adapter was trained against.

A QLoRA run trains on a 4-bit (nf4 or fp4, with or without double quantization, any ``bnb_4bit_quant_storage``) or
8-bit base, often a pre-quantized checkpoint (``*-bnb-4bit``). What the adapter saw is each quantized matrix
dequantized as bitsandbytes dequantizes it; merging into the original 16-bit weights instead adds the update to
weights the adapter never saw. So a bitsandbytes base is read as a plain base whose quantized matrices are those
dequantized weights: written once, tensor by tensor and block by block (at most a few hundred MB in memory for any
matrix), into a folder of its own (``plain_base``), which every step after reads like any base.

Dequantization is bitsandbytes' own arithmetic, with no bitsandbytes needed:

- 4-bit: each byte holds two codes, high nibble first; a value is ``quant_map[code] * absmax[block]`` in fp32,
  rounded once to the dtype the quant state names (bf16 for a bf16 model). With double quantization the absmax are
  themselves 8-bit: ``nested_quant_map[q] * nested_absmax[block] + nested_offset``, in fp32.
- 8-bit (LLM.int8): ``int8 * SCB[row] * (1/127)`` in fp32, rounded to the model's dtype.

tests/unit/test_quantized_base.py compares each case with bitsandbytes' ``dequantize_4bit`` and
``int8_vectorwise_dequant`` on the CPU, bit for bit. Other quantized formats (GPTQ, AWQ, compressed-tensors, FP8)
are refused with what is supported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import i18n
from ..tensor_io import PlannedTensor, ShardWriter, read_bytes, read_header

__all__ = [
    "quantization_of",
    "describe",
    "unsupported_quantization",
    "plain_base",
    "quantized_as_trained",
    "quantized_name",
    "dequantize_4bit",
    "MARKER",
    "STATED_KEYS",
]

# base_model_quantization's keys: BitsAndBytesConfig's names for what a QLoRA training run quantized
STATED_KEYS = (
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
    "llm_int8_skip_modules",
)

MARKER = "dequantized_from.json"  # in a plain base: what it was made from
_COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__")
_CHUNK = 1 << 22  # values dequantized at a time


def quantization_of(folder: Path) -> dict[str, Any] | None:
    """config.json's quantization_config, or None for a plain base."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return quantization if isinstance(quantization, dict) else None


def unsupported_quantization(quantization: dict[str, Any]) -> str | None:
    """The quantization method when it is not one read here (bitsandbytes 4-bit or 8-bit), else None."""
    method = str(quantization.get("quant_method") or "unknown")
    if method == "bitsandbytes" and (quantization.get("load_in_4bit") or quantization.get("load_in_8bit")):
        return None
    return method


def describe(quantization: dict[str, Any]) -> str:
    """``bitsandbytes nf4, double quantization, compute bfloat16`` or ``bitsandbytes 8-bit (LLM.int8)``."""
    if quantization.get("load_in_8bit"):
        return "bitsandbytes 8-bit (LLM.int8)"
    words = [f"bitsandbytes {quantization.get('bnb_4bit_quant_type', 'fp4')}"]
    if quantization.get("bnb_4bit_use_double_quant"):
        words.append("double quantization")
    words.append(f"compute {quantization.get('bnb_4bit_compute_dtype', 'float32')}")
    return ", ".join(words)


def dequantize_4bit(packed: Any, absmax: Any, code: Any, blocksize: int, shape: list[int], dtype: Any) -> Any:
    """bitsandbytes' 4-bit dequantization: two codes per byte (high nibble first), ``code[q] * absmax[block]`` in
    fp32, rounded once to ``dtype``; computed ``_CHUNK`` values at a time."""
    import torch

    flat = packed.reshape(-1).view(torch.uint8)
    n = 1
    for size in shape:
        n *= size
    out = torch.empty(n, dtype=dtype)
    # the two values of every byte at once: one lookup in a 256-row table of (code[high], code[low]) pairs
    # each pair as one 8-byte word: a 1-D lookup numpy does at memory speed
    pairs = torch.stack([code[torch.arange(256) >> 4], code[torch.arange(256) & 0xF]], dim=1).contiguous()
    pairs = pairs.numpy().view("int64").reshape(256)
    flat_np = flat.numpy()
    step = max(blocksize, _CHUNK // blocksize * blocksize)
    for start in range(0, n, step):
        stop = min(n, start + step)
        words = pairs[flat_np[start // 2 : (stop + 1) // 2]]
        values = torch.from_numpy(words.view("float32")).reshape(-1)[: stop - start]
        scale = absmax[start // blocksize : (stop + blocksize - 1) // blocksize]
        full = (stop - start) // blocksize * blocksize
        values[:full].view(-1, blocksize).mul_(scale[: full // blocksize].view(-1, 1))  # fp32, in place
        if full < stop - start:
            values[full:].mul_(scale[-1])
        out[start:stop].copy_(values)  # rounded once to dtype
    return out.reshape(shape)


def _dequantize_blockwise(quantized: Any, absmax: Any, code: Any, blocksize: int) -> Any:
    """bitsandbytes' 8-bit blockwise dequantization (the absmax of double quantization), in fp32."""
    import torch

    values = torch.from_numpy(code.numpy()[quantized.reshape(-1).numpy()])
    n, full = values.numel(), values.numel() // blocksize * blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].view(-1, 1))
    if full < n:
        values[full:].mul_(absmax[full // blocksize])
    return values


class _Reader:
    """One shard's tensors by name, as torch tensors (raw bytes read from the file), whole or in row chunks; its reads
    are serialized (tensors are made on several threads, and a read is a seek then a read on one file handle)."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.tensors = path, read_header(path).tensors
        self.fh = path.open("rb")
        self.lock = threading.Lock()

    def _bytes(self, name: str, start: int | None = None, stop: int | None = None) -> bytearray:
        with self.lock:
            return bytearray(read_bytes(self.fh, self.tensors[name], start, stop))

    def get(self, name: str) -> Any:
        import torch

        from ..tensor_io import torch_dtype

        info = self.tensors[name]
        raw = self._bytes(name)
        dtype = torch_dtype(info.dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(info.shape) if raw else torch.empty(info.shape, dtype=dtype)

    def chunks(self, name: str) -> Any:
        """A tensor copied as stored, 16 MB of rows at a time (an embedding is never whole in memory)."""
        import math

        import torch

        from ..tensor_io import torch_dtype

        info = self.tensors[name]
        if len(info.shape) < 2:
            yield self.get(name)
            return
        row = math.prod(info.shape[1:])
        step = max(1, (16 << 20) // max(1, row * 4))
        for start in range(0, info.shape[0], step):
            stop = min(info.shape[0], start + step)
            raw = self._bytes(name, start, stop)
            yield torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).view(stop - start, *info.shape[1:])


def _plain_tensors(reader: _Reader, quantization: dict[str, Any], model_dtype: str) -> list[tuple[PlannedTensor, Any]]:
    """Every tensor of the plain base in this shard: (what it is, how to make it), companions left out."""
    names = list(reader.tensors)
    quantized = {n for n in names if f"{n}.absmax" in reader.tensors or n.endswith(".weight") and _scb(n) in names}
    planned = []
    for name in names:
        if name in quantized:
            planned.append(_planned_quantized(reader, name, quantization, model_dtype))
        elif not (name.endswith(_COMPANIONS) or "quant_state" in name or name.endswith((".SCB", ".weight_format"))):
            info = reader.tensors[name]
            planned.append((PlannedTensor(name, info.dtype, tuple(info.shape)), lambda n=name: reader.chunks(n)))
    return planned


def _scb(weight: str) -> str:
    return weight[: -len("weight")] + "SCB"


def _planned_quantized(reader: _Reader, name: str, quantization: dict[str, Any], model_dtype: str) -> Any:
    import torch

    from ..tensor_io import TORCH_TO_SAFETENSORS

    if quantization.get("load_in_8bit"):
        info = reader.tensors[name]
        dtype = getattr(torch, model_dtype)

        def make() -> Any:
            cb, scb = reader.get(name), reader.get(_scb(name)).float()
            return (cb * scb.view(-1, 1) * 7.874015718698502e-3).to(dtype)

        return PlannedTensor(name, TORCH_TO_SAFETENSORS[str(dtype).removeprefix("torch.")], tuple(info.shape)), make
    state_name = next(n for n in reader.tensors if n.startswith(f"{name}.quant_state.bitsandbytes__"))
    state = json.loads(bytes(reader.get(state_name).tolist()).decode("utf-8"))
    dtype = getattr(torch, state["dtype"])

    def make() -> Any:
        absmax = reader.get(f"{name}.absmax")
        if f"{name}.nested_absmax" in reader.tensors:
            nested, nested_code = reader.get(f"{name}.nested_absmax").float(), reader.get(f"{name}.nested_quant_map")
            absmax = _dequantize_blockwise(absmax, nested, nested_code.float(), state["nested_blocksize"])
            absmax += torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        code = reader.get(f"{name}.quant_map").float()
        return dequantize_4bit(reader.get(name), absmax.float(), code, state["blocksize"], state["shape"], dtype)

    return PlannedTensor(name, TORCH_TO_SAFETENSORS[str(dtype).removeprefix("torch.")], tuple(state["shape"])), make


def _write_shard(path: Path, planned: list[tuple[PlannedTensor, Any]]) -> None:
    """One shard of a plain base: each tensor made (``make()``: the tensor, or its row chunks) and written in order,
    the next ones made meanwhile on the other cores (torch and numpy release the GIL); the file renamed when whole."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from ..monitoring import threads

    writer = ShardWriter(path, [p for p, _ in planned], hashed=False)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads(), 4))) as pool:
            ahead = max(1, min(threads(), 4))  # tensors being made at once: a few hundred MB at most
            made = [pool.submit(make) for _, make in planned[:ahead]]
            for index in range(len(planned)):
                result = made[index].result()
                if index + ahead < len(planned):
                    made.append(pool.submit(planned[index + ahead][1]))
                for part in [result] if isinstance(result, torch.Tensor) else result:
                    writer.write(part.contiguous().view(-1).view(torch.uint8).numpy())
                made[index] = None
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _digest(source: Path) -> str:
    """What the plain base is made from: the source's files (names, sizes, times) and this module's version."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    seen = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files] + [_VERSION]
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]


_VERSION = 1


def cache_root() -> Path:
    """Where plain bases are kept: MODEL_EXPORT_CACHE, else ~/.cache/model-export."""
    return Path(os.path.expanduser(os.environ.get("MODEL_EXPORT_CACHE") or "~/.cache/model-export"))


def plain_base(source: Path, quantization: dict[str, Any]) -> Path:
    """The plain base of a bitsandbytes ``source``: made once (its shards dequantized tensor by tensor, its other
    files copied, config.json without quantization_config) into ``cache_root()/dequantized/<name>-<digest>``; kept
    while the source is unchanged. Processes making it at once each write their own and the first rename wins."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    model_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    target = cache_root() / "dequantized" / f"{source.name}-{_digest(source)}"
    return _build(target, source, quantization, lambda reader: _plain_tensors(reader, quantization, model_dtype))


def _build(target: Path, source: Path, quantization: dict[str, Any], plan: Any, stated: bool = False) -> Path:
    """``target``, made once from ``source``: each shard written as ``plan(reader)`` lays it out (PlannedTensor, how to
    make it), the other files copied, config.json without quantization_config, the index's map rewritten, and the
    MARKER saying what it was made from; written under a name of this process's and renamed when whole (a process
    that finds another's finished keeps that one)."""
    from ..monitoring import logger

    if (target / MARKER).is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    logger.info(i18n.ui("dequantizing_base", described=describe(quantization), source=source, target=target))
    weight_map = {}
    for shard in sorted(source.glob("*.safetensors")):
        reader = _Reader(shard)
        try:
            planned = plan(reader)
            _write_shard(partial / shard.name, planned)
        finally:
            reader.fh.close()
        weight_map.update({p.name: shard.name for p, _ in planned})
    for extra in source.iterdir():
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != "model.safetensors.index.json":
            shutil.copy2(extra, partial / extra.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (source / "model.safetensors.index.json").is_file():
        index = {"metadata": {}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    record = {"source": str(source), "quantization": quantization, "described": describe(quantization)}
    record.update({"stated": True} if stated else {})
    (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: theirs is the same
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _quantized_names(reader: _Reader, skip: list[str]) -> set[str]:
    """The weights transformers quantizes when it loads a model with a BitsAndBytesConfig: every linear layer's (a
    2-D ``.weight``) but the embeddings, lm_head and llm_int8_skip_modules."""
    kept = ("embed_tokens", "lm_head", "wte", "wpe", *skip)
    return {
        name
        for name, info in reader.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2 and not any(k in name for k in kept)
    }


def _as_trained(bnb: Any, stated: dict[str, Any], weight: Any) -> Any:
    """``weight`` quantized by bitsandbytes as ``stated`` says and dequantized again, in its own dtype."""
    import torch

    if stated.get("load_in_8bit"):
        quantized, scale, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        return bnb.functional.int8_vectorwise_dequant(quantized, scale).to(weight.dtype)
    packed, state = bnb.functional.quantize_4bit(
        weight,
        blocksize=64,
        compress_statistics=bool(stated.get("bnb_4bit_use_double_quant")),
        quant_type=str(stated.get("bnb_4bit_quant_type") or "fp4"),
        quant_storage=getattr(torch, str(stated.get("bnb_4bit_quant_storage") or "uint8")),
    )
    return bnb.functional.dequantize_4bit(packed, state)


def quantized_as_trained(source: Path, stated: dict[str, Any]) -> Path:
    """The plain base a QLoRA run on the 16-bit ``source`` trained against: each linear layer's weight quantized by
    bitsandbytes as ``stated`` (BitsAndBytesConfig's names: what transformers does at load_in_4bit / load_in_8bit)
    and dequantized again, the rest as stored; made once into the cache like plain_base. Needs bitsandbytes (its own
    quantization, on the CPU)."""
    from ..extras import require

    bnb = require("bitsandbytes", "merging into the weights a QLoRA adapter was trained against")
    digest = hashlib.sha256(json.dumps([_digest(source), stated], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "dequantized" / f"{source.name}-as-trained-{digest}"
    as_trained = functools.partial(_as_trained, bnb, stated)
    skip = list(stated.get("llm_int8_skip_modules") or [])

    def plan(reader: _Reader) -> list[tuple[PlannedTensor, Any]]:
        quantized = _quantized_names(reader, skip)
        return [
            (
                PlannedTensor(n, i.dtype, tuple(i.shape)),
                (lambda n=n: as_trained(reader.get(n))) if n in quantized else (lambda n=n: reader.chunks(n)),
            )
            for n, i in reader.tensors.items()
        ]

    return _build(target, source, {"quant_method": "bitsandbytes", **stated}, plan, stated=True)


def quantized_name(named: str | None) -> str | None:
    """``named`` (adapter_config.json's base) with what it is, when it is a quantized base: a local folder whose
    config.json says bitsandbytes, or a hub name that says it (``...-bnb-4bit``); else None."""
    if not named:
        return None
    folder = Path(os.path.expanduser(named))
    quantization = quantization_of(folder) if folder.is_dir() else None
    if quantization and quantization.get("quant_method") == "bitsandbytes":
        return f"{named} ({describe(quantization)})"
    lowered = named.lower()
    return f"{named} (bitsandbytes)" if "bnb-4bit" in lowered or "bnb-8bit" in lowered else None
