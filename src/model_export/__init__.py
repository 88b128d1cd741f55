"""model-export: turn a LoRA fine-tuning run into optimized, validated deployment artifacts.

The public API mirrors the CLI: each subcommand calls the function of the same name.
Heavy backends (torch, onnx, gguf) are imported only when a stage needs them.
"""

from .checkpoint.base_model import BaseModelInfo, inspect_base_model, resolve_base_model
from .checkpoint.detect import CheckpointDetector, Detection, detect
from .checkpoint.validate import CheckpointReport, check, validate_checkpoint
from .config import ExportConfiguration
from .config_file import init_config, load_config
from .config_problems import ConfigProblem
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
from .merging.merger import MergeResult, ModelMerger, merge
from .pipeline.batch import BatchResult, run, run_batch
from .pipeline.run import run_adapter
from .pipeline.state import RunResult
from .pipeline.validate import check_config, validate_config

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
