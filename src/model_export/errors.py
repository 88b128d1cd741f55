"""The exception tree of model-export.

Every failure the tool can explain is an ``ExportError`` with a stable code (``ME`` + three
digits) and a hint that says what to do next. Texts live in ``messages.yaml`` in English and
Chinese; the message is rendered in the current language when it is read.

    ExportError
    ├── ConfigError                 ME1xx  configuration file or values (CLI exit code 2)
    ├── CheckpointValidationError   ME2xx  checkpoint missing, incomplete, corrupt or unfit
    ├── BaseModelError              ME3xx  base model cannot be found or read (also an OSError)
    ├── ResourceError               ME4xx  memory or disk exhausted
    ├── MissingDependencyError      ME5xx  an optional extra is not installed (also an ImportError)
    ├── ValidationError             ME6xx  an exported artifact disagrees with the reference
    ├── MergeError                  ME7xx  the adapter cannot be merged as requested
    ├── ExportFormatError           ME8xx  an exporter (onnx, gguf, tensorrt) failed
    │   └── OnnxExportError                ONNX export failed (also a RuntimeError, as the guide shows)
    └── InternalError               ME9xx  Ctrl-C (ME998), or a fault of model-export itself (ME999)

Anything else that escapes is turned into one of these by ``explain`` (the pipeline records it in run.json, the
CLI prints it as one line with its code); ``--debug`` shows the traceback.
"""

from __future__ import annotations

from typing import Any

from . import i18n

__all__ = [
    "ExportError",
    "ConfigError",
    "CheckpointValidationError",
    "BaseModelError",
    "ResourceError",
    "MissingDependencyError",
    "ValidationError",
    "MergeError",
    "ExportFormatError",
    "OnnxExportError",
    "InternalError",
]  # and explain(), which turns any exception into one of these


class ExportError(Exception):
    """Base of every error model-export explains. ``key`` names its entry in messages.yaml."""

    exit_code = 1

    def __init__(self, key: str, /, **params: Any) -> None:
        entry = i18n.catalogue()["errors"].get(key)
        if entry is None:
            raise KeyError(f"no message {key!r} in messages.yaml")
        if entry["class"] != type(self).__name__:
            raise TypeError(f"message {key!r} belongs to {entry['class']}, not {type(self).__name__}")
        self.key = key
        self.code: str = entry["code"]
        self.params = params
        super().__init__(self.render("en"))

    def render(self, lang: str | None = None) -> str:
        """The message in ``lang`` (default: the current language)."""
        return i18n.render("errors", self.key, lang=lang, **self._params_for(lang))

    def hint(self, lang: str | None = None) -> str:
        """What to do next, in ``lang`` (default: the current language)."""
        return i18n.render("errors", self.key, "hint", lang=lang, **self._params_for(lang))

    def _params_for(self, lang: str | None) -> dict[str, Any]:
        # Parameters may themselves be translatable (lists of problems): render them lazily.
        return {k: (v.render(lang) if hasattr(v, "render") else v) for k, v in self.params.items()}

    @property
    def message(self) -> str:
        return self.render()

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "code": self.code, "message": self.render(), "hint": self.hint()}


class ConfigError(ExportError):
    """The configuration file cannot be read, or its values are invalid or in conflict."""

    exit_code = 2

    def __init__(self, key: str, /, problems: list | None = None, **params: Any) -> None:
        self.problems = list(problems or [])
        if self.problems:
            params.setdefault("count", len(self.problems))
            params["problems"] = _ProblemList(self.problems)
        super().__init__(key, **params)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["problems"] = [p.to_dict() for p in self.problems]
        return data


class _ProblemList:
    def __init__(self, problems: list) -> None:
        self.problems = problems

    def render(self, lang: str | None = None) -> str:
        return "\n".join(f"  - {p.render(lang)}" for p in self.problems)


class CheckpointValidationError(ExportError, ValueError):
    """The checkpoint is missing, incomplete, corrupt, unsafe or does not fit the base model."""


class BaseModelError(ExportError, OSError):
    """The base model cannot be resolved (locally, from the cache or the hub) or is not usable."""

    def __str__(self) -> str:  # OSError.__str__ would print errno fields
        return self.render()


class ResourceError(ExportError, MemoryError, RuntimeError):
    """Memory or disk space ran out (a RuntimeError too, as torch's CUDA out-of-memory is)."""


class MissingDependencyError(ExportError, ImportError):
    """An optional backend is needed but its extra is not installed."""


class ValidationError(ExportError):
    """An exported artifact does not agree with the unmerged reference."""


class MergeError(ExportError):
    """The adapter cannot be merged as requested."""


class ExportFormatError(ExportError):
    """An exporter (onnx, gguf, tensorrt) failed."""


class OnnxExportError(ExportFormatError, RuntimeError):
    """The ONNX exporter failed: an operator it cannot convert, dynamic shapes it cannot express, or another failure."""


class InternalError(ExportError):
    """The run was interrupted (ME998, exit code 130) or model-export itself failed (ME999): not the input's fault."""

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 130 if self.key == "interrupted" else 1


def explain(exc: BaseException, where: str, log: Any = None) -> ExportError:
    """``exc`` as one of ours: itself if it is an ExportError; Ctrl-C as ME998; MemoryError as the guide's memory
    error (ME406); anything else as ME999 naming the log file."""
    if isinstance(exc, ExportError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return InternalError("interrupted", where=where)
    if isinstance(exc, MemoryError):
        return ResourceError("out_of_memory", where=where, detail=str(exc) or type(exc).__name__)
    text = f"{type(exc).__name__}: {exc}"
    return InternalError(
        "internal_error",
        where=where,
        error=text if len(text) <= 300 else text[:300] + "...",
        log=log or i18n.ui("no_log_file"),
    )
