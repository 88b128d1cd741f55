"""The PEFT adapter format: reading what PEFT's save_pretrained writes, and nothing else.

adapter_config.json (parsed, and its values checked against what PEFT's LoraConfig takes), the weights file
(adapter_model.safetensors, or adapter_model.bin through the weights-only unpickler), the saved keys
(``base_model.model.<module>.lora_A.weight`` and friends), rank and alpha patterns, and the cheap completeness check
the detector runs. The validator, the merge plan and the exporters import this module; it imports none of them.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import CheckpointValidationError
from ..tensor_io import TORCH_TO_SAFETENSORS, SafetensorsFormatError, read_bytes, read_header

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHT_FILES",
    "TRAINING_ARTIFACTS",
    "SUPPORTED_PEFT_TYPES",
    "parse_adapter_key",
    "read_adapter_config",
    "weights_file",
    "quick_check",
    "adapter_header",
    "load_bin",
    "load_adapter_state",
    "pattern_value",
    "MemoryTensor",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_ARTIFACTS = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
)
SUPPORTED_PEFT_TYPES = ("LORA",)
_PREFIX = "base_model.model."
_KINDS = {  # suffix of a saved adapter key -> (kind, role)
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": ("dora", "m"),
    ".lora_magnitude_vector.weight": ("dora", "m"),
    ".lora_B.bias": ("linear", "bias"),
}


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
    """Parse adapter_config.json. Raises CheckpointValidationError (ME202 missing, ME204 invalid with line and
    column)."""
    file = directory / ADAPTER_CONFIG
    if not file.is_file():
        raise _missing(directory, ADAPTER_CONFIG)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointValidationError(
            "adapter_config_invalid", path=str(file), line=exc.lineno, column=exc.colno, problem=exc.msg
        ) from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointValidationError(
            "adapter_config_invalid", path=str(file), line=0, column=0, problem=str(exc)[:200]
        ) from None
    if not isinstance(data, dict):
        raise CheckpointValidationError(
            "adapter_config_invalid", path=str(file), line=1, column=1, problem="not a JSON object"
        )
    for key, (accepts, expected) in _ADAPTER_VALUE_TYPES.items():
        if key in data and not (data[key] is None and key in _NULLABLE) and not accepts(data[key]):
            raise CheckpointValidationError(
                "adapter_config_value", path=str(file), key=key, value=repr(data[key])[:80], expected=expected
            )
    return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


_NULLABLE = {
    "target_modules",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "base_model_name_or_path",
}
# What PEFT's LoraConfig takes for the keys the merge reads: a value of another type is the config's fault, said so.
_ADAPTER_VALUE_TYPES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a finite number (PEFT scales by lora_alpha / r)"),
    "target_modules": (_names, "a module name pattern or a list of module names"),
    "modules_to_save": (_names, "a list of module names"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(isinstance(r, int) and r > 0 for r in v.values()),
        "an object of module patterns to positive ranks",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_number(a) for a in v.values()),
        "an object of module patterns to numbers",
    ),
    "layers_to_transform": (
        lambda v: isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v)),
        "a layer index or a list of them",
    ),
    "peft_type": (lambda v: isinstance(v, str), "a string such as LORA"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a hub id or a local path"),
}


def _missing(directory: Path, name: str) -> CheckpointValidationError:
    example = (
        directory / "checkpoint-30"
        if not directory.name.startswith("checkpoint-")
        else directory.parent / "checkpoint-30"
    )
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
        adapter_header(file)
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
                raise CheckpointValidationError(
                    "symlink_outside", path=str(path), target=i18n.ui("link_unresolvable"), checkpoint=str(directory)
                ) from None
            if not target.is_relative_to(root):
                raise CheckpointValidationError(
                    "symlink_outside", path=str(path), target=str(target), checkpoint=str(directory)
                )
        if path.exists() and not (
            path.is_dir() or path.is_file()
        ):  # a FIFO, device or socket would hang or mislead a read
            raise CheckpointValidationError("special_file", path=str(path))


def adapter_header(file: Path):
    try:
        return read_header(file)
    except SafetensorsFormatError as exc:
        raise CheckpointValidationError("safetensors_corrupt", path=str(file), problem=str(exc)) from None
    except OSError as exc:
        raise CheckpointValidationError("adapter_unreadable", path=str(file), problem=str(exc)) from None


def load_bin(file: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False, which is exactly what must not be done: keep only the cause.
        cause = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        raise CheckpointValidationError(
            "unsafe_pickle",
            path=str(file),
            problem=cause.group(1)[:200] if cause else "refused by the weights-only unpickler",
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged zip or pickle
        raise CheckpointValidationError(
            "adapter_unreadable", path=str(file), problem=f"{type(exc).__name__}: {exc}"[:300]
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointValidationError("adapter_unreadable", path=str(file), problem="not a dict of tensors")
    return state


def load_adapter_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The adapter's LoRA tensors in memory as float32 arrays (they are small), its whole tensors
    (modules_to_save, saved embeddings) as (header entry, file) to stream from disk, and the weights file."""
    from ..numerics import as_float

    file = weights_file(directory)
    lora, full = {}, {}
    if file.suffix == ".safetensors":
        header = adapter_header(file)
        with file.open("rb") as fh:
            for name, info in header.tensors.items():
                if parse_adapter_key(name)[1] == "full":
                    full[name] = (info, file)
                else:
                    lora[name] = as_float(read_bytes(fh, info), info.dtype, info.shape)
    else:
        for name, tensor in load_bin(file).items():
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


class MemoryTensor:
    """A source tensor already in memory (from a .bin adapter), shaped like tensor_io.TensorInfo."""

    def __init__(self, name: str, tensor: Any) -> None:
        import torch

        self.name, self.dtype, self.shape = (
            name,
            TORCH_TO_SAFETENSORS[str(tensor.dtype).removeprefix("torch.")],
            tuple(tensor.shape),
        )
        self.raw = bytearray(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.start, self.end = 0, len(self.raw)

    @property
    def nbytes(self) -> int:
        return self.end - self.start
