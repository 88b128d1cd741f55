"""Safetensors files read one tensor at a time, with the header checked before anything is trusted.

We parse the header ourselves (rather than calling safetensors' safe_open) for two reasons: the
checks must report *what* is wrong in a form the user can act on, and tensors are read with plain
``seek``/``readinto`` so that a large shard never stays mapped and never counts toward resident memory.
The checks follow the safetensors format rules: header at most 100 MB, offsets inside the file,
no overlap, no holes, and byte lengths that match dtype and shape.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["SafetensorsFormatError", "TensorInfo", "SafetensorsHeader", "read_header", "read_tensor", "iter_tensors", "DTYPE_SIZES"]

MAX_HEADER_BYTES = 100_000_000

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


class SafetensorsFormatError(ValueError):
    """A safetensors file breaks the format; callers turn it into the error of their stage."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file. Raises SafetensorsFormatError naming the problem."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise SafetensorsFormatError(f"the file is {size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"header length {header_len} bytes is over the 100 MB limit")
        if 8 + header_len > size:
            raise SafetensorsFormatError(f"header length {header_len} bytes runs past the end of the {size}-byte file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = {name: _tensor_info(name, entry, base) for name, entry in header.items()}
    _check_layout(tensors, base, size - base)
    return SafetensorsHeader(path, tensors, metadata if isinstance(metadata, dict) else {})


def _tensor_info(name: str, entry: object, base: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsFormatError(f"tensor {name!r}: data_offsets {offsets!r} are not two ordered non-negative integers")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored but dtype {dtype} and shape {shape} need {expected}")
    return TensorInfo(name, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _check_layout(tensors: dict[str, TensorInfo], base: int, data_size: int) -> None:
    previous, covered = None, 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.end - base > data_size:
            raise SafetensorsFormatError(
                f"tensor {info.name!r} ends at data byte {info.end - base} but the file holds only "
                f"{data_size} bytes of data (offsets outside the file; truncated?)")
        if previous is not None and info.start < previous.end:
            raise SafetensorsFormatError(f"tensors {previous.name!r} and {info.name!r} overlap")
        covered += info.nbytes
        previous = info
    if covered != data_size:
        raise SafetensorsFormatError(
            f"the data section holds {data_size} bytes but the tensors cover {covered} (holes or trailing bytes)")


_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


def read_tensor(fh: BinaryIO, info: TensorInfo):
    """Read one tensor from ``fh`` (its open shard) with explicit I/O, so no mapping outlives the call."""
    import torch

    buffer = bytearray(info.nbytes)
    fh.seek(info.start)
    if fh.readinto(buffer) != info.nbytes:
        raise SafetensorsFormatError(f"tensor {info.name!r}: the file ended before its data did")
    dtype = getattr(torch, _TORCH_DTYPES[info.dtype])
    if not buffer:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


def iter_tensors(header: SafetensorsHeader) -> Iterator[tuple[str, "object"]]:
    """Yield (name, tensor) for every tensor of a checked header, one in memory at a time, in file order."""
    with header.path.open("rb") as fh:
        for info in sorted(header.tensors.values(), key=lambda t: t.start):
            yield info.name, read_tensor(fh, info)
