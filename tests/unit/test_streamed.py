"""The layer-streamed forward pass computes what PEFT's unmerged model computes (issue 16): logits within 1e-5 in fp32
and the same greedy tokens, on tiny models of each architecture and each adapter variant the merge supports."""

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


@pytest.mark.parametrize("guess", ["none", "right", "wrong", "half"])
def test_drafted_decoding_keeps_the_models_own_greedy_tokens(tiny_base, tmp_path, guess):
    """A draft of each continuation (verification passes the reference's) changes how many passes decoding takes,
    never the tokens: each continuation is the one PEFT's model generates alone, and with a right draft one pass gives
    every prompt's logits and continuation."""
    from model_export.runtimes.hf import greedy
    from model_export.runtimes.streamed import run_streamed

    adapter = build_adapter(tiny_base, tmp_path / "adapter")
    reference, streamed = peft_reference(tiny_base, adapter), StreamedModel(tiny_base, adapter)
    inputs = [(torch.tensor([1, 5, 9, 22]), 8), (torch.tensor([3, 17, 40, 7, 7, 2, 11]), 8), (torch.tensor([9, 9]), 5)]
    inputs.append((torch.tensor([4, 8, 15, 16, 23, 42, 4, 8]), 0))  # scored only, like the held-out text
    expected = [greedy(reference, ids, count) for ids, count in inputs]
    drafts = {
        "none": None,
        "right": expected,
        "wrong": [[(t + 1) % 100 for t in tokens] for tokens in expected],
        "half": [tokens[: len(tokens) // 2] + [0] * 8 for tokens in expected],
    }[guess]
    passes = _passes(streamed)
    got = run_streamed(streamed, inputs, batch_size=1, drafts=drafts)
    for (ids, _), want, (logits, tokens) in zip(inputs, expected, got):
        assert tokens == want
        with torch.no_grad():
            assert float((reference(ids[None]).logits[0] - logits).abs().max()) <= 1e-5
    if guess == "right":
        assert passes[0] == 2  # prompts and continuations in one pass, the scored text in another
    else:
        assert passes[0] <= 1 + 8 + 1  # never more than a pass per token (the first from the prompt pass), + scoring
