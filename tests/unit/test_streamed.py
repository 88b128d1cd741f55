"""The layer-streamed forward pass computes what PEFT's unmerged model computes (issue 16): logits within 1e-5 in fp32
and the same greedy tokens, on tiny models of each architecture and each adapter variant the merge supports."""

from pathlib import Path

import pytest
import torch

from model_export.demo.tiny import build_adapter, save_as_trained
from model_export.merging.streamed import StreamedModel, streamable

IDS = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 17]])


def peft_reference(base, adapter, resize=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if resize:
        model.resize_token_embeddings(resize)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def assert_same(reference, streamed, ids=IDS, new_tokens=6):
    with torch.no_grad():
        expected, got = reference(ids).logits, streamed(ids).logits
        assert expected.shape == got.shape
        assert float((expected - got).abs().max()) <= 1e-5
        settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert reference.generate(ids, **settings).tolist() == streamed.generate(ids, **settings).tolist()


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True, "lora_alpha": 16},
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "use_dora": True},
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
        {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32}},
        {"target_modules": ["q_proj", "lm_head"]},
    ],
    ids=["plain", "rslora", "dora", "embeddings-and-modules-to-save", "patterns", "lora-on-tied-head"],
)
def test_streamed_agrees_with_peft_on_each_adapter_variant(tiny_base, tmp_path, lora):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", **lora)
    streamed = StreamedModel(tiny_base, adapter)
    try:
        assert_same(peft_reference(tiny_base, adapter), streamed)
    finally:
        streamed.close()


def test_streamed_agrees_on_an_untied_base_with_added_tokens(untied_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_base))
    model.resize_token_embeddings(400)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    save_as_trained(peft_model, tmp_path / "adapter", str(untied_base))
    streamed = StreamedModel(untied_base, tmp_path / "adapter")
    assert_same(
        peft_reference(untied_base, tmp_path / "adapter", resize=400), streamed, ids=torch.tensor([[1, 2, 390, 399, 5]])
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_streamed_agrees_on_each_architecture(tiny_base, tmp_path, arch):
    import shutil

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from tests.conftest import spread_model

    shape = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=arch != "mistral",
    )
    config = {
        "qwen2": Qwen2Config(architectures=["Qwen2ForCausalLM"], **shape),
        "llama": LlamaConfig(architectures=["LlamaForCausalLM"], **shape),
        "mistral": MistralConfig(architectures=["MistralForCausalLM"], **shape),
    }[arch]
    base = spread_model(tmp_path / arch, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_base / name, base / name)
    adapter = build_adapter(base, tmp_path / "adapter")
    assert_same(peft_reference(base, adapter), StreamedModel(base, adapter))


def test_the_base_alone_streams_as_transformers_runs_it(tiny_base):
    from transformers import AutoModelForCausalLM

    assert_same(
        AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval(), StreamedModel(tiny_base)
    )


def test_what_it_does_not_cover_is_named(tiny_base, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert "GPT2LMHeadModel" in streamable(tmp_path)
    assert "fan_in_fan_out" in streamable(tiny_base, {"fan_in_fan_out": True})
    assert streamable(tiny_base, {"use_dora": True}) is None


@pytest.mark.parametrize("bits", [8, 4])
def test_compressed_tensors_artifacts_stream_as_transformers_decompresses_them(tiny_base, tmp_path, bits):
    """The int8/int4 safetensors artifact runs layer by layer, each layer unpacked by compressed-tensors itself: the
    logits and greedy tokens transformers computes after decompressing the whole model."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from model_export.exporters.safetensors_quant import export_quantized_safetensors
    from model_export.runtimes import runtime_for

    export_quantized_safetensors(tiny_base, tmp_path / "q", bits=bits, max_shard_size=60_000)
    assert streamable(tmp_path / "q") is None
    assert runtime_for(tmp_path / "q", streamed=True).name == "transformers (layer-streamed)"
    whole = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32).eval()
    assert_same(whole, StreamedModel(tmp_path / "q"))


def test_other_quantizations_are_not_streamed(tiny_base, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_base, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert "gptq" in streamable(tmp_path / "m")


def _passes(streamed):
    """A counter of the forward passes a StreamedModel makes (each runs decoder layer 0 once)."""
    count = [0]
    streamed.model.model.layers[0].register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    return count


SEQUENCES = [
    torch.tensor([1, 5, 9, 22]),
    torch.tensor([3, 17, 40, 7, 7, 2, 11]),
    torch.tensor([9]),
    torch.tensor([9, 9]),
]


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "use_dora": True},
        {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
    ],
    ids=["plain", "dora", "embeddings-and-head"],
)
def test_packed_scoring_is_each_sequence_alone_in_one_pass(tiny_base, tmp_path, lora):
    """Every sequence packed in one pass (no padding between them) gets the logits PEFT's model gives it alone; the
    ones asked for without the adapter get what PEFT's disable_adapter gives, in the same pass."""
    from model_export.runtimes.streamed import score_streamed

    adapter = build_adapter(tiny_base, tmp_path / "adapter", **lora)
    reference, streamed = peft_reference(tiny_base, adapter), StreamedModel(tiny_base, adapter)
    passes = _passes(streamed)
    got = score_streamed(streamed, SEQUENCES + SEQUENCES[:2], [0, 0, 0, 0, -1, -1])
    assert passes[0] == 1
    with torch.no_grad():
        for ids, logits in zip(SEQUENCES, got[:4]):
            assert float((reference(ids[None]).logits[0] - logits).abs().max()) <= 1e-5
        with reference.disable_adapter():
            for ids, logits in zip(SEQUENCES[:2], got[4:]):
                base = reference(ids[None]).logits[0]
                assert float((base - logits).abs().max()) <= 1e-5
    assert float((got[0] - got[4]).abs().max()) > 1e-4  # the adapter changes something, so the check above bites
    streamed.close()


def test_rows_hold_at_most_the_pack_size(tiny_base, tmp_path, monkeypatch):
    from model_export.runtimes import streamed as module

    monkeypatch.setattr(module, "PACK_TOKENS", 8)
    assert module.pack([4, 7, 1, 2, 9, 3]) == [[0], [1, 2], [3], [4], [5]]
    adapter = build_adapter(tiny_base, tmp_path / "adapter")
    reference, streamed = peft_reference(tiny_base, adapter), StreamedModel(tiny_base, adapter)
    got = module.score_streamed(streamed, SEQUENCES)
    with torch.no_grad():
        for ids, logits in zip(SEQUENCES, got):
            assert float((reference(ids[None]).logits[0] - logits).abs().max()) <= 1e-5
    streamed.close()


def _reads(streamed):
    """A counter of the decoder layers a StreamedModel reads from its files."""
    count = [0]
    read = streamed._read_layer

    def counted(*args):
        count[0] += 1
        return read(*args)

    streamed._read_layer = counted
    return count


@pytest.mark.parametrize("budget", ["one layer", "everything"])
def test_resident_layers_give_identical_results_with_fewer_reads(tiny_base, tmp_path, budget):
    """max_memory keeps widened layers between passes: greedy decoding and scoring give bit for bit what reading
    every layer on every pass gives, and the layers kept are read once."""
    from model_export.runtimes.streamed import greedy_lockstep, score_streamed

    adapter = build_adapter(tiny_base, tmp_path / "adapter")
    layers = StreamedModel(tiny_base, adapter)
    one = sum(p.numel() * 4 for p in layers.model.model.layers[0].parameters())
    layers.close()
    limit = {"one layer": one, "everything": 1 << 30}[budget]
    results, reads = {}, {}
    for name, max_memory in (("streamed", 0), ("resident", limit)):
        model = StreamedModel(tiny_base, adapter, max_memory=max_memory)
        count = _reads(model)
        tokens = greedy_lockstep(model, SEQUENCES[:2], 6, set())
        logits = score_streamed(model, SEQUENCES)
        results[name], reads[name] = (tokens, logits), count[0]
        kept = len(model.resident)
        model.close()
    assert results["streamed"][0] == results["resident"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["streamed"][1], results["resident"][1]))
    total = layers.config.num_hidden_layers
    assert kept == (1 if budget == "one layer" else total)
    passes = reads["streamed"] // total  # 6 decoding passes and the scoring pass
    assert passes == 7
    # the layers kept are read once, the others on every pass (the read ahead of a next pass that never comes is
    # not made when no layer is left to read)
    saved = reads["streamed"] - kept * (passes - 1)
    assert saved - 1 <= reads["resident"] <= saved


def test_layers_not_kept_are_widened_into_two_buffers_in_turn(tiny_base, tmp_path):
    """With nothing resident every layer is read on every pass, into one of two fp32 buffers kept for the model's life,
    in turn (one computes while the reader thread fills the other), not into new memory each time; the results are
    PEFT's (checked above and in the resident test, which streams the same way)."""
    from model_export.runtimes.streamed import greedy_lockstep

    model = StreamedModel(tiny_base, build_adapter(tiny_base, tmp_path / "adapter"), max_memory=0)
    where, read = [], model._read_layer

    def recorded(index, reader, buffers):
        weights = read(index, reader, buffers)
        where.append(weights["self_attn.q_proj.weight"].data_ptr())
        return weights

    model._read_layer = recorded
    greedy_lockstep(model, SEQUENCES[:2], 4, set())
    model.close()
    assert len(where) >= 4 * model.config.num_hidden_layers
    assert len(set(where)) == 2
    assert all(a != b for a, b in zip(where, where[1:]))


def test_a_head_read_in_blocks_gives_what_peft_gives(tiny_base, tmp_path, monkeypatch):
    """A head not kept resident is multiplied in blocks of rows, the next block widened by the reader thread into the
    second of two buffers while one multiplies: with blocks of 7 rows (the last one short) the logits are PEFT's, for a
    tied head and for a head with a LoRA of its own, bit for bit those of the head multiplied whole."""
    from model_export.merging import streamed

    variants = [{}, {"target_modules": ["q_proj", "lm_head"]}]
    for k, lora in enumerate(variants):
        adapter = build_adapter(tiny_base, tmp_path / f"a{k}", **lora)
        whole = StreamedModel(tiny_base, adapter, max_memory=1 << 30)
        with torch.no_grad():
            expected = whole(IDS).logits
        whole.close()
        width = whole.model.lm_head.planned.shape[1]
        monkeypatch.setattr(streamed, "HEAD_BLOCK_BYTES", 4 * width * 7)
        model = StreamedModel(tiny_base, adapter, max_memory=0)
        assert model.model.lm_head.planned.shape[0] % 7 != 0  # a short last block
        assert_same(peft_reference(tiny_base, adapter), model)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, expected)
        assert len(model.model.lm_head.blocks) == 2
        model.close()
        monkeypatch.undo()


def _resident_kb(address):
    """kB resident of the mapping that starts at ``address``, from /proc/self/smaps (None when there is none)."""
    inside, resident = False, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = int(fields[0].split("-")[0], 16) == address
            resident = 0 if inside else resident
        elif inside and fields[:1] == ["Rss:"]:
            resident += int(fields[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_a_pass_leaves_none_of_the_base_s_pages_resident(tiny_base):
    """Layers are widened straight from a mapping of the base's file, and its pages are released after each read: once
    a pass is over, the model's mappings of the file (its reader's and its reader thread's) hold none of it resident."""
    import numpy as np

    model = StreamedModel(tiny_base)
    with torch.no_grad():
        model(IDS)
    mappings = [m for reader in (model.reader, model._ahead_reader) for m in reader._mappings.values() if m is not None]
    resident = [_resident_kb(np.frombuffer(m, dtype=np.uint8).ctypes.data) for m in mappings]
    model.close()
    assert len(mappings) == 2  # the one file, mapped by each reader
    assert resident == [0, 0]


def test_a_tensor_past_the_end_of_its_file_is_named(tmp_path):
    """A tensor whose bytes the file no longer holds (the file changed after its header was read) is reported as
    read_bytes reports it, not read past the mapping."""
    from types import SimpleNamespace

    from model_export.merging.reader import TensorReader
    from model_export.tensor_io import SafetensorsFormatError, TensorInfo

    path = tmp_path / "short.safetensors"
    path.write_bytes(bytes(4096))
    info = TensorInfo("w", "BF16", (4, 1024), 0, 8192)
    reader = TensorReader()
    with pytest.raises(SafetensorsFormatError, match="'w': the file ended before its data did"):
        reader.into(SimpleNamespace(source=info, source_file=path, shape=info.shape), torch.empty(4, 1024))
    reader.close()


def test_several_adapters_share_one_pass(tiny_base, tmp_path, monkeypatch):
    """A StreamedModel of several adapters on one base (a batch's references): each sequence scored with the adapter
    its number names, or the base alone (-1), gets what PEFT's model of that adapter gives it alone, in one pass (each
    layer read once for all of them); decoded together, each input gets that adapter's own greedy tokens. The adapters
    differ in kind: plain; DoRA; rsLoRA of another rank on other modules. Where only plain ones share a layer (q_proj)
    their updates are made in one stacked pair of products (merging.unmerged.stacked), in the scoring pass and in each
    decoding step; elsewhere each adapter's positions are changed on their own."""
    from model_export.merging import unmerged
    from model_export.runtimes.streamed import greedy_lockstep, score_streamed

    together, stacked = [], unmerged.stacked
    monkeypatch.setattr(unmerged, "stacked", lambda *a: together.append(stacked(*a)) or together[-1])

    variants = [
        {},
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "use_dora": True},
        {"target_modules": ["q_proj", "down_proj"], "use_rslora": True, "r": 2},
    ]
    adapters = [build_adapter(tiny_base, tmp_path / f"a{k}", seed=k + 3, **v) for k, v in enumerate(variants)]
    shared = StreamedModel(tiny_base, adapters)
    passes, reads = _passes(shared), _reads(shared)
    sequences = [s for s in SEQUENCES[:3] for _ in range(3)] + SEQUENCES[:1]
    numbers = [0, 1, 2] * 3 + [-1]
    got = score_streamed(shared, sequences, numbers)
    assert passes[0] == 1 and reads[0] <= shared.config.num_hidden_layers + 1  # + the next pass's first, read ahead
    inputs = [SEQUENCES[1], SEQUENCES[0], SEQUENCES[1], SEQUENCES[3]]
    decoded = greedy_lockstep(shared, inputs, 6, set(), adapters=[0, 1, 2, 2])
    assert shared._stacked
    score_streamed(shared, sequences[:1], [0])  # the next pass lets the decoding's stacked matrices go
    assert not shared._stacked
    shared.close()
    with torch.no_grad():
        for k, adapter in enumerate(adapters):
            reference = peft_reference(tiny_base, adapter)
            for ids, number, logits in zip(sequences, numbers, got):
                if number == k:
                    assert float((reference(ids[None]).logits[0] - logits).abs().max()) <= 1e-5, (k, ids)
            for ids, number, tokens in zip(inputs, [0, 1, 2, 2], decoded):
                if number == k:
                    alone = reference.generate(ids[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
                    assert alone[0, ids.numel() :].tolist() == tokens, (k, ids)
            if k == 0:
                with reference.disable_adapter():
                    base = reference(sequences[-1][None]).logits[0]
                assert float((base - got[-1]).abs().max()) <= 1e-5
    assert float((got[0] - got[1]).abs().max()) > 1e-4  # the adapters differ, so the checks above bite
    made = [t for t in together if t is not None]
    assert made and len(made) < len(together)  # the stacked form was taken on q_proj, not where DoRA runs beside it


def test_adapters_with_tensors_of_their_own_do_not_share_a_pass(tiny_base, tmp_path):
    """An adapter that saves whole tensors in place of the base's (modules_to_save) or unties the head cannot run on
    the base's own layers beside others: refused, and named so by shares_base."""
    from model_export.checkpoint.adapter_format import read_adapter_config
    from model_export.checkpoint.base_model import inspect_base_model
    from model_export.merging.plan import adapter_plan, make_plan
    from model_export.merging.streamed import shares_base

    plain = build_adapter(tiny_base, tmp_path / "plain")
    saved = build_adapter(tiny_base, tmp_path / "saved", target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = build_adapter(tiny_base, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    info = inspect_base_model(str(tiny_base))
    base = make_plan({}, {}, {}, info, "fp32", False)

    def plan(path):
        return adapter_plan(path, read_adapter_config(path), info, "fp32", False)[0]

    assert shares_base(plan(plain), base)
    assert not shares_base(plan(saved), base) and not shares_base(plan(head), base)
    with pytest.raises(ValueError, match="shares_base"):
        StreamedModel(tiny_base, [plain, saved])
