"""The Hugging Face folder around merged weights: config, generation config, tokenizer, model card, index.

Every file is written under a temporary name and renamed, so a killed run leaves no half-written file.
The rope helpers read config.json as transformers does, for the exporters that write rotary tables.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..tensor_io import input_file
from .adapter_format import TRAINING_ARTIFACTS
from .base_model import tokenizer_source

__all__ = [
    "write_config",
    "copy_tokenizer",
    "copy_generation_config",
    "write_index",
    "write_model_card",
    "copy_training_artifacts",
    "TOKENIZER_SET",
    "rope_parameters",
    "rope_inv_freq",
]

# Files that make up a tokenizer; they are copied together from one place, never mixed.
TOKENIZER_SET = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_DROP_CONFIG_KEYS = ("quantization_config", "pretraining_tp_quantized")
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file of an input (refused when it is a link out of its folder or not a regular file) into an artifact."""
    src = input_file(src, src.parent)
    partial = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, partial)
    os.replace(partial, dst)


def write_config(out: Path, config: dict[str, Any], weight_dtype: str) -> None:
    """config.json with the output dtype, no quantization settings, and the plan's tie flag and vocab size."""
    config = {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}
    name = _TORCH_NAMES.get(weight_dtype, "float32")
    present = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    for key in present:
        config[key] = name
    write_atomic(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(out: Path, candidates: list[Path]) -> Path | None:
    """Copy the tokenizer (with its chat template and special tokens) from the first candidate that has one."""
    source = tokenizer_source(candidates)
    if source is not None:
        for name in TOKENIZER_SET:
            if (source / name).is_file():
                _copy_atomic(source / name, out / name)
    return source


def copy_generation_config(out: Path, candidates: list[Path]) -> Path | None:
    source = next((d for d in candidates if (d / "generation_config.json").is_file()), None)
    if source is not None:
        _copy_atomic(source / "generation_config.json", out / "generation_config.json")
    return source


def copy_training_artifacts(out: Path, checkpoint: Path) -> list[str]:
    """Only when remove_training_artifacts is false: copy them, unread, into training_artifacts/."""
    present = [name for name in TRAINING_ARTIFACTS if (checkpoint / name).is_file()]
    if present:
        (out / "training_artifacts").mkdir(exist_ok=True)
        for name in present:
            _copy_atomic(checkpoint / name, out / "training_artifacts" / name)
    return present


def write_index(out: Path, index_name: str, weight_map: dict[str, str], total_size: int) -> None:
    data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out / index_name, json.dumps(data, indent=2) + "\n")


def write_model_card(out: Path, facts: dict[str, Any]) -> None:
    """README.md recording base model, adapter, checkpoint and the merge settings."""
    base = facts["base_model"]
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in facts.items())
    text = (
        f"---\nbase_model: {base}\nlibrary_name: transformers\ntags:\n- lora\n- merged\n- model-export\n---\n\n"
        f"# Merged model\n\n{base} with the LoRA adapter from `{facts['checkpoint']}` merged into its weights by "
        "model-export's streaming merge (fp32 accumulation, one rounding to the output dtype).\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )
    write_atomic(out / "README.md", text)


def rope_parameters(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(rope type, its parameters) from config.json, in transformers 5 form (rope_parameters) or 4 (rope_scaling)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("rope_type") or params.get("type") or "default", params


def rope_inv_freq(
    folder: Path, config: dict[str, Any], head_dim: int, rope_type: str | None = None
) -> tuple[Any, float]:
    """Inverse frequencies (fp32 torch tensor) and attention scaling as transformers computes them: the standard
    formula for the default rope, transformers' own init function for every other type (Llama 3, YaRN, linear, ...).
    ``rope_type='default'`` gives the unscaled frequencies of a scaled model. Loading the model class just for this
    would cost seconds of imports."""
    import torch

    configured, params = rope_parameters(config)
    if (rope_type or configured) == "default":
        base = params.get("rope_theta", config.get("rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[configured](AutoConfig.from_pretrained(str(folder)), "cpu")
    return inv_freq.float(), scaling
