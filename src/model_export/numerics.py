"""Raw tensor bytes as floats, in numpy, so that checking a checkpoint needs no torch.

bf16 has no numpy dtype: it is the upper half of a float32, so widening it is an exact shift.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_float", "nonfinite_count", "NUMPY_DTYPES"]

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def as_float(buffer, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A private, writable float array (float64 for F64, float32 otherwise) from raw little-endian bytes."""
    if dtype == "BF16":
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32).reshape(shape)
    raw = np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype])
    work = np.float64 if dtype == "F64" else np.float32
    return raw.astype(work).reshape(shape)  # astype always copies


def nonfinite_count(buffer, dtype: str) -> int:
    """How many NaN or Inf values raw float bytes hold (0 for integer dtypes)."""
    if dtype == "BF16":
        bits = np.frombuffer(buffer, dtype=np.uint16)
        return int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
    if dtype not in ("F64", "F32", "F16"):
        return 0
    return int(np.count_nonzero(~np.isfinite(np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype]))))
