"""Which adapters a configuration names: one checkpoint, or a batch's (a list, a glob, a sweep folder of Trainer
runs), each with the name of its folder under output_dir, and the one base they share. Read before anything is
written, by a batch's run and by validate-config alike.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import i18n
from ..config import OUTPUT_FILES, OUTPUT_STEPS, ExportConfiguration
from ..errors import CheckpointValidationError, ConfigError, ExportError

__all__ = ["Adapter", "find_adapters", "is_batch", "shared_base", "BATCH_MANIFEST", "BASE_DIR", "TOKEN_FILE"]

BATCH_MANIFEST = "batch.json"
BASE_DIR = "base"
TOKEN_FILE = ".batch-token"  # written by the driver, read by every task: proves the task sees the same output_dir
RESERVED = {BASE_DIR, *OUTPUT_STEPS, *OUTPUT_FILES, BATCH_MANIFEST, TOKEN_FILE}
GLOB = re.compile(r"[*?\[]")  # what makes a checkpoint entry a glob (the validator reads it too)
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Adapter:
    name: str
    path: str  # a training run folder (checkpoint-N inside) or an adapter folder
    source: str  # the configuration entry it came from


def _holds_adapter(path: Path) -> bool:
    """A training run (checkpoint-N folders) or an adapter folder."""
    return (path / "adapter_config.json").is_file() or any(p.is_dir() for p in path.glob("checkpoint-*"))


def is_batch(config: ExportConfiguration) -> bool:
    """Several adapters: ``adapters`` set, or checkpoint_path a glob or a sweep folder (sub-folders that are runs)."""
    if config.adapters:
        return True
    path = Path(os.path.expanduser(config.checkpoint_path))
    if GLOB.search(config.checkpoint_path) and not path.exists():
        return True
    return path.is_dir() and not _holds_adapter(path) and any(_holds_adapter(p) for p in _subfolders(path))


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _expand(entry: str) -> list[Path]:
    """The adapter folders of one entry: a glob's matches, a sweep folder's runs, or the folder itself."""
    raw = os.path.expanduser(entry)
    if GLOB.search(entry) and not Path(raw).exists():
        matches = [Path(m) for m in sorted(glob.glob(raw)) if Path(m).is_dir()]
        if not matches:
            raise ConfigError("batch_no_adapters", entry=entry)
        return matches
    path = Path(raw)
    if not path.exists():
        raise CheckpointValidationError("checkpoint_not_found", path=entry, cwd=str(Path.cwd()))
    if path.is_dir() and not _holds_adapter(path):
        runs = [p for p in _subfolders(path) if _holds_adapter(p)]
        if runs:
            return runs
    return [path]


def _name(path: Path) -> str:
    """A run folder's name; a checkpoint-N given directly is named with its run: lr-1e-4-checkpoint-30."""
    name = path.resolve().name
    if re.fullmatch(r"checkpoint-\d+", name):
        name = f"{path.resolve().parent.name}-{name}"
    return _NAME.sub("-", name).strip("-.") or "adapter"


def find_adapters(config: ExportConfiguration) -> list[Adapter]:
    """Every adapter of the batch with its output folder's name, in the configuration's order.

    Raises ConfigError (ME111) when two adapters would write the same folder, or a name is not a plain folder name or
    is one the batch uses itself; ConfigError (ME112) when a glob matches nothing; CheckpointValidationError (ME201)
    for a path that does not exist. Nothing is written before these are known."""
    entries: list[tuple[str | None, str]]
    if isinstance(config.adapters, dict):
        entries = list(config.adapters.items())
    else:
        entries = [(None, e) for e in (config.adapters or [config.checkpoint_path])]
    found: list[Adapter] = []
    seen: set[Path] = set()
    for given, entry in entries:
        for path in _expand(entry):
            if path.resolve() in seen:  # the same folder listed twice (a path and a glob): one adapter
                continue
            seen.add(path.resolve())
            found.append(Adapter(given if given is not None else _name(path), str(path), entry))
    problems = []
    by_name: dict[str, list[Adapter]] = {}
    for adapter in found:
        by_name.setdefault(adapter.name.lower(), []).append(adapter)  # Foo and foo are one folder on some disks
        if adapter.name in RESERVED or _NAME.search(adapter.name) or adapter.name.startswith("."):
            problems.append(i18n.ui("batch_name_bad", name=adapter.name, path=adapter.path))
    for same in by_name.values():
        if len(same) > 1:
            paths = ", ".join(a.path for a in same)
            problems.append(i18n.ui("batch_name_twice", name=same[0].name, paths=paths))
    if problems:
        raise ConfigError("batch_names", names="\n".join(f"  - {p}" for p in problems))
    return found


def shared_base(config: ExportConfiguration, adapters: list[Adapter]) -> str:
    """The one base every adapter is merged into: base_model_name, or the base all their adapter_config.json name.
    Raises ConfigError (ME113) when they name different bases and base_model_name does not settle it."""
    if config.base_model_name:
        return config.base_model_name
    from .adapter_format import read_adapter_config
    from .detect import detect

    named: dict[str, list[str]] = {}
    for adapter in adapters:
        try:
            base = read_adapter_config(detect(adapter.path, config.checkpoint_selection).path).get(
                "base_model_name_or_path"
            )
        except ExportError:
            continue  # this adapter fails on its own, in its own run, with its own error
        if base:
            named.setdefault(base, []).append(adapter.name)
    if len(named) > 1:
        listed = "; ".join(f"{base}: {', '.join(names)}" for base, names in named.items())
        raise ConfigError("batch_bases_differ", bases=listed)
    if not named:
        from ..errors import BaseModelError

        raise BaseModelError("base_model_unknown", path=", ".join(a.path for a in adapters))
    return next(iter(named))
