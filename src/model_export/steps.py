"""The run's units of work as data: what configuration keys each reads, and when it can be kept from an earlier run.

A unit (one format's export, ``export:gguf``; one artifact's verification, ``verify:onnx``) declares the keys it
reads. It runs against a ``ConfigView`` that refuses any other key (a setting it reads without declaring it would
leave a stale artifact after a change: the view makes that a failure at once, in tests). Its key hashes the declared
values, its inputs' fingerprints and its upstream keys; an earlier record with the same key and untouched files is
kept, and a unit that reruns says why: which declared value changed (``gguf_output_type q4_k_m -> q6_k``), or that
its inputs did.

    view = ConfigView(config, ("gguf_type", "quantization_level"), "export:gguf")
    unit = Unit("export:gguf", view.values(), [merge_key])
    if unit.kept(previous_record, files): ...
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigView",
    "StepSpec",
    "UndeclaredKey",
    "Unit",
    "changed_values",
    "fingerprint",
    "sampled_hash",
    "files_in",
    "STEP_FILE",
    "key_hash",
]

STEP_FILE = ".step.json"  # each step's result, hidden so that it never joins an artifact

# Properties of the configuration and the keys they are computed from.
_DERIVED = {"max_shard_size_bytes": ("max_shard_size",), "formats": ("export_formats", "export_onnx")}


class UndeclaredKey(AttributeError):
    """A unit read a configuration key it did not declare: a fault of model-export (its resume key would miss it)."""


class ConfigView:
    """The configuration as one unit sees it: its declared keys (and properties computed from them), nothing else."""

    def __init__(self, config: Any, keys: tuple[str, ...] | list[str], unit: str) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_keys", frozenset(keys))
        object.__setattr__(self, "_unit", unit)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        needs = _DERIVED.get(name, (name,))
        if not set(needs) <= self._keys:
            raise UndeclaredKey(
                f"{self._unit} reads {name}, which it does not declare (declared: {sorted(self._keys)})"
            )
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._unit}: the configuration is read-only here")

    def values(self) -> dict[str, Any]:
        """The declared keys and their values, as JSON holds them (run.json records them; a rerun compares them)."""
        dumped = self._config.model_dump(mode="json")
        return {key: dumped[key] for key in sorted(self._keys)}


def key_hash(data: Any) -> str:
    """The sha256 of ``data`` as sorted JSON: every step's and unit's key."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Unit:
    """One step's unit of work: its name, its declared values, what else its result depends on (fingerprints of its
    input files, upstream content keys), and its layout values (graph.StepSpec.layout: in its key, not in its content
    key, which is what the steps after it take in)."""

    name: str
    values: dict[str, Any]
    inputs: list[Any] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def content_key(self) -> str:
        """What the steps that need this one take in: the same whatever its layout values."""
        return key_hash([self.name, self.values, self.inputs])

    @property
    def key(self) -> str:
        return key_hash([self.content_key, self.layout]) if self.layout else self.content_key

    @property
    def declared(self) -> dict[str, Any]:
        """Every declared value, layout included, as run.json records them."""
        return {**self.values, **self.layout}

    def kept(self, previous: dict[str, Any] | None, files: list[Any] | None = None) -> bool:
        """An earlier record of this unit with the same key, whose files are as it left them (``files``: their
        fingerprints now; None when the unit writes no files of its own)."""
        if not previous or previous.get("key") != self.key:
            return False
        return files is None or previous.get("files") == files

    def record(self, files: list[Any] | None = None) -> dict[str, Any]:
        """What run.json keeps of this unit: its key, its declared values, the fingerprints of what it wrote."""
        return {"key": self.key, "values": self.declared, **({"files": files} if files is not None else {})}

    def why(self, previous: dict[str, Any] | None) -> str:
        """Why this unit runs again, in words: the declared values that changed, else its inputs (files, an upstream
        step), else that nothing was recorded of it."""
        from . import i18n

        if not previous or not previous.get("key"):
            return i18n.ui("why_new")
        changed = changed_values(previous.get("values") or {}, self.declared)
        if changed:
            return changed
        if previous.get("key") == self.key:
            return i18n.ui("why_files")
        return i18n.ui("why_inputs")


@dataclass(frozen=True)
class StepSpec:
    """One step of the run as data (see the module's docstring for what each kind of key does)."""

    name: str
    keys: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    writes: str | None = None
    layout: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    bounds: tuple[str, ...] = ()

    def view(self, config: Any) -> ConfigView:
        """The configuration as this step may read it."""
        return ConfigView(config, self.keys + self.layout + self.reads + self.bounds, self.name)

    def unit(self, config: Any, inputs: list[Any], upstream: dict[str, str]) -> Unit:
        """This step's unit of work for ``config``: its declared values, ``inputs`` (fingerprints) and the content keys
        of the steps it needs (``upstream``: name -> content key; a step that did not run here is left out)."""
        dumped = config.model_dump(mode="json")
        values = {key: dumped[key] for key in sorted(self.keys)}
        layout = {key: dumped[key] for key in sorted(self.layout)}
        needed = [[need, upstream[need]] for need in self.needs if need in upstream]
        return Unit(self.name, values, [*inputs, needed], layout)


def changed_values(before: dict[str, Any], now: dict[str, Any]) -> str:
    """``gguf_output_type q4_k_m -> q6_k; validation_int4_min_top1 0.85 -> 0.5``: every declared value that differs."""

    def shown(value: Any) -> str:
        return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value

    keys = sorted(set(before) | set(now))
    return "; ".join(
        f"{key} {shown(before.get(key))} -> {shown(now.get(key))}" for key in keys if before.get(key) != now.get(key)
    )


def fingerprint(paths: list[Path]) -> list[list[Any]]:
    """Name, size, modification time and a hash of sampled bytes of files: a file rewritten with the same size and
    mtime (touch -r, a copy that keeps times) is still noticed where its header or any sampled block changed."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns, sampled_hash(p)] for p in paths if p.is_file()]


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def sampled_hash(path: Path) -> str:
    """sha256 of the first 64 KiB (a safetensors or GGUF header is there) and 15 more 64 KiB blocks spread evenly over
    the file: about 1 MiB read per file whatever its size."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        for i in range(SAMPLES):
            fh.seek(0 if i == 0 else max(size - SAMPLE_BYTES, 0) * i // (SAMPLES - 1))
            digest.update(fh.read(SAMPLE_BYTES))
            if size <= SAMPLE_BYTES:
                break
    return digest.hexdigest()[:16]


def files_in(folder: str | None) -> list[Path]:
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != STEP_FILE)
