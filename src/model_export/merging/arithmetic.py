"""The update math of the merge, as PEFT does it, accumulated in fp32 and rounded once.

PEFT's merge_and_unload computes ``delta = (B @ A) * scaling`` in fp32 (transposed for
fan_in_fan_out and embeddings) and adds it to the base weight; DoRA then scales each output row
(each embedding column) by ``magnitude / ||W + delta||``. We do the same operations in the same
order, on rows at a time where the operation allows it, so that per element the result is within
one unit in the last place of PEFT's (the only difference being that we round once, at the end).

The math runs in torch, as PEFT's does, so that fp32 results agree bit for bit (numpy's BLAS sums
in another order); with ``device="cuda"`` it runs on the GPU, falling back to the CPU when the GPU
runs out of memory. Bytes are widened to fp32 in numpy (exact) and rounded once by torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from .. import i18n
from ..checkpoint.adapter_format import MemoryTensor
from ..monitoring import logger
from ..tensor_io import read_bytes, tensor_range

__all__ = ["merged_chunks", "MemoryTensor", "Workspace", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20  # fp32 working set of one chunk


class Workspace:
    """Buffers reused from chunk to chunk. A fresh large allocation costs a page fault per 4 KiB, which
    made the merge several times slower than its arithmetic; output buffers come from a small pool
    and return to it once the writer thread has written them."""

    def __init__(self, pool_size: int = 4) -> None:
        import queue

        self._floats: dict[str, Any] = {}
        self._read = bytearray()
        self._free: queue.Queue = queue.Queue()
        for _ in range(pool_size):
            self._free.put(bytearray())

    def floats(self, name: str, numel: int):
        import torch

        buffer = self._floats.get(name)
        if buffer is None or buffer.numel() < numel:
            self._floats[name] = buffer = torch.empty(numel, dtype=torch.float32)
        return buffer[:numel]

    def read(self, fh: BinaryIO, info: Any, start: int, stop: int) -> memoryview:
        """Rows ``start:stop`` of ``info``'s tensor, into the reused read buffer."""
        length = tensor_range(info, start, stop)[1]
        if len(self._read) < length:
            self._read = bytearray(length)
        return read_bytes(fh, info, start, stop, into=self._read)

    def out_buffer(self, length: int) -> bytearray:
        """A pooled buffer of at least ``length`` bytes; blocks while every buffer waits to be written."""
        buffer = self._free.get()
        if len(buffer) < length:
            buffer = bytearray(length)
        return buffer

    def release(self, buffer: bytearray) -> None:
        self._free.put(buffer)


def _source_bytes(source: Any, fh: BinaryIO | None, start: int, stop: int, workspace: Workspace):
    if isinstance(source, MemoryTensor):
        offset, length = tensor_range(source, start, stop)
        return memoryview(source.raw)[offset : offset + length]
    return workspace.read(fh, source, start, stop)


def _whole_tensor(lora: Any) -> bool:
    # fan_in_fan_out and DoRA on embeddings normalise across rows: they need the whole tensor at once.
    return lora is not None and (lora.fan_in_fan_out or (lora.kind == "embedding" and lora.magnitude is not None))


def merged_chunks(
    tensor: Any, fh: BinaryIO | None, workspace: Workspace, device: str = "cpu"
) -> Iterator[tuple[memoryview, Any]]:
    """Yield (bytes, release) for the output of ``tensor`` (an OutputTensor), merged a chunk of rows at a time.

    ``release`` returns the buffer to the workspace once the bytes are written (None: nothing to return).
    """
    import torch

    from ..tensor_io import torch_dtype

    source = tensor.source
    total = tensor.shape[0] if tensor.shape else 1
    row_elems = math.prod(tensor.shape[1:]) if tensor.shape else 1
    step = total if _whole_tensor(tensor.lora) or not tensor.shape else max(1, CHUNK_BYTES // (4 * max(row_elems, 1)))
    floating = source.dtype in ("F64", "F32", "F16", "BF16")
    for start in range(0, total, step):
        stop = min(total, start + step)
        raw = _source_bytes(source, fh, start, stop, workspace)
        if not floating or not len(raw):  # integer buffers (and empty tensors) are copied as they are
            yield _pooled(workspace, raw)
            continue
        shape = (stop - start, *tensor.shape[1:]) if tensor.shape else ()
        numel = math.prod(shape)
        weight = workspace.floats("weight", numel).view(shape)
        weight.copy_(torch.frombuffer(raw, dtype=torch_dtype(source.dtype)).view(shape))
        if tensor.lora is not None:
            weight = _on_device(tensor.lora, weight, start, stop, device, workspace)
        if tensor.bias_of is not None:
            weight += torch.from_numpy(tensor.bias_of.bias[start:stop]) * tensor.bias_of.scaling
        out_dtype = torch_dtype(tensor.dtype)
        length = numel * out_dtype.itemsize
        buffer = workspace.out_buffer(length)
        torch.frombuffer(buffer, dtype=out_dtype, count=numel).view(shape).copy_(weight)
        yield memoryview(buffer)[:length], lambda buffer=buffer: workspace.release(buffer)


def _pooled(workspace: Workspace, raw: memoryview) -> tuple[memoryview, Any]:
    buffer = workspace.out_buffer(len(raw))
    buffer[: len(raw)] = raw
    return memoryview(buffer)[: len(raw)], lambda: workspace.release(buffer)


class _Backend:
    """Where the update math runs. Always torch: it is what PEFT runs, so fp32 results agree bit for bit."""

    def __init__(self, device: str, workspace: Workspace | None = None) -> None:
        import torch

        self.torch, self.device, self.workspace = torch, torch.device(device), workspace

    def param(self, array: np.ndarray):
        return self.torch.from_numpy(array).to(self.device)

    def take(self, weight):
        """The CPU rows onto this backend's device."""
        return weight.to(self.device)

    def norm_rows(self, x):
        return self.torch.linalg.norm(x, dim=1)

    def matmul(self, a, b):
        """a @ b, into a reused buffer on the CPU (the values are the same as a fresh a @ b)."""
        if self.workspace is None:
            return a @ b
        out = self.workspace.floats("delta", a.shape[0] * b.shape[1]).view(a.shape[0], b.shape[1])
        return self.torch.matmul(a, b, out=out)


def _on_device(lora: Any, weight: Any, start: int, stop: int, device: str, workspace: Workspace):
    import torch

    cpu = _Backend("cpu", None if _whole_tensor(lora) else workspace)
    if device == "cpu" or not torch.cuda.is_available():
        return _apply(lora, weight, start, stop, cpu)
    try:
        gpu = _Backend("cuda")
        return _apply(lora, gpu.take(weight), start, stop, gpu).cpu()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        logger.warning(i18n.ui("merge_gpu_fallback", module=lora.module))
        return _apply(lora, weight, start, stop, cpu)


def _apply(lora: Any, weight: Any, start: int, stop: int, backend: Any) -> Any:
    """weight (fp32 rows start:stop of the base) -> merged fp32 rows, following PEFT's order of operations."""
    A, B, s = backend.param(lora.A), backend.param(lora.B), lora.scaling
    if lora.kind == "embedding":
        if lora.magnitude is not None:  # whole tensor: the norm runs over all rows of each column
            delta = (B @ A).T * s
            factor = (backend.param(lora.magnitude) / backend.norm_rows(weight.T + delta.T)).reshape(1, -1)
            return factor * (weight + delta)
        delta = backend.matmul(B, A[:, start:stop])
        delta.mul_(s)
        weight += delta.T
        return weight
    if lora.fan_in_fan_out:
        delta = (B @ A).T * s
    else:
        delta = backend.matmul(B[start:stop], A)
        delta.mul_(s)
    if lora.magnitude is None:
        weight += delta
        return weight
    merged = weight + delta
    norm = backend.norm_rows(merged.T if lora.fan_in_fan_out else merged)
    magnitude = backend.param(lora.magnitude)
    if lora.fan_in_fan_out:
        return (magnitude / norm).reshape(1, -1) * merged
    return (magnitude[start:stop] / norm).reshape(-1, 1) * merged
