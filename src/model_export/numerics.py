"""Raw tensor bytes as floats, in numpy, so that checking a checkpoint needs no torch.

bf16 has no numpy dtype: it is the upper half of a float32, so widening it is an exact shift.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_float", "narrow_into", "nonfinite_count", "widen_into", "FLOAT_DTYPES", "NUMPY_DTYPES"]

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
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what widen_into widens


def as_float(buffer, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A private, writable float array (float64 for F64, float32 otherwise) from raw little-endian bytes."""
    if dtype == "F64":
        return np.frombuffer(buffer, dtype=np.float64).reshape(shape).copy()
    return widen_into(buffer, dtype, np.empty(shape, dtype=np.float32))


def nonfinite_count(buffer, dtype: str) -> int:
    """How many NaN or Inf values raw float bytes hold (0 for integer dtypes)."""
    if dtype == "BF16":
        bits = np.frombuffer(buffer, dtype=np.uint16)
        return int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
    if dtype not in ("F64", "F32", "F16"):
        return 0
    return int(np.count_nonzero(~np.isfinite(np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype]))))


def widen_into(buffer, dtype: str, out: np.ndarray) -> np.ndarray:
    """Raw float bytes (F64, F32, F16, BF16) widened (F64: rounded) into the float32 array ``out``, shaped like it."""
    if dtype == "BF16":
        bits = np.frombuffer(buffer, dtype=np.uint16).reshape(out.shape)
        np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype]).reshape(out.shape), casting="same_kind")
    return out


def narrow_into(x: np.ndarray, dtype: str, out, scratch: np.ndarray) -> None:
    """float32 ``x`` (contiguous, any shape) rounded to ``dtype`` (F32, F16, BF16) into the bytes ``out``, as torch
    rounds: to nearest, ties to even; a bf16 NaN becomes 0x7FC0. ``x`` is consumed (its bits change); ``scratch``:
    uint32, at least as many as ``x``."""
    x = x.reshape(-1)
    if dtype == "F32":
        np.copyto(np.frombuffer(out, dtype=np.float32, count=x.size), x)
        return
    if dtype == "F16":
        np.copyto(np.frombuffer(out, dtype=np.float16, count=x.size), x, casting="same_kind")
        return
    if dtype != "BF16":
        raise ValueError(f"cannot round float32 to {dtype}")
    target = np.frombuffer(out, dtype=np.uint16, count=x.size)
    nan = np.isnan(x) if np.isnan(x.max()) else None  # a NaN anywhere makes the maximum NaN: one pass, no mask
    bits, carry = x.view(np.uint32), scratch[: x.size]
    np.right_shift(bits, 16, out=carry)  # ties go to the even result: add 0x7FFF plus the bit that stays lowest
    carry &= 1
    carry += 0x7FFF
    bits += carry
    np.copyto(target, bits.view(np.uint16)[1::2])  # the upper halves (little-endian)
    if nan is not None:
        target[nan] = 0x7FC0
