"""model-export: turn a LoRA fine-tuning run into optimized, validated deployment artifacts.

The public API mirrors the CLI: each subcommand calls the function of the same name.
Heavy backends (torch, onnx, gguf) are imported only when a stage needs them.
"""

from .base_model import BaseModelInfo, inspect_base_model, resolve_base_model
from .batch import BatchResult, run, run_batch
from .checkpoint_detector import CheckpointDetector, Detection, detect
from .checkpoint_validator import CheckpointReport, check, validate_checkpoint
from .config import ConfigProblem, ExportConfiguration, init_config, load_config
from .config_validator import check_config, validate_config
from .doctor import DoctorReport, doctor
from .errors import (
    BaseModelError,
    CheckpointValidationError,
    ConfigError,
    ExportError,
    ExportFormatError,
    MergeError,
    MissingDependencyError,
    ResourceError,
    ValidationError,
)
from .i18n import set_language
from .model_merger import MergeResult, ModelMerger, merge
from .pipeline import RunResult, run_adapter

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
