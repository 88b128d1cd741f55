"""Issue 17: the demo with calibration data gives a Q4_K_M GGUF quantized with an importance matrix, every tensor the
bytes llama.cpp's own quantizer writes from the same merged weights and the same imatrix, verified in llama.cpp."""

import importlib.util
import json

import numpy as np
import pytest

from model_export import ExportConfiguration, run
from model_export.errors import ConfigError
from tests.reference import DEMO_INT4_BOUNDS

pytestmark = pytest.mark.integration
gguf = pytest.importorskip("gguf")
LLAMA = importlib.util.find_spec("llama_cpp") is not None


def demo_config(training, out, **settings):
    from importlib import resources

    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import TASK_PROMPTS

    corpus = str(resources.files("model_export.demo").joinpath("corpus.txt"))
    values = {
        "test_input_samples": TASK_PROMPTS,  # what the demo's fine-tune learned, as the demo verifies
        "export_formats": ["gguf"],
        "quantization_level": "int4",
        "calibration_data": corpus,
        "calibration_sequence_length": 32,
        "calibration_samples": 8,
        **settings,
    }
    return ExportConfiguration(
        checkpoint_path=str(training), base_model_name=str(shipped_base()), output_dir=str(out), **values
    )


def test_demo_q4_k_m_with_imatrix_is_what_llama_quantize_writes(training, tmp_path):
    pytest.importorskip("llama_cpp")  # llama.cpp's quantizer is the reference
    from model_export.exporters.gguf_export import export_gguf
    from model_export.quantize.gguf_types import read_importance
    from tests.reference import llama_quantize

    out = tmp_path / "out"
    result = run(demo_config(training, out))
    steps = result.steps
    calibrate = steps["calibrate"]["result"]
    assert calibrate["samples"] >= 4 and calibrate["matrices"] == 14 and calibrate["kind"] == "text"
    details = steps["export"]["result"]["details"]["gguf"]
    assert details["gguf_type"] == "q4_k_m" and details["method"] == "imatrix"
    path = details["path"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"

    # llama.cpp's route from the same merged weights: an f32 GGUF, then llama_model_quantize with our imatrix
    importance = read_importance(calibrate["imatrix"])
    f32 = export_gguf(out / "merge", tmp_path / "f32", gguf_type="f32")["path"]
    theirs = llama_quantize(f32, tmp_path / "theirs.gguf", "q4_k_m", importance)
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for tensor in gguf.GGUFReader(str(theirs)).tensors:
        assert ours[tensor.name].tensor_type == tensor.tensor_type, tensor.name
        assert np.array_equal(np.asarray(ours[tensor.name].data).view(np.uint8), np.asarray(tensor.data).view(np.uint8))
    verdict = steps["verify"]["result"]["verdicts"]["gguf"]
    assert verdict["status"] == ("verified" if LLAMA else "not_run"), verdict
    assert "quantized: importance matrix (" in (out / "report.html").read_text(encoding="utf-8")
    assert verdict["rule"].startswith("read back")  # re-encoded with the imatrix: equal to what was written

    # resumed with the same data: calibration and export are skipped; other data: collected again
    again = run(demo_config(training, out))
    assert again.steps["calibrate"]["skipped"] and again.steps["export"]["skipped"]


def test_without_calibration_data_the_gguf_is_data_free_and_says_so(training, tmp_path):
    result = run(demo_config(training, tmp_path / "out", calibration_data=None, run_validation_tests=False))
    assert "calibrate" not in result.steps
    assert result.steps["export"]["result"]["details"]["gguf"]["method"] == "data-free"


def test_too_short_calibration_data_stops_before_the_merge(training, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Hello there.", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="fewer than one sample of 32"):
        run(demo_config(training, out, calibration_data=str(short)))
    assert not (out / "merge").exists()
    manifest = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {"steps": {}}
    assert "merge" not in manifest["steps"]


def test_calibration_samples_and_length_decide_the_tokens_the_imatrix_sees(training, tmp_path):
    from model_export.quantize.gguf_types import read_importance

    seen = {}
    for samples, length in ((2, 16), (4, 32)):
        out = tmp_path / f"{samples}x{length}"
        config = demo_config(
            training,
            out,
            calibration_samples=samples,
            calibration_sequence_length=length,
            run_validation_tests=False,
        )
        assert config.calibration_data
        calibrate = run(config).steps["calibrate"]["result"]
        fields = {f.name: f for f in gguf.GGUFReader(calibrate["imatrix"]).fields.values()}
        counts = {
            t.name: float(np.asarray(t.data).reshape(-1)[0])
            for t in gguf.GGUFReader(calibrate["imatrix"]).tensors
            if ".counts" in t.name
        }
        seen[(samples, length)] = (
            calibrate["tokens"],
            int(fields["imatrix.chunk_size"].parts[-1][0]),
            set(counts.values()),
        )
        assert read_importance(calibrate["imatrix"])
    assert seen == {(2, 16): (32, 16, {32.0}), (4, 32): (128, 32, {128.0})}


def test_demo_int4_safetensors_by_gptq_loads_in_transformers_and_verifies(training, tmp_path):
    """quantization_method auto with calibration data: GPTQ, packed as compressed-tensors int4 that transformers
    loads; its layer outputs on the calibration data move less than round-to-nearest's; gptq_act_order changes the
    levels; quantization_method rtn keeps the data-free export."""
    pytest.importorskip("compressed_tensors")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    packed = {}
    for method, act_order in (("auto", False), ("auto", True), ("rtn", False)):
        out = tmp_path / f"{method}-{act_order}"
        config = demo_config(
            training,
            out,
            export_formats=["safetensors"],
            quantization_method=method,
            gptq_act_order=act_order,
            run_validation_tests=method == "auto" and not act_order,
            **DEMO_INT4_BOUNDS,  # what int4 costs the demo's tiny model (tests/reference.py)
        )
        result = run(config)
        details = result.steps["export"]["result"]["details"]["safetensors"]
        assert details["method"] == ("gptq" if method == "auto" else "round-to-nearest")
        if method == "auto":
            gptq = result.steps["calibrate"]["result"]["gptq"]
            assert gptq["matrices"] == 14 and gptq["act_order"] is act_order
            assert gptq["output_error"] < gptq["output_error_rtn"], gptq
        else:
            assert "calibrate" not in result.steps
        artifact = out / "export" / "safetensors"
        packed[(method, act_order)] = load_file(str(artifact / "model.safetensors"))[
            "model.layers.0.mlp.down_proj.weight_packed"
        ]
        if method == "auto" and not act_order:
            model = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32)  # transformers loads it
            assert model(torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size
            verdict = result.steps["verify"]["result"]["verdicts"]["safetensors"]
            assert verdict["status"] == "verified" and verdict["precision"] == "int4", verdict
            assert "quantized: GPTQ, layer output error" in (out / "report.html").read_text(encoding="utf-8")
    assert not torch.equal(packed[("auto", False)], packed[("rtn", False)])
    assert not torch.equal(packed[("auto", False)], packed[("auto", True)])


def test_onnx_int4_takes_the_same_gptq_blocks_as_the_safetensors(training, tmp_path):
    """With calibration data the ONNX int4 graph holds GPTQ's levels and groups as MatMulNBits blocks: run in
    onnxruntime with fp32 compute it gives the logits of the GPTQ safetensors in transformers."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("compressed_tensors")
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from model_export.exporters.onnx_linear import quantize_blocks
    from model_export.runtimes.ort import OnnxDecoder

    out = tmp_path / "out"
    config = demo_config(
        training,
        out,
        export_formats=["safetensors", "onnx"],
        onnx_optimize_graph=False,
        onnx_accuracy_level=0,
        run_validation_tests=False,
    )
    result = run(config)
    details = result.steps["export"]["result"]["details"]
    assert details["onnx"]["method"] == "gptq" and details["safetensors"]["method"] == "gptq"
    graph = onnx.load(str(out / "export" / "onnx" / "model.onnx"), load_external_data=False).graph
    blocks = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits" and "lm_head" not in n.name  # the head is not GPTQ's (rounded, onnx_block_size)
        for a in n.attribute
        if a.name == "block_size"
    }
    assert blocks == {result.steps["calibrate"]["result"]["gptq"]["group_size"]}
    ids = [5, 17, 33, 2, 90, 100, 7, 41]
    onnx_logits, _ = OnnxDecoder(out / "export" / "onnx" / "model.onnx").prompt(ids)
    model = AutoModelForCausalLM.from_pretrained(str(out / "export" / "safetensors"), dtype=torch.float32)
    # The graph's tied embedding (its head, and the table its GatherBlockQuantized reads) is not a decoder matrix: it
    # is rounded to onnx_block_size blocks there and kept whole in the safetensors. Give transformers' model the
    # graph's table to compare the decoders alone.
    head = model.lm_head.weight.detach().clone()
    packed, scales, zeros = quantize_blocks(head, 4, 32)
    levels = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(head.shape[0], -1, 32).astype(np.float32)
    zero = np.stack([zeros & 0xF, zeros >> 4], axis=-1).reshape(head.shape[0], -1)[:, : levels.shape[1]]
    rounded = ((levels - zero[..., None]) * scales[..., None]).reshape(head.shape)
    model.lm_head.weight = model.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(rounded))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(onnx_logits - expected).max() < 1e-3


def test_quantization_group_size_sets_the_int4_groups(training, tmp_path):
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    from model_export.errors import ExportFormatError

    scales = {}
    for group in (None, 64):
        out = tmp_path / f"g{group}"
        config = demo_config(
            training,
            out,
            export_formats=["safetensors"],
            calibration_data=None,
            quantization_group_size=group,
            run_validation_tests=False,
        )
        result = run(config)
        assert result.steps["export"]["result"]["details"]["safetensors"]["group_size"] == (group or 128)
        quant = json.loads((out / "export" / "safetensors" / "config.json").read_text())["quantization_config"]
        assert quant["config_groups"]["group_0"]["weights"]["group_size"] == (group or 128)
        with safe_open(str(out / "export" / "safetensors" / "model.safetensors"), "pt") as f:
            scales[group] = tuple(f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape)
    assert scales == {None: (256, 4), 64: (256, 8)}  # down_proj: 512 inputs
    with pytest.raises(ExportFormatError, match="does not divide the input size"):
        run(
            demo_config(
                training,
                tmp_path / "g1024",
                export_formats=["safetensors"],
                calibration_data=None,
                quantization_group_size=1024,
                run_validation_tests=False,
            )
        )
    with pytest.raises(Exception, match="power of two"):
        demo_config(training, tmp_path / "g48", quantization_group_size=48)


def test_quantization_keep_modules_keeps_them_in_every_format(training, tmp_path):
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("onnxruntime")
    import onnx
    from safetensors import safe_open

    out = tmp_path / "out"
    config = demo_config(
        training,
        out,
        export_formats=["safetensors", "onnx", "gguf"],
        calibration_data=None,
        quantization_keep_modules=["down_proj", "lm_head"],
        onnx_optimize_graph=False,
        run_validation_tests=False,
    )
    run(config)
    export = out / "export"
    with safe_open(str(export / "safetensors" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.layers.1.mlp.down_proj.weight_packed" not in names
    assert "model.layers.1.mlp.up_proj.weight_packed" in names
    ignore = json.loads((export / "safetensors" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.down_proj" in ignore and "lm_head" in ignore
    graph = onnx.load(str(export / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert ops["/model/layers.0/mlp/down_proj"] == "Gemm" and ops["/model/layers.0/mlp/up_proj"] == "MatMulNBits"
    assert ops["/model/embed_tokens"] == "Gather" and ops["/lm_head/gemm"] == "Gemm"  # tied: "lm_head" keeps both
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(next((export / "gguf").glob("*.gguf"))).tensors}
    assert types["blk.0.ffn_down.weight"] == "F32" and types["token_embd.weight"] == "F32"  # the demo merge is fp32
    assert types["blk.0.ffn_up.weight"] == "Q4_K"


def test_quantization_symmetric_decides_zero_points(training, tmp_path):
    """Unset: symmetric safetensors (vLLM's W4A16), asymmetric ONNX blocks (onnxruntime-genai's choice); set, both
    follow it. Each artifact still verifies on the int4 bounds; GPTQ (symmetric only) refuses false."""
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("onnxruntime")
    import onnx
    from safetensors import safe_open

    seen = {}
    for symmetric in (None, False, True):
        out = tmp_path / str(symmetric)
        config = demo_config(
            training,
            out,
            export_formats=["safetensors", "onnx"],
            calibration_data=None,
            quantization_symmetric=symmetric,
            onnx_optimize_graph=False,
            **DEMO_INT4_BOUNDS,
        )
        result = run(config)
        assert all(v["status"] == "verified" for v in result.steps["verify"]["result"]["verdicts"].values())
        export = out / "export"
        quant = json.loads((export / "safetensors" / "config.json").read_text())["quantization_config"]
        with safe_open(str(export / "safetensors" / "model.safetensors"), "pt") as f:
            zero_points = any(k.endswith("weight_zero_point") for k in f.keys())
        graph = onnx.load(str(export / "onnx" / "model.onnx"), load_external_data=False).graph
        onnx_zero_points = any(len(n.input) == 4 for n in graph.node if n.op_type == "MatMulNBits")
        seen[symmetric] = (quant["config_groups"]["group_0"]["weights"]["symmetric"], zero_points, onnx_zero_points)
    assert seen == {None: (True, False, True), False: (False, True, True), True: (True, False, False)}
    from model_export.pipeline.validate import validate_config

    problems = validate_config(
        demo_config(training, tmp_path / "x", export_formats=["safetensors"], quantization_symmetric=False)
    )
    assert [p.kind for p in problems] == ["gptq_symmetric"]


def test_gptq_and_imatrix_come_from_one_calibration_pass(training, tmp_path):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "out"
    result = run(demo_config(training, out, export_formats=["safetensors", "gguf"], run_validation_tests=False))
    calibrate = result.steps["calibrate"]["result"]
    assert calibrate["gptq"]["matrices"] == calibrate["matrices"] == 14
    details = result.steps["export"]["result"]["details"]
    assert details["gguf"]["method"] == "imatrix" and details["safetensors"]["method"] == "gptq"
    log = (out / "export.log").read_text(encoding="utf-8")
    assert "GPTQ, layer by layer" in log and "Collecting the importance matrix" not in log  # the model ran once
