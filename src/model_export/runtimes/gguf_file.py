"""A GGUF file's header and tensors, read straight from the file.

gguf's ``GGUFReader`` builds every metadata field as numpy parts, the vocabulary's 151936 strings and as many merges
included: 3.8 s for a Qwen3 GGUF on this machine, and a GGUF artifact's verification opened it four times (its
precision twice, the LoRA check, the read back). Here the header is walked with ``struct`` (arrays skipped, their
length kept), and each tensor's data is a numpy view of the memory-mapped file shaped as ``GGUFReader`` shapes it
(numpy order; quantized types as bytes per row), so the read back compares the same arrays.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFTensor", "read_gguf"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32}
_TYPED["I64"] = np.int64


@dataclass
class GGUFTensor:
    """One tensor: its name, ggml type (gguf.GGMLQuantizationType), shape in ggml order (innermost first) and data."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """``fields``: every metadata key with its value (scalars and strings; an array's value is its length), and
    ``tensors`` in file order. ``string_item(key, i)`` reads one string of an array of strings (the vocabulary's
    ``tokenizer.ggml.tokens``); ``release()`` drops the pages read so far from this process's resident memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.fields, self.tensors, self._arrays = _parse(self._map, self.path)
        except Exception:
            self._map.close()
            raise

    def string_item(self, key: str, index: int) -> str | None:
        """Item ``index`` of the array of strings ``key``, or None when there is no such item."""
        kind, at = self._arrays.get(key, (None, 0))
        if kind != _STRING or not 0 <= index < self.fields[key]:
            return None
        for _ in range(index):
            at += 8 + struct.unpack_from("<Q", self._map, at)[0]
        return _string(self._map, at)[0].decode("utf-8", "replace")

    def release(self) -> None:
        if hasattr(self._map, "madvise"):
            try:
                self._map.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def read_gguf(path: str | Path) -> GGUFFile:
    """The GGUF at ``path`` (version 2 or 3). Raises ValueError when it is not one."""
    return GGUFFile(path)


def _parse(data: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[GGUFTensor], dict[str, tuple[int, int]]]:
    import gguf

    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not read here (2 or later)")
    at, fields, arrays = 24, {}, {}
    for _ in range(kv_count):
        raw, at = _string(data, at)
        key = raw.decode("utf-8", "replace")
        (kind,) = struct.unpack_from("<I", data, at)
        if kind == _ARRAY:  # where its items start, for string_item
            arrays[key] = (struct.unpack_from("<I", data, at + 4)[0], at + 16)
        fields[key], at = _value(data, at + 4, kind)
    entries = []
    for _ in range(tensor_count):
        name, at = _string(data, at)
        (dims,) = struct.unpack_from("<I", data, at)
        shape = struct.unpack_from(f"<{dims}Q", data, at + 4)
        kind, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * dims)
        at += 4 + 8 * dims + 12
        entries.append((name.decode("utf-8"), tuple(int(d) for d in shape), gguf.GGMLQuantizationType(kind), offset))
    alignment = int(fields.get("general.alignment", 32))
    start = -(-at // alignment) * alignment
    return fields, [_tensor(data, start, *entry) for entry in entries], arrays


def _tensor(data: mmap.mmap, start: int, name: str, shape: tuple[int, ...], ttype: Any, offset: int) -> GGUFTensor:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ttype]
    count = int(np.prod(shape, dtype=np.int64))
    dims = tuple(reversed(shape))
    typed = _TYPED.get(ttype.name)
    if typed is not None:
        array = np.frombuffer(data, dtype=typed, count=count, offset=start + offset).reshape(dims)
    else:
        nbytes = count * size // block
        array = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=start + offset)
        array = array.reshape(gguf.quant_shape_to_byte_shape(dims, ttype))
    return GGUFTensor(name, ttype, shape, array)


def _string(data: mmap.mmap, at: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("<Q", data, at)
    return data[at + 8 : at + 8 + length], at + 8 + length


def _value(data: mmap.mmap, at: int, kind: int) -> tuple[Any, int]:
    """A metadata value and where the next begins: a scalar, a string (decoded), or an array (its length, skipped)."""
    if kind == _STRING:
        value, at = _string(data, at)
        return value.decode("utf-8", "replace"), at
    if kind == _ARRAY:
        item, items = struct.unpack_from("<IQ", data, at)
        at += 12
        if item in _SCALARS:
            return items, at + items * struct.calcsize(_SCALARS[item])
        for _ in range(items):  # strings (the vocabulary) are stepped over, not decoded
            at = at + 8 + struct.unpack_from("<Q", data, at)[0] if item == _STRING else _value(data, at, item)[1]
        return items, at
    (value,) = struct.unpack_from(_SCALARS[kind], data, at)
    return value, at + struct.calcsize(_SCALARS[kind])
