"""Whether a checkpoint is sound and fits its base model, without loading base weights.

Checks, in order: the directory and its files exist; adapter_config.json is valid JSON for a
LoRA adapter; the safetensors header is consistent (or a .bin adapter is a weights-only pickle);
every adapter tensor is finite; lora_A and lora_B ranks agree with each other and the config;
and every adapted module exists in the base model with matching shapes (from the base model's
config.json and safetensors headers).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import i18n
from ..errors import BaseModelError, CheckpointValidationError
from ..monitoring import Progress, logger
from ..tensor_io import input_file, read_bytes, row_bytes
from .adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHT_FILES,
    SUPPORTED_PEFT_TYPES,
    TRAINING_ARTIFACTS,
    adapter_header,
    load_bin,
    parse_adapter_key,
    pattern_value,
    quick_check,
    read_adapter_config,
)
from .base_model import TOKENIZER_FILES, BaseModelInfo, inspect_base_model, refuse_quantized, tokenizer_source
from .hf_layout import TOKENIZER_SET
from .quantized_base import quantized_name

if TYPE_CHECKING:
    from ..config import ExportConfiguration

__all__ = [
    "check",
    "validate_checkpoint",
    "quick_check",
    "read_adapter_config",
    "CheckpointReport",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHT_FILES",
    "TRAINING_ARTIFACTS",
    "parse_adapter_key",
]

_SCAN_CHUNK = 64 << 20


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
    base_quantization: str | None = None  # a quantized base: what it is, and that it is read as its dequantized weights
    training_artifacts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROOT_FILES = (*TOKENIZER_SET, "generation_config.json", "trainer_state.json")


def _check_root_files(root: Path) -> None:
    """The files the run reads from the training output folder (the checkpoint's parent: tokenizer, chat template,
    generation config, trainer state) are regular files inside it: a link there must not leak a file from elsewhere on
    the machine into every artifact (ME214), and a FIFO must not hang the run (ME218)."""
    for name in ROOT_FILES:
        if (root / name).is_symlink() or (root / name).exists():
            input_file(root / name, root)


def _scan(file: Path, progress: bool) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Shapes of every adapter tensor and the names of those holding NaN or Inf, reading one chunk at a time
    and logging 'Processing checkpoint: N% complete'."""
    from ..numerics import nonfinite_count

    shapes, nonfinite = {}, []
    if file.suffix != ".safetensors":
        import torch

        for name, tensor in load_bin(file).items():
            shapes[name] = tuple(tensor.shape)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nonfinite.append(name)
        return shapes, nonfinite
    header = adapter_header(file)
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


def validate_checkpoint(
    checkpoint: str | Path, base_model: str | None = None, *, progress: bool = True
) -> CheckpointReport:
    """Check a checkpoint completely; with a base model (or the one adapter_config.json names), check the fit too.

    Raises CheckpointValidationError (ME201-ME215) and BaseModelError (ME301-ME303).
    """
    directory = Path(checkpoint)
    file = quick_check(checkpoint)
    config = read_adapter_config(directory)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise CheckpointValidationError(
            "unsupported_peft_type",
            peft_type=config.get("peft_type"),
            path=str(directory / ADAPTER_CONFIG),
            supported="LORA (including rsLoRA and DoRA)",
        )
    shapes, nonfinite = _scan(file, progress)
    if nonfinite:
        raise CheckpointValidationError("nonfinite_weights", count=len(nonfinite), tensor=nonfinite[0], path=str(file))
    modules = _check_ranks(shapes, config)
    if config.get("use_dora") and not any(parse_adapter_key(k)[1] == "dora" for k in shapes):
        raise CheckpointValidationError("dora_magnitude_missing", path=str(file))
    report = CheckpointReport(
        path=str(directory),
        peft_type=peft_type,
        rank=int(config.get("r", 8)),
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        target_modules=config.get("target_modules"),
        weights_file=file.name,
        adapter_bytes=file.stat().st_size,
        num_tensors=len(shapes),
        num_modules=len(modules),
        full_tensors=sorted(parse_adapter_key(k)[0] for k in shapes if parse_adapter_key(k)[1] == "full"),
        training_artifacts=[a for a in TRAINING_ARTIFACTS if (directory / a).exists()],
    )
    unknown = [k for k in shapes if parse_adapter_key(k)[1] == "unknown"]
    if unknown:
        report.warnings.append(i18n.ui("warn_unknown_tensors", count=len(unknown), first=unknown[0]))
    _check_root_files(directory.parent)
    base_name = base_model or config.get("base_model_name_or_path")
    if base_name:
        base = refuse_quantized(inspect_base_model(base_name))
        _check_fit(shapes, modules, config, base)
        if not base.has_tokenizer and not _has_tokenizer(directory):
            raise BaseModelError("base_tokenizer_missing", name=base_name, path=str(base.path))
        _check_tokenizer_fits(directory, base, shapes)
        report.base_model, report.base_model_path, report.fit_checked = base_name, str(base.path), True
        report.base_quantization = base_quantization(base.path)
        trained_on = quantized_name(config.get("base_model_name_or_path"))
        if trained_on and report.base_quantization is None:  # a QLoRA adapter given a 16-bit base
            report.warnings.append(i18n.ui("warn_trained_quantized", named=trained_on, given=base_name))
            logger.warning(report.warnings[-1])
    else:
        report.warnings.append(i18n.ui("warn_fit_unchecked"))
        logger.warning(report.warnings[-1])
    return report


def base_quantization(path: Path) -> str | None:
    """For a plain base made from a quantized one (checkpoint/quantized_base.py): ``base: bitsandbytes nf4, double
    quantization, compute bfloat16; merged into its dequantized weights``; None for any other base."""
    from .quantized_base import MARKER

    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return i18n.ui("base_dequantized", described=json.loads(marker.read_text(encoding="utf-8"))["described"])


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
        raise CheckpointValidationError(
            "tokenizer_unreadable", path=str(source / "tokenizer.json"), error=str(exc)[:200]
        ) from None
    rows = [t.shape[0] for name, t in base.tensors.items() if name.endswith("embed_tokens.weight")]
    rows += [
        shape[0]
        for key, shape in shapes.items()  # an embedding the adapter saved whole (modules_to_save)
        if parse_adapter_key(key)[1] == "full"
        and parse_adapter_key(key)[0].removesuffix(".weight").endswith("embed_tokens")
    ]
    if rows and ids and max(ids) >= max(rows):
        raise CheckpointValidationError(
            "tokenizer_mismatch", path=str(source / "tokenizer.json"), max_id=max(ids), rows=max(rows)
        )


def _check_tokenizer_files(source: Path | None) -> None:
    """The JSON files of the tokenizer the run will use (the checkpoint's, the Trainer root's, else the base's) parse
    (ME216): a damaged one would otherwise stop the run only at verification."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
    ):
        path = source / name if source is not None else None
        if path is None or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise CheckpointValidationError("tokenizer_unreadable", path=str(path), error=str(exc)[:200]) from None
        if not isinstance(data, dict):
            raise CheckpointValidationError(
                "tokenizer_unreadable", path=str(path), error=f"a JSON {type(data).__name__}, not an object"
            )


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
            raise CheckpointValidationError(
                "rank_mismatch", module=module, problem=i18n.ui("rank_partner_missing", present=present, absent=absent)
            )
        rank_a, rank_b = entry["A"][0], entry["B"][-1]
        if rank_a != rank_b:
            raise CheckpointValidationError(
                "rank_mismatch", module=module, problem=i18n.ui("rank_a_b", rank_a=rank_a, rank_b=rank_b)
            )
        expected = int(pattern_value(config.get("rank_pattern"), module, expected_default))
        if rank_a != expected:
            raise CheckpointValidationError(
                "rank_mismatch", module=module, problem=i18n.ui("rank_config", rank=rank_a, expected=expected)
            )
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
        raise CheckpointValidationError(
            "adapter_base_mismatch",
            base=base.name,
            problem=shown,
            trained_on=config.get("base_model_name_or_path") or "?",
        )


def check(
    checkpoint: str | Path | None = None,
    base_model: str | None = None,
    selection: str | None = None,
    *,
    config: ExportConfiguration | None = None,
    progress: bool | None = None,
) -> CheckpointReport:
    """Detect the checkpoint under ``checkpoint`` (see checkpoint.detect.detect), then validate it fully.

    Arguments left as None come from ``config`` (checkpoint_path, base_model_name, checkpoint_selection,
    enable_progress_monitoring, memory_monitoring). Raises CheckpointValidationError and BaseModelError.
    """
    from ..config import ExportConfiguration
    from ..monitoring import MemoryMonitor
    from .detect import detect

    config = config or ExportConfiguration(checkpoint_path=str(checkpoint or "./qwen3-finetuned"))
    progress = config.enable_progress_monitoring if progress is None else progress
    with MemoryMonitor(config.memory_monitoring_interval, enabled=config.memory_monitoring):
        found = detect(checkpoint or config.checkpoint_path, selection or config.checkpoint_selection)
        return validate_checkpoint(found.path, base_model or config.base_model_name, progress=progress)
