"""Optional backends: import them only when a feature needs them, and say how to install them."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (pip distribution, extra of model-export that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime_genai": ("onnxruntime-genai", "genai"),
    "gguf": ("gguf", "gguf"),
    "compressed_tensors": ("compressed-tensors", "quant"),
    "bitsandbytes": ("bitsandbytes", "gpu"),
    "llama_cpp": ("llama-cpp-python", "llamacpp"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "ray": ("ray", "ray"),
}


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def import_problem(module: str) -> str | None:
    """Why ``module`` cannot be used here, in words with the fix, or None when it imports: not installed (the pip
    command), or installed but failing to import (a wheel built for another glibc or CPU, a missing shared library:
    its own error quoted, and how to rebuild it)."""
    from . import i18n

    package, extra = OPTIONAL_PACKAGES.get(module, (module, "all"))
    if not is_available(module):
        return i18n.ui("reason_package_missing", package=package, extra=extra)
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError from a shared library, anything its import raises
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return i18n.ui("reason_package_broken", package=package, extra=extra, error=error)
    return None


def require(module: str, feature: str) -> ModuleType:
    """Import an optional module for ``feature``; raise MissingDependencyError (ME501) with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = OPTIONAL_PACKAGES.get(module, (module, "all"))
        raise MissingDependencyError("missing_dependency", feature=feature, package=package, extra=extra) from None
