"""Each artifact is judged in one pass over the reference's own tokens (teacher-forced, issue 28). Where the artifact
agrees with the reference, that is exactly what a free-running generation would have judged: the same tokens, the same
logits at every position, so the same metrics."""

import pytest
import torch

from model_export.verify.artifacts import verify_artifact
from model_export.verify.judge import along, compare
from model_export.verify.reference import RunOptions, compute_reference


@pytest.fixture(scope="module")
def merged(tiny_base, adapter, tmp_path_factory):
    """PEFT's own merge of the adapter, in fp32: an artifact that agrees with the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("merged")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_base)).save_pretrained(out)
    return out


def free_running(folder, reference, new_tokens):
    """The metrics as a free-running judge computes them: the artifact generates on its own from each prompt (its
    logits at every prompt position and at each step it decoded), compared with the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    logits, tokens = [], []
    for ids in reference.input_ids:
        with torch.no_grad():
            prompt = model(ids[None]).logits[0]
            out = model.generate(
                ids[None],
                attention_mask=torch.ones_like(ids[None]),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        generated = out.sequences[0, ids.numel() :].tolist()
        steps = [step[0] for step in out.logits[1 : len(generated)]]  # the first step's are the prompt's last
        logits.append(torch.cat([prompt, *[s[None] for s in steps]]) if steps else prompt)
        tokens.append(generated)
    return compare(reference, logits, tokens), tokens


@pytest.mark.parametrize("runtime", ["streamed", "transformers"])
def test_teacher_forced_metrics_equal_free_running_ones_where_the_artifact_agrees(tiny_base, adapter, merged, runtime):
    prompts = ["Hello", "简单测试", "Tell me one line."]
    reference = compute_reference(tiny_base, adapter, tiny_base, prompts, 6, options=RunOptions(runtime=runtime))
    verdict = verify_artifact(merged, reference, options=RunOptions(runtime=runtime))
    free, tokens = free_running(merged, reference, 6)
    assert tokens == reference.greedy  # the artifact agrees: free-running, it generates the reference's tokens
    assert verdict.passed and verdict.outputs["greedy"] == reference.greedy
    for ours, theirs in zip(verdict.samples, free):
        assert ours.greedy_agreement == theirs.greedy_agreement == 1.0
        assert ours.top1_agreement == theirs.top1_agreement == 1.0
        assert abs(ours.kl - theirs.kl) <= 1e-7 and abs(ours.max_abs_diff - theirs.max_abs_diff) <= 1e-5
    # every position was judged: the prompt and every greedy token but the last
    for ids, tokens, logits in zip(reference.input_ids, reference.greedy, verdict.outputs["logits"]):
        assert logits.shape[0] == ids.numel() + len(tokens) - 1


def test_greedy_agreement_stops_at_the_first_different_choice():
    want = [5, 6, 7, 8]
    assert along(2, want, [0, 0, 5, 6, 7, 8]) == [5, 6, 7, 8]
    assert along(2, want, [0, 0, 5, 9, 7, 8]) == [5, 9]  # after a different choice the artifact goes its own way
    assert along(0, want, [1, 6, 7, 8]) == [1]


def test_max_memory_keeps_the_references_layers_and_changes_nothing_else(tiny_base, adapter, caplog):
    """max_memory: 0 reads every layer on every pass; a budget that holds the model keeps every layer (and the head)
    resident, which the log says; the reference is bit for bit the same."""
    results = {}
    for budget in (0, "1GiB"):
        caplog.clear()
        with caplog.at_level("INFO", logger="model_export"):
            options = RunOptions(runtime="streamed", max_memory=budget)
            prompts = ["Hello", "简单测试"]
            results[budget] = compute_reference(tiny_base, adapter, tiny_base, prompts, 6, options=options)
        kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reference: ")]
        assert kept, caplog.text
        expected = "Reference: 0 of 2" if budget == 0 else "Reference: 2 of 2 decoder layers and the head"
        assert kept[0].startswith(expected)
    zero, resident = results[0], results["1GiB"]
    assert zero.greedy == resident.greedy
    assert all(torch.equal(a, b) for a, b in zip(zero.logits, resident.logits))
    assert zero.heldout_perplexity == resident.heldout_perplexity and zero.base_perplexity == resident.base_perplexity


def test_max_memory_takes_auto_a_size_or_zero():
    from model_export import ConfigError, ExportConfiguration

    assert ExportConfiguration(max_memory="auto").max_memory == "auto"
    assert ExportConfiguration(max_memory="6GiB").max_memory == "6GiB"
    assert ExportConfiguration(max_memory=0).max_memory == 0
    for wrong in ("lots", -1):
        with pytest.raises(ConfigError) as err:
            ExportConfiguration(max_memory=wrong)
        assert "max_memory" in str(err.value)


def test_the_difference_histogram_counts_what_numpy_counts_and_leaves_out_what_is_not_finite():
    """The report's histogram of |artifact - reference| over every position and token: numpy's histogram of the same
    differences (bins from 0 to the largest); an artifact with NaN or inf logits is plotted on its finite ones."""
    import numpy as np

    from model_export.verify.judge import logit_histogram
    from model_export.verify.reference import Reference

    torch.manual_seed(0)
    ref = [torch.randn(5, 50), torch.randn(7, 50)]
    reference = Reference(["a"], [torch.zeros(3, dtype=torch.long)], ref[:1], [[1]], ref[1], 1.0, "cpu", "full")
    reference.heldout_logits = ref[1]
    got = [r + 0.1 * torch.randn_like(r) for r in ref]
    diffs = np.concatenate([(g - r).abs().numpy().ravel() for g, r in zip(got, ref)])
    expected, edges = np.histogram(diffs, bins=24, range=(0.0, float(diffs.max())))
    histogram = logit_histogram(reference, got[:1], got[1])
    assert histogram["counts"] == expected.tolist() and histogram["edges"] == pytest.approx(edges.tolist())
    got[1][2, 3], got[0][0, 0] = float("nan"), float("inf")
    finite = np.delete(diffs, [0, 5 * 50 + 2 * 50 + 3])
    expected, _ = np.histogram(finite, bins=24, range=(0.0, float(finite.max())))
    assert logit_histogram(reference, got[:1], got[1])["counts"] == expected.tolist()
