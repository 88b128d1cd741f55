"""transformers: a model folder (safetensors, PyTorch .bin, compressed-tensors int8/int4) on the CPU or the GPU; and the
forward passes the reference (base + adapter through PEFT) runs with, which are the same code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..monitoring import logger
from .base import Runtime

__all__ = ["TransformersRuntime", "prompt_logits", "greedy"]


def prompt_logits(model: Any, inputs: list[Any], batch_size: int = 1) -> list[Any]:
    """Prompt logits (fp32, on the CPU) of a transformers model, ``batch_size`` sequences per forward pass.

    A batch is padded on the right under an attention mask: a causal model's logits at the real positions never see
    the padding after them, so each sequence's logits are those it has alone (to float rounding)."""
    import torch

    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        length = max(ids.numel() for ids in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : seq.numel()], mask[row, : seq.numel()] = seq, 1
        logger.debug("forward pass: batch of %d, %d tokens", len(batch), length)
        with torch.no_grad():
            logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
        out.extend(logits[row, : seq.numel()] for row, seq in enumerate(batch))
    return out


def greedy(model: Any, input_ids: Any, new_tokens: int) -> list[int]:
    """Greedy continuation of one sequence by a transformers model, on the model's device."""
    import torch

    if new_tokens == 0:
        return []
    ids = input_ids[None].to(model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
    return out[0, input_ids.numel() :].tolist()


class TransformersRuntime(Runtime):
    """A model folder loaded by transformers (weights memory-mapped unless ``mmap`` is false) on ``device``."""

    name = "transformers"
    placeable = True

    def __init__(self, path: Path, device: str = "cpu", *, mmap: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from ..monitoring import third_party_output

        self.path, self.device, self.torch = Path(path), device, torch
        with third_party_output():
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype="auto", device_map=device, disable_mmap=not mmap
            ).eval()
        self._sync()

    def _sync(self) -> None:
        if self.device == "cuda":  # CUDA runs asynchronously: a timer stops only when the GPU has finished
            self.torch.cuda.synchronize()

    def score(self, sequences: list[Any], batch_size: int = 1) -> list[Any]:
        return prompt_logits(self.model, sequences, batch_size)

    def timed(self, ids: list[int], new_tokens: int, batch: int = 1) -> tuple[float, float]:
        torch = self.torch
        inputs = torch.tensor([ids] * batch, device=self.device)
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(inputs, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            ttft = time.perf_counter() - start
            past = out.past_key_values
            start = time.perf_counter()
            for step in range(new_tokens):
                positions = torch.full((batch, 1), len(ids) + step, device=self.device)
                out = self.model(token, past_key_values=past, position_ids=positions, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            return ttft, time.perf_counter() - start

    def close(self) -> None:
        self.model = None
