"""A batch's references in one layer-streamed pass (verify/references.py): each adapter's reference is what it gets
computed alone (compute_reference), and a run takes it only when it was made from exactly what the run asks."""

import json
import shutil

import pytest
import torch

from model_export.demo.tiny import build_adapter
from model_export.verify.reference import RunOptions, compute_reference
from model_export.verify.references import shared_path, shared_references, take_shared

PROMPTS = ["Hello", "Write a haiku about autumn."]


def take(folder, checkpoint, base):
    """compute_reference's ``shared`` as a run's verify step gives it."""
    return lambda asked: take_shared(folder, checkpoint, base, asked)


@pytest.fixture(scope="module")
def made(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    adapters = [
        build_adapter(tiny_base, root / "plain", seed=3),
        build_adapter(tiny_base, root / "dora", seed=4, target_modules=["k_proj", "down_proj"], use_dora=True),
        build_adapter(tiny_base, root / "saved", seed=5, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ]
    tokenizers = [tiny_base] * len(adapters)
    result = shared_references(tiny_base, adapters, tokenizers, PROMPTS, 5, RunOptions(), None, root / "references")
    return adapters, result, root / "references"


def test_each_shared_reference_is_the_reference_computed_alone(tiny_base, made):
    adapters, result, folder = made
    assert len(result["files"]) == 2  # the adapter with a tensor of its own is left to its run, with why
    assert list(result["left"]) == [str(adapters[2])] and "modules_to_save" in result["left"][str(adapters[2])]
    for adapter in adapters[:2]:
        alone = compute_reference(tiny_base, adapter, tiny_base, PROMPTS, 5)
        saved = torch.load(shared_path(folder, adapter), weights_only=True)["reference"]
        assert saved["greedy"] == alone.greedy
        for ours, theirs in zip(saved["logits"], alone.logits):
            assert float((ours - theirs).abs().max()) <= 1e-5
        assert float((saved["heldout_logits"] - alone.heldout_logits).abs().max()) <= 1e-5
        assert saved["heldout_perplexity"] == pytest.approx(alone.heldout_perplexity, rel=1e-5)
        assert saved["base_perplexity"] == pytest.approx(alone.base_perplexity, rel=1e-5)
        taken = compute_reference(tiny_base, adapter, tiny_base, PROMPTS, 5, shared=take(folder, adapter, tiny_base))
        assert taken.greedy == alone.greedy and torch.equal(taken.logits[0], saved["logits"][0])


def test_a_run_asking_otherwise_computes_its_own(tiny_base, made, tmp_path, caplog):
    """Other prompts, another number of new tokens or other adapter weights than the shared pass was made from: not
    taken (the run computes its own)."""
    adapters, _, folder = made
    caplog.set_level("INFO", logger="model_export")
    compute_reference(tiny_base, adapters[0], tiny_base, PROMPTS, 5, shared=take(folder, adapters[0], tiny_base))
    assert "Reference taken from the batch's shared pass" in caplog.text
    for prompts, new_tokens in ((["Hello"], 5), (PROMPTS, 3)):
        caplog.clear()
        compute_reference(
            tiny_base, adapters[0], tiny_base, prompts, new_tokens, shared=take(folder, adapters[0], tiny_base)
        )
        assert "Reference taken" not in caplog.text and "Reference streamed layer by layer" in caplog.text
    changed = tmp_path / "changed"
    shutil.copytree(adapters[0], changed)
    config = json.loads((changed / "adapter_config.json").read_text())
    (changed / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    shutil.copy(shared_path(folder, adapters[0]), shared_path(folder, changed))  # as if made for this path
    caplog.clear()
    compute_reference(tiny_base, changed, tiny_base, PROMPTS, 5, shared=take(folder, changed, tiny_base))
    assert "Reference taken" not in caplog.text


def test_fewer_than_two_adapters_share_nothing(tiny_base, made, tmp_path):
    adapters, _, _ = made
    result = shared_references(tiny_base, adapters[:1], [tiny_base], PROMPTS, 5, RunOptions(), None, tmp_path / "r")
    assert result == {"files": [], "left": {}} and not (tmp_path / "r").exists()
    assert take_shared(tmp_path / "r", adapters[0], tiny_base, None) is None


def test_references_scored_in_several_passes_are_the_same(tiny_base, made, tmp_path, monkeypatch):
    """Where the adapters' logits would not fit SCORE_BYTES in one scoring pass they are scored in several (here one
    adapter per pass): each reference is what the one pass made. The base alone on the held-out text is scored in the
    first pass only; the second takes its perplexity and entropy from it."""
    from model_export.runtimes import streamed
    from model_export.verify import references

    adapters, _, folder = made
    monkeypatch.setattr(references, "SCORE_BYTES", 1)
    passes, owners = [], []
    score, score_streamed = references._score, streamed.score_streamed
    monkeypatch.setattr(references, "_score", lambda model, group, *a: passes.append(group) or score(model, group, *a))
    monkeypatch.setattr(
        streamed, "score_streamed", lambda m, s, o, **k: owners.append(o) or score_streamed(m, s, o, **k)
    )
    tokenizers = [tiny_base] * 2
    result = shared_references(tiny_base, adapters[:2], tokenizers, PROMPTS, 5, RunOptions(), None, tmp_path / "r")
    assert passes == [[0], [1]] and len(result["files"]) == 2
    assert [-1 in o for o in owners] == [True, False]
    for adapter in adapters[:2]:
        split = torch.load(shared_path(tmp_path / "r", adapter), weights_only=True)["reference"]
        whole = torch.load(shared_path(folder, adapter), weights_only=True)["reference"]
        assert split["greedy"] == whole["greedy"]
        assert split["base_perplexity"] == pytest.approx(whole["base_perplexity"], rel=1e-5)
        assert split["base_entropy"] == pytest.approx(whole["base_entropy"], rel=1e-5)
        for a, b in zip(split["logits"] + [split["heldout_logits"]], whole["logits"] + [whole["heldout_logits"]]):
            assert float((a - b).abs().max()) <= 1e-5


def test_a_pass_of_one_adapter_s_sequences_gives_what_it_gives_alone(tiny_base, tmp_path, monkeypatch):
    """In a batch the base's held-out logits come from base/ and each scoring pass holds one adapter's sequences (the
    logits of several would pass SCORE_BYTES at a real shape): every position of such a pass is that adapter's, and
    its reference is still the one computed alone."""
    from transformers import AutoTokenizer

    from model_export.verify import references
    from model_export.verify.reference import _max_positions, base_heldout_logits, heldout_ids

    monkeypatch.setattr(references, "SCORE_BYTES", 1)
    adapters = [build_adapter(tiny_base, tmp_path / f"a{k}", seed=7 + k) for k in range(2)]
    limit = min(RunOptions().max_length, _max_positions(tiny_base))
    held = tmp_path / "base-heldout.pt"
    base_heldout_logits(tiny_base, heldout_ids(AutoTokenizer.from_pretrained(str(tiny_base)), limit), save_to=held)
    made = shared_references(tiny_base, adapters, [tiny_base] * 2, PROMPTS, 5, RunOptions(), held, tmp_path / "refs")
    assert len(made["files"]) == 2
    for adapter in adapters:
        alone = compute_reference(tiny_base, adapter, tiny_base, PROMPTS, 5)
        saved = torch.load(shared_path(tmp_path / "refs", adapter), weights_only=True)["reference"]
        assert saved["greedy"] == alone.greedy
        for ours, theirs in zip([*saved["logits"], saved["heldout_logits"]], [*alone.logits, alone.heldout_logits]):
            assert float((ours - theirs).abs().max()) <= 1e-5


def test_the_pass_keeps_the_base_alone_on_the_base_s_held_out_ids(tiny_base, tmp_path, monkeypatch):
    """Given the base's held-out ids and no file holding them, the pass scores the base alone on them once (with the
    adapters' sequences) and saves it where the batch's verify:heldout finds it: what the base alone gives there."""
    from transformers import AutoTokenizer

    from model_export.runtimes import streamed
    from model_export.verify.reference import _max_positions, _shared_base_logits, base_heldout_logits, heldout_ids

    adapters = [build_adapter(tiny_base, tmp_path / f"a{k}", seed=11 + k) for k in range(2)]
    limit = min(RunOptions().max_length, _max_positions(tiny_base))
    ids = heldout_ids(AutoTokenizer.from_pretrained(str(tiny_base)), limit)
    owners, score_streamed = [], streamed.score_streamed
    monkeypatch.setattr(
        streamed, "score_streamed", lambda m, s, o, **k: owners.append(o) or score_streamed(m, s, o, **k)
    )
    held = tmp_path / "base" / "base-heldout.pt"
    made = shared_references(
        tiny_base, adapters, [tiny_base] * 2, PROMPTS, 5, RunOptions(), held, tmp_path / "refs", base_ids=ids
    )
    assert len(made["files"]) == 2 and sum(o.count(-1) for o in owners) == 1
    monkeypatch.setattr(streamed, "score_streamed", score_streamed)
    kept = _shared_base_logits(held, ids)
    assert kept is not None and float((kept - base_heldout_logits(tiny_base, ids)).abs().max()) <= 1e-5
    monkeypatch.setattr(
        streamed, "score_streamed", lambda m, s, o, **k: owners.append(o) or score_streamed(m, s, o, **k)
    )
    owners.clear()  # made already: read, not scored again
    shared_references(
        tiny_base, adapters, [tiny_base] * 2, PROMPTS, 5, RunOptions(), held, tmp_path / "r2", base_ids=ids
    )
    assert sum(o.count(-1) for o in owners) == 0


def test_a_run_keeps_a_taken_reference_as_a_link_to_the_batch_s_file_or_a_copy(made, tmp_path, monkeypatch):
    """The run's cache of a reference taken from the batch is that file, hard-linked; where the link cannot be made
    (another filesystem), a copy; load_reference reads both as the reference."""
    import os

    from model_export.verify.references import load_reference
    from model_export.verify.step import _keep

    adapters, _, folder = made
    shared = shared_path(folder, adapters[0])
    reference = load_reference(shared)
    reference.kept_in = shared
    _keep(reference, tmp_path / "linked")
    assert os.path.samefile(tmp_path / "linked", shared)

    def no_link(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    _keep(reference, tmp_path / "copied")
    assert not os.path.samefile(tmp_path / "copied", shared)
    copied = load_reference(tmp_path / "copied")
    assert copied.greedy == reference.greedy and torch.equal(copied.logits[0], reference.logits[0])
