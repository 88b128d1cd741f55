"""Which checkpoint to export: the latest complete one, or the Trainer's best.

    detector = CheckpointDetector()
    checkpoint = detector.detect_latest_checkpoint("./qwen3-finetuned")

A path is either a training output directory holding ``checkpoint-N`` folders (ordered by N, so
checkpoint-100 comes after checkpoint-30), or an adapter directory itself. Incomplete checkpoints
are skipped with a logged reason and never chosen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import i18n
from ..errors import CheckpointValidationError
from ..monitoring import logger
from .adapter_format import ADAPTER_CONFIG, quick_check

__all__ = ["CheckpointDetector", "Detection", "Candidate", "detect"]

_STEP = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Candidate:
    path: str
    step: int | None
    complete: bool
    reason: str | None = None


@dataclass
class Detection:
    root: str
    selection: str
    selected: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.selected)

    @property
    def trained_on(self) -> str | None:
        """The quantized base adapter_config.json names, with what it is (a QLoRA adapter), else None."""
        from .adapter_format import read_adapter_config
        from .quantized_base import quantized_name

        try:
            return quantized_name(read_adapter_config(self.path).get("base_model_name_or_path"))
        except Exception:  # noqa: BLE001 - an unreadable config is check's to report, not detect's
            return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "selection": self.selection,
            "selected": self.selected,
            "candidates": [vars(c) for c in self.candidates],
            "trained_on": self.trained_on,
        }


def _candidate(path: Path, step: int | None) -> Candidate:
    try:
        quick_check(path)
    except CheckpointValidationError as exc:
        logger.warning(i18n.ui("skipped", path=path, reason=exc.render()))
        return Candidate(str(path), step, False, exc.render())
    return Candidate(str(path), step, True)


def _scan(root: Path) -> list[Candidate]:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name)))
    return [_candidate(path, step) for step, path in steps]


def detect(path: str | Path, selection: Literal["latest", "best"] = "latest") -> Detection:
    """Find the checkpoint to export under ``path``.

    Raises CheckpointValidationError (ME201, ME203, ME211, ME212, ME220)."""
    root = Path(path)
    if root.is_file():  # a configuration file given to `check`, an adapter_model.safetensors: say what it is
        raise CheckpointValidationError("checkpoint_is_file", path=str(path))
    if not root.is_dir():
        raise CheckpointValidationError("checkpoint_not_found", path=str(path), cwd=str(Path.cwd()))
    candidates = _scan(root)
    own = _candidate(root, None) if (root / ADAPTER_CONFIG).exists() else None
    if own is not None and not candidates:
        if not own.complete:
            quick_check(root)  # raise the precise error for the one adapter the user named
        return Detection(str(root), selection, own.path, [own])
    if own is not None:
        candidates.append(own)
    if not candidates:
        raise CheckpointValidationError("adapter_config_not_found", path=str(path))
    chosen = _best(root, candidates) if selection == "best" else _latest(root, candidates)
    logger.debug(i18n.ui("detected", path=chosen.path))  # the caller says it once: the detect command, or the run's log
    return Detection(str(root), selection, chosen.path, candidates)


def _latest(root: Path, candidates: list[Candidate]) -> Candidate:
    # The adapter saved in the root (trainer.save_model at the end of training) is the final one.
    complete = [c for c in candidates if c.complete]
    if not complete:
        reasons = "\n".join(f"  - {Path(c.path).name}: {c.reason}" for c in candidates)
        raise CheckpointValidationError("no_complete_checkpoint", path=str(root), reasons=reasons)
    final = [c for c in complete if c.step is None]
    return final[0] if final else max(complete, key=lambda c: c.step)


def _best(root: Path, candidates: list[Candidate]) -> Candidate:
    states = [root / "trainer_state.json"] + [
        Path(c.path) / "trainer_state.json"
        for c in sorted((c for c in candidates if c.step is not None), key=lambda c: -c.step)
    ]
    state_file = next((s for s in states if s.is_file()), None)
    if state_file is None:
        raise CheckpointValidationError("best_checkpoint_unknown", path=str(root), problem=i18n.ui("best_no_state"))
    try:
        best = json.loads(state_file.read_text(encoding="utf-8")).get("best_model_checkpoint")
    except (OSError, ValueError, AttributeError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise CheckpointValidationError(
            "best_checkpoint_unknown", path=str(state_file), problem=str(exc)[:200]
        ) from None
    if not best or not isinstance(best, str):  # a hand-edited or foreign trainer_state.json may hold anything here
        raise CheckpointValidationError(
            "best_checkpoint_unknown", path=str(state_file), problem=i18n.ui("best_not_recorded")
        )
    # Training may have run elsewhere: match the folder name, not the recorded path.
    match = next((c for c in candidates if Path(c.path).name == Path(best).name), None)
    if match is None:
        raise CheckpointValidationError(
            "best_checkpoint_unknown", path=str(state_file), problem=i18n.ui("best_missing", best=best, root=root)
        )
    if not match.complete:
        raise CheckpointValidationError(
            "best_checkpoint_unknown",
            path=str(state_file),
            problem=i18n.ui("best_incomplete", best=best, reason=match.reason),
        )
    return match


class CheckpointDetector:
    """The guide's entry point: ``CheckpointDetector().detect_latest_checkpoint(path)``."""

    def __init__(self, selection: Literal["latest", "best"] = "latest") -> None:
        self.selection = selection

    def detect(self, path: str | Path) -> Detection:
        return detect(path, self.selection)

    def detect_latest_checkpoint(self, path: str | Path) -> Path:
        """The latest complete checkpoint under ``path``. Raises CheckpointValidationError."""
        return detect(path, "latest").path

    def detect_best_checkpoint(self, path: str | Path) -> Path:
        """The Trainer's best_model_checkpoint under ``path``. Raises CheckpointValidationError."""
        return detect(path, "best").path
