"""The ONNX graph written as it is built: weights read from the merge in row chunks and written into one external data
file (large tensors page-aligned, so onnxruntime can map them), and the node helpers the builder composes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import i18n
from ..faults import crash_point
from ..files import write_sliced
from ..monitoring import Progress
from ..tensor_io import read_header, torch_row_chunks

DATA_FILE = "model.onnx.data"


_ALIGN = 4096  # large tensors start on page boundaries, so onnxruntime can map them


_ALIGN_SMALL = 64  # small ones (norms, scales of small layers) are not worth a page each


_CHUNK_BYTES = 64 << 20  # rows of one tensor converted at a time


class Weights:
    """Merged safetensors, read one tensor (or a few rows of one) at a time."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, tuple[Path, Any]] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            for name, info in read_header(shard).tensors.items():
                self.where[name] = (shard, info)
        self.files: dict[Path, Any] = {}
        total = sum(info.nbytes for _, info in self.where.values())
        self.meter = Progress(i18n.ui("progress_export", format="ONNX"), total)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str):
        return self.where[name][1]

    def raw_chunks(self, name: str) -> Iterator[Any]:
        """The tensor in its stored dtype as torch tensors of at most _CHUNK_BYTES of float32 each (whole rows)."""
        path, info = self.where[name]
        fh = self.files.get(path) or self.files.setdefault(path, open(path, "rb"))  # noqa: SIM115 - closed in close()
        for chunk in torch_row_chunks(fh, info, _CHUNK_BYTES):
            self.meter.advance(chunk.numel() * chunk.element_size())
            yield chunk

    def row_chunks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor as float32 arrays of at most _CHUNK_BYTES each (whole rows); torch widens bf16 on every core."""
        import torch

        for chunk in self.raw_chunks(name):
            yield chunk.to(torch.float32).numpy()

    def close(self) -> None:
        self.meter.close()
        for fh in self.files.values():
            fh.close()


class DataFile:
    """Appends tensors to the external data file and returns TensorProtos that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0
        self.count = 0

    def add(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks) -> Any:
        from onnx import TensorProto, helper

        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        pad = (-self.offset) % (_ALIGN if expected >= (1 << 20) else _ALIGN_SMALL)
        self.fh.write(b"\0" * pad)
        start = self.offset = self.offset + pad
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            write_sliced(self.fh, data)
            self.offset += data.nbytes
        length = self.offset - start
        if length != expected:  # a bug, not a user error: never write a tensor that lies about its size
            raise AssertionError(f"{name}: wrote {length} bytes, expected {expected}")
        crash_point("export_tensor")
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.count += 1
        return tensor

    def close(self) -> None:
        self.fh.close()


class Graph:
    """Nodes, initializers and names of the graph being built."""

    def __init__(self, data: DataFile, opset: int) -> None:
        self.data, self.opset = data, opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []  # inputs beyond the decoder's own (an adapter's LoRA A and B)
        self.constants: dict[tuple, str] = {}

    def op(
        self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs
    ) -> Any:
        from onnx import helper

        names = (
            outputs
            if isinstance(outputs, list)
            else [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        )
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"/const/{len(self.constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def weight(self, name: str, dtype, shape, chunks) -> str:
        self.initializers.append(self.data.add(name, dtype, tuple(shape), chunks))
        return name

    def copy(self, weights: Weights, name: str, dtype) -> str:
        """A merged tensor as an initializer of the same name, in ``dtype`` (fp32 or fp16), streamed in row chunks."""
        return self.weight(name, dtype, weights.info(name).shape, weights.row_chunks(name))
