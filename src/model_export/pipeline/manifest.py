"""run.json, the run's manifest: typed step records and the export's result, with one (de)serialisation.

    manifest = RunManifest.load(Path("export-demo/run.json"))
    manifest.steps["merge"].status          # "done"
    manifest.export().artifacts["onnx"]     # "export-demo/export/onnx"

Versioned: a run.json of this version is read, its steps mapped to the run's declared steps (graph.STEP_SPECS, the
units ``export:<format>`` and ``verify:<unit>``); one of any other version is refused (ME109) rather than misread; an
unreadable one starts the run afresh, with a warning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ConfigError
from ..files import strict_json, write_atomic
from ..monitoring import logger

__all__ = ["RunManifest", "StepRecord", "ExportResult", "MANIFEST", "VERSION"]

MANIFEST = "run.json"
VERSION = 3  # 2: one export and one verify step for all formats; 1: the same without typed records


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class StepRecord:
    """One step in run.json: its status (running, done, failed), the key of its inputs and settings, the values of the
    configuration keys it declares, its result and the fingerprints of its output files, and what it cost."""

    status: str = "running"
    key: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)
    seconds: float | None = None
    peak_rss: int | None = None
    finished: str | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        return cls(**_known(cls, data if isinstance(data, dict) else {}))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def unit_record(self) -> dict[str, Any]:
        """As steps.Unit reads an earlier record of itself: key, declared values, files, and what it kept besides."""
        seconds = {"seconds": self.seconds} if self.seconds is not None else {}
        return {**self.result, "key": self.key, "values": self.values, "files": self.outputs, **seconds}

    @classmethod
    def of_unit(cls, record: dict[str, Any], finished: str) -> StepRecord:
        """A unit's record (steps.Unit.record and what it kept besides) as a step of run.json."""
        rest = {k: v for k, v in record.items() if k not in ("key", "values", "files", "seconds")}
        return cls(
            "done",
            record["key"],
            record.get("values", {}),
            False,
            rest,
            record.get("files", []),
            record.get("seconds"),
            None,
            finished,
        )


@dataclass
class ExportResult:
    """The export step's result: each format's folder, sizes (whole folder, and weights alone) and exporter details."""

    artifacts: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    weight_sizes: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        return cls(**_known(cls, data or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunManifest:
    version: int = VERSION
    steps: dict[str, StepRecord] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RunManifest:
        """The manifest at ``path`` (a run.json, or the run directory holding it); a new one when there is none."""
        path = Path(path)
        path = path / MANIFEST if path.is_dir() else path
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            logger.warning(i18n.ui("manifest_unreadable", path=path))
            return cls()
        if not isinstance(data, dict):
            logger.warning(i18n.ui("manifest_unreadable", path=path))
            return cls()
        version = data.get("version", 1)
        if version != VERSION:
            raise ConfigError("manifest_version", path=str(path), version=version, supported=VERSION)
        steps = data.get("steps") if isinstance(data.get("steps"), dict) else {}
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        from ..config import OUTPUT_STEPS

        mapped = {n: StepRecord.from_dict(s) for n, s in steps.items() if n.split(":", 1)[0] in OUTPUT_STEPS}
        return cls(VERSION, mapped, config)

    def save(self, path: str | Path) -> None:
        """Strict JSON (no NaN), written atomically."""
        write_atomic(Path(path), strict_json(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "steps": self.steps_dict(), "config": self.config}

    def steps_dict(self) -> dict[str, dict[str, Any]]:
        """Every step in the run's order, each step of units followed by its units."""
        from .graph import step_order

        return {name: self.steps[name].to_dict() for name in step_order(list(self.steps))}

    def result(self, step: str) -> dict[str, Any]:
        record = self.steps.get(step)
        return record.result if record is not None else {}

    def results(self) -> dict[str, dict[str, Any]]:
        return {name: step.result for name, step in self.steps.items()}

    def export(self) -> ExportResult:
        return ExportResult.from_dict(self.result("export"))
