"""What the merge will write, decided before any output exists.

From adapter_config.json, the adapter's tensors and the base model's headers, the plan lists every
output tensor in order with its source (a base tensor, or a full tensor saved in the adapter), the
LoRA update to apply (with PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA, per-module
rank_pattern and alpha_pattern), its output dtype, and whether tied embeddings must be untied.
Anything the merge cannot reproduce exactly is refused here, naming what is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.adapter_format import parse_adapter_key, pattern_value
from ..checkpoint.base_model import BaseModelInfo
from ..errors import MergeError
from ..tensor_io import TORCH_TO_SAFETENSORS, PlannedTensor, TensorInfo

__all__ = ["LoraUpdate", "OutputTensor", "MergePlan", "make_plan", "adapter_plan", "OUTPUT_DTYPES"]

OUTPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_LM_HEAD = "lm_head.weight"

# adapter_config.json settings the streaming merge does not reproduce (value that is fine -> name in messages)
_UNSUPPORTED_SETTINGS = {
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable_token_indices (trainable tokens)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "ensure_weight_tying": "ensure_weight_tying",
    "megatron_config": "Megatron layers (megatron_config)",
}
# initialisations that change the base weights during training: merging into the original base would be wrong
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraUpdate:
    module: str
    kind: str  # linear | embedding
    A: Any
    B: Any
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: Any = None  # DoRA
    bias: Any = None  # lora_bias: added to the module's bias


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype of the output
    source: Any  # TensorInfo, or adapter_format.MemoryTensor for .bin adapters
    source_file: Path | None
    lora: LoraUpdate | None = None
    bias_of: LoraUpdate | None = None

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)

    @property
    def is_copy(self) -> bool:
        return self.lora is None and self.bias_of is None and self.dtype == self.source.dtype


@dataclass
class MergePlan:
    tensors: list[OutputTensor]
    config: dict[str, Any]  # the output config.json
    untied: bool
    vocab_size: int | None
    notes: list[str] = field(default_factory=list)


def _scaling(config: dict[str, Any], module: str) -> float:
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_supported(config: dict[str, Any], keys: list[str]) -> None:
    """Raise MergeError (ME701) naming every adapter feature the merge cannot reproduce."""
    found = [name for key, name in _UNSUPPORTED_SETTINGS.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        found.append(
            f"init_lora_weights={init} (the base weights changed during training; save the adapter with "
            "path_initial_model_for_weight_conversion)"
        )
    if config.get("loftq_config"):
        found.append("LoftQ (loftq_config)")
    found += [f"tensor {k}" for k in keys if parse_adapter_key(k)[1] == "unknown"]
    if found:
        raise MergeError("merge_unsupported", features="; ".join(found))


def lora_modules(config: dict[str, Any], tensors: dict[str, Any]) -> dict[str, LoraUpdate]:
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, kind, role = parse_adapter_key(key)
        if kind in ("linear", "embedding", "dora"):
            entry = parts.setdefault(module, {})
            entry[role] = tensor
            if kind != "dora":
                entry["kind"] = kind
    fif = bool(config.get("fan_in_fan_out"))
    return {
        module: LoraUpdate(
            module,
            p["kind"],
            p["A"],
            p["B"],
            _scaling(config, module),
            fan_in_fan_out=fif and p["kind"] == "linear",
            magnitude=p.get("m"),
            bias=p.get("bias"),
        )
        for module, p in parts.items()
    }


def _out_dtype(source: TensorInfo, dtype: str, compress: bool) -> str:
    if source.dtype not in FLOAT_DTYPES:
        return source.dtype
    if dtype != "auto":
        return OUTPUT_DTYPES[dtype]
    return source.dtype if compress else "F32"


def make_plan(
    adapter_config: dict[str, Any],
    lora_tensors: dict[str, Any],
    full: dict[str, tuple[Any, Path | None]],
    base: BaseModelInfo,
    dtype: str = "auto",
    compress_weights: bool = True,
) -> MergePlan:
    """Plan the merged model. ``full`` maps base tensor names to whole tensors saved in the adapter.

    Raises MergeError (ME701 unsupported, ME702 inconsistent embeddings).
    """
    modules = lora_modules(adapter_config, lora_tensors)
    config = dict(base.config)
    tied = bool(config.get("tie_word_embeddings", True)) and _LM_HEAD not in base.tensors
    embed_name = next((n for n in base.tensors if n.endswith("embed_tokens.weight")), None)
    tensors: list[OutputTensor] = []
    for name, info in base.tensors.items():
        source, file = full.get(name, (info, base.files[name]))
        module = name.removesuffix(".weight") if name.endswith(".weight") else None
        bias_module = name.removesuffix(".bias") if name.endswith(".bias") else None
        lora = modules.get(module) if module else None
        bias_of = (
            modules.get(bias_module)
            if bias_module and modules.get(bias_module) and modules[bias_module].bias is not None
            else None
        )
        tensors.append(
            OutputTensor(name, source.shape, _out_dtype(source, dtype, compress_weights), source, file, lora, bias_of)
        )
    _check_biases(modules, base)
    untied = False
    if tied and embed_name is not None:
        embed = next(t for t in tensors if t.name == embed_name)
        head_lora = modules.get("lm_head")
        untied = head_lora is not None or _LM_HEAD in full or embed.lora is not None
        if untied:
            source, file = full.get(_LM_HEAD, (embed.source, embed.source_file))
            tensors.append(
                OutputTensor(
                    _LM_HEAD, source.shape, _out_dtype(source, dtype, compress_weights), source, file, head_lora
                )
            )
            config["tie_word_embeddings"] = False
    vocab = _vocab(tensors, embed_name, config)
    return MergePlan(tensors, config, untied, vocab)


def adapter_plan(
    checkpoint: Path, adapter_config: dict[str, Any], info: BaseModelInfo, dtype: str = "auto", compress: bool = True
) -> tuple[MergePlan, Path]:
    """The plan for ``checkpoint`` on ``info``: the adapter read (adapter_format.load_adapter_state), what it cannot
    reproduce refused (ME701), whole tensors it saved put in place of the base's. The merge and the layer-streamed
    reference read the adapter through this one function. Returns the plan and the adapter's weights file."""
    from ..checkpoint.adapter_format import load_adapter_state

    lora, full, adapter_file = load_adapter_state(checkpoint)
    check_supported(adapter_config, list(lora) + list(full))
    full_by_base = {parse_adapter_key(k)[0]: v for k, v in full.items()}
    return make_plan(adapter_config, lora, full_by_base, info, dtype, compress), adapter_file


def _check_biases(modules: dict[str, LoraUpdate], base: BaseModelInfo) -> None:
    missing = [m for m, u in modules.items() if u.bias is not None and f"{m}.bias" not in base.tensors]
    if missing:
        raise MergeError("merge_unsupported", features="lora_bias on modules without a bias: " + ", ".join(missing[:3]))


def _vocab(tensors: list[OutputTensor], embed_name: str | None, config: dict[str, Any]) -> int | None:
    rows = {t.name: t.shape[0] for t in tensors if t.name in (embed_name, _LM_HEAD)}
    if embed_name in rows and _LM_HEAD in rows and rows[embed_name] != rows[_LM_HEAD]:
        raise MergeError("merge_vocab_mismatch", embed=rows[embed_name], head=rows[_LM_HEAD])
    vocab = rows.get(embed_name) or rows.get(_LM_HEAD)
    if vocab is not None and vocab != config.get("vocab_size"):
        config["vocab_size"] = vocab
    return vocab


def torch_to_safetensors(dtype) -> str:
    return TORCH_TO_SAFETENSORS[str(dtype).removeprefix("torch.")]
