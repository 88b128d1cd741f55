"""TensorRT (experimental): what can be checked without TensorRT. The engine itself is built and verified by
tests/integration/test_pipeline.py::test_a_tensorrt_engine_is_built_and_verified where tensorrt and a GPU exist."""

from __future__ import annotations

import numpy as np
import pytest

from model_export import ExportFormatError
from model_export.exporters.tensorrt_export import _profile, check_tensorrt, export_standard_graph, missing_for_tensorrt


def test_what_is_missing_is_named():
    import torch

    missing = missing_for_tensorrt()
    assert any("'tensorrt'" in m for m in missing) == (not __import__("importlib").util.find_spec("tensorrt"))
    assert any("CUDA GPU" in m for m in missing) == (not torch.cuda.is_available())
    if missing:
        with pytest.raises(ExportFormatError) as err:
            check_tensorrt()
        assert err.value.code == "ME810" and all(m in str(err.value) for m in missing)


def test_the_optimization_profile_covers_batch_tokens_and_an_empty_cache():
    assert _profile("input_ids", (-1, -1), 4, 512) == ((1, 1), (1, 256), (4, 512))
    assert _profile("attention_mask", (-1, -1), 1, 128) == ((1, 1), (1, 64), (1, 128))
    assert _profile("past_key_values.0.key", (-1, 2, -1, 32), 2, 512) == (
        (1, 2, 0, 32),
        (1, 2, 256, 32),
        (2, 2, 511, 32),
    )


def test_the_graph_tensorrt_reads_has_standard_operators_only_and_computes_the_model(tiny_base, tmp_path):
    """The streaming builder's graph uses onnxruntime's contrib operators; TensorRT's parser reads the default domain
    only, and no local functions. The graph it gets must still be the model: onnxruntime runs it like transformers."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from model_export.exporters.onnx_export import OnnxDecoder

    graph = export_standard_graph(tiny_base, tmp_path / "onnx")
    model = onnx.load(str(graph), load_external_data=False)
    assert not model.functions and {n.domain for n in model.graph.node} == {""}
    assert {o.domain for o in model.opset_import} == {""}
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert (
        dims["input_ids"] == ["batch_size", "sequence_length"]
        and dims["past_key_values.0.key"][2] == "past_sequence_length"
    )
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(tiny_base / name, graph.parent / name)
    ids = [5, 17, 42, 8, 99]
    logits, tokens = OnnxDecoder(graph).generate(ids, 4)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - expected).max() < 2e-5 and len(tokens) >= 1
