"""model-export: turn a LoRA fine-tuning run into optimized, validated deployment artifacts.

The public API mirrors the CLI: each subcommand calls the function of the same name.
Heavy backends (torch, onnx, gguf) are imported only when a stage needs them.
"""

import importlib as _importlib

# A function that shares its module's name is bound now: once the submodule is imported, the package's attribute
# would otherwise be the module, not the function.
from .doctor import DoctorReport, doctor

# Each public name and the module it lives in, imported when first asked for (PEP 562): a command imports what it
# runs and no more (``model-export merge`` never imports the pipeline, transformers or onnx).
_EXPORTS = {
    "checkpoint.base_model": ("BaseModelInfo", "inspect_base_model", "resolve_base_model"),
    "checkpoint.detect": ("CheckpointDetector", "Detection", "detect"),
    "checkpoint.validate": ("CheckpointReport", "check", "validate_checkpoint"),
    "config": ("ExportConfiguration",),
    "config_file": ("init_config", "load_config"),
    "config_problems": ("ConfigProblem",),
    "errors": (
        "BaseModelError",
        "CheckpointValidationError",
        "ConfigError",
        "ExportError",
        "ExportFormatError",
        "MergeError",
        "MissingDependencyError",
        "ResourceError",
        "ValidationError",
    ),
    "i18n": ("set_language",),
    "merging.merger": ("MergeResult", "ModelMerger", "merge"),
    "pipeline.batch": ("BatchResult", "run", "run_batch"),
    "pipeline.run": ("run_adapter",),
    "pipeline.state": ("RunResult",),
    "pipeline.validate": ("check_config", "validate_config"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE.update(DoctorReport="doctor", doctor="doctor")


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'model_export' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__version__ = "0.1.0"

__all__ = [
    "BaseModelError",
    "BatchResult",
    "BaseModelInfo",
    "CheckpointDetector",
    "CheckpointReport",
    "CheckpointValidationError",
    "ConfigError",
    "ConfigProblem",
    "Detection",
    "DoctorReport",
    "ExportConfiguration",
    "ExportError",
    "ExportFormatError",
    "MergeError",
    "MergeResult",
    "MissingDependencyError",
    "ModelMerger",
    "ResourceError",
    "RunResult",
    "ValidationError",
    "check",
    "check_config",
    "detect",
    "doctor",
    "init_config",
    "inspect_base_model",
    "load_config",
    "merge",
    "resolve_base_model",
    "run",
    "run_adapter",
    "run_batch",
    "set_language",
    "validate_checkpoint",
    "validate_config",
]
