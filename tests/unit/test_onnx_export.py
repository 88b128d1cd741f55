"""ONNX export on tiny models, each graph run in onnxruntime and compared with transformers (the reference)."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from model_export import ExportConfiguration, check_config
from model_export.errors import ConfigError, ExportFormatError, OnnxExportError
from model_export.exporters.onnx_builder import build_onnx
from model_export.exporters.onnx_export import OnnxDecoder, export_onnx
from model_export.exporters.onnx_linear import quantize_blocks
from model_export.exporters.onnx_torch import translate_export_error
from tests.conftest import spread_model

PROMPT = [5, 17, 33, 2, 90, 100, 7, 41, 3]
AXES = ExportConfiguration().onnx_dynamic_axes


def transformers_run(folder, ids=PROMPT, new_tokens=6):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=0,
        )
    return logits, out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"],
    )
    return spread_model(tmp_path_factory.mktemp("qwen2") / "qwen2", config)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        architectures=["LlamaForCausalLM"],
    )
    return spread_model(tmp_path_factory.mktemp("llama") / "llama", config)


@pytest.mark.parametrize("base", ["tiny_base", "untied_base", "qwen2_base", "llama_base"])
def test_builder_fp32_matches_transformers_with_and_without_the_cache(base, request, tmp_path):
    """Qwen3 (head_dim 32 != hidden/heads 16, tied and untied), Qwen2 (q/k/v biases), Llama 3 rope scaling."""
    folder = request.getfixturevalue(base)
    result = build_onnx(folder, tmp_path, weight_type="fp32", dynamic_axes=AXES)
    ref_logits, ref_tokens = transformers_run(folder)
    decoder = OnnxDecoder(result.path)
    logits, tokens = decoder.generate(PROMPT, 6)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    assert tokens == ref_tokens
    # token by token through the cache gives the same logits as the whole prompt at once
    decoder.step = 1
    stepwise, _ = decoder.prompt(PROMPT)
    np.testing.assert_allclose(stepwise, ref_logits, atol=2e-5, rtol=0)


def test_builder_writes_the_weights_once_in_external_data(tiny_base, tmp_path):
    result = build_onnx(tiny_base, tmp_path, weight_type="fp32", dynamic_axes=AXES)
    graph = onnx.load(result.path, load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert "model.embed_tokens.weight" in {t.name for t in external} and "lm_head.weight" not in {
        t.name for t in external
    }
    assert (tmp_path / "model.onnx").stat().st_size < 64 * 1024  # the graph alone; the weights are beside it
    ops = {n.op_type for n in graph.node}
    assert {"GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization", "Gemm"} <= ops
    names = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert names["input_ids"] == ["batch_size", "sequence_length"]
    assert names["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert names["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 32]


def test_opset_23_uses_the_standard_rms_normalization(tiny_base, tmp_path):
    result = build_onnx(tiny_base, tmp_path, weight_type="fp32", opset=23, dynamic_axes=AXES)
    ops = {n.op_type for n in onnx.load(result.path, load_external_data=False).graph.node}
    assert "RMSNormalization" in ops and "SimplifiedLayerNormalization" not in ops
    np.testing.assert_allclose(
        OnnxDecoder(result.path).prompt(PROMPT)[0], transformers_run(tiny_base)[0], atol=2e-5, rtol=0
    )


def dequantized(folder, graph_path, bits, block):
    """The model's state dict with every quantized weight replaced by what its MatMulNBits blocks hold."""
    init = {
        t.name: numpy_helper.to_array(t, base_dir=str(graph_path.parent))
        for t in onnx.load(str(graph_path)).graph.initializer
    }

    def unpack(name, n, k):
        q, scales, zeros = init[f"{name}.q{bits}"], init[f"{name}.scales"], init[f"{name}.zero_points"]
        if bits == 4:
            q = np.stack([q & 15, q >> 4], -1).reshape(n, -1)
            zeros = np.stack([zeros & 15, zeros >> 4], -1).reshape(n, -1)[:, : scales.shape[1]]
        values = q.reshape(n, -1, block).astype(np.float32)
        return torch.from_numpy(((values - zeros[:, :, None]) * scales[:, :, None]).reshape(n, -1)[:, :k])

    return unpack


@pytest.mark.parametrize("weight_type,bits", [("int4", 4), ("int8", 8)])
def test_quantized_graph_equals_the_model_with_its_dequantized_weights(tiny_base, tmp_path, weight_type, bits):
    """The graph computes exactly what transformers computes with the blocks' values: all loss is quantization.
    The tied embedding is stored once, as the head's blocks, and gathered from them."""
    from transformers import AutoModelForCausalLM

    result = build_onnx(tiny_base, tmp_path, weight_type=weight_type, accuracy_level=0, dynamic_axes=AXES)
    unpack = dequantized(tiny_base, tmp_path / "model.onnx", bits, 32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    state = model.state_dict()
    for name, weight in state.items():
        if name.endswith("_proj.weight"):
            state[name] = unpack(name, *weight.shape)
    head = unpack("model.embed_tokens.weight", *state["model.embed_tokens.weight"].shape)
    state["model.embed_tokens.weight"] = state["lm_head.weight"] = (
        head  # tied: the embedding gathers from the head's blocks
    )
    model.load_state_dict(state)
    with torch.no_grad():
        expected = (model.model(torch.tensor([PROMPT])).last_hidden_state[0] @ head.T).numpy()
    np.testing.assert_allclose(OnnxDecoder(result.path).prompt(PROMPT)[0], expected, atol=2e-5, rtol=0)
    graph = onnx.load(result.path, load_external_data=False).graph
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    assert not any(t.name == "model.embed_tokens.weight" for t in graph.initializer)


def test_blocks_are_those_of_onnxruntimes_quantizer_including_a_padded_last_block():
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, size=(24, 40)).astype(np.float32)  # [N, K]; K = 40 is not a multiple of 32
    matmul = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24])],
        [numpy_helper.from_array(weight.T.copy(), "w")],
    )
    quantizer = MatMulNBitsQuantizer(helper.make_model(matmul), bits=4, block_size=32, is_symmetric=False)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    packed, scales, zeros = quantize_blocks(weight, 4, 32)
    assert np.array_equal(packed, theirs["w_Q4"]) and np.array_equal(zeros, theirs["w_zero_points"])
    assert np.array_equal(scales.reshape(theirs["w_scales"].shape), theirs["w_scales"])


def test_fp16_graph_stays_close_to_the_reference(tiny_base, tmp_path):
    result = build_onnx(tiny_base, tmp_path, weight_type="fp16", dynamic_axes=AXES)
    ref_logits, _ = transformers_run(tiny_base)
    logits, _ = OnnxDecoder(result.path).generate(PROMPT, 4)
    assert np.abs(logits - ref_logits).max() < 0.02
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() == 1.0


def test_without_dynamic_axes_the_graph_takes_one_token_per_call(tiny_base, tmp_path):
    result = build_onnx(tiny_base, tmp_path, weight_type="fp32", dynamic_axes=None)
    graph = onnx.load(result.path, load_external_data=False).graph
    shape = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 1]
    decoder = OnnxDecoder(result.path)
    assert decoder.step == 1
    ref_logits, ref_tokens = transformers_run(tiny_base)
    logits, tokens = decoder.generate(PROMPT, 6)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    assert tokens == ref_tokens


@pytest.mark.parametrize(
    "base,level,tolerance", [("tiny_base", "none", 2e-5), ("untied_base", "none", 2e-5), ("tiny_base", "fp16", 0.02)]
)
def test_torch_backend_matches_transformers(base, request, tmp_path, level, tolerance):
    """Qwen3 with head_dim 32 != hidden/heads 16, tied and untied."""
    folder = request.getfixturevalue(base)
    info = export_onnx(folder, tmp_path, backend="torch", level=level, opset=18, dynamic_axes=AXES, optimize=False)
    assert info["backend"] == "torch"
    ref_logits, ref_tokens = transformers_run(folder)
    logits, tokens = OnnxDecoder(tmp_path / "model.onnx").generate(PROMPT, 6)
    assert np.abs(logits - ref_logits).max() <= tolerance
    if level == "none":
        assert tokens == ref_tokens
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert (
        dims["input_ids"] == ["batch_size", "sequence_length"]
        and dims["past_key_values.0.key"][2] == "past_sequence_length"
    )


def test_torch_backend_int4_uses_matmulnbits_and_agrees_with_the_builder(tiny_base, tmp_path):
    export_onnx(
        tiny_base, tmp_path / "torch", backend="torch", level="int4", opset=18, dynamic_axes=AXES, optimize=False
    )
    export_onnx(
        tiny_base, tmp_path / "builder", backend="builder", level="int4", opset=18, dynamic_axes=AXES, optimize=False
    )
    graph = onnx.load(str(tmp_path / "torch" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 14  # 7 projections x 2 layers (+ the head)
    theirs = OnnxDecoder(tmp_path / "torch" / "model.onnx").prompt(PROMPT)[0]
    ours = OnnxDecoder(tmp_path / "builder" / "model.onnx").prompt(PROMPT)[0]
    reference = transformers_run(tiny_base)[0]
    # same quantizer, same blocks: both land equally near the fp32 reference
    assert abs(np.abs(theirs - reference).mean() - np.abs(ours - reference).mean()) < 0.05


def test_the_folder_has_what_onnxruntime_genai_reads(tiny_base, tmp_path):
    info = export_onnx(tiny_base, tmp_path, backend="builder", level="none", opset=17, dynamic_axes=AXES)
    assert info["graphs"] == ["model.onnx", "model.optimized.onnx"]
    genai = json.loads((tmp_path / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (32, 4, 2)
    assert genai["model"]["type"] == "qwen3" and (tmp_path / "tokenizer.json").is_file()
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    eos = genai["model"]["eos_token_id"]
    _, ours = OnnxDecoder(tmp_path / "model.onnx").generate(PROMPT, 6)
    assert tokens[: len(ours)] == ours and (len(tokens) == 6 or tokens[-1] == eos)


def test_an_unknown_architecture_is_refused_by_the_builder_and_taken_by_auto(tiny_base, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_base, tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["SomethingElseForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError) as caught:
        build_onnx(folder, tmp_path / "out")
    assert caught.value.code == "ME802" and "onnx_backend: torch" in caught.value.hint()
    from model_export.exporters.onnx_export import choose_backend

    assert choose_backend("auto", folder) == "torch" and choose_backend("auto", tiny_base) == "builder"


def test_exporter_failures_become_the_guides_errors():
    from torch._dynamo.exc import UserError, UserErrorType

    unsupported = translate_export_error(
        RuntimeError(
            "Failed to convert the exported program to an ONNX model. No decompositions registered for the real-valued "
            "input "
            "of aten.scaled_dot_product_attention.default"
        ),
        18,
        {},
    )
    assert isinstance(unsupported, OnnxExportError) and isinstance(unsupported, RuntimeError)
    assert str(unsupported) == "Unsupported operator: aten::scaled_dot_product_attention.default"
    assert unsupported.code == "ME803" and "opset 18" in unsupported.hint()
    dynamic = translate_export_error(
        UserError(
            UserErrorType.CONSTRAINT_VIOLATION,
            "Constraints violated (sequence_length)! "
            "Not all values of sequence_length in the specified range satisfy the generated guard",
        ),
        18,
        {"input_ids": {0: "batch_size", 1: "sequence_length"}},
    )
    assert str(dynamic) == "The following model inputs have dynamic shapes that are not supported: input_ids"
    assert dynamic.code == "ME804" and "onnx_dynamic_axes: null" in dynamic.hint()
    other = translate_export_error(ValueError("something else"), 18, {})
    assert other.code == "ME805" and str(other) == "ONNX export failed: ValueError: something else"


@pytest.mark.parametrize("backend,opset,minimum", [("builder", 13, 14), ("torch", 17, 18), ("auto", 11, 14)])
def test_an_opset_too_low_for_the_backend_is_a_config_error(backend, opset, minimum, tmp_path):
    config = ExportConfiguration(
        checkpoint_path=str(tmp_path / "run"),
        output_dir=str(tmp_path / "out"),
        export_formats=["onnx"],
        onnx_backend=backend,
        onnx_opset_version=opset,
    )
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert f"onnx_opset_version {opset} is too low" in str(caught.value) and f"at least {minimum}" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_config_without_token_ids_takes_the_tokenizers_and_genai_loads_it(tiny_base, tmp_path):
    """A base whose config.json names no eos or bos (the benchmarks' random bases): genai_config.json takes the
    tokenizer's ids, since onnxruntime-genai refuses a null ("Expected a number but saw a null")."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    (base / "config.json").write_text(json.dumps(config))
    (base / "generation_config.json").unlink(missing_ok=True)
    export_onnx(base, tmp_path / "out", backend="builder", level="none", opset=17, dynamic_axes=AXES, optimize=False)
    model = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert model["eos_token_id"] == tokenizer.eos_token_id is not None
    assert None not in (model["bos_token_id"], model["pad_token_id"])
    og = pytest.importorskip("onnxruntime_genai")
    og.Tokenizer(og.Config(str(tmp_path / "out")))  # loads: no null id


def test_a_folder_genai_cannot_load_fails_its_serving_check_with_genais_words(tiny_base, tmp_path):
    """The serving check of a graph whose genai_config.json onnxruntime-genai refuses: failed (a user's genai cannot
    serve it either), quoting genai, rather than an exception that stops verification."""
    pytest.importorskip("onnxruntime_genai")
    from model_export.verify.serving import serving_check

    export_onnx(tiny_base, tmp_path, backend="builder", level="none", opset=17, dynamic_axes=AXES, optimize=False)
    genai = json.loads((tmp_path / "genai_config.json").read_text())
    genai["model"]["bos_token_id"] = None
    (tmp_path / "genai_config.json").write_text(json.dumps(genai))
    result = serving_check(tmp_path / "model.onnx", tiny_base)
    assert result["status"] == "failed"
    assert all(c["status"] == "failed" and "bos_token_id" in c["reason"] for c in result["checks"])
