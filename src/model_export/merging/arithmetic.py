"""The update math of the merge, as PEFT does it, accumulated in fp32 and rounded once.

PEFT's merge_and_unload computes ``delta = (B @ A) * scaling`` in fp32 (transposed for
fan_in_fan_out and embeddings) and adds it to the base weight; DoRA then scales each output row
(each embedding column) by ``magnitude / ||W + delta||``. We do the same operations in the same
order, on rows at a time where the operation allows it, so that per element the result is within
one unit in the last place of PEFT's (the only difference being that we round once, at the end).

On the CPU the math runs in numpy, so that merging never imports torch (its import alone took 1.4 s of
a 5 s merge at the 0.6B shape): bytes are widened to fp32 exactly, the rank-r product is numpy's
BLAS, and the result is rounded to nearest, ties to even, as torch rounds (numerics.narrow_into; a
bf16 NaN becomes 0x7FC0). numpy's BLAS may sum a product in another order than torch's; at the
shapes of a LoRA (r rows against whole matrices) the fp32 products agreed bit for bit on this
machine, and any difference stays within the one ulp above. With ``device="cuda"`` the math runs
in torch on the GPU, falling back to the CPU when the GPU runs out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

import numpy as np

from .. import i18n
from ..checkpoint.adapter_format import MemoryTensor
from ..monitoring import logger
from ..numerics import narrow_into, widen_into
from ..tensor_io import DTYPE_SIZES, read_bytes, tensor_range

__all__ = ["merged_chunks", "MemoryTensor", "Workspace", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20  # fp32 working set of one chunk
# A chunk's rows go through widening, the update and rounding a block at a time, so that the passes over a block find
# it in the CPU's cache (0.3 s of CPU less in a 0.6B merge than whole chunks); the blocks go to the lanes in turn.
BLOCK_ELEMS = 1 << 17
# BLAS sums a product of a few rows (or columns) in another order than of many: numpy's results for blocks of 3
# embedding columns differed in fp32 from the whole product, while blocks of 8 to 128 matched it bit for bit
MIN_BLOCK_ROWS = 32
SPLIT_ELEMS = 1 << 18  # smaller chunks are not worth handing rows to another thread


class Workspace:
    """Buffers reused from chunk to chunk, and the threads that share a chunk's rows. A fresh large allocation costs a
    page fault per 4 KiB, which made the merge several times slower than its arithmetic; output buffers come from a
    small pool and return to it once the writer thread has written them. With ``lanes`` > 1 each chunk's rows are
    split between this thread and ``lanes - 1`` helpers (numpy releases the GIL in its loops and BLAS)."""

    def __init__(self, pool_size: int = 4, lanes: int = 1) -> None:
        import queue

        self._floats: dict[str, Any] = {}
        self._read = np.empty(0, np.uint8)
        self._free: queue.Queue = queue.Queue()
        for _ in range(pool_size):
            self._free.put(np.empty(0, np.uint8))
        self.lanes = max(1, lanes)
        self._helpers: Any = None

    def run(self, jobs: list[Any]) -> None:
        """Run the callables ``jobs``: the first here, the others on helper threads; errors are raised here."""
        if len(jobs) == 1:
            jobs[0]()
            return
        if self._helpers is None:
            from concurrent.futures import ThreadPoolExecutor

            self._helpers = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="merge")
        pending = [self._helpers.submit(job) for job in jobs[1:]]
        try:
            jobs[0]()
        finally:
            for future in pending:
                future.result()

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown()
            self._helpers = None

    def floats(self, name: str, numel: int, dtype: Any = np.float32) -> np.ndarray:
        buffer = self._floats.get(name)
        if buffer is None or buffer.size < numel:
            self._floats[name] = buffer = np.empty(numel, dtype=dtype)
        return buffer[:numel]

    def read(self, fh: BinaryIO, info: Any, start: int, stop: int) -> memoryview:
        """Rows ``start:stop`` of ``info``'s tensor, into the reused read buffer."""
        length = tensor_range(info, start, stop)[1]
        if len(self._read) < length:
            self._read = np.empty(length, np.uint8)
        return read_bytes(fh, info, start, stop, into=self._read)

    def out_buffer(self, length: int) -> np.ndarray:
        """A pooled buffer of at least ``length`` bytes; blocks while every buffer waits to be written."""
        buffer = self._free.get()
        if len(buffer) < length:
            buffer = np.empty(length, np.uint8)  # not zero-filled: every byte handed out is written first
        return buffer

    def release(self, buffer: np.ndarray) -> None:
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
        length = (stop - start) * row_elems * DTYPE_SIZES[tensor.dtype]
        buffer = workspace.out_buffer(length)
        out, rows = memoryview(buffer)[:length], stop - start
        whole = _whole_tensor(tensor.lora)
        lanes = 1 if whole or rows * row_elems < SPLIT_ELEMS else workspace.lanes
        blocks = _blocks(start, stop, rows if whole else max(MIN_BLOCK_ROWS, BLOCK_ELEMS // row_elems))
        jobs = [
            partial(_merge_blocks, tensor, raw, out, start, blocks[lane::lanes], lane, device, workspace)
            for lane in range(min(lanes, len(blocks)))
        ]
        workspace.run(jobs)
        yield out, lambda buffer=buffer: workspace.release(buffer)


def _blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Rows ``start:stop`` in blocks of ``size`` rows, a last block shorter than MIN_BLOCK_ROWS joined to the one
    before it."""
    bounds = list(range(start, stop, size)) + [stop]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_BLOCK_ROWS:
        del bounds[-2]
    return list(zip(bounds, bounds[1:]))


def _merge_blocks(
    tensor: Any, raw: memoryview, out: memoryview, first: int, blocks: list, lane: int, device: str, workspace
) -> None:
    """One lane's share of a chunk: its blocks of rows, one after the other, in that lane's buffers."""
    for start, stop in blocks:
        _merge_rows(tensor, raw, out, first, start, stop, lane, device, workspace)


def _merge_rows(
    tensor: Any, raw: memoryview, out: memoryview, first: int, start: int, stop: int, lane: int, device: str, workspace
) -> None:
    """Rows ``start:stop`` of ``tensor`` merged from the chunk's bytes ``raw`` (rows from ``first``) into ``out``."""
    shape = (stop - start, *tensor.shape[1:]) if tensor.shape else ()
    numel, row_elems = math.prod(shape), math.prod(tensor.shape[1:]) if tensor.shape else 1
    source_row = DTYPE_SIZES[tensor.source.dtype] * row_elems
    out_row = DTYPE_SIZES[tensor.dtype] * row_elems
    rows_in = raw[(start - first) * source_row : (stop - first) * source_row]
    weight = widen_into(rows_in, tensor.source.dtype, workspace.floats(f"weight{lane}", numel).reshape(shape))
    if tensor.lora is not None:
        weight = _on_device(tensor.lora, weight, start, stop, device, workspace, lane)
    if tensor.bias_of is not None:
        weight += tensor.bias_of.bias[start:stop] * np.float32(tensor.bias_of.scaling)
    rows_out = out[(start - first) * out_row : (stop - first) * out_row]
    narrow_into(np.ascontiguousarray(weight), tensor.dtype, rows_out, workspace.floats(f"bits{lane}", numel, np.uint32))


def _pooled(workspace: Workspace, raw: memoryview) -> tuple[memoryview, Any]:
    buffer = workspace.out_buffer(len(raw))
    buffer[: len(raw)] = raw
    return memoryview(buffer)[: len(raw)], lambda: workspace.release(buffer)


class _Numpy:
    """The update math of plain LoRA on the CPU, in numpy."""

    def __init__(self, workspace: Workspace | None = None, lane: int = 0) -> None:
        self.workspace, self.lane = workspace, lane

    def param(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b, into a reused buffer (the values are the same as a fresh a @ b)."""
        if self.workspace is None:
            return a @ b
        out = self.workspace.floats(f"delta{self.lane}", a.shape[0] * b.shape[1])
        return np.matmul(a, b, out=out.reshape(a.shape[0], -1))


class _Backend:
    """The update math in torch: on a GPU, and for DoRA on the CPU too (its norms are sums whose order torch's
    reduction picks from the tensors' layouts; numpy's differed by up to 7 ulp in fp32 outputs)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)

    def param(self, array: np.ndarray):
        return self.torch.from_numpy(np.asarray(array, dtype=np.float32)).to(self.device)

    def take(self, weight: np.ndarray):
        """The CPU rows onto this backend's device."""
        return self.torch.from_numpy(weight).to(self.device)

    def norm_rows(self, x):
        return self.torch.linalg.norm(x, dim=1)

    def matmul(self, a, b):
        return a @ b


def _on_device(
    lora: Any, weight: np.ndarray, start: int, stop: int, device: str, workspace: Workspace, lane: int = 0
) -> np.ndarray:
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            try:
                gpu = _Backend("cuda")
                return _apply(lora, gpu.take(weight), start, stop, gpu).cpu().numpy()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                logger.warning(i18n.ui("merge_gpu_fallback", module=lora.module))
    if lora.magnitude is not None:
        cpu = _Backend("cpu")
        return _apply(lora, cpu.take(weight), start, stop, cpu).numpy()
    return _apply(lora, weight, start, stop, _Numpy(None if _whole_tensor(lora) else workspace, lane))


def _apply(lora: Any, weight: Any, start: int, stop: int, backend: Any) -> Any:
    """weight (fp32 rows start:stop of the base) -> merged fp32 rows, following PEFT's order of operations."""
    A, B, s = backend.param(lora.A), backend.param(lora.B), lora.scaling
    if lora.kind == "embedding":
        if lora.magnitude is not None:  # whole tensor: the norm runs over all rows of each column
            delta = (B @ A).T * s
            factor = (backend.param(lora.magnitude) / backend.norm_rows(weight.T + delta.T)).reshape(1, -1)
            return factor * (weight + delta)
        delta = backend.matmul(B, A[:, start:stop])
        delta *= s
        weight += delta.T
        return weight
    if lora.fan_in_fan_out:
        delta = (B @ A).T * s
    else:
        delta = backend.matmul(B[start:stop], A)
        delta *= s
    if lora.magnitude is None:
        weight += delta
        return weight
    merged = weight + delta
    norm = backend.norm_rows(merged.T if lora.fan_in_fan_out else merged)
    magnitude = backend.param(lora.magnitude)
    if lora.fan_in_fan_out:
        return (magnitude / norm).reshape(1, -1) * merged
    return (magnitude[start:stop] / norm).reshape(-1, 1) * merged
