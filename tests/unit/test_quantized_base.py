"""Issue 27: a bitsandbytes base is read as the weights a QLoRA adapter was trained against. Each quantized matrix of
the plain base equals bitsandbytes' own dequantization on the CPU, bit for bit: nf4 and fp4, with and without double
quantization, every quant storage type, and 8-bit; everything else as stored."""

import json
import shutil

import pytest

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from model_export.checkpoint.quantized_base import (  # noqa: E402
    describe,
    plain_base,
    quantization_of,
    unsupported_quantization,
)


def quantized_base(folder, **settings):
    """The shipped demo base quantized by transformers and bitsandbytes on the CPU and saved as save_pretrained saves
    it (what a pre-quantized *-bnb-4bit repository holds), with the tokenizer beside it; and the loaded model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from model_export.demo.run import shipped_base

    config = BitsAndBytesConfig(**settings)
    model = AutoModelForCausalLM.from_pretrained(
        str(shipped_base()), quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shipped_base() / name, folder / name)
    return model


def bitsandbytes_dequantized(weight):
    """A quantized weight of a model transformers loaded with bitsandbytes, as bitsandbytes itself dequantizes it on
    the CPU (8-bit in the model's bf16); None for a weight that is not quantized."""
    kind = type(weight).__name__
    if kind == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).to(torch.bfloat16)
    return None


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


FOUR_BIT = [
    {"bnb_4bit_quant_type": kind, "bnb_4bit_use_double_quant": double, "bnb_4bit_quant_storage": storage}
    for kind in ("nf4", "fp4")
    for double in (False, True)
    for storage in (torch.uint8, torch.bfloat16, torch.float32)
]


CASES = [{"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16, **s} for s in FOUR_BIT]
CASES.append({"load_in_8bit": True})


def _case(s: dict) -> str:
    if "load_in_8bit" in s:
        return "8bit"
    double = "dq" if s["bnb_4bit_use_double_quant"] else "sq"
    return f"{s['bnb_4bit_quant_type']}-{double}-{str(s['bnb_4bit_quant_storage'])[6:]}"


@pytest.mark.parametrize("settings", CASES, ids=_case)
def test_the_plain_base_is_bitsandbytes_dequantization_bit_for_bit(tmp_path, monkeypatch, settings):
    from safetensors import safe_open

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    model = quantized_base(tmp_path / "base", **settings)
    quantization = quantization_of(tmp_path / "base")
    assert unsupported_quantization(quantization) is None
    plain = plain_base(tmp_path / "base", quantization)
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    checked = 0
    with safe_open(str(plain / "model.safetensors"), "pt") as ours:
        assert all(ours.get_tensor(k).dtype in (torch.bfloat16, torch.float32) for k in ours.keys())  # no uint8/int8
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            theirs = bitsandbytes_dequantized(weight)
            if theirs is None:
                if weight is not None and f"{name}.weight" in ours.keys():  # not quantized: as stored
                    assert torch.equal(_bits(ours.get_tensor(f"{name}.weight")), _bits(weight.data.contiguous()))
                continue
            mine = ours.get_tensor(f"{name}.weight")
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
            assert torch.equal(_bits(mine), _bits(theirs.contiguous())), name
            checked += 1
    assert checked == 14  # every projection of both layers
    assert plain_base(tmp_path / "base", quantization) == plain  # made once, kept


def test_what_is_found_is_named_and_other_quantizations_are_refused(tmp_path):
    from model_export import BaseModelError
    from model_export.checkpoint.base_model import inspect_base_model, refuse_quantized, resolve_base_model
    from model_export.demo.run import shipped_base

    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    assert describe({**settings, "bnb_4bit_compute_dtype": "bfloat16"}) == (
        "bitsandbytes nf4, double quantization, compute bfloat16"
    )
    assert describe({"load_in_8bit": True}) == "bitsandbytes 8-bit (LLM.int8)"
    awq = tmp_path / "awq"
    shutil.copytree(shipped_base(), awq)
    config = json.loads((awq / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    assert resolve_base_model(str(awq)) == awq  # left as it is (our compressed-tensors artifacts are read so)
    with pytest.raises(BaseModelError) as err:
        refuse_quantized(inspect_base_model(str(awq)))
    assert err.value.code == "ME305" and "quantized with awq" in str(err.value)
    assert "bitsandbytes 4-bit (nf4 or fp4" in err.value.hint()


@pytest.mark.parametrize(
    "settings",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
        {"load_in_8bit": True},
    ],
    ids=["nf4-dq", "fp4", "8bit"],
)
def test_a_stated_quantization_gives_the_weights_transformers_quantizes_at_load(tmp_path, monkeypatch, settings):
    """base_model_quantization on the 16-bit base: each matrix as transformers' load_in_4bit / load_in_8bit
    quantizes it, dequantized by bitsandbytes; everything else as stored."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from model_export.checkpoint.quantized_base import quantized_as_trained
    from model_export.demo.run import shipped_base

    monkeypatch.setenv("MODEL_EXPORT_CACHE", str(tmp_path / "cache"))
    bf16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(str(shipped_base()), dtype=torch.bfloat16).save_pretrained(bf16)
    model = quantized_base(tmp_path / "quantized", bnb_4bit_compute_dtype=torch.bfloat16, **settings)
    plain = quantized_as_trained(bf16, settings)
    with safe_open(str(plain / "model.safetensors"), "pt") as ours:
        for name, module in model.named_modules():
            theirs = bitsandbytes_dequantized(getattr(module, "weight", None))
            if theirs is None:
                continue
            assert torch.equal(_bits(ours.get_tensor(f"{name}.weight")), _bits(theirs.contiguous())), name
