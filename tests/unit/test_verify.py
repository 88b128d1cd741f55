"""The pass rules (which bound applies to which artifact) and how an artifact's precision is read from its files."""

from __future__ import annotations

import pytest

from model_export.verify.artifacts import precision_of
from model_export.verify.judge import ArtifactVerdict, Bounds, SampleResult, judge


def verdict(precision: str, top1: float, kl: float, max_diff: float = 0.5) -> ArtifactVerdict:
    return ArtifactVerdict("artifact", precision, True, "", [SampleResult("p", max_diff, max_diff / 2, kl, top1, 1.0)])


@pytest.mark.parametrize(
    "precision, top1, kl, code",
    [
        ("int4", 0.88, 0.07, None),  # llama.cpp's q4_0 on Llama 3 8B loses about this much
        ("reduced", 0.88, 0.07, "ME603"),  # the same loss in an 8-bit or fp16 artifact is a fault
        ("reduced", 0.95, 0.07, "ME601"),
        ("reduced", 0.95, 0.01, None),
        ("int4", 0.80, 0.05, "ME603"),
        ("int4", 0.90, 0.20, "ME601"),
    ],
)
def test_each_precision_is_judged_on_its_own_bounds(precision, top1, kl, code):
    failure = judge(v := verdict(precision, top1, kl), Bounds())
    assert (failure and failure.code) == code
    assert v.rule == ("top-1 >= 0.85, KL <= 0.1" if precision == "int4" else "top-1 >= 0.9, KL <= 0.05")


def test_full_precision_is_judged_on_the_logit_tolerance_alone():
    assert judge(verdict("full", 1.0, 0.0, max_diff=5e-4), Bounds()) is None
    assert judge(verdict("full", 1.0, 0.0, max_diff=2e-3), Bounds()).code == "ME601"


def test_bounds_come_from_the_configuration():
    from model_export.config import ExportConfiguration

    bounds = Bounds.from_config(
        ExportConfiguration(validation_int4_min_top1=0.7, validation_int4_max_kl=0.3, validation_tolerance=1e-2)
    )
    assert (bounds.tolerance, bounds.min_top1, bounds.max_kl, bounds.int4_min_top1, bounds.int4_max_kl) == (
        1e-2,
        0.9,
        0.05,
        0.7,
        0.3,
    )


@pytest.mark.parametrize(
    "gguf_type, expected",
    [("f32", "full"), ("f16", "reduced"), ("q8_0", "reduced"), ("q4_0", "int4"), ("q5_1", "int4")],
)
def test_precision_of_a_gguf_follows_its_tensor_types(tiny_base, tmp_path, gguf_type, expected):
    pytest.importorskip("gguf")
    from model_export.exporters.gguf_export import export_gguf

    result = export_gguf(tiny_base, tmp_path, gguf_type=gguf_type)
    assert precision_of(next(tmp_path.glob("*.gguf"))) == expected, result


@pytest.mark.parametrize(
    "weight_type, expected", [("fp32", "full"), ("fp16", "reduced"), ("int8", "reduced"), ("int4", "int4")]
)
def test_precision_of_an_onnx_graph_follows_its_weights(tiny_base, tmp_path, weight_type, expected):
    pytest.importorskip("onnxruntime")
    from model_export.exporters.onnx_builder import build_onnx

    build_onnx(tiny_base, tmp_path, weight_type=weight_type)
    assert precision_of(tmp_path / "model.onnx") == expected


@pytest.mark.parametrize("bits, expected", [(8, "reduced"), (4, "int4")])
def test_precision_of_a_compressed_tensors_checkpoint_follows_its_bits(tiny_base, tmp_path, bits, expected):
    pytest.importorskip("compressed_tensors")
    from model_export.exporters.safetensors_quant import export_quantized_safetensors

    export_quantized_safetensors(tiny_base, tmp_path / "q", bits=bits)
    assert precision_of(tmp_path / "q") == expected
    assert precision_of(tiny_base) == "full"
