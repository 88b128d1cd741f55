"""Calibration data and the importance matrix: files read as the guide's users write them, problems named by file and
line before anything is written, the imatrix against transformers' own forward pass and in llama.cpp's file format."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from model_export.errors import ConfigError
from model_export.pipeline.validate import validate_config
from model_export.quantize.calibration import calibration_problems, calibration_samples

TEXT = (
    "The export tool reads a checkpoint, merges the adapter and writes the model. "
    "Every artifact is verified against the reference before it is trusted.\n"
) * 6


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(str(tiny_base))


def test_a_text_file_is_cut_into_samples_of_the_asked_length(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    found = calibration_samples(path, tokenizer, samples=3, length=16)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert found.kind == "text" and found.samples == [ids[0:16], ids[16:32], ids[32:48]]


def test_jsonl_text_records_are_separate_documents(tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": line}) for line in TEXT.splitlines()), encoding="utf-8")
    found = calibration_samples(path, tokenizer, samples=100, length=8)
    first = tokenizer(TEXT.splitlines()[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert found.kind == "jsonl text" and sum(found.samples, [])[: len(first)] == first
    assert all(len(s) == 8 for s in found.samples) and found.tokens == 8 * len(found.samples)


def test_chat_records_go_through_the_models_chat_template(tokenizer, tmp_path):
    assert tokenizer.chat_template, "the tiny tokenizer carries Qwen's ChatML template"
    messages = [{"role": "user", "content": "Export the model."}, {"role": "assistant", "content": "Done."}]
    path = tmp_path / "chat.jsonl"
    path.write_text((json.dumps({"messages": messages}) + "\n") * 4, encoding="utf-8")
    found = calibration_samples(path, tokenizer, samples=2, length=12)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>" in rendered
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert found.kind == "jsonl chat" and sum(found.samples, [])[:12] == (expected * 2)[:12]


@pytest.mark.parametrize(
    "content, line, detail",
    [
        ('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', 3, "not JSON"),
        ('{"text": "fine"}\n\n{"prompt": "no text"}\n', 3, "neither a 'text' nor a 'messages' field"),
        ('{"messages": [{"role": "user", "content": 5}]}\n', 1, "'content' is not text"),
        ('{"text": "   "}\n', 1, "empty text"),
        ('["a list"]\n', 1, "not a JSON object"),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_number(tmp_path, content, line, detail):
    path = tmp_path / "calib.jsonl"
    path.write_text(content, encoding="utf-8")
    problems = validate_config({"checkpoint_path": str(tmp_path), "calibration_data": str(path)})
    found = [p for p in problems if p.key == "calibration_data"]
    assert len(found) == 1 and f"{path}:{line} " in found[0].message() and detail in found[0].message()
    assert "JSON Lines" in found[0].fix()


def test_other_file_problems(tmp_path):
    binary = tmp_path / "calib.txt"
    binary.write_bytes(b"first line\nsecond \xff line\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', encoding="utf-8")
    assert "calib.txt:2 cannot be used: not UTF-8" in calibration_problems(binary)[0].message()
    assert "the file is empty" in calibration_problems(empty)[0].message()
    assert "both 'text' and 'messages'" in calibration_problems(mixed)[0].message()
    assert calibration_problems(tmp_path / "missing.txt")[0].kind == "calibration_missing"


def test_too_little_text_for_one_sample_is_a_configuration_error(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short.", encoding="utf-8")
    with pytest.raises(ConfigError, match="fewer than one sample of 256") as caught:
        calibration_samples(path, tokenizer, samples=4, length=256)
    assert "calibration_sequence_length" in str(caught.value)


def test_chat_records_without_a_template_are_refused(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        calibration_samples(path, plain, samples=1, length=4)


def test_imatrix_equals_the_squared_inputs_transformers_computes(tiny_base, tmp_path):
    """Per linear layer, the sum of squared inputs of each column over the calibration tokens: the layer-streamed
    collection against hooks on transformers' whole model, and the file read back as llama-quantize reads it."""
    gguf = pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    from model_export.quantize.gguf_types import read_importance
    from model_export.quantize.imatrix import collect_imatrix, write_imatrix

    samples = [[(7 * i + 3 * j) % 300 + 5 for j in range(24)] for i in range(5)]
    ours = collect_imatrix(tiny_base, samples)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    expected, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):

            def record(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                expected[name] = expected.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(torch.tensor(samples))
    gguf_names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    assert len(ours) == len(expected) == 14
    for name, sums in expected.items():
        layer, module = name.split(".")[2], ".".join(name.split(".")[3:])
        got, count = ours[f"blk.{layer}.{gguf_names[module]}.weight"]
        assert count == 5 * 24
        np.testing.assert_allclose(got, sums.float().numpy(), rtol=1e-5)
    path = write_imatrix(tmp_path / "imatrix.gguf", ours, datasets=["calib.txt"], chunk_size=24)
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert fields["imatrix.chunk_count"].parts[-1][0] == 5 and fields["imatrix.chunk_size"].parts[-1][0] == 24
    assert bytes(fields["imatrix.datasets"].parts[-1]).decode() == "calib.txt"
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F32 and [int(d) for d in q.shape] == [64, 1]
    assert tensors["blk.0.attn_q.weight.counts"].tensor_type == gguf.GGMLQuantizationType.F32
    importance = read_importance(path)
    sums, count = ours["blk.1.ffn_down.weight"]
    assert np.array_equal(importance["blk.1.ffn_down.weight"], sums / np.float32(count))


def test_gptq_pass_collects_the_same_importance_matrix(tiny_base, tmp_path):
    """A run with both GPTQ and an imatrix GGUF reads the model once: GPTQ's pass fills the imatrix, equal to
    collect_imatrix's."""
    pytest.importorskip("gguf")
    pytest.importorskip("compressed_tensors")
    from model_export.quantize.gptq import calibrate_gptq
    from model_export.quantize.imatrix import collect_imatrix

    samples = [[(5 * i + 11 * j) % 300 + 5 for j in range(32)] for i in range(4)]
    alone = collect_imatrix(tiny_base, samples)
    together: dict = {}
    calibrate_gptq(tiny_base, samples, tmp_path / "gptq", group_size=32, imatrix=together)
    assert set(together) == set(alone)
    for name, (sums, count) in alone.items():
        assert together[name][1] == count
        np.testing.assert_array_equal(together[name][0], sums)
