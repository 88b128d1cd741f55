"""A model folder run through the layer-streamed forward pass (merging/streamed.py): transformers' layers, one in
memory at a time, on the CPU. Verification uses it for the reference and for safetensors artifacts (plain, or int8/int4
compressed-tensors unpacked layer by layer) so that no whole model is loaded.

Every forward pass reads every layer again, so the number of passes is the cost, not the number of tokens in them.
``run_streamed`` therefore does three things a whole-model runtime does not need:

- all the sequences that generate go through one pass together (padded on the right under an attention mask), and
  that pass gives their prompt logits and first token at once;
- given a *draft* of each continuation (verification passes the reference's greedy tokens), that first pass runs the
  prompt followed by the draft and keeps every predicted token up to and including the first that differs from the
  draft (teacher-forced checking, as speculative decoding does): the tokens kept are the model's own greedy tokens,
  whatever the draft; an artifact that agrees with the reference needs one pass for prompt logits and continuation;
- whatever is still to generate is decoded in lockstep with the KV cache, one pass per token for all sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import i18n
from .base import Runtime

__all__ = ["StreamedRuntime", "run_streamed"]


class StreamedRuntime(Runtime):
    name = "transformers (layer-streamed)"

    def __init__(self, path: Path) -> None:
        from ..merging.streamed import StreamedModel

        self.path, self.device = Path(path), "cpu"
        self.model = StreamedModel(path)

    def run(
        self, inputs: list[tuple[Any, int]], batch_size: int = 1, drafts: list[list[int]] | None = None
    ) -> list[tuple[Any, list[int]]]:
        return run_streamed(self.model, inputs, batch_size, drafts, label=self.path.name)

    def close(self) -> None:
        self.model.close()


def run_streamed(
    model: Any,
    inputs: list[tuple[Any, int]],
    batch_size: int = 1,
    drafts: list[list[int]] | None = None,
    label: str = "",
) -> list[tuple[Any, list[int]]]:
    """Prompt logits and greedy continuation of a StreamedModel for each ``(ids, new_tokens)`` (see the module doc);
    ``drafts[i]``, when given, is a guess of input i's continuation. Inputs without new tokens (the held-out text)
    are scored ``batch_size`` to a pass. Progress is logged per layer run (against the most passes it could take)."""
    from ..monitoring import Progress
    from .hf import prompt_logits

    generating = [i for i, (_, count) in enumerate(inputs) if count]
    scoring = [i for i, (_, count) in enumerate(inputs) if not count]
    most = max((inputs[i][1] for i in generating), default=0)
    passes = (1 + max(most - 1, 0) if generating else 0) + -(-len(scoring) // max(batch_size, 1))
    layers = model.config.num_hidden_layers
    meter = Progress(i18n.ui("progress_streamed", what=label), passes * layers, step=5)
    model.on_layer = lambda: meter.advance(1)
    results: dict[int, tuple[Any, list[int]]] = {}
    try:
        if generating:
            guesses = [
                list((drafts[i] if drafts and i < len(drafts) else None) or [])[: inputs[i][1]] for i in generating
            ]
            firsts = _first_pass(model, [inputs[i][0] for i in generating], guesses)
            pending: dict[int, int] = {}
            for i, guess, (logits, predicted) in zip(generating, guesses, firsts):
                tokens = _accepted(predicted, guess, inputs[i][1], model.eos_ids)
                results[i] = (logits, tokens)
                if len(tokens) < inputs[i][1] and tokens[-1] not in model.eos_ids:
                    pending[i] = inputs[i][1] - len(tokens)
            if pending:
                import torch

                contexts = [torch.cat([inputs[i][0], torch.tensor(results[i][1], dtype=torch.long)]) for i in pending]
                for i, more in zip(pending, greedy_lockstep(model, contexts, max(pending.values()), model.eos_ids)):
                    results[i][1].extend(more[: pending[i]])
        if scoring:
            for i, logits in zip(scoring, prompt_logits(model, [inputs[i][0] for i in scoring], batch_size)):
                results[i] = (logits, [])
        meter.advance(meter.total - meter.done)  # fewer passes than the most it could take: done all the same
    finally:
        model.on_layer = None
        meter.close()
    return [results[i] for i in range(len(inputs))]


def _first_pass(model: Any, prompts: list[Any], guesses: list[list[int]]) -> list[tuple[Any, list[int]]]:
    """One forward pass over every prompt followed by its guess, padded on the right under an attention mask (a causal
    model's real positions never see the padding after them, so nothing computed there, even an overflow, reaches
    them): each prompt's logits, and the token predicted after the prompt and after each guessed token."""
    import torch

    from ..monitoring import logger

    sequences = [torch.cat([ids, torch.tensor(guess, dtype=torch.long)]) for ids, guess in zip(prompts, guesses)]
    length = max(seq.numel() for seq in sequences)
    batch = torch.full((len(sequences), length), model.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : seq.numel()], mask[row, : seq.numel()] = seq, 1
    logger.debug("forward pass: batch of %d, %d tokens, %d guessed", len(sequences), length, sum(map(len, guesses)))
    with torch.no_grad():
        logits = model(batch, attention_mask=mask, use_cache=False).logits.float()
    out = []
    for row, (ids, seq) in enumerate(zip(prompts, sequences)):
        rows = logits[row, : seq.numel()]
        out.append((rows[: ids.numel()].clone(), rows[ids.numel() - 1 :].argmax(-1).tolist()))
    return out


def _accepted(predicted: list[int], guess: list[int], count: int, eos: set[int]) -> list[int]:
    """The model's own greedy tokens among ``predicted`` (the token after the prompt, then after each guessed token):
    each is valid while every guessed token before it was the model's own, so they are kept up to and including the
    first that differs from the guess, an end-of-sequence token, or ``count`` tokens."""
    tokens: list[int] = []
    for k, token in enumerate(predicted):
        tokens.append(token)
        if token in eos or len(tokens) == count or (k < len(guess) and token != guess[k]):
            break
    return tokens


def greedy_lockstep(model: Any, inputs: list[Any], new_tokens: int, eos: set[int]) -> list[list[int]]:
    """Greedy continuations of several sequences decoded together (left-padded under an attention mask), each cut
    after its first end-of-sequence token as a lone run stops there. For a model whose every forward pass costs the
    same whatever the batch (the layer-streamed one reads every layer per pass), this is one pass per token for all."""
    import torch

    length = max(ids.numel() for ids in inputs)
    pad = model.config.pad_token_id or 0
    batch = torch.full((len(inputs), length), pad, dtype=torch.long)
    mask = torch.zeros(len(inputs), length, dtype=torch.long)
    for row, ids in enumerate(inputs):
        batch[row, length - ids.numel() :], mask[row, length - ids.numel() :] = ids, 1
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    continuations = []
    for row in out[:, length:].tolist():
        stop = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        continuations.append(row[:stop])
    return continuations
