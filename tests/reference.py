"""The reference implementations the tests compare against: PEFT's merge and PEFT's unmerged forward."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def peft_merge(base: Path, adapter: Path, out: Path, dtype=torch.float32) -> Path:
    """PEFT merge_and_unload + save_pretrained, as users run it today."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(out))
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory (sharded or not)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def _ordered(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.bfloat16, torch.float16):
        bits, sign = t.view(torch.int16).to(torch.int64), 0x8000
    else:
        bits, sign = t.float().view(torch.int32).to(torch.int64), 0x80000000
    return torch.where(bits < 0, -(bits & (sign - 1)), bits)


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units in the last place of their (common) dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return int((_ordered(a) - _ordered(b)).abs().max().item()) if a.numel() else 0


def unmerged_logits(base: Path, adapter: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of base + adapter through PEFT, unmerged, in fp32: the ground truth of what the adapter means."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    )
    with torch.no_grad():
        return model.eval()(input_ids).logits


def model_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids).logits
