"""llama.cpp's own quantizers (``ggml_quantize_chunk`` in its libggml-base), where the llamacpp extra installed them.

The GGUF export needs no llama.cpp: the K-quants and the 32-value types with an importance matrix are ours in numpy
(kquants.py), the other types gguf.quants', each byte-identical to llama.cpp's (tests/unit/test_kquants.py compares
every block with this very function). Where llama-cpp-python is installed (it runs the GGUF's verification), the
same bytes come 2-7x faster from its C library (measured in docs/benchmarks.md), so the export and its read back call
it instead. Only libggml-base is loaded, by ctypes, not the ``llama_cpp`` module (which loads libllama and its
backends); ctypes releases the GIL for the call, so row chunks quantize on every core as the numpy ones do."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["ggml_library", "ggml_quantize", "quantizer"]

# the types llama.cpp's quantizer encodes here (their ggml_type numbers and block sizes: gguf's, as a GGUF has them)
GGML_TYPES = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"})
_LIBRARY = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}.get(sys.platform, "libggml-base.so")
_LOADED: list[ctypes.CDLL | None] = []


def _library_path() -> Path | None:
    """libggml-base beside llama-cpp-python's module (or in LLAMA_CPP_LIB_PATH, which llama_cpp itself honours)."""
    folder = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not folder:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = str(Path(list(spec.submodule_search_locations)[0]) / "lib")
    path = Path(folder) / _LIBRARY
    return path if path.is_file() else None


def ggml_library() -> ctypes.CDLL | None:
    """libggml-base with ggml_quantize_chunk's signature, or None where it is not installed or does not load."""
    if not _LOADED:
        path, lib = _library_path(), None
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                # (type, src, dst, start, nrows, n_per_row, imatrix)
                lib.ggml_quantize_chunk.argtypes = [
                    ctypes.c_int,
                    *[ctypes.c_void_p] * 2,
                    *[ctypes.c_int64] * 3,
                    ctypes.c_void_p,
                ]
            except (OSError, AttributeError):  # a broken or foreign build: our own quantizers do the work
                lib = None
        _LOADED.append(lib)
    return _LOADED[0]


def quantizer() -> str:
    """Which code encodes the quantized types in this process, as the export reports it."""
    if ggml_library() is None:
        return "model-export (numpy)"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama.cpp (llama-cpp-python {version('llama-cpp-python')})"
    except PackageNotFoundError:
        return "llama.cpp"


def ggml_quantize(rows: np.ndarray, ttype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows [n, columns] in ``ttype`` (uint8 [n, row bytes]) by llama.cpp's ggml_quantize_chunk, with one
    importance per column where given (llama.cpp's quant_weights). Needs ggml_library(); the columns must be whole
    blocks (checked here: ggml would abort the process)."""
    import gguf

    lib = ggml_library()
    if lib is None:
        raise RuntimeError("llama.cpp's libggml-base is not installed")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    count, columns = rows.shape
    qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if columns % block:
        raise ValueError(f"{ttype} needs rows of whole {block}-value blocks, not {columns} values")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.size != columns:
            raise ValueError(f"{columns} columns but {importance.size} importances")
    out = np.empty((count, columns // block * size), dtype=np.uint8)
    weights = None if importance is None else importance.ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, count, columns, weights)
    if written != out.size:  # a bug or a foreign ggml, not a user error
        raise AssertionError(f"ggml_quantize_chunk wrote {written} bytes, {out.size} expected")
    return out
