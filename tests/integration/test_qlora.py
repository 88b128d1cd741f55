"""Issue 27: a QLoRA adapter merges into the weights it was trained against. The adapter is made by PEFT on the demo
base quantized to nf4 with double quantization by bitsandbytes on the CPU (what a QLoRA run on a pre-quantized
*-bnb-4bit checkpoint leaves); the merge, the reference and every artifact read that base's dequantized weights."""

import json
from pathlib import Path

import pytest

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from model_export import ExportConfiguration, merge, run  # noqa: E402

pytestmark = pytest.mark.integration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": torch.bfloat16,
}


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """(the 4-bit base folder, the adapter folder, PEFT's unmerged model on the 4-bit base)."""
    from peft import LoraConfig, get_peft_model

    from tests.unit.test_quantized_base import quantized_base

    root = tmp_path_factory.mktemp("qlora")
    model = quantized_base(root / "base-bnb4", **SETTINGS)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():  # a trained adapter's size of update
        if "lora_B" in name:
            param.data.mul_(0.05)
    peft_model.save_pretrained(root / "adapter")
    adapter_config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(root / "base-bnb4")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return root / "base-bnb4", root / "adapter", peft_model.eval()


def test_the_merge_is_the_dequantized_weights_plus_the_update(qlora, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    base, adapter, peft_model = qlora
    merge(str(adapter), str(base), str(tmp_path / "merged"), dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    layers = dict(peft_model.named_modules())
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as merged:
        assert {merged.get_tensor(k).dtype for k in merged.keys()} == {torch.float32}  # no uint8 left
        checked = 0
        for name, module in layers.items():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            base_layer = module.base_layer
            dequantized = bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state)
            update = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            expected = dequantized.float() + update.float()
            key = name.removeprefix("base_model.model.") + ".weight"
            got = merged.get_tensor(key)
            assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max())), key
            checked += 1
        assert checked == 14
        norm = "model.norm.weight"
        stored = dict(peft_model.named_parameters())[f"base_model.model.{norm}"]
        assert torch.equal(merged.get_tensor(norm), stored.float())  # not quantized: as stored (widened to fp32)


def test_the_merged_model_computes_what_peft_computes_on_the_4bit_base(qlora, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    base, adapter, peft_model = qlora
    merge(str(adapter), str(base), str(tmp_path / "merged"), dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    ids = tokenizer("The quick brown fox jumps over the lazy dog. 说点什么。", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
        ours = merged(input_ids=ids).logits.float()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="none")
    assert float(kl.sum(-1).mean()) < 0.05  # the bf16 bounds
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.9


def test_the_run_names_the_base_and_verifies_every_format_from_it(qlora, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = qlora
    out = tmp_path / "out"
    config = ExportConfiguration(
        checkpoint_path=str(adapter),
        base_model_name=str(base),
        output_dir=str(out),
        export_formats=["safetensors", "onnx", "gguf"],
    )
    result = run(config)
    verify = result.steps["verify"]["result"]
    assert all(v["status"] in ("verified", "not_run") for v in verify["verdicts"].values()), verify["verdicts"]
    assert verify["counts"]["verified"] >= 3 and verify["counts"]["failed"] == 0
    check = result.steps["check"]["result"]
    assert check["base_quantization"] == (
        "base: bitsandbytes nf4, double quantization, compute bfloat16; merged into its dequantized weights "
        "(what the adapter was trained against)"
    )
    assert "bitsandbytes nf4, double quantization" in (out / "export.log").read_text()
    assert "merged into its dequantized weights" in (out / "report.html").read_text(encoding="utf-8")


def test_a_16bit_base_for_a_qlora_adapter_is_named_as_the_other_road(qlora):
    from model_export import check
    from model_export.demo.run import shipped_base

    _, adapter, _ = qlora
    report = check(str(adapter), str(shipped_base()))
    assert report.base_quantization is None
    (warning,) = [w for w in report.warnings if "16-bit base" in w]
    assert "bitsandbytes nf4, double quantization" in warning and "never saw" in warning


def test_a_16bit_base_with_the_training_quantization_stated_merges_as_the_quantized_base_does(
    qlora, tmp_path, monkeypatch
):
    """base_model_quantization: the 16-bit base quantized by bitsandbytes as the training did, then dequantized: the
    same merge, tensor for tensor, as from the quantized base itself; merge_into: original keeps the 16-bit weights."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from model_export.demo.run import shipped_base

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = qlora
    bf16 = tmp_path / "base-bf16"  # the 16-bit base the quantized one was made from
    AutoModelForCausalLM.from_pretrained(str(shipped_base()), dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shipped_base() / name, bf16 / name)
    stated = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    common = {"checkpoint_path": str(adapter), "export_formats": ["safetensors"], "run_validation_tests": False}
    runs = {
        "quantized": {"base_model_name": str(base)},
        "stated": {"base_model_name": str(bf16), "base_model_quantization": stated},
        "original": {"base_model_name": str(bf16), "base_model_quantization": stated, "merge_into": "original"},
    }
    merged = {}
    for name, settings in runs.items():
        result = run(ExportConfiguration(output_dir=str(tmp_path / name), **common, **settings))
        merged[name] = safe_open(str(Path(result.steps["merge"]["result"]["output_dir"]) / "model.safetensors"), "pt")
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(merged["stated"].get_tensor(key), merged["quantized"].get_tensor(key))
    assert not torch.equal(merged["original"].get_tensor(key), merged["quantized"].get_tensor(key))
    assert all(
        torch.equal(merged["stated"].get_tensor(k), merged["quantized"].get_tensor(k)) for k in merged["stated"].keys()
    )


def test_merge_into_original_on_a_quantized_base_says_the_16bit_weights_are_not_there(qlora, tmp_path, monkeypatch):
    from model_export import BaseModelError

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = qlora
    config = ExportConfiguration(
        checkpoint_path=str(adapter), base_model_name=str(base), output_dir=str(tmp_path / "o"), merge_into="original"
    )
    with pytest.raises(BaseModelError) as err:
        run(config)
    assert err.value.code == "ME306" and "original 16-bit weights are not in it" in str(err.value)


def test_a_stated_quantization_is_checked_with_the_rest(tmp_path):
    from model_export import validate_config

    problems = validate_config(
        {"checkpoint_path": str(tmp_path), "base_model_quantization": {"load_in_4bit": True, "bits": 3}}, inputs=False
    )
    (problem,) = [p for p in problems if p.key == "base_model_quantization"]
    assert "load_in_4bit" in str(problem.fix) or "load_in_4bit" in str(problem)


def test_the_report_says_what_merging_into_the_16bit_weights_would_cost(qlora, tmp_path, monkeypatch):
    """The stated road: the reference is the adapter on the dequantized weights; the same adapter on the 16-bit
    weights as they are is measured against it (KL, top-1, perplexity) and shown."""
    import shutil

    from transformers import AutoModelForCausalLM

    from model_export.demo.run import shipped_base

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    _, adapter, _ = qlora
    bf16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(str(shipped_base()), dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shipped_base() / name, bf16 / name)
    stated = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    out = tmp_path / "out"
    result = run(
        ExportConfiguration(
            checkpoint_path=str(adapter),
            base_model_name=str(bf16),
            base_model_quantization=stated,
            output_dir=str(out),
            export_formats=["safetensors"],
        )
    )
    other = result.steps["verify"]["result"]["reference"]["other_road"]
    assert other["base"] == str(bf16) and other["mean_kl"] > 0 and 0 < other["top1"] <= 1 and other["perplexity"] > 1
    assert "Merged into the 16-bit weights of" in (out / "report.html").read_text(encoding="utf-8")


def test_detect_names_the_quantized_base_the_adapter_was_trained_on(qlora, capsys):
    from model_export.cli import main

    _, adapter, _ = qlora
    assert main(["detect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "trained on a quantized base:" in out and "bitsandbytes nf4, double quantization" in out
