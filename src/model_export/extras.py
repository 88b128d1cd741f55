"""Optional backends: import them only when a feature needs them, and say how to install them."""

from __future__ import annotations

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


def require(module: str, feature: str) -> ModuleType:
    """Import an optional module for ``feature``; raise MissingDependencyError (ME501) with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = OPTIONAL_PACKAGES.get(module, (module, "all"))
        raise MissingDependencyError("missing_dependency", feature=feature, package=package, extra=extra) from None
