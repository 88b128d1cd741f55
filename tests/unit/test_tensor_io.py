"""The safetensors header checks and one-tensor reader, against the safetensors library itself."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_export.tensor_io import SafetensorsFormatError, read_bytes, read_header, torch_dtype


@pytest.fixture
def sample(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(5).to(torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def rewrite(path, mutate, data_extra=b"", header_len=None):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len or len(body)) + body + raw[8 + n :] + data_extra)


def reference_rejects(path):
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001
        return True
    return False


def test_reads_what_safetensors_reads(sample):
    path, tensors = sample
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    with path.open("rb") as fh:
        got = {
            name: torch.frombuffer(read_bytes(fh, info), dtype=torch_dtype(info.dtype)).reshape(info.shape)
            if info.nbytes
            else torch.empty(info.shape, dtype=torch_dtype(info.dtype))
            for name, info in header.tensors.items()
        }
        rows = read_bytes(fh, header.tensors["a"], 1, 3, into=bytearray(64))
        assert torch.equal(torch.frombuffer(rows, dtype=torch.float32).reshape(2, 4), tensors["a"][1:3])
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def _offsets(name, start, end):
    return lambda h: h[name].__setitem__("data_offsets", [start, end])


@pytest.mark.parametrize(
    "mutate,problem",
    [
        (_offsets("a", 0, 4 * 12 + 8), "need 48"),
        (lambda h: h["a"].__setitem__("shape", [4, 4]), "need 64"),
        (lambda h: h["a"].__setitem__("dtype", "F7"), "unknown dtype"),
        (lambda h: h["a"].__setitem__("shape", [3, -4]), "not a list of non-negative"),
        (
            lambda h: h["b"].__setitem__("data_offsets", [h["b"]["data_offsets"][1], h["b"]["data_offsets"][0]]),
            "ordered",
        ),
    ],
)
def test_entry_problems(sample, mutate, problem):
    path, _ = sample
    rewrite(path, mutate)
    with pytest.raises(SafetensorsFormatError, match=problem):
        read_header(path)
    assert reference_rejects(path)


def test_offsets_outside_the_file(sample):
    path, _ = sample
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])  # truncated
    with pytest.raises(SafetensorsFormatError, match="offsets outside the file"):
        read_header(path)
    assert reference_rejects(path)


def test_overlapping_tensors(sample):
    path, _ = sample

    def overlap(h):
        start = h["a"]["data_offsets"][0]
        h["b"]["dtype"], h["b"]["shape"], h["b"]["data_offsets"] = "F32", [12], [start, start + 48]

    rewrite(path, overlap)
    with pytest.raises(SafetensorsFormatError, match="overlap"):
        read_header(path)
    assert reference_rejects(path)


def test_trailing_bytes(sample):
    path, _ = sample
    rewrite(path, lambda h: None, data_extra=b"\0" * 16)
    with pytest.raises(SafetensorsFormatError, match="holes or trailing bytes"):
        read_header(path)
    assert reference_rejects(path)


def test_header_length_checks(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="runs past the end"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="over the 100 MB limit"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsFormatError, match="shorter than the 8-byte"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{x:1")
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        read_header(path)
    for bad in (path,):
        assert reference_rejects(bad)
