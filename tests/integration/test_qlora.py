"""Issue 27: a QLoRA adapter merges into the weights it was trained against. The adapter is made by PEFT on the demo
base quantized to nf4 with double quantization by bitsandbytes on the CPU (what a QLoRA run on a pre-quantized
*-bnb-4bit checkpoint leaves); the merge, the reference and every artifact read that base's dequantized weights."""

import json

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


def test_a_16bit_base_for_a_qlora_adapter_is_named_as_the_other_road(qlora):
    from model_export import check
    from model_export.demo.run import shipped_base

    _, adapter, _ = qlora
    report = check(str(adapter), str(shipped_base()))
    assert report.base_quantization is None
    (warning,) = [w for w in report.warnings if "16-bit base" in w]
    assert "bitsandbytes nf4, double quantization" in warning and "never saw" in warning
