"""Widening and rounding raw float bytes in numpy, against torch's conversions bit for bit (the merge's output)."""

import numpy as np
import pytest
import torch

from model_export.numerics import narrow_into, widen_into

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(1 << 16, dtype=np.float32) * np.float32(10.0) ** rng.integers(-44, 38, 1 << 16)
    any_bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halfway = (rng.integers(0, 2**16, 4096, dtype=np.uint64).astype(np.uint32) << 16 | 0x8000).view(np.float32)
    edges = [0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 3.4028235e38, 65504.0, 65520.0, 1e-45, 6e-8]
    edges = np.array(edges, np.float32)
    values = np.concatenate([normal, any_bits, halfway, edges]).astype(np.float32)
    return values[~np.isnan(values)]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_rounding_is_torch_s_bit_for_bit(dtype):
    values = _values()
    expected = torch.from_numpy(values.copy()).to(TORCH[dtype])
    out = bytearray(values.size * expected.element_size())
    with np.errstate(over="ignore"):
        narrow_into(values.copy(), dtype, out, np.empty(values.size, np.uint32))
    assert bytes(out) == expected.view(torch.uint8).numpy().tobytes()
    widened = widen_into(out, dtype, np.empty(values.size, np.float32))
    assert np.array_equal(widened.view(np.uint32), expected.float().numpy().view(np.uint32))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_nan_stays_nan(dtype):
    values = np.array([np.nan, 1.0, -np.nan, 2.0], np.float32)
    values = np.concatenate([values, np.array([0x7F800001, 0xFF800001, 0x7FFFFFFF], np.uint32).view(np.float32)])
    out = bytearray(values.size * 2)
    narrow_into(values.copy(), dtype, out, np.empty(values.size, np.uint32))
    back = widen_into(out, dtype, np.empty(values.size, np.float32))
    assert np.array_equal(np.isnan(back), np.isnan(values)) and list(back[[1, 3]]) == [1.0, 2.0]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_a_scalar_rounds_as_an_array_does(dtype):
    value = np.array(1.00390625 + 2**-10, np.float32)  # not representable in bf16: rounds
    out = bytearray(4)
    narrow_into(value.copy(), dtype, out, np.empty(1, np.uint32))
    expected = torch.tensor([float(value)]).to(TORCH[dtype]).view(torch.uint8).numpy().tobytes()
    assert bytes(out[: len(expected)]) == expected
