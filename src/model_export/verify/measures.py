"""What verification measures over logits, one block of positions at a time.

Logits are [positions, vocabulary] in fp32: at Qwen3's 151,936 tokens a prompt with its tokens and the held-out text are
about 230 MB, and every measure here (softmax, differences, KL) would make one or two temporaries of that size per
sample if taken on the whole tensor. Fresh allocations that large are mapped and zeroed by the kernel page by page on
every call (glibc maps them, and gives them back when freed), which cost more than the arithmetic: on one core, 1.15 s
for the four samples of a 0.6B run against 0.5 s taken ``BLOCK_BYTES`` of positions at a time, whose temporaries glibc
reuses from its heap (blocks of 16 MB were still mapped afresh half the time). Each block's sum is added as a Python
float (fp64, on the CPU wherever the logits are), so rounding does not grow with the number of positions.

    perplexity(logits, ids)        exp of the mean negative log-likelihood of each next token
    entropy(logits)                mean entropy (nats) of the next-token distributions
    differences(ref, got)          max and mean |got - ref|, mean KL(ref || got), top-1 agreement, at every position
    histogram(pairs, bins)         counts of |got - ref| over every pair, from 0 to the largest finite difference
    top1(logits)                   each position's argmax
    all_finite(logits)             no NaN and no inf
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

__all__ = ["BLOCK_BYTES", "all_finite", "blocks", "differences", "entropy", "histogram", "perplexity", "top1"]

BLOCK_BYTES = 4 << 20  # one block of [rows, vocabulary] in fp32: its temporaries come back from the heap, warm


def blocks(rows: int, width: int) -> Iterator[slice]:
    """Slices of ``rows`` positions, each block of ``width`` fp32 values per position at most BLOCK_BYTES (one row
    at least)."""
    step = max(1, BLOCK_BYTES // max(width * 4, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def perplexity(logits: Any, ids: Any) -> float:
    """exp of the mean negative log-likelihood of each next token: ``logits[i]`` predicts ``ids[i + 1]``."""
    import torch

    scored, targets = logits[:-1], ids[1:].long()
    total = 0.0
    for rows in blocks(scored.shape[0], scored.shape[-1]):
        total += float(torch.nn.functional.cross_entropy(scored[rows].float(), targets[rows], reduction="sum"))
    return _exp(total / scored.shape[0]) if scored.shape[0] else math.nan


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def entropy(logits: Any) -> float:
    """Mean entropy, in nats, of the next-token distributions: log(vocabulary size) for a uniform guess."""
    total = 0.0
    for rows in blocks(logits.shape[0], logits.shape[-1]):
        logp = logits[rows].float().log_softmax(-1)
        total += float((logp.exp() * logp).nan_to_num().sum())  # a token of probability 0 adds 0
    return -total / logits.shape[0] if logits.shape[0] else math.nan


def differences(ref: Any, got: Any) -> tuple[float, float, float, float]:
    """(max |got - ref|, mean |got - ref|, mean over positions of KL(ref || got), share of positions whose argmax
    agree) of two [positions, vocabulary] logits; NaN anywhere in ``got`` makes the first two NaN."""
    import torch

    positions, vocab = ref.shape
    if not positions:
        return math.nan, math.nan, math.nan, math.nan
    largest, absolute, kl, agree = 0.0, 0.0, 0.0, 0
    for rows in blocks(positions, vocab):
        r, g = ref[rows], got[rows]
        diff = (g - r).abs_()
        block = float(diff.max())
        largest = block if math.isnan(block) or block > largest else largest  # once NaN, NaN
        absolute += float(diff.sum())
        kl += float(torch.nn.functional.kl_div(g.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="sum"))
        agree += int((top1(g) == top1(r)).sum())
    return largest, absolute / (positions * vocab), kl / positions, agree / positions


def histogram(pairs: list[tuple[Any, Any]], bins: int = 24) -> tuple[float, list[float]]:
    """(the largest finite |got - ref| over every (ref, got) pair, the counts of |got - ref| in ``bins`` equal bins
    from 0 to it); a NaN or inf difference is left out (the artifact fails on its other measures)."""
    import torch

    def finite_blocks() -> Iterator[Any]:
        for ref, got in pairs:
            for rows in blocks(ref.shape[0], ref.shape[-1]):
                diff = (got[rows] - ref[rows]).abs_()
                yield diff if bool(torch.isfinite(diff.max())) else diff[torch.isfinite(diff)]

    top = max((float(d.max()) for d in finite_blocks() if d.numel()), default=0.0) or 1e-12
    counts = [0.0] * bins
    for diff in finite_blocks():
        counts = [a + b for a, b in zip(counts, torch.histc(diff, bins=bins, min=0.0, max=top).tolist())]
    return top, counts


def top1(logits: Any) -> Any:
    """The index of each row's largest logit, the first of equal ones, a NaN counting as largest: argmax's answer, by
    torch.max over the last dimension (three times faster than argmax there on the CPU)."""
    return logits.max(-1).indices


def all_finite(logits: Any) -> bool:
    """No NaN and no inf in ``logits``."""
    import torch

    return all(bool(torch.isfinite(logits[rows]).all()) for rows in blocks(logits.shape[0], logits.shape[-1]))
