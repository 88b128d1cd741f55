"""GGUF export on tiny models: read back with gguf's own reader, compared with the merge and, where installed, run in
llama.cpp."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from model_export.errors import ExportFormatError  # noqa: E402
from model_export.exporters.gguf_export import export_gguf  # noqa: E402
from model_export.exporters.gguf_readback import read_back  # noqa: E402
from model_export.quantize.gguf_types import GGUF_TYPES, K_MIXTURES  # noqa: E402

PROMPT = [5, 17, 33, 2, 90, 100, 7, 41, 3]


def field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1:
        value = f.parts[f.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value[0]
    return [bytes(f.parts[i]).decode() if f.parts[i].dtype == np.uint8 else f.parts[i][0] for i in f.data]


@pytest.mark.parametrize("gguf_type", [t for t in GGUF_TYPES if t not in K_MIXTURES])  # K mixtures: test_kquants.py
def test_every_type_reads_back_equal_to_the_merge(tiny_base, tmp_path, gguf_type):
    info = export_gguf(tiny_base, tmp_path, gguf_type=gguf_type)
    checked = read_back(info["path"], tiny_base)
    assert checked["tensors"] == 24  # tied: no output.weight
    reader = gguf.GGUFReader(info["path"])
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "f32" and types["token_embd.weight"] == gguf_type
    assert "output.weight" not in types
    bound = {
        "f32": 0.0,
        "f16": 2e-3,
        "bf16": 2e-3,
        "q8_0": 0.01,
        "q5_1": 0.03,
        "q5_0": 0.03,
        "q4_1": 0.05,
        "q4_0": 0.05,
    }
    assert max(checked["max_abs_diff_by_type"].values()) <= bound[gguf_type]


@pytest.mark.parametrize("gguf_type", ["f32", "bf16", "q8_0", "q4_k_m"])
def test_our_header_reader_sees_what_gguf_s_reader_sees(tiny_base, adapter, tmp_path, gguf_type):
    """runtimes/gguf_file.py (read without building every field) against gguf's own GGUFReader: every tensor's name,
    type, shape and data array, every metadata key and the scalar and string values, of a model and a LoRA GGUF."""
    from model_export.exporters.gguf_lora import export_gguf_lora
    from model_export.runtimes.gguf_file import read_gguf

    files = [export_gguf(tiny_base, tmp_path / "model", gguf_type=gguf_type)["path"]]
    files.append(export_gguf_lora(adapter, tiny_base, tmp_path / "lora")["path"])
    for path in files:
        ours, theirs = read_gguf(path), gguf.GGUFReader(path)
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for mine, reference in zip(ours.tensors, theirs.tensors):
            assert mine.tensor_type == reference.tensor_type and mine.shape == tuple(int(d) for d in reference.shape)
            assert mine.data.dtype == reference.data.dtype and np.array_equal(mine.data, reference.data)
        assert set(ours.fields) == set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
        for key, value in ours.fields.items():
            expected = field(theirs, key)
            assert value == (len(expected) if isinstance(expected, list) else expected), key
        if "tokenizer.ggml.tokens" in ours.fields:
            tokens = field(theirs, "tokenizer.ggml.tokens")
            assert [ours.string_item("tokenizer.ggml.tokens", i) for i in (0, 7, len(tokens) - 1)] == [
                tokens[0],
                tokens[7],
                tokens[-1],
            ]
            assert ours.string_item("tokenizer.ggml.tokens", len(tokens)) is None


def test_metadata_and_tokenizer_as_llama_cpp_expects(tmp_path):
    from transformers import AutoTokenizer

    from model_export.demo.tiny import build_base_model

    base = build_base_model(tmp_path / "padded", vocab_size=448)  # 384 tokens, 448 embedding rows, as Qwen pads
    info = export_gguf(base, tmp_path / "out", gguf_type="f16")
    reader = gguf.GGUFReader(info["path"])
    config = json.loads((base / "config.json").read_text())
    assert field(reader, "general.architecture") == "qwen3"
    assert field(reader, "qwen3.attention.key_length") == 32 != config["hidden_size"] // config["num_attention_heads"]
    assert field(reader, "qwen3.attention.head_count_kv") == 2 and field(reader, "qwen3.block_count") == 2
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert len(tokens) == config["vocab_size"] > len(tokenizer)  # padded to the embedding's rows
    assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]" and types[-1] == gguf.TokenType.UNUSED
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.eos_token_id") == im_end
    assert field(reader, "tokenizer.ggml.merges") and "<|im_start|>" in field(reader, "tokenizer.chat_template")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert (
        modelfile.startswith("FROM ./model-f16.gguf")
        and 'PARAMETER stop "<|im_end|>"' in modelfile
        and "<|im_start|>" in modelfile
    )


def test_untied_heads_and_biases_are_written(untied_base, tmp_path, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    info = export_gguf(untied_base, tmp_path / "untied", gguf_type="q8_0")
    assert read_back(info["path"], untied_base)["tensors"] == 25
    assert "output.weight" in {t.name for t in gguf.GGUFReader(info["path"]).tensors}
    qwen2 = tmp_path / "qwen2"
    config = Qwen2Config(
        vocab_size=len(json.loads((untied_base / "tokenizer.json").read_text())["model"]["vocab"]) + 64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(qwen2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(untied_base / name, qwen2 / name)
    info = export_gguf(qwen2, tmp_path / "qwen2-out", gguf_type="q4_0")
    read_back(info["path"], qwen2)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(info["path"]).tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.0.attn_q.weight"] == "Q4_0"


@pytest.mark.parametrize("gguf_type,where", [("q8_0", 100), ("f32", 100), ("f32", -3)])
def test_a_damaged_file_fails_the_read_back(tiny_base, tmp_path, gguf_type, where, monkeypatch):
    """A flipped byte is found: in a quantized tensor by encoding the merge again, in a tensor stored in the merge's
    own type (f32 from this fp32 base) by comparing the bytes, chunk by chunk (here 256 bytes at a time, so the last
    chunk is checked as well as the first)."""
    from model_export.exporters import gguf_readback

    monkeypatch.setattr(gguf_readback, "_COMPARE_BYTES", 256)
    info = export_gguf(tiny_base, tmp_path, gguf_type=gguf_type)
    assert read_back(info["path"], tiny_base)["tensors"] == 24
    reader = gguf.GGUFReader(info["path"])
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    offset = tensor.data_offset + (where if where >= 0 else int(tensor.n_bytes) + where)
    del reader, tensor
    data = bytearray(open(info["path"], "rb").read())
    data[offset] ^= 0xFF
    open(info["path"], "wb").write(bytes(data))
    with pytest.raises(ExportFormatError) as caught:
        read_back(info["path"], tiny_base)
    assert caught.value.code == "ME809" and "blk.1.ffn_down.weight differs from the merge" in str(caught.value)


def test_what_the_export_does_not_handle_is_refused_before_writing(tiny_base, tmp_path):
    folder = shutil.copytree(tiny_base, tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError) as caught:
        export_gguf(folder, tmp_path / "out")
    assert caught.value.code == "ME807" and "rope scaling longrope" in str(caught.value)
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match="the architecture GPT2LMHeadModel"):
        export_gguf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gguf_type,atol", [("f32", 1e-3), ("q8_0", None)])
def test_llama_cpp_runs_the_file_and_agrees_with_transformers(tiny_base, tmp_path, gguf_type, atol):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from model_export.runtimes.llamacpp import llama_cpp_run as _llama_cpp_run

    export_gguf(tiny_base, tmp_path, gguf_type=gguf_type)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
        ref_tokens = model.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        )[0, len(PROMPT) :].tolist()
    logits, tokens = _llama_cpp_run(tmp_path / f"model-{gguf_type}.gguf", PROMPT, 6)
    assert logits.shape == ref.shape
    if atol:
        np.testing.assert_allclose(logits, ref, atol=atol, rtol=0)
        assert tokens == ref_tokens[: len(tokens)]
    else:
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def test_a_lora_only_adapter_applies_peft_scaling_in_llama_cpp(tiny_base, adapter, tmp_path):
    """rsLoRA (alpha/sqrt(r)) with a rank pattern: each lora_b carries its module's scaling, so llama.cpp's
    base + --lora equals PEFT's unmerged model."""
    from model_export.demo.tiny import build_adapter
    from model_export.exporters.gguf_lora import export_gguf_lora
    from model_export.exporters.gguf_readback import read_back_lora
    from tests.reference import unmerged_logits

    other = adapter
    adapter = build_adapter(
        tiny_base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"down_proj": 8},
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    info = export_gguf_lora(adapter, tiny_base, tmp_path / "lora")
    assert read_back_lora(info["path"], adapter, tiny_base) == {"tensors": 12, "modules": 6}
    with pytest.raises(ExportFormatError, match="the LoRA tensors differ"):
        read_back_lora(info["path"], other, tiny_base)
    reader = gguf.GGUFReader(info["path"])
    names = {t.name: t for t in reader.tensors}
    assert info["modules"] == 6 and len(names) == 12 and "blk.1.ffn_down.weight.lora_b" in names
    assert field(reader, "adapter.type") == "lora" and field(reader, "general.type") == "adapter"
    llama_cpp = pytest.importorskip("llama_cpp")
    base_gguf = export_gguf(tiny_base, tmp_path / "base", gguf_type="f32")["path"]
    llm = llama_cpp.Llama(
        model_path=base_gguf, lora_path=info["path"], n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    llm.eval(PROMPT)
    logits = np.array(llm.scores[: len(PROMPT)])
    llm.close()
    reference = unmerged_logits(tiny_base, adapter, torch.tensor([PROMPT]))[0].numpy()
    np.testing.assert_allclose(logits, reference, atol=1e-3, rtol=0)
    from tests.reference import model_logits

    assert (
        np.abs(model_logits(tiny_base, torch.tensor([PROMPT]))[0].numpy() - reference).max() > 0.05
    )  # the adapter matters


def test_adapters_llama_cpp_cannot_hold_are_refused(tiny_base, tmp_path):
    from model_export.demo.tiny import build_adapter
    from model_export.exporters.gguf_lora import export_gguf_lora

    adapter = build_adapter(tiny_base, tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ExportFormatError, match="an adapter with DoRA"):
        export_gguf_lora(adapter, tiny_base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_blocks_are_bit_identical_to_ggmls_c_quantizer(tiny_base, tmp_path, gguf_type):
    """The file's blocks against ggml_quantize_chunk from the libggml that llama-cpp-python ships."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    from safetensors.numpy import load_file

    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    info = export_gguf(tiny_base, tmp_path, gguf_type=gguf_type)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(info["path"]).tensors}
    weights = load_file(str(tiny_base / "model.safetensors"))
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    for hf_name, gguf_name in (
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
        ("model.embed_tokens.weight", "token_embd.weight"),
    ):
        rows = np.ascontiguousarray(weights[hf_name], dtype=np.float32)
        ours = stored[gguf_name].reshape(-1)
        theirs = np.zeros(ours.size, dtype=np.uint8)
        written = lib.ggml_quantize_chunk(
            int(qtype), rows.ctypes.data, theirs.ctypes.data, 0, rows.shape[0], rows.shape[1], None
        )
        assert written == ours.size and np.array_equal(ours, theirs)


ROPES = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


def tiny_model(tiny_base, folder, arch, rope="default"):
    """A tiny Llama or Qwen3 with the demo tokenizer (GQA, head_dim 32 != hidden/heads) and the given rope scaling."""
    from transformers import LlamaConfig, Qwen3Config

    from tests.conftest import spread_model

    shape = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_scaling=ROPES[rope],
    )
    config = (
        LlamaConfig(architectures=["LlamaForCausalLM"], **shape)
        if arch == "llama"
        else Qwen3Config(architectures=["Qwen3ForCausalLM"], **shape)
    )
    folder = spread_model(folder, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_base / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "arch, dtype, kernel",
    [
        ("qwen3", "bfloat16", True),
        ("qwen3", "bfloat16", False),
        ("llama", "bfloat16", True),
        ("llama", "float32", True),
    ],
)
def test_a_type_that_stores_the_merge_s_own_bytes_writes_the_file_widening_writes(
    tiny_base, tmp_path, monkeypatch, arch, dtype, kernel
):
    """bf16 into bf16 (and f32 into f32) copies the merge's bytes, Llama's q/k rows reordered per head as they are:
    the same file, byte for byte, as widening every tensor to float32 and encoding it again. A tensor whose rows stay
    in place is copied file to file by the kernel (copy_file_range); where the kernel refuses (another filesystem:
    EXDEV) its bytes are read and written instead."""
    import errno

    from transformers import AutoModelForCausalLM

    from model_export.exporters import gguf_export, gguf_tensors

    folder = tiny_model(tiny_base, tmp_path / "model", arch)
    if dtype == "bfloat16":  # the merge's dtype: its tensors and its config.json
        AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).save_pretrained(str(folder))
    gguf_type = {"bfloat16": "bf16", "float32": "f32"}[dtype]
    if not kernel:

        def refused(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr("os.copy_file_range", refused, raising=False)
    copies, kernel_copies, stored_chunks, copy_range = [], [], gguf_export.stored_chunks, gguf_tensors.copy_range
    monkeypatch.setattr(gguf_export, "stored_chunks", lambda src, fh: _chunks_read(src, fh, copies, stored_chunks))
    monkeypatch.setattr(
        gguf_tensors, "copy_range", lambda *a: kernel_copies.append(copy_range(*a)) or kernel_copies[-1]
    )
    copied = export_gguf(folder, tmp_path / "copied", gguf_type=gguf_type)["path"]
    assert kernel_copies and all(kernel_copies) == kernel and any(kernel_copies) == kernel
    q, embedding = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    read = {q, embedding} & set(copies)  # Llama's q rows are reordered, so read whatever the kernel can do
    assert read == ({q} if arch == "llama" else set()) | (set() if kernel else {embedding, q})
    monkeypatch.setattr(gguf_export, "STORED_AS", {})
    widened = export_gguf(folder, tmp_path / "widened", gguf_type=gguf_type)["path"]
    assert Path(copied).read_bytes() == Path(widened).read_bytes()
    types = {t.tensor_type.name.lower() for t in gguf.GGUFReader(copied).tensors}
    assert gguf_type in types


def _chunks_read(source, fh, names, stored_chunks):
    """stored_chunks, noting each tensor whose chunks are actually read."""
    for chunk in stored_chunks(source, fh):
        names.append(source.name)
        yield chunk


def test_a_kernel_copy_moves_the_file_s_position_or_leaves_it_for_the_caller(tmp_path, monkeypatch):
    """files.copy_range: the bytes asked for, at the destination's position, in as many calls as the kernel takes;
    False with the position unchanged where copy_file_range is missing or refuses; a full disk raised, not hidden."""
    import errno
    import os

    from model_export.files import copy_range

    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 4)
    calls, kernel = [], os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or kernel(*a[:2], min(a[2], 100), *a[3:]))
    with open(source, "rb") as src, open(tmp_path / "out", "wb") as dst:
        dst.write(b"head")
        assert copy_range(src, dst, 10, 500) and dst.tell() == 504 and len(calls) == 5
        dst.write(b"tail")
    assert (tmp_path / "out").read_bytes() == b"head" + source.read_bytes()[10:510] + b"tail"
    for failure, raised in ((errno.EXDEV, False), (errno.ENOSPC, True)):

        def refuse(*args, failure=failure):
            raise OSError(failure, os.strerror(failure))

        monkeypatch.setattr(os, "copy_file_range", refuse)
        with open(source, "rb") as src, open(tmp_path / "out", "wb") as dst:
            dst.write(b"head")
            if raised:
                with pytest.raises(OSError) as caught:
                    copy_range(src, dst, 0, 10)
                assert caught.value.errno == errno.ENOSPC
            else:
                assert not copy_range(src, dst, 0, 10) and dst.tell() == 4
    monkeypatch.delattr(os, "copy_file_range")
    with open(source, "rb") as src, open(tmp_path / "out", "wb") as dst:
        assert not copy_range(src, dst, 0, 10) and dst.tell() == 0


@pytest.mark.parametrize(
    "arch, rope", [("llama", "default"), ("llama", "llama3"), ("llama", "linear"), ("llama", "yarn"), ("qwen3", "yarn")]
)
def test_llama_and_scaled_rope_run_in_llama_cpp_as_in_transformers(tiny_base, tmp_path, arch, rope):
    """Llama's q/k rows reordered for llama.cpp's pairwise rope; Llama 3 rope as a rope_freqs tensor (llama.cpp's way),
    linear and YaRN as metadata: llama.cpp computes what transformers computes, also past the original context."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from model_export.runtimes.llamacpp import llama_cpp_run as _llama_cpp_run

    folder = tiny_model(tiny_base, tmp_path / "model", arch, rope)
    info = export_gguf(folder, tmp_path / "gguf", gguf_type="f32")
    assert read_back(info["path"], folder)["tensors"] == info["tensors"]
    prompt = (PROMPT * 5)[:40]  # past the original context of 16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].numpy()
    logits, _ = _llama_cpp_run(info["path"], prompt, 0)
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=0)


def test_a_lora_on_llama_q_and_k_applies_in_llama_cpp(tiny_base, tmp_path):
    """lora_b of q/k reordered like the base's rows, so base GGUF + --lora equals PEFT's unmerged Llama."""
    from model_export.demo.tiny import build_adapter
    from model_export.exporters.gguf_lora import export_gguf_lora
    from model_export.exporters.gguf_readback import read_back_lora
    from tests.reference import unmerged_logits

    folder = tiny_model(tiny_base, tmp_path / "llama", "llama")
    adapter = build_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "o_proj"])
    info = export_gguf_lora(adapter, folder, tmp_path / "lora")
    assert read_back_lora(info["path"], adapter, folder) == {"tensors": 12, "modules": 6}
    llama_cpp = pytest.importorskip("llama_cpp")
    base_gguf = export_gguf(folder, tmp_path / "base", gguf_type="f32")["path"]
    llm = llama_cpp.Llama(
        model_path=base_gguf, lora_path=info["path"], n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    llm.eval(PROMPT)
    logits = np.array(llm.scores[: len(PROMPT)])
    llm.close()
    np.testing.assert_allclose(
        logits, unmerged_logits(folder, adapter, torch.tensor([PROMPT]))[0].numpy(), atol=1e-3, rtol=0
    )


def test_the_read_back_samples_large_quantized_tensors_and_still_finds_damage(tiny_base, tmp_path, monkeypatch):
    """A quantized tensor larger than READBACK_SAMPLE_BYTES is re-encoded on four row ranges, its first and last rows
    among them: damage in those rows is found; the rest is left to llama.cpp's run of the whole file."""
    from model_export.exporters import gguf_readback

    monkeypatch.setattr(gguf_readback, "READBACK_SAMPLE_BYTES", 4096)
    info = export_gguf(tiny_base, tmp_path, gguf_type="q8_0")
    assert read_back(info["path"], tiny_base)["tensors"] == 24
    reader = gguf.GGUFReader(info["path"])
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    offset, size = tensor.data_offset, tensor.n_bytes
    del reader, tensor
    data = bytearray(open(info["path"], "rb").read())
    data[offset + size - 5] ^= 0xFF  # in the last row
    open(info["path"], "wb").write(bytes(data))
    with pytest.raises(ExportFormatError, match="blk.1.ffn_down.weight differs from the merge"):
        read_back(info["path"], tiny_base)


def test_llama_cpp_extra_buffers_are_off_on_an_amx_cpu_unless_asked(monkeypatch):
    """llama-cpp-python 0.3.36 built natively crashed (SIGSEGV in ggml_backend_amx_mul_mat) on every quantized GGUF
    on a CPU with AMX: its extra buffer types are off there, and the environment variable decides when set."""
    from model_export.runtimes import llamacpp

    amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    assert llamacpp.extra_buffers() is (not amx)
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, "0")
    assert llamacpp.extra_buffers() is False
    llama_cpp = pytest.importorskip("llama_cpp")
    seen = []
    real = llama_cpp.Llama
    monkeypatch.setattr(llama_cpp, "Llama", lambda **kw: seen.append(llama_cpp.llama_cpp.llama_model_default_params()))
    llamacpp.load_llama(model_path="x")
    assert seen[0].use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # put back after loading
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, "1")
    llamacpp.load_llama(model_path="x")
    assert seen[1].use_extra_bufts is True and real is not None


def test_llama_cpp_maps_a_file_unless_it_repacks_its_quantized_weights(tiny_base, tmp_path, monkeypatch):
    """Mapped, a GGUF just written is read from the page cache; read into llama.cpp's own memory where its CPU
    kernels repack quantized blocks (extra buffers on), since the mapped pages stayed resident beside the copy."""
    from model_export.runtimes import llamacpp

    for gguf_type in ("bf16", "q8_0"):
        export_gguf(tiny_base, tmp_path / gguf_type, gguf_type=gguf_type)
    bf16, q8_0 = tmp_path / "bf16" / "model-bf16.gguf", tmp_path / "q8_0" / "model-q8_0.gguf"
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, "1")
    assert llamacpp.mapped(bf16) is True and llamacpp.mapped(q8_0) is False
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, "0")
    assert llamacpp.mapped(bf16) is True and llamacpp.mapped(q8_0) is True


def test_llama_cpp_evaluates_a_batch_on_the_threads_it_was_given(monkeypatch):
    """llama-cpp-python evaluates a prompt on every core unless told (n_threads_batch): a batch's worker given one
    core must not spin two."""
    from model_export.runtimes import llamacpp

    llama_cpp = pytest.importorskip("llama_cpp")
    seen = []
    monkeypatch.setattr(llama_cpp, "Llama", lambda **kw: seen.append(kw))
    monkeypatch.setenv("MODEL_EXPORT_THREADS", "1")
    llamacpp.load_llama(model_path="x", n_threads=llamacpp.threads())
    llamacpp.load_llama(model_path="x", vocab_only=True)
    assert [kw["n_threads_batch"] for kw in seen] == [1, 1]
