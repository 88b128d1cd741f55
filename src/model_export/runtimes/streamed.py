"""A model folder run through the layer-streamed forward pass (merging/streamed.py): transformers' layers, one in
memory at a time, on the CPU. Verification uses it for the reference and for safetensors artifacts (plain, or int8/int4
compressed-tensors unpacked layer by layer) so that no whole model is loaded.

Every forward pass reads every layer again (but those kept resident), so the number of passes is the cost, not the
number of tokens in them:

- ``score_streamed`` puts every sequence it is given in one pass: packed one after another in rows (each its own
  positions from 0, so transformers' masks keep them apart, as for padding-free training), no padding between them;
  ``adapters`` says which adapter each sequence runs with (-1: none, the reference's base on the held-out text; a
  StreamedModel of several adapters: a batch's references in one pass);
- ``greedy_lockstep`` decodes several sequences together with the KV cache, one pass per token for all (each with
  its adapter, likewise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import i18n
from .base import Runtime

__all__ = ["StreamedRuntime", "score_streamed", "greedy_lockstep", "PACK_TOKENS"]

PACK_TOKENS = 1024  # tokens packed in one row of a scoring pass (a longer sequence has a row of its own)


class StreamedRuntime(Runtime):
    name = "transformers (layer-streamed)"

    def __init__(self, path: Path) -> None:
        from ..merging.streamed import StreamedModel

        self.path, self.device = Path(path), "cpu"
        self.model = StreamedModel(path)

    def score(self, sequences: list[Any], batch_size: int = 1) -> list[Any]:
        return score_streamed(self.model, sequences, label=self.path.name)

    def close(self) -> None:
        self.model.close()


def pack(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Rows of sequence indices, in order, each holding at most ``capacity`` tokens (PACK_TOKENS; or one longer
    sequence)."""
    capacity = capacity or PACK_TOKENS
    rows: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if not rows or used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


@contextlib.contextmanager
def _progress(model: Any, label: str, passes: int) -> Iterator[None]:
    """Progress of ``passes`` passes of a StreamedModel, counted per decoder layer run; complete at the end (decoding
    that stops early at end-of-sequence makes fewer passes)."""
    from ..monitoring import Progress

    meter = Progress(i18n.ui("progress_streamed", what=label), passes * model.config.num_hidden_layers, step=5)
    model.on_layer = lambda: meter.advance(1)
    try:
        yield
    finally:
        model.on_layer = None
        meter.advance(meter.total - meter.done)
        meter.close()


def score_streamed(model: Any, sequences: list[Any], adapters: list[int] | None = None, label: str = "") -> list[Any]:
    """The logits (fp32, [len, vocab]) at every position of each sequence, all in one pass of a StreamedModel (see the
    module doc); sequence i with adapter ``adapters[i]`` (-1: the base alone; None: adapter 0 for all)."""
    import torch

    from ..monitoring import logger

    lengths = [int(ids.numel()) for ids in sequences]
    rows = pack(lengths)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), model.config.pad_token_id or 0, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    adapter = torch.zeros(len(rows), width, dtype=torch.long)
    where = {}
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            ids[r, offset : offset + lengths[i]] = sequences[i]
            positions[r, offset : offset + lengths[i]] = torch.arange(lengths[i])
            adapter[r, offset : offset + lengths[i]] = adapters[i] if adapters is not None else 0
            where[i] = (r, offset)
            offset += lengths[i]
        positions[r, offset:] = torch.arange(width - offset)  # the padding: a sequence of its own, never read
    model.adapter_index = None if adapters is None else adapter
    logger.debug("forward pass: %d sequences packed in %d rows of %d tokens", len(sequences), len(rows), width)
    try:
        with _progress(model, label, 1), torch.no_grad():
            logits = model(ids, position_ids=positions, use_cache=False).logits
    finally:
        model.adapter_index = None
    return [logits[where[i][0], where[i][1] : where[i][1] + lengths[i]].float().clone() for i in range(len(sequences))]


def greedy_lockstep(
    model: Any, inputs: list[Any], new_tokens: int, eos: set[int], label: str = "", adapters: list[int] | None = None
) -> list[list[int]]:
    """Greedy continuations of several sequences decoded together (left-padded under an attention mask), each cut
    after its first end-of-sequence token as a lone run stops there; input i with adapter ``adapters[i]`` (None: adapter
    0 for all). For a model whose every forward pass costs the same whatever the batch (the layer-streamed one reads
    every layer it does not keep per pass), this is one pass per token for all."""
    import torch

    length = max(ids.numel() for ids in inputs)
    pad = model.config.pad_token_id or 0
    batch = torch.full((len(inputs), length), pad, dtype=torch.long)
    mask = torch.zeros(len(inputs), length, dtype=torch.long)
    for row, ids in enumerate(inputs):
        batch[row, length - ids.numel() :], mask[row, length - ids.numel() :] = ids, 1
    model.adapter_index = None if adapters is None else torch.tensor(adapters, dtype=torch.long)[:, None]
    try:
        with _progress(model, label, new_tokens), torch.no_grad():
            out = model.generate(
                batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
    finally:
        model.adapter_index = None
    continuations = []
    for row in out[:, length:].tolist():
        stop = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        continuations.append(row[:stop])
    return continuations
