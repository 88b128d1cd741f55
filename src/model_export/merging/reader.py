"""Reading a base's (or adapter's) tensors for the layer-streamed pass (merging/streamed.py): widened to fp32 straight
from a mapping of the file into memory the pass keeps, the mapped pages released after each read; and giving freed heap
memory back between layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TensorReader", "trim_heap", "TRIM_EVERY"]

WINDOW = 1 << 20  # the mapped pages released after a read: every aligned window of this size the read touched


TRIM_EVERY = 8  # decoder layers run between two returns of freed heap memory to the system


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere). Each layer allocates
    and frees tens to hundreds of MB of different sizes; glibc raises its mmap threshold after such frees, so later ones
    come from the heap and stay resident when freed: without this the streamed pass grew by about a layer's weights per
    pass (0.6B shape: 1.9 GB resident after five passes, 1.1 GB with a trim every eight layers, no slower)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _rows(planned: Any, start: int | None, stop: int | None) -> tuple[int, ...]:
    """The shape of a tensor, or of its rows ``start:stop``."""
    return tuple(planned.shape) if start is None else (stop - start, *planned.shape[1:])


class TensorReader:
    """Reads base (or adapter) tensors, whole or by rows, as fp32 torch tensors.

    A float tensor in a file is widened straight from a read-only mapping of the file into its fp32 destination, and
    the mapped pages are released right after (madvise DONTNEED: nothing stays mapped or counts as resident; the page
    cache keeps the file). With ``into`` the destination is a buffer kept between layers: measured at the 4B shape
    (a 193 MB decoder layer), reading into new memory and widening into new memory took 0.30-0.35 s a layer, widening
    from the mapping into a kept buffer 0.09 s; most of the difference is the first touch of new pages."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}
        self._mappings: dict[Path, Any] = {}

    def read(self, planned: Any, start: int | None = None, stop: int | None = None):
        """The tensor, or its rows ``start:stop``, as a new fp32 tensor."""
        import torch

        return self.into(planned, torch.empty(_rows(planned, start, stop), dtype=torch.float32), start, stop)

    def into(self, planned: Any, out: Any, start: int | None = None, stop: int | None = None):
        """The tensor, or its rows, widened into the fp32 tensor ``out`` (contiguous, of their shape); returns it."""
        from ..checkpoint.adapter_format import MemoryTensor
        from ..numerics import FLOAT_DTYPES, widen_into
        from ..tensor_io import SafetensorsFormatError, tensor_range

        source = planned.source
        mapping = None
        if not isinstance(source, MemoryTensor) and source.dtype in FLOAT_DTYPES:
            mapping = self._mapping(planned.source_file)
        if mapping is None:  # an adapter's tensor held in memory, an integer dtype, or a file that cannot be mapped
            return out.copy_(self.native(planned, start, stop))
        import mmap

        import numpy as np

        offset, length = tensor_range(source, start, stop)
        if offset + length > len(mapping):  # as read_bytes says it (the file changed since its header was read)
            raise SafetensorsFormatError(f"tensor {source.name!r}: the file ended before its data did")
        if length:
            widen_into(np.frombuffer(mapping, dtype=np.uint8, count=length, offset=offset), source.dtype, out.numpy())
            # the kernel maps the page cache around a fault in aligned windows (fault-around, 64 KiB by default):
            # release every aligned WINDOW the range touched, not only its own pages (a test checks none stay)
            first, last = offset - offset % WINDOW, min(-(-(offset + length) // WINDOW) * WINDOW, len(mapping))
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        return out

    def _mapping(self, path: Path) -> Any:
        """A read-only mapping of a whole file, kept for the model's life (None where the file cannot be mapped)."""
        if path not in self._mappings:
            import mmap

            try:
                self._mappings[path] = mmap.mmap(self._file(path).fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # an empty file, or a file system that does not map
                self._mappings[path] = None
        return self._mappings[path]

    def _file(self, path: Path) -> Any:
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for the model's life
        return self._files[path]

    def native(self, planned: Any, start: int | None = None, stop: int | None = None):
        """The tensor, or its rows, in its stored dtype (packed int32 weights, their scales and shapes)."""
        import torch

        from ..tensor_io import torch_dtype

        raw = self._bytes(planned, start, stop)
        return torch.frombuffer(raw, dtype=torch_dtype(planned.source.dtype)).reshape(_rows(planned, start, stop))

    def _bytes(self, planned: Any, start: int | None, stop: int | None):
        from ..checkpoint.adapter_format import MemoryTensor
        from ..tensor_io import read_bytes, tensor_range

        source = planned.source
        if isinstance(source, MemoryTensor):
            offset, length = tensor_range(source, start, stop)
            return bytearray(source.raw[offset : offset + length])
        return read_bytes(self._file(planned.source_file), source, start, stop)

    def close(self) -> None:
        for mapping in self._mappings.values():
            if mapping is not None:
                mapping.close()
        self._mappings.clear()
        for fh in self._files.values():
            fh.close()
        self._files.clear()
