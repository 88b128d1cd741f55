"""int8/int4 safetensors in compressed-tensors' format, proven by loading them in transformers on the CPU."""

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from model_export.exporters.safetensors_quant import export_quantized_safetensors, group_size_for
from model_export.tensor_io import read_header

PROMPT = [5, 17, 33, 2, 90, 100, 7, 41, 3]


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_loads_the_checkpoint_and_its_weights_are_the_rounded_merge(tiny_base, tmp_path, bits):
    from transformers import AutoModelForCausalLM

    info = export_quantized_safetensors(tiny_base, tmp_path, bits=bits, max_shard_size=60_000)  # several shards
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    names = {n for shard in tmp_path.glob("*.safetensors") for n in read_header(shard).tensors}
    assert "model.layers.0.mlp.down_proj.weight_packed" in names and "model.layers.0.mlp.down_proj.weight" not in names
    assert "model.embed_tokens.weight" in names  # the embedding (and the tied head) stay as merged
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from safetensors.torch import load_file

    from model_export.exporters.safetensors_quant import _scheme

    stored = {k: v for shard in tmp_path.glob("*.safetensors") for k, v in load_file(str(shard)).items()}
    original = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    expected = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    levels, scheme = (127 if bits == 8 else 7), _scheme(bits, info["group_size"] or 0)
    layers = 0
    for name, layer in expected.named_modules():
        if not name.endswith("_proj"):
            continue
        parts = {k: stored[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
        w = original.get_submodule(name).weight
        group = w.shape[1] if bits == 8 else info["group_size"]
        step = w.reshape(w.shape[0], -1, group).abs().amax(-1, keepdim=True) / levels  # symmetric round-to-nearest
        error = (weight - w).reshape(w.shape[0], -1, group).abs()
        assert bool((error <= step * 0.5 + 1e-6).all()) and float(error.max()) > 0
        layer.weight.data.copy_(weight)
        layers += 1
    assert layers == 14
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()  # transformers' own loader
    with torch.no_grad():
        got, want, ref = (m(torch.tensor([PROMPT])).logits for m in (loaded, expected, original))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)  # it computes with exactly the rounded weights
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= (1.0 if bits == 8 else 0.6)


def test_one_group_size_divides_every_layer():
    assert [group_size_for(n) for n in (4096, 2560, 64, 96, 40)] == [128, 128, 64, 32, 0]
