"""The adapter itself for llama.cpp and Ollama: a LoRA GGUF (llama.cpp's convert_lora_to_gguf layout), which a batch's
Modelfile (modelfile.py) loads on the shared base GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import extras
from ..errors import ExportFormatError
from ..quantize.gguf_types import SUPPORTED_ARCHITECTURES
from .gguf_tensors import permute_heads, rope_heads

__all__ = ["export_gguf_lora"]


def export_gguf_lora(checkpoint: str | Path, base: str | Path, out: str | Path) -> dict[str, Any]:
    """A LoRA-only GGUF adapter (``adapter-lora-f32.gguf``) for llama.cpp's ``--lora`` on a GGUF of the base model.

    llama.cpp scales each update by ``alpha / rank`` of that tensor. PEFT's scaling (alpha/r, alpha/sqrt(r) for
    rsLoRA, per-module rank and alpha patterns) cannot all be one alpha, so the file says alpha = 1 and each
    ``lora_b`` carries ``scaling * rank``: llama.cpp then applies exactly PEFT's update. Raises ExportFormatError
    for what llama.cpp's adapters cannot hold (DoRA, LoRA on embeddings, lora_bias, modules_to_save).
    """
    gguf = extras.require("gguf", "GGUF export")
    from ..checkpoint.adapter_format import load_adapter_state, read_adapter_config
    from ..merging.plan import check_supported, lora_modules

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out)
    adapter_config = read_adapter_config(checkpoint)
    lora, full, _ = load_adapter_state(checkpoint)
    check_supported(adapter_config, list(lora) + list(full))
    modules = lora_modules(adapter_config, lora)
    unsupported = sorted(
        {"DoRA" for m in modules.values() if m.magnitude is not None}
        | {"LoRA on embeddings" for m in modules.values() if m.kind != "linear"}
        | {"lora_bias" for m in modules.values() if m.bias is not None}
        | ({"modules_to_save"} if full else set())
    )
    if unsupported:
        raise ExportFormatError(
            "gguf_unsupported",
            what=f"an adapter with {', '.join(unsupported)}",
            supported="plain LoRA on linear layers",
        )
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ExportFormatError(
            "gguf_unsupported", what=f"the architecture {arch_name}", supported=", ".join(SUPPORTED_ARCHITECTURES)
        )
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch_name])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "adapter-lora-f32.gguf"
    partial = out / f"{path.name}.partial"
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    for module, update in sorted(modules.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportFormatError("gguf_unknown_tensor", tensor=module + ".weight")
        a = np.ascontiguousarray(update.A, dtype=np.float32)
        b = lora_b(update, arch_name, config, module)
        writer.add_tensor(f"{target}.lora_a", a)
        writer.add_tensor(f"{target}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return {"path": str(path), "modules": len(modules)}


def lora_b(update: Any, arch_name: str, config: dict[str, Any], module: str) -> np.ndarray:
    """B * scaling * rank, its rows reordered per head where the base's q/k rows are (the llama architecture)."""
    b = np.ascontiguousarray(update.B, dtype=np.float32) * np.float32(update.scaling * np.asarray(update.A).shape[0])
    heads = rope_heads(arch_name, config, module + ".weight")
    return np.ascontiguousarray(permute_heads(b, heads)) if heads else b
