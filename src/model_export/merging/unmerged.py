"""PEFT's LoRA applied unmerged on the layer-streamed model (merging/streamed.py), for one adapter or several at once.

A StreamedModel of several adapters runs their sequences in one pass; ``adapter_index`` says which adapter applies at
which position (-1: the base alone). Each linear layer's hook adds every adapter's update at its own positions:

- one adapter at every position (a scoring pass of one adapter's sequences): ``scaling * B (A x)`` on the whole output;
- several plain LoRA adapters side by side (a batch's references decoding all their prompts together): their A
  matrices stacked into one, their scaled B matrices into another, and the ranks of other adapters masked to zero at
  each position, so that one pair of products serves them all. A decoding step of 24 rows (8 adapters) otherwise made
  8 small product pairs, selections and copies per linear layer: 26,656 of them per 16 steps at the 0.6B shape, 5 s
  of the shared pass (docs/benchmarks.md). Masking adds exact zeros; the stacked form differs from one adapter's by
  float rounding (the scaling applied to B before the product);
- otherwise (DoRA, a lora bias, embeddings, the head): each adapter's positions selected, changed and written back.
"""

from __future__ import annotations

from typing import Any

__all__ = ["lora_delta", "adapted", "lora_hook"]


def lora_delta(lora: Any, x: Any):
    """scaling * B (A x) (+ the lora bias), PEFT's unmerged update of a linear layer, in fp32."""
    import torch

    A, B = torch.from_numpy(lora.A).float(), torch.from_numpy(lora.B).float()
    return torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * lora.scaling


def adapted(owner: Any, loras: list[tuple[int, Any]], output: Any, change: Any) -> Any:
    """``output`` (the module's own new result) changed by each of ``loras`` ((adapter number, update) pairs) where the
    owner's adapter_index selects that adapter: ``change(lora, pick)`` gives the changed values at the positions
    ``pick`` selects from a [batch, seq, ...] tensor, written back in place. With no index the first adapter applies
    everywhere (one adapter's model); -1 is the base alone, as PEFT's disable_adapter computes it."""
    index = owner.adapter_index
    if index is None:
        return change(loras[0][1], lambda t: t) if loras[0][0] == 0 else output
    output = output.contiguous()
    for number, lora in loras:
        where = positions(owner, index, output.shape[:2]).get(number)
        if where is None:
            continue
        if where is EVERY:  # one adapter at every position (a scoring pass of one adapter's sequences)
            output = change(lora, lambda t: t)
            continue
        changed = change(lora, lambda t, where=where: t.flatten(0, 1).index_select(0, where))
        output.flatten(0, 1).index_copy_(0, where, changed)
    return output


EVERY = object()


def positions(owner: Any, index: Any, shape: Any) -> dict[int, Any]:
    """Each adapter number's flat positions in ``index`` broadcast to ``shape`` (EVERY when it is the only one),
    worked out once per pass and shape (the selection keeps its index alive, so ``is`` cannot match a new one)."""
    held = owner._positions
    if held is not None and held[0] is not index:  # a new pass: the last one's stacked matrices are let go
        owner._stacked = {}
    if held is None or held[0] is not index or held[1] != tuple(shape):
        numbers = index.expand(shape).flatten()
        found = numbers.unique().tolist()
        where = {n: EVERY if len(found) == 1 else (numbers == n).nonzero().squeeze(1) for n in found}
        owner._positions = held = (index, tuple(shape), where, numbers, {})
    return held[2]


def stacked(owner: Any, loras: list[tuple[int, Any]], x: Any, output: Any) -> Any:
    """``output`` plus the plain LoRA updates of the adapters the pass's index holds, in one pair of products (see
    the module doc); None where that form does not apply: fewer than two of them, or one with DoRA or a lora bias."""
    import torch

    where = positions(owner, owner.adapter_index, output.shape[:2])
    present = [(n, lora) for n, lora in loras if n in where]
    if len(present) < 2 or any(lora.magnitude is not None or lora.bias is not None for _, lora in present):
        return None
    held = owner._positions
    key = tuple((n, lora.A.shape[0]) for n, lora in present)  # the adapters and their ranks
    if (id(loras), key) not in owner._stacked:  # kept for this pass (positions lets them go at the next)
        A = torch.cat([torch.from_numpy(lora.A).float() for _, lora in present])
        B = torch.cat([torch.from_numpy(lora.B).float() * lora.scaling for _, lora in present], dim=1)
        owner_of = torch.cat([torch.full((lora.A.shape[0],), n) for n, lora in present])
        owner._stacked[(id(loras), key)] = (A, B, owner_of)
    A, B, owner_of = owner._stacked[(id(loras), key)]
    masks = held[4]
    if key not in masks:
        masks[key] = (held[3][:, None] == owner_of[None, :]).float()
    low = torch.nn.functional.linear(x.flatten(0, 1), A) * masks[key]
    return output + torch.nn.functional.linear(low, B).view_as(output)


def lora_hook(owner: Any, loras: list[tuple[int, Any]]):
    """PEFT's unmerged LoRA on a linear layer whose base weight (and bias) has just run: add scaling * B (A x) and the
    lora bias; for DoRA, rescale by magnitude / ||W + scaling B A|| as PEFT's DoRA layer does (each adapter where the
    owner's adapter_index selects it; several plain ones at once where ``stacked`` applies)."""
    import torch

    def hook(module: Any, args: Any, output: Any) -> Any:
        if owner.adapter_index is not None and len(loras) > 1:
            together = stacked(owner, loras, args[0], output)
            if together is not None:
                return together

        def change(lora: Any, pick: Any) -> Any:
            out = pick(output)
            delta = lora_delta(lora, pick(args[0]))
            if lora.magnitude is not None:
                A, B = torch.from_numpy(lora.A).float(), torch.from_numpy(lora.B).float()
                weight = module.weight + lora.scaling * (B @ A)
                scale = torch.from_numpy(lora.magnitude).float().reshape(-1) / weight.norm(p=2, dim=1)
                base = out - module.bias if module.bias is not None else out
                changed = out + (scale - 1) * base + scale * delta
            else:
                changed = out + delta
            return changed + torch.from_numpy(lora.bias).float() if lora.bias is not None else changed

        return adapted(owner, loras, output, change)

    return hook
