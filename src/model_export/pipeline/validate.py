"""validate_config: every problem of a configuration at once, each naming the key and the fix.

from model_export import validate_config
errors = validate_config(config)      # [] when the configuration is sound
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import extras, i18n
from ..checkpoint.adapters import GLOB as _GLOB
from ..config import OUTPUT_FILES, OUTPUT_STEPS, ExportConfiguration
from ..config_file import check_dict, read_config_file
from ..config_problems import ConfigProblem
from ..errors import ConfigError
from ..exporters import FORMATS

__all__ = ["validate_config", "check_config", "ONNX_MIN_OPSET", "ONNX_IO_RANKS"]

# The lowest opset each ONNX export path needs, and why.
# The newest opset of onnx 1.16, the oldest onnx the onnx extra allows (pyproject.toml: onnx>=1.16)
OPSET_OF_OLDEST_ONNX = 21
ONNX_MIN_OPSET: dict[str, tuple[int, str]] = {
    "builder": (14, "the builder's graph (Reshape-14, ReduceSum-13 with axes as an input)"),
    "torch": (18, "torch.onnx.export with dynamo=True"),
}

# Names of the exported decoder's inputs and outputs, with their rank.
ONNX_IO_RANKS: dict[str, int] = {
    "input_ids": 2,
    "attention_mask": 2,
    "position_ids": 2,
    "logits": 3,
    r"past_key_values\.\d+\.(key|value)": 4,
    r"present\.\d+\.(key|value)": 4,
}


def validate_config(
    config: ExportConfiguration | Mapping[str, Any] | str | Path, *, inputs: bool = True
) -> list[ConfigProblem]:
    """Return every problem of ``config`` (a configuration, a mapping, or a YAML/JSON path); [] when sound.

    ``inputs`` also checks what the run would find only when it starts (the checkpoint and the adapters found and
    complete, the base found on this machine or downloadable, a GPU for device_map cuda, TensorRT): each reported with
    the error the run would raise, its code and its fix. The run itself raises those errors, typed, from its steps.
    Raises ConfigError only when a file cannot be read or parsed at all.
    """
    lines: dict[str, int] = {}
    if isinstance(config, (str, Path)):
        config, lines = read_config_file(config)
    problems: list[ConfigProblem] = []
    if not isinstance(config, ExportConfiguration):
        built, problems = check_dict(config, lines)
        if built is None:
            # Drop the keys with field problems and check the rest, so one pass shows everything.
            bad = {p.key.split(".")[0] for p in problems}
            built, _ = check_dict({k: v for k, v in config.items() if k not in bad})
            if built is None:
                return problems
        config = built
    for rule in _RULES:
        problems.extend(rule(config))
    if inputs and not problems:  # the inputs of a configuration that is sound in itself
        problems.extend(_inputs(config))
    for problem in problems:
        problem.line = problem.line or lines.get(problem.key.split(".")[0])
    return problems


def check_config(config: ExportConfiguration, source: str | None = None) -> ExportConfiguration:
    """Raise ConfigError (ME101) listing every problem of ``config``; return it when sound. The inputs are left to
    the run's steps, which raise each its own error (ME201 for a missing checkpoint, as the guide shows it)."""
    problems = validate_config(config, inputs=False)
    if problems:
        raise ConfigError("config_invalid", problems=problems, where=f" ({source})" if source else "")
    return config


def _load_in_bits(config: ExportConfiguration) -> list[ConfigProblem]:
    if config.base_model_load_in_4bit and config.base_model_load_in_8bit:
        return [ConfigProblem("base_model_load_in_8bit", "both_4bit_8bit")]
    key = (
        "base_model_load_in_4bit"
        if config.base_model_load_in_4bit
        else "base_model_load_in_8bit"
        if config.base_model_load_in_8bit
        else None
    )
    if key and config.device_map == "cpu":
        return [ConfigProblem(key, "bits_on_cpu")]
    return []


def _trained_quantization(config: ExportConfiguration) -> list[ConfigProblem]:
    """base_model_quantization in BitsAndBytesConfig's names, 4-bit or 8-bit (checkpoint/quantized_base.py)."""
    from ..checkpoint.quantized_base import STATED_KEYS

    stated = config.base_model_quantization
    if stated is None:
        return []
    unknown = sorted(set(stated) - set(STATED_KEYS))
    four, eight = bool(stated.get("load_in_4bit")), bool(stated.get("load_in_8bit"))
    if unknown or four == eight or stated.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        known = ", ".join(STATED_KEYS)
        return [ConfigProblem("base_model_quantization", "stated_quantization", {"keys": known})]
    return []


def _quantization(config: ExportConfiguration) -> list[ConfigProblem]:
    level = config.quantization_level
    return [
        ConfigProblem(
            "quantization_level",
            "quant_format",
            {"level": level, "format": fmt, "allowed": ", ".join(FORMATS[fmt].levels)},
        )
        for fmt in config.formats
        if level not in FORMATS[fmt].levels
    ]


def _opset(config: ExportConfiguration) -> list[ConfigProblem]:
    if "onnx" not in config.formats:
        return []
    backend = "torch" if config.onnx_backend == "torch" else "builder"
    minimum, reason = ONNX_MIN_OPSET[backend]
    opset = config.onnx_opset_version
    problems = []
    if opset < minimum:
        problems.append(
            ConfigProblem("onnx_opset_version", "opset_too_low", {"opset": opset, "reason": reason, "minimum": minimum})
        )
    # Importing onnx costs half a second (ml_dtypes): only an opset newer than every allowed onnx knows needs it.
    if opset > OPSET_OF_OLDEST_ONNX and extras.is_available("onnx"):
        import onnx

        maximum = onnx.defs.onnx_opset_version()
        if opset > maximum:
            problems.append(
                ConfigProblem(
                    "onnx_opset_version",
                    "opset_too_high",
                    {"opset": opset, "version": onnx.__version__, "maximum": maximum},
                )
            )
    size = config.onnx_block_size
    if config.quantization_level in ("int8", "int4") and size & (size - 1):
        problems.append(ConfigProblem("onnx_block_size", "block_size_invalid", {"size": size}))
    return problems


def _dynamic_axes(config: ExportConfiguration) -> list[ConfigProblem]:
    problems = []
    known = ", ".join(p.replace(r"\.\d+\.", ".{i}.").replace("(key|value)", "key/value") for p in ONNX_IO_RANKS)
    for name, axes in (config.onnx_dynamic_axes or {}).items():
        rank = next((r for pattern, r in ONNX_IO_RANKS.items() if re.fullmatch(pattern, name)), None)
        key = f"onnx_dynamic_axes.{name}"
        if rank is None:
            problems.append(ConfigProblem(key, "dynamic_axes_unknown_input", {"name": name, "known": known}))
            continue
        for axis in axes:
            if not 0 <= axis < rank:
                problems.append(
                    ConfigProblem(
                        key, "dynamic_axes_bad_axis", {"name": name, "axis": axis, "rank": rank, "last": rank - 1}
                    )
                )
    return problems


def _resolved(raw: str) -> Path:
    """The path with ~ expanded and symbolic links followed (as far as they resolve: a link loop stays as written)."""
    path = Path(os.path.expanduser(raw))
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _writable(path: Path) -> bool:
    """The folder, or its nearest existing parent, can take new files (the run creates output_dir when it is
    missing)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _written_paths(output: Path) -> list[Path]:
    """What a run writes under output_dir, and where links already there lead (a step folder, or a folder in one, that
    links to an input would make the run write into, or clear, that input)."""
    paths = []
    for name in OUTPUT_STEPS + OUTPUT_FILES:
        path = output / name
        paths.append(path)
        links = [path] + (list(path.iterdir()) if path.is_dir() and not path.is_symlink() else [])
        paths += [_resolved(str(p)) for p in links if p.is_symlink()]
    return paths


def _output_dir(config: ExportConfiguration) -> list[ConfigProblem]:
    """No step ever writes, creates or deletes inside an input: output_dir is not an input or inside one, no input is
    (or holds) a step folder or file the run writes under output_dir, and log_file is not inside an input."""
    output = _resolved(config.output_dir)
    entries = _checkpoint_entries(config)
    inputs = [("what_checkpoint", path) for entry in entries for path in _entry_paths(entry)]
    inputs += [("what_base", str(path)) for path in _base_dirs(config, [raw for _, raw in inputs])]
    if config.calibration_data:
        inputs.append(("what_calibration", config.calibration_data))
    written = [("output_dir", path) for path in _written_paths(output)]
    if config.log_file:
        written.append(("log_file", _resolved(config.log_file)))
    problems = [
        ConfigProblem("output_dir", "output_matches_glob", {"output": config.output_dir, "entry": entry})
        for entry in entries
        if _GLOB.search(entry) and output.match(str(_resolved_pattern(entry)))  # absolute: whole path, * within a name
    ]
    if output.exists() and not output.is_dir():
        problems.append(ConfigProblem("output_dir", "output_not_dir", {"path": config.output_dir}))
    elif not _writable(output):
        problems.append(ConfigProblem("output_dir", "output_not_writable", {"path": config.output_dir}))
    for what, raw in inputs:
        path = _resolved(raw)
        if output == path or output.is_relative_to(path):
            relation = i18n.render("problems", "relation_equal" if output == path else "relation_inside")
            problems.append(
                ConfigProblem(
                    "output_dir",
                    "output_inside_input",
                    {
                        "output": config.output_dir,
                        "relation": relation,
                        "what": i18n.render("problems", what),
                        "input": raw,
                    },
                )
            )
            continue
        for key, target in written:
            if path == target or path.is_relative_to(target) or target.is_relative_to(path):
                problems.append(
                    ConfigProblem(
                        key,
                        "input_in_written_path",
                        {"what": i18n.render("problems", what), "input": raw, "target": str(target)},
                    )
                )
                break
    return problems


def _base_dirs(config: ExportConfiguration, checkpoints: list[str]) -> list[Path]:
    """The base model's folders on this machine, however it is named: base_model_name, or else each base the
    adapters' adapter_config.json files name (a path, relative to where the run starts as the run reads it, or a hub
    id found in the hub cache); nothing is downloaded."""
    from ..checkpoint.base_model import local_base_dirs

    names = [config.base_model_name] if config.base_model_name else _named_bases(checkpoints)
    return [path for name in dict.fromkeys(names) for path in local_base_dirs(name)]


def _named_bases(checkpoints: list[str]) -> list[str]:
    """base_model_name_or_path of every adapter_config.json the checkpoint paths can select: the folder itself, its
    checkpoint-N folders, and those of a sweep folder's runs (unreadable ones are other rules' problems)."""
    import json

    names = []
    for raw in checkpoints:
        root = Path(os.path.expanduser(raw))
        patterns = ("adapter_config.json", "*/adapter_config.json", "*/*/adapter_config.json")
        for file in (f for pattern in patterns for f in sorted(root.glob(pattern))[:1000]):
            try:
                name = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(name, str) and name and "\0" not in name:
                names.append(name)
    return names


def _checkpoint_entries(config: ExportConfiguration) -> list[str]:
    """Every checkpoint entry as written: the adapters (a list or a mapping's paths) and checkpoint_path (a glob or a
    sweep folder there makes a batch too)."""
    adapters = config.adapters.values() if isinstance(config.adapters, dict) else config.adapters
    return [*adapters, config.checkpoint_path]


def _entry_paths(entry: str) -> list[str]:
    """The folders a checkpoint_path or adapters entry names: a glob's matches (the run takes those), else itself."""
    raw = os.path.expanduser(entry)
    if _GLOB.search(entry) and not Path(raw).exists():
        return sorted(glob.glob(raw))
    return [entry]


def _resolved_pattern(entry: str) -> Path:
    """A glob made absolute as the output is (its folder part resolved), to compare the output with it."""
    pattern = Path(os.path.expanduser(entry))
    fixed = _fixed_part(entry)
    return _resolved(fixed) / pattern.relative_to(fixed) if fixed != "." else Path.cwd().resolve() / pattern


def _fixed_part(entry: str) -> str:
    """A glob's folder before its first wildcard (runs/lr-* -> runs): what it can match lies inside it."""
    parts = Path(entry).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if re.search(r"[*?\[]", p)), len(parts))]]
    return str(Path(*fixed)) if fixed else "."


def _batch(config: ExportConfiguration) -> list[ConfigProblem]:
    """A batch's keys: artifacts that cannot be written per adapter on a shared base, a Ray executor without Ray."""
    problems = []
    if config.batch_outputs == "adapters":
        alone = [f for f in config.formats if f not in ("safetensors", "gguf", "onnx")]
        if alone:
            problems.append(ConfigProblem("batch_outputs", "batch_outputs_merged_only", {"formats": ", ".join(alone)}))
    if config.executor == "ray" and not extras.is_available("ray"):
        problems.append(ConfigProblem("executor", "ray_missing"))
    return problems


def _formats(config: ExportConfiguration) -> list[ConfigProblem]:
    """A run left with no format: named by the key that emptied it (export_onnx: false, the guide's way to skip ONNX,
    removing the only format listed) or else export_formats."""
    if config.formats:
        return []
    if config.export_onnx is False and "onnx" in config.export_formats:
        return [ConfigProblem("export_onnx", "export_onnx_removes_all")]
    return [ConfigProblem("export_formats", "no_formats")]


def _samples_and_data(config: ExportConfiguration) -> list[ConfigProblem]:
    problems = []
    if config.run_validation_tests and not config.test_input_samples:
        problems.append(ConfigProblem("test_input_samples", "no_test_samples"))
    if config.calibration_data:
        from ..quantize.calibration import calibration_problems

        problems += calibration_problems(config.calibration_data)  # missing, unreadable, a bad line (named)
        problems += _calibration_samples(config)
    return problems


def _calibration_samples(config: ExportConfiguration) -> list[ConfigProblem]:
    """The data tokenized as the run will tokenize it (too short for one sample, chat records without a template),
    with the tokenizer the run would take: the checkpoints', their runs', then the base's."""
    from ..quantize.calibration import sample_problems

    checkpoints = [Path(os.path.expanduser(_fixed_part(entry))) for entry in _checkpoint_entries(config)]
    folders = [p for root in checkpoints for p in [*sorted(root.glob("checkpoint-*"), reverse=True), root]]
    bases = _base_dirs(config, [str(p) for p in checkpoints])
    folders += [d for base in bases for d in [base, *sorted(base.glob("snapshots/*"))]]
    return sample_problems(config, folders)


def _gptq(config: ExportConfiguration) -> list[ConfigProblem]:
    from ..quantize.gptq import GPTQ_MAX_TOKENS

    problems = []
    uses_gptq = config.quantization_method == "gptq" or (
        config.quantization_method == "auto" and config.calibration_data and config.quantization_level == "int4"
    )
    if uses_gptq and config.quantization_symmetric is False and {"safetensors", "onnx"} & set(config.formats):
        problems.append(ConfigProblem("quantization_symmetric", "gptq_symmetric"))
    if config.quantization_method != "gptq":
        return problems
    if not config.calibration_data:
        problems.append(ConfigProblem("quantization_method", "gptq_without_data"))
    if config.quantization_level != "int4" or "safetensors" not in config.formats:
        params = {"level": config.quantization_level, "formats": ", ".join(config.formats) or "none"}
        problems.append(ConfigProblem("quantization_method", "gptq_not_int4", params))
    tokens = config.calibration_samples * config.calibration_sequence_length
    if tokens > GPTQ_MAX_TOKENS:
        problems.append(
            ConfigProblem("calibration_samples", "gptq_too_many_tokens", {"tokens": tokens, "limit": GPTQ_MAX_TOKENS})
        )
    return problems


def _format_keys(config: ExportConfiguration) -> list[ConfigProblem]:
    """Keys that only one format reads, set for a run without that format."""
    problems = []
    for key in ("gguf_output_type", "gguf_token_embedding_type"):
        if getattr(config, key) is not None and "gguf" not in config.formats:
            problems.append(ConfigProblem(key, "key_without_format", {"format": "gguf"}))
    if config.onnx_adapter and "onnx" not in config.formats:
        problems.append(ConfigProblem("onnx_adapter", "key_without_format", {"format": "onnx"}))
    from ..exporters.onnx_lora import onnx_adapters

    if onnx_adapters(config) and 1 not in (config.onnx_dynamic_axes or {}).get("input_ids", {}):
        problems.append(ConfigProblem("onnx_dynamic_axes", "genai_needs_prompt_axis"))
    return problems


class _Said:
    """An error's message or hint, rendered in the language asked for when the problem is printed."""

    def __init__(self, error: Any, part: str) -> None:
        self.error, self.part = error, part

    def render(self, lang: str | None = None) -> str:
        return self.error.render(lang) if self.part == "message" else self.error.hint(lang)


def _predicted(key: str, error: Any) -> ConfigProblem:
    return ConfigProblem(
        key, "run_would_fail", {"code": error.code, "message": _Said(error, "message"), "hint": _Said(error, "hint")}
    )


def _inputs(config: ExportConfiguration) -> list[ConfigProblem]:
    """What the run would stop on before writing anything, found now: the checkpoint (or a batch's adapters and their
    one base), the base model, the device, TensorRT. Nothing is downloaded or loaded (headers only)."""
    from ..errors import ExportError

    problems: list[ConfigProblem] = []
    try:
        base = _input_base(config)
    except ExportError as exc:
        problems.append(_predicted("adapters" if config.adapters else "checkpoint_path", exc))
        base = config.base_model_name
    if base:
        try:
            _check_base(base)
        except ExportError as exc:
            problems.append(_predicted("base_model_name", exc))
    try:
        from ..checkpoint.loading import resolve_device

        resolve_device(config.device_map)
        if "tensorrt" in config.formats:
            from ..exporters.tensorrt_export import check_tensorrt

            check_tensorrt()
    except ExportError as exc:
        problems.append(_predicted("device_map" if exc.code == "ME405" else "export_formats", exc))
    return problems


def _input_base(config: ExportConfiguration) -> str | None:
    """The checkpoint(s) as the run finds them, and the base they are merged into (None when not named anywhere:
    the run's check step says so). Raises the run's own errors (ME201, ME211, ME111-ME113, ...)."""
    from ..checkpoint.adapter_format import read_adapter_config
    from ..checkpoint.adapters import find_adapters, is_batch, shared_base
    from ..checkpoint.detect import detect

    if is_batch(config):
        return shared_base(config, find_adapters(config))
    checkpoint = detect(config.checkpoint_path, config.checkpoint_selection).path
    return config.base_model_name or read_adapter_config(checkpoint).get("base_model_name_or_path")


def _check_base(name: str) -> None:
    """The base found on this machine (a folder, or the hub cache) and readable, or a hub id the run may download:
    raises what the run would (ME301, ME303) otherwise."""
    from ..checkpoint.base_model import inspect_base_model, is_hub_id, is_offline, local_base_dirs

    if not local_base_dirs(name) and is_hub_id(name) and not is_offline():
        return  # the run downloads it (validate-config never does)
    inspect_base_model(name)


_RULES = (
    _load_in_bits,
    _trained_quantization,
    _quantization,
    _opset,
    _dynamic_axes,
    _output_dir,
    _formats,
    _samples_and_data,
    _format_keys,
    _gptq,
    _batch,
)


def configuration_markdown() -> str:
    """docs/configuration.md: every key (config.reference_markdown) and the formats with what each quantization level
    becomes, both generated (scripts/gen_config_docs.py), so the docs cannot drift from the schema or the registry."""
    from ..config_file import reference_markdown
    from ..exporters import format_table

    return (
        reference_markdown() + "\n## Formats\n\nFrom the format registry (`model_export.exporters.FORMATS`); "
        "a level a format does not list is a configuration error.\n\n" + format_table()
    )
