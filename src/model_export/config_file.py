"""Configuration files and their problems: YAML or JSON read with each key's line, --set overrides, every problem at
once (ConfigProblem: the key, its line, the message and the fix, in the user's language), and the example file
`model-export init-config` writes.

    config = load_config("export.yaml", overrides=["quantization_level=int8"])
    problems = check_dict(data, lines)   # [] when sound; ExportConfiguration itself raises on the first run"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import i18n
from .config import ExportConfiguration
from .config_problems import ConfigProblem
from .errors import ConfigError

__all__ = [
    "load_config",
    "config_from_dict",
    "init_config",
    "example_yaml",
    "read_config_file",
    "check_dict",
    "apply_overrides",
    "reference_markdown",
]


def check_dict(
    data: Mapping[str, Any], lines: Mapping[str, int] | None = None
) -> tuple[ExportConfiguration | None, list[ConfigProblem]]:
    """Build a configuration from ``data``; return it (or None) and every field problem found."""
    try:  # YAML allows keys that are not strings (`? ` or `1:`); they are reported as unknown keys, under their text
        return ExportConfiguration(**{str(k): v for k, v in dict(data).items()}), []
    except ConfigError as exc:
        for problem in exc.problems:
            problem.line = (lines or {}).get(problem.key.split(".")[0])
        return None, exc.problems


def config_from_dict(
    data: Mapping[str, Any], source: str | None = None, lines: Mapping[str, int] | None = None
) -> ExportConfiguration:
    """Build a configuration; raise ConfigError (ME101) listing every field problem at once."""
    config, problems = check_dict(data, lines)
    if problems:
        raise ConfigError("config_invalid", problems=problems, where=f" ({source})" if source else "")
    return config


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases: a configuration has no use for them, and nested aliases are how a
    few lines of YAML expand into billions of values (the "billion laughs")."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a configuration", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML or JSON file safely; return its mapping and the line of each top-level key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config_not_found", path=str(path))
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError("config_unsupported_suffix", path=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "config_parse",
            path=str(path),
            line=0,
            column=exc.start + 1,
            problem=i18n.Foreign.parser(
                f"the file is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
            ),
        ) from None
    except OSError as exc:
        raise ConfigError("config_parse", path=str(path), line=0, column=0, problem=exc.strerror or str(exc)) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - safe subclass
    except RecursionError:
        raise ConfigError(
            "config_parse",
            path=str(path),
            line=0,
            column=0,
            problem=i18n.Foreign.parser("nested too deeply to be a configuration"),
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "config_parse", path=str(path), line=exc.lineno, column=exc.colno, problem=i18n.Foreign.parser(exc.msg)
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            "config_parse",
            path=str(path),
            line=mark.line + 1 if mark else 0,
            column=mark.column + 1 if mark else 0,
            problem=i18n.Foreign.parser(exc.problem or str(exc)),
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            "config_parse", path=str(path), line=0, column=0, problem=i18n.Foreign.parser(str(exc))
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config_not_mapping", path=str(path), found=type(data).__name__)
    return data, _key_lines(text)


def _key_lines(text: str) -> dict[str, int]:
    try:
        node = yaml.compose(text, Loader=_ConfigLoader)
    except (yaml.YAMLError, RecursionError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` overrides; values are read as YAML (``2``, ``true``, ``[onnx,gguf]``)."""
    data = dict(data)
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("config_bad_override", text=text)
        try:
            value = yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else None  # noqa: S506 - safe subclass
        except yaml.YAMLError:
            value = raw
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        target = data
        for part in parts[:-1]:
            child = target.get(part)
            target[part] = child = dict(child) if isinstance(child, dict) else {}
            target = child
        target[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExportConfiguration:
    """Load a configuration from YAML or JSON (or the defaults when ``path`` is None), then apply overrides.

    Raises ConfigError: the file is missing or unparsable (ME102 names line and column), or its
    keys or values are invalid (ME101 lists every problem at once).
    """
    data, lines = read_config_file(path) if path is not None else ({}, {})
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source=str(path) if path is not None else None, lines=lines)


def example_yaml() -> str:
    """A commented YAML of every key with its default, generated from the schema."""
    lines = [
        "# model-export configuration. Every key is optional; the value shown is the default.",
        "# Check it with: model-export validate-config FILE",
        "",
    ]
    defaults = ExportConfiguration().model_dump(mode="json")
    for name, info in ExportConfiguration.model_fields.items():
        lines.append(f"# {info.description}")
        dumped = yaml.safe_dump({name: defaults[name]}, allow_unicode=True, default_flow_style=False, sort_keys=False)
        lines.extend(dumped.rstrip("\n").splitlines())
        lines.append("")
    return "\n".join(lines)


def init_config(path: str | Path = "model-export.yaml", force: bool = False) -> Path:
    """Write example_yaml() to ``path``. Raises ConfigError if the file exists and ``force`` is false."""
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError("config_exists", path=str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(example_yaml(), encoding="utf-8")
    except OSError as exc:  # a read-only folder, a full disk, a path through a file
        raise ConfigError("config_write_failed", path=str(path), problem=exc.strerror or str(exc)) from None
    return path


def reference_markdown() -> str:
    """docs/configuration.md: a table of every key, generated from the schema (scripts/gen_config_docs.py)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `ExportConfiguration` by `python scripts/gen_config_docs.py`; do not edit by hand.",
        "Cross-key rules are checked by `model-export validate-config FILE` (see troubleshooting.en.md).",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    defaults = ExportConfiguration().model_dump(mode="json")
    for name, info in ExportConfiguration.model_fields.items():
        kind = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "or")
        default = json.dumps(defaults[name], ensure_ascii=False).replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | `{default}` | {info.description} |")
    return "\n".join(lines) + "\n"
