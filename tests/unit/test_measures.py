"""verify/measures.py takes its measures a block of positions at a time: each must equal the same measure taken by
torch on the whole tensor (torch.distributions, cross_entropy, kl_div, argmax), whatever the block size."""

import math

import pytest
import torch

from model_export.verify import measures


@pytest.fixture(params=[1, 3, 1000], ids=["row", "rows", "whole"])
def block_rows(request, monkeypatch):
    """Blocks of one row, of three (the last one short), and one block for everything."""
    monkeypatch.setattr(measures, "BLOCK_BYTES", request.param * 50 * 4)
    return request.param


def _logits(rows=11, vocab=50, seed=0):
    torch.manual_seed(seed)
    return torch.randn(rows, vocab) * 3


def test_blocks_cover_every_row_once_in_order(block_rows):
    covered = [i for rows in measures.blocks(11, 50) for i in range(11)[rows]]
    assert covered == list(range(11))
    assert max(s.stop - s.start for s in measures.blocks(11, 50)) == min(block_rows, 11)


def test_entropy_and_perplexity_equal_torch_s_on_the_whole_tensor(block_rows):
    logits, ids = _logits(), torch.randint(0, 50, (11,))
    logits[2, :40] = float("-inf")  # tokens of probability 0 add nothing to the entropy
    whole = torch.distributions.Categorical(logits=logits).entropy().mean()
    assert measures.entropy(logits) == pytest.approx(float(whole), rel=1e-6)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    assert measures.perplexity(logits, ids) == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_differences_equal_the_whole_tensor_s(block_rows):
    ref = _logits()
    got = ref + 0.05 * torch.randn_like(ref)
    got[4] = ref[4].flip(0)  # one position whose top-1 differs
    largest, mean, kl, top1 = measures.differences(ref, got)
    diff = (got - ref).abs()
    whole_kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert largest == float(diff.max()) and mean == pytest.approx(float(diff.mean()), rel=1e-6)
    assert kl == pytest.approx(float(whole_kl.sum(-1).mean()), rel=1e-5)
    assert top1 == pytest.approx(float((got.argmax(-1) == ref.argmax(-1)).double().mean())) and top1 == 10 / 11


def test_a_nan_makes_the_differences_nan_and_counts_as_the_largest_logit(block_rows):
    ref = _logits()
    got = ref.clone()
    got[7, 9] = float("nan")
    largest, mean, _, top1 = measures.differences(ref, got)
    assert math.isnan(largest) and math.isnan(mean)
    assert top1 == pytest.approx(float((got.argmax(-1) == ref.argmax(-1)).double().mean())) and top1 == 10 / 11
    assert not measures.all_finite(got) and measures.all_finite(ref)
    got[7, 9] = float("inf")
    assert not measures.all_finite(got)


def test_top1_is_argmax_with_ties_and_nan():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, float("nan"), 5.0, float("nan")], [0.0, 0.0, 0.0, 0.0]])
    assert measures.top1(logits).tolist() == logits.argmax(-1).tolist() == [1, 1, 0]
