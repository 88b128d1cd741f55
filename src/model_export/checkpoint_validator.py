"""Whether a checkpoint is sound and fits its base model, without loading base weights.

Checks, in order: the directory and its files exist; adapter_config.json is valid JSON for a
LoRA adapter; the safetensors header is consistent (or a .bin adapter is a weights-only pickle);
every adapter tensor is finite; lora_A and lora_B ranks agree with each other and the config;
and every adapted module exists in the base model with matching shapes (from the base model's
config.json and safetensors headers).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import i18n
from .base_model import TOKENIZER_FILES, BaseModelInfo, inspect_base_model, tokenizer_source
from .errors import BaseModelError, CheckpointValidationError
from .monitoring import Progress, logger
from .tensor_io import SafetensorsFormatError, input_file, read_bytes, read_header, row_bytes

if TYPE_CHECKING:
    from .config import ExportConfiguration

__all__ = ["check", "validate_checkpoint", "quick_check", "read_adapter_config", "CheckpointReport",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHT_FILES", "TRAINING_ARTIFACTS", "parse_adapter_key"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_ARTIFACTS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")
SUPPORTED_PEFT_TYPES = ("LORA",)
_PREFIX = "base_model.model."
_SCAN_CHUNK = 64 << 20
_KINDS = {  # suffix of a saved adapter key -> (kind, role)
    ".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": ("dora", "m"), ".lora_magnitude_vector.weight": ("dora", "m"),
    ".lora_B.bias": ("linear", "bias"),
}


@dataclass
class CheckpointReport:
    path: str
    peft_type: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: Any
    weights_file: str
    adapter_bytes: int
    num_tensors: int
    num_modules: int
    full_tensors: list[str]
    base_model: str | None = None
    base_model_path: str | None = None
    fit_checked: bool = False
    training_artifacts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_adapter_key(key: str) -> tuple[str, str, str]:
    """Split a saved adapter key into (module, kind, role); kind 'full' for whole tensors such as modules_to_save."""
    name = key.removeprefix(_PREFIX)
    for suffix, (kind, role) in _KINDS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind, role
    if ".lora_" in name or "trainable_tokens" in name:  # a LoRA variant's tensor this tool does not know
        return name, "unknown", "unknown"
    for wrapper in (".base_layer", ".modules_to_save", ".original_module"):
        name = name.replace(wrapper, "")
    return name, "full", "weight"


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """Parse adapter_config.json. Raises CheckpointValidationError (ME202 missing, ME204 invalid with line and column)."""
    file = directory / ADAPTER_CONFIG
    if not file.is_file():
        raise _missing(directory, ADAPTER_CONFIG)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointValidationError("adapter_config_invalid", path=str(file), line=exc.lineno, column=exc.colno, problem=exc.msg) from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointValidationError("adapter_config_invalid", path=str(file), line=0, column=0, problem=str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise CheckpointValidationError("adapter_config_invalid", path=str(file), line=1, column=1, problem="not a JSON object")
    for key, (accepts, expected) in _ADAPTER_VALUE_TYPES.items():
        if key in data and not (data[key] is None and key in _NULLABLE) and not accepts(data[key]):
            raise CheckpointValidationError("adapter_config_value", path=str(file), key=key, value=repr(data[key])[:80],
                                            expected=expected)
    return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


_NULLABLE = {"target_modules", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
             "base_model_name_or_path"}
# What PEFT's LoraConfig takes for the keys the merge reads: a value of another type is the config's fault, said so.
_ADAPTER_VALUE_TYPES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a finite number (PEFT scales by lora_alpha / r)"),
    "target_modules": (_names, "a module name pattern or a list of module names"),
    "modules_to_save": (_names, "a list of module names"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(r, int) and r > 0 for r in v.values()),
                     "an object of module patterns to positive ranks"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_number(a) for a in v.values()),
                      "an object of module patterns to numbers"),
    "layers_to_transform": (lambda v: isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v)),
                            "a layer index or a list of them"),
    "peft_type": (lambda v: isinstance(v, str), "a string such as LORA"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a hub id or a local path"),
}


def _missing(directory: Path, name: str) -> CheckpointValidationError:
    example = directory / "checkpoint-30" if not directory.name.startswith("checkpoint-") else directory.parent / "checkpoint-30"
    return CheckpointValidationError("missing_file", name=name, directory=str(directory), example=str(example))


def weights_file(directory: Path) -> Path:
    for name in ADAPTER_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise _missing(directory, ADAPTER_WEIGHT_FILES[0])


def quick_check(directory: str | Path) -> Path:
    """The cheap completeness check the detector uses: config readable, weights present, non-empty, header sound.

    Returns the weights file. Raises CheckpointValidationError.
    """
    shown, directory = str(directory), Path(directory)  # keep the user's spelling (./run) in messages
    if not directory.is_dir():
        raise CheckpointValidationError("checkpoint_not_found", path=shown, cwd=str(Path.cwd()))
    _check_links(directory)
    read_adapter_config(directory)
    file = weights_file(directory)
    if file.stat().st_size == 0:
        raise CheckpointValidationError("safetensors_corrupt", path=str(file), problem=i18n.ui("reason_empty_file"))
    if file.suffix == ".safetensors":
        _header(file)
    return file


def _check_links(directory: Path) -> None:
    """Refuse symbolic links in the checkpoint that lead outside it (ME214): a downloaded checkpoint must not make the
    tool read, or copy into an artifact, a file elsewhere on the machine."""
    root = directory.resolve()
    for path in directory.rglob("*"):
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):  # a loop, or a link to nothing: it cannot be read, so it is refused
                raise CheckpointValidationError("symlink_outside", path=str(path), target=i18n.ui("link_unresolvable"),
                                                checkpoint=str(directory)) from None
            if not target.is_relative_to(root):
                raise CheckpointValidationError("symlink_outside", path=str(path), target=str(target), checkpoint=str(directory))
        if path.exists() and not (path.is_dir() or path.is_file()):  # a FIFO, device or socket would hang or mislead a read
            raise CheckpointValidationError("special_file", path=str(path))


ROOT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
              "trainer_state.json")


def _check_root_files(root: Path) -> None:
    """The files the run reads from the training output folder (the checkpoint's parent: tokenizer, chat template,
    generation config, trainer state) are regular files inside it: a link there must not leak a file from elsewhere on
    the machine into every artifact (ME214), and a FIFO must not hang the run (ME218)."""
    for name in ROOT_FILES:
        if (root / name).is_symlink() or (root / name).exists():
            input_file(root / name, root)


def _header(file: Path):
    try:
        return read_header(file)
    except SafetensorsFormatError as exc:
        raise CheckpointValidationError("safetensors_corrupt", path=str(file), problem=str(exc)) from None
    except OSError as exc:
        raise CheckpointValidationError("adapter_unreadable", path=str(file), problem=str(exc)) from None


def _load_bin(file: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False, which is exactly what must not be done: keep only the cause.
        cause = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        raise CheckpointValidationError("unsafe_pickle", path=str(file),
                                        problem=cause.group(1)[:200] if cause else "refused by the weights-only unpickler") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged zip or pickle
        raise CheckpointValidationError("adapter_unreadable", path=str(file), problem=f"{type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointValidationError("adapter_unreadable", path=str(file), problem="not a dict of tensors")
    return state


def _scan(file: Path, progress: bool) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Shapes of every adapter tensor and the names of those holding NaN or Inf, reading one chunk at a time
    and logging 'Processing checkpoint: N% complete'."""
    from .numerics import nonfinite_count

    shapes, nonfinite = {}, []
    if file.suffix != ".safetensors":
        import torch

        for name, tensor in _load_bin(file).items():
            shapes[name] = tuple(tensor.shape)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nonfinite.append(name)
        return shapes, nonfinite
    header = _header(file)
    meter = Progress(i18n.ui("progress_checkpoint"), header.data_bytes, enabled=progress)
    with file.open("rb") as fh:
        for info in sorted(header.tensors.values(), key=lambda t: t.start):
            shapes[info.name] = info.shape
            rows = info.shape[0] if info.shape else 1
            step = max(1, _SCAN_CHUNK // max(row_bytes(info), 1))
            bad = 0
            for start in range(0, rows, step):
                chunk = read_bytes(fh, info, start, min(rows, start + step))
                bad += nonfinite_count(chunk, info.dtype)
                meter.advance(len(chunk))
            if bad:
                nonfinite.append(info.name)
    return shapes, nonfinite


def load_adapter_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The adapter's LoRA tensors in memory as float32 arrays (they are small), its whole tensors
    (modules_to_save, saved embeddings) as (header entry, file) to stream from disk, and the weights file."""
    from .merge_math import MemoryTensor
    from .numerics import as_float

    file = weights_file(directory)
    lora, full = {}, {}
    if file.suffix == ".safetensors":
        header = _header(file)
        with file.open("rb") as fh:
            for name, info in header.tensors.items():
                if parse_adapter_key(name)[1] == "full":
                    full[name] = (info, file)
                else:
                    lora[name] = as_float(read_bytes(fh, info), info.dtype, info.shape)
    else:
        for name, tensor in _load_bin(file).items():
            if parse_adapter_key(name)[1] == "full":
                full[name] = (MemoryTensor(name, tensor), None)
            else:
                lora[name] = tensor.float().numpy()
    return lora, full, file


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def validate_checkpoint(checkpoint: str | Path, base_model: str | None = None, *, progress: bool = True) -> CheckpointReport:
    """Check a checkpoint completely; with a base model (or the one adapter_config.json names), check the fit too.

    Raises CheckpointValidationError (ME201-ME215) and BaseModelError (ME301-ME303).
    """
    directory = Path(checkpoint)
    file = quick_check(checkpoint)
    config = read_adapter_config(directory)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise CheckpointValidationError("unsupported_peft_type", peft_type=config.get("peft_type"), path=str(directory / ADAPTER_CONFIG),
                                        supported="LORA (including rsLoRA and DoRA)")
    shapes, nonfinite = _scan(file, progress)
    if nonfinite:
        raise CheckpointValidationError("nonfinite_weights", count=len(nonfinite), tensor=nonfinite[0], path=str(file))
    modules = _check_ranks(shapes, config)
    if config.get("use_dora") and not any(parse_adapter_key(k)[1] == "dora" for k in shapes):
        raise CheckpointValidationError("dora_magnitude_missing", path=str(file))
    report = CheckpointReport(
        path=str(directory), peft_type=peft_type, rank=int(config.get("r", 8)), lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
        target_modules=config.get("target_modules"), weights_file=file.name, adapter_bytes=file.stat().st_size,
        num_tensors=len(shapes), num_modules=len(modules),
        full_tensors=sorted(parse_adapter_key(k)[0] for k in shapes if parse_adapter_key(k)[1] == "full"),
        training_artifacts=[a for a in TRAINING_ARTIFACTS if (directory / a).exists()])
    unknown = [k for k in shapes if parse_adapter_key(k)[1] == "unknown"]
    if unknown:
        report.warnings.append(i18n.ui("warn_unknown_tensors", count=len(unknown), first=unknown[0]))
    _check_root_files(directory.parent)
    base_name = base_model or config.get("base_model_name_or_path")
    if base_name:
        base = inspect_base_model(base_name)
        _check_fit(shapes, modules, config, base)
        if not base.has_tokenizer and not _has_tokenizer(directory):
            raise BaseModelError("base_tokenizer_missing", name=base_name, path=str(base.path))
        _check_tokenizer_fits(directory, base, shapes)
        report.base_model, report.base_model_path, report.fit_checked = base_name, str(base.path), True
    else:
        report.warnings.append(i18n.ui("warn_fit_unchecked"))
        logger.warning(report.warnings[-1])
    return report


def _check_tokenizer_fits(directory: Path, base: BaseModelInfo, shapes: dict) -> None:
    """Every id of the tokenizer that will be used (the checkpoint's, the Trainer root's, else the base's) must have an
    embedding row: the base's rows, or the adapter's saved embedding when it grew the vocabulary (ME215)."""
    _check_tokenizer_files(tokenizer_source([directory, directory.parent, base.path]))
    source = next((d for d in (directory, directory.parent, base.path) if (d / "tokenizer.json").is_file()), None)
    if source is None:
        return  # a sentencepiece-only tokenizer: nothing cheap to check
    try:
        data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab")
        ids = [int(i) for i in vocab.values()] if isinstance(vocab, dict) else []
        ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointValidationError("tokenizer_unreadable", path=str(source / "tokenizer.json"), error=str(exc)[:200]) from None
    rows = [t.shape[0] for name, t in base.tensors.items() if name.endswith("embed_tokens.weight")]
    rows += [shape[0] for key, shape in shapes.items()  # an embedding the adapter saved whole (modules_to_save)
             if parse_adapter_key(key)[1] == "full" and parse_adapter_key(key)[0].removesuffix(".weight").endswith("embed_tokens")]
    if rows and ids and max(ids) >= max(rows):
        raise CheckpointValidationError("tokenizer_mismatch", path=str(source / "tokenizer.json"), max_id=max(ids), rows=max(rows))


def _check_tokenizer_files(source: Path | None) -> None:
    """The JSON files of the tokenizer the run will use (the checkpoint's, the Trainer root's, else the base's) parse
    (ME216): a damaged one would otherwise stop the run only at verification."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json"):
        path = source / name if source is not None else None
        if path is None or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise CheckpointValidationError("tokenizer_unreadable", path=str(path), error=str(exc)[:200]) from None
        if not isinstance(data, dict):
            raise CheckpointValidationError("tokenizer_unreadable", path=str(path), error=f"a JSON {type(data).__name__}, not an object")


def _target_problem(config: dict[str, Any], base: BaseModelInfo) -> str | None:
    """PEFT matches target_modules against the base's module names (a string: a regular expression for the whole name;
    a list: a name or a name's last parts); when nothing matches, PEFT cannot even load the adapter."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return None
    names = {n.rsplit(".", 1)[0] for n in base.tensors if n.endswith(".weight")}
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error:
            return i18n.ui("fit_targets", targets=targets)
        matched = any(pattern.fullmatch(n) for n in names)
    else:
        wanted = [str(t) for t in targets]
        matched = any(n == t or n.endswith("." + t) for n in names for t in wanted)
    return None if matched else i18n.ui("fit_targets", targets=targets)


def _has_tokenizer(directory: Path) -> bool:
    """A tokenizer saved with the adapter, or beside the checkpoint-N folders (Trainer's output root)."""
    return any((d / f).is_file() for d in (directory, directory.parent) for f in TOKENIZER_FILES)


def _check_ranks(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group LoRA tensors by module and check that A and B ranks agree with each other and the config."""
    modules: dict[str, dict[str, Any]] = {}
    for key, shape in shapes.items():
        module, kind, role = parse_adapter_key(key)
        if kind in ("linear", "embedding", "dora"):
            entry = modules.setdefault(module, {"kind": kind})
            if kind != "dora":
                entry["kind"] = kind
            entry[role] = shape
    expected_default = int(config.get("r", 8))
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            present, absent = ("lora_A", "lora_B") if "A" in entry else ("lora_B", "lora_A")
            raise CheckpointValidationError("rank_mismatch", module=module, problem=i18n.ui("rank_partner_missing", present=present, absent=absent))
        rank_a, rank_b = entry["A"][0], entry["B"][-1]
        if rank_a != rank_b:
            raise CheckpointValidationError("rank_mismatch", module=module, problem=i18n.ui("rank_a_b", rank_a=rank_a, rank_b=rank_b))
        expected = int(pattern_value(config.get("rank_pattern"), module, expected_default))
        if rank_a != expected:
            raise CheckpointValidationError("rank_mismatch", module=module, problem=i18n.ui("rank_config", rank=rank_a, expected=expected))
    return modules


def _base_shape(base: BaseModelInfo, module: str) -> tuple[int, ...] | None:
    info = base.tensors.get(f"{module}.weight")
    if info is None and module.endswith("lm_head") and base.config.get("tie_word_embeddings", True):
        info = next((t for n, t in base.tensors.items() if n.endswith("embed_tokens.weight")), None)
    return info.shape if info is not None else None


def _check_fit(shapes: dict, modules: dict, config: dict, base: BaseModelInfo) -> None:
    problems = [p for p in [_target_problem(config, base)] if p]
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, entry in sorted(modules.items()):
        base_shape = _base_shape(base, module)
        if base_shape is None:
            problems.append(i18n.ui("fit_no_module", module=module))
            continue
        if entry["kind"] == "embedding":
            want = (entry["A"][1], entry["B"][0])
            ok = want[1] == base_shape[1] and want[0] >= base_shape[0]
        else:
            want = (entry["B"][0], entry["A"][1])
            if fan_in_fan_out:
                want = want[::-1]
            ok = want == tuple(base_shape)
        if not ok:
            problems.append(i18n.ui("fit_shape", module=module, adapter=list(want), base=list(base_shape)))
    for key, shape in shapes.items():
        module, kind, _ = parse_adapter_key(key)
        if kind != "full":
            continue
        base_shape = _base_shape(base, module.removesuffix(".weight"))
        if base_shape is None and module.endswith(".bias"):
            base_shape = base.tensors[module].shape if module in base.tensors else None
        if base_shape is None:
            problems.append(i18n.ui("fit_no_module", module=module))
        elif tuple(shape[1:]) != tuple(base_shape[1:]) or shape[0] < base_shape[0]:
            problems.append(i18n.ui("fit_shape", module=module, adapter=list(shape), base=list(base_shape)))
    if problems:
        shown = "; ".join(problems[:5]) + (i18n.ui("and_more", count=len(problems) - 5) if len(problems) > 5 else "")
        raise CheckpointValidationError("adapter_base_mismatch", base=base.name, problem=shown,
                                        trained_on=config.get("base_model_name_or_path") or "?")


def check(checkpoint: str | Path | None = None, base_model: str | None = None, selection: str | None = None, *,
          config: "ExportConfiguration | None" = None, progress: bool | None = None) -> CheckpointReport:
    """Detect the checkpoint under ``checkpoint`` (see checkpoint_detector.detect), then validate it fully.

    Arguments left as None come from ``config`` (checkpoint_path, base_model_name, checkpoint_selection,
    enable_progress_monitoring, memory_monitoring). Raises CheckpointValidationError and BaseModelError.
    """
    from .checkpoint_detector import detect
    from .config import ExportConfiguration
    from .monitoring import MemoryMonitor

    config = config or ExportConfiguration(checkpoint_path=str(checkpoint or "./qwen3-finetuned"))
    progress = config.enable_progress_monitoring if progress is None else progress
    with MemoryMonitor(config.memory_monitoring_interval, enabled=config.memory_monitoring):
        found = detect(checkpoint or config.checkpoint_path, selection or config.checkpoint_selection)
        return validate_checkpoint(found.path, base_model or config.base_model_name, progress=progress)
