"""K-quants and llama.cpp's K mixtures against llama.cpp itself: every block against ggml_quantize_chunk, every tensor
of a mixture (its type and its bytes) against llama_model_quantize on the same f32 GGUF, with and without an
importance matrix."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from model_export.exporters.gguf_export import export_gguf  # noqa: E402
from model_export.exporters.gguf_readback import read_back  # noqa: E402
from model_export.quantize import kquants  # noqa: E402
from model_export.quantize.gguf_types import K_MIXTURES  # noqa: E402
from tests.reference import ggml_quantize, llama_quantize  # noqa: E402

ALL = (*kquants.K_TYPES, *kquants.LEGACY_BYTES)


def awkward_rows(seed=0):
    """Rows that take every branch: zeros, a constant block, large and tiny magnitudes, outliers, one sign only,
    values on a coarse grid (ties in rounding)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((24, 768)).astype(np.float32) * 0.02
    rows[1] = 0
    rows[2, :256] = 0.5
    rows[3] *= 1000
    rows[4, ::7] *= 50
    rows[5] = np.abs(rows[5])
    rows[6] = -np.abs(rows[6])
    rows[7] = rng.integers(-3, 4, 768) * 0.01
    rows[8] *= 1e-6
    rows[9, 300:330] = 0
    return rows


def importance(columns, seed=0):
    weights = (np.random.default_rng(seed).random(columns).astype(np.float32) ** 3) * 10
    weights[:5] = 0  # columns the calibration never saw
    return weights


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["reference", "imatrix"])
@pytest.mark.parametrize("k_type", kquants.K_TYPES)
def test_k_blocks_dequantize_close_to_the_input(k_type, with_imatrix):
    """Without llama.cpp: gguf's own dequantizer reads our blocks back to within the type's rounding."""
    rows = awkward_rows()[10:]
    blocks = kquants.quantize(rows, k_type, importance(rows.shape[1]) if with_imatrix else None)
    back = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, k_type.upper()))
    error = np.sqrt(((back - rows) ** 2).mean()) / np.sqrt((rows**2).mean())
    assert error < {"q2_k": 0.45, "q3_k": 0.25, "q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[k_type]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ggml_type", ALL)
def test_blocks_are_byte_identical_to_ggml_quantize_chunk(ggml_type, seed):
    pytest.importorskip("llama_cpp")
    rows = awkward_rows(seed)
    weights = importance(rows.shape[1], seed)
    if ggml_type in kquants.K_TYPES:
        assert np.array_equal(kquants.quantize(rows, ggml_type), ggml_quantize(rows, ggml_type))
    assert np.array_equal(kquants.quantize(rows, ggml_type, weights), ggml_quantize(rows, ggml_type, weights))


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    """Rows of whole 256-value blocks (and attn_output's 128, which falls back), eight layers so that the mixtures'
    choice per layer shows, an f32 GGUF of it for llama.cpp's quantizer and an importance matrix for every matrix."""
    from model_export.demo.tiny import build_base_model

    work = tmp_path_factory.mktemp("kmodel")
    models = {}
    for tied in (True, False):
        base = build_base_model(work / f"base-{tied}", hidden_size=256, num_hidden_layers=8, tie_word_embeddings=tied)
        f32 = export_gguf(base, work / f"f32-{tied}", gguf_type="f32")["path"]
        tensors = gguf.GGUFReader(f32).tensors
        imatrix = {t.name: importance(int(t.shape[0]), i) for i, t in enumerate(tensors) if len(t.shape) == 2}
        models[tied] = (base, f32, imatrix)
    return models


def stored(path):
    return {
        t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).tobytes()) for t in gguf.GGUFReader(path).tensors
    }


CASES = [(m, True, True) for m in K_MIXTURES] + [
    ("q4_k_m", True, False),
    ("q3_k_m", True, False),
    ("q2_k", True, False),
    ("q4_k_m", False, True),
    ("q5_k_m", False, False),
]


@pytest.mark.parametrize("mixture, tied, with_imatrix", CASES)
def test_mixtures_are_byte_identical_to_llama_model_quantize(k_model, tmp_path, mixture, tied, with_imatrix):
    """Same tensor types (Q6_K output, more bits for attn_v and ffn_down where llama.cpp gives them, 32-value
    fallbacks for 128-wide rows) and the same bytes as llama-quantize on our f32 GGUF of the same model."""
    pytest.importorskip("llama_cpp")
    base, f32, imatrix = k_model[tied]
    imatrix = imatrix if with_imatrix else None
    ours = stored(export_gguf(base, tmp_path / "ours", gguf_type=mixture, imatrix=imatrix)["path"])
    theirs = stored(llama_quantize(f32, tmp_path / "theirs.gguf", mixture, imatrix))
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    assert [n for n in ours if ours[n][1] != theirs[n][1]] == []


@pytest.mark.parametrize(
    "gguf_type, with_imatrix", [("q4_k_m", True), ("q4_k_m", False), ("q3_k_s", True), ("q5_0", True), ("q8_0", False)]
)
def test_our_quantizers_write_the_file_llama_cpp_s_quantizer_writes(
    k_model, tmp_path, monkeypatch, gguf_type, with_imatrix
):
    """Where the llamacpp extra is installed the export encodes with llama.cpp's ggml_quantize_chunk (faster); without
    it with our numpy K-quants and gguf.quants. Both give the same file, and each says which one wrote it; the read
    back (which encodes the merge again) passes either way."""
    pytest.importorskip("llama_cpp")
    from model_export.quantize import ggml_quants

    base, _, imatrix = k_model[True]
    imatrix = imatrix if with_imatrix else None
    fast = export_gguf(base, tmp_path / "ggml", gguf_type=gguf_type, imatrix=imatrix)
    monkeypatch.setattr(ggml_quants, "_LOADED", [None])  # as on a machine without llama-cpp-python
    ours = export_gguf(base, tmp_path / "numpy", gguf_type=gguf_type, imatrix=imatrix)
    assert fast["quantizer"].startswith("llama.cpp (llama-cpp-python ") and ours["quantizer"] == "model-export (numpy)"
    with open(fast["path"], "rb") as a, open(ours["path"], "rb") as b:
        assert a.read() == b.read()
    assert read_back(ours["path"], base, imatrix)["tensors"] == len(gguf.GGUFReader(ours["path"]).tensors)


def test_llama_cpp_s_quantizer_is_refused_rows_it_would_abort_on():
    pytest.importorskip("llama_cpp")
    from model_export.quantize.ggml_quants import ggml_quantize as ours

    rows = awkward_rows()
    assert np.array_equal(ours(rows, "q4_k", importance(768)), ggml_quantize(rows, "q4_k", importance(768)))
    with pytest.raises(ValueError, match="whole 256-value blocks"):
        ours(rows[:, :300], "q4_k")  # ggml asserts (and ends the process) on a partial block
    with pytest.raises(ValueError, match="768 columns but 700 importances"):
        ours(rows, "q4_k", np.ones(700, dtype=np.float32))


def test_q4_k_m_gives_more_bits_where_llama_cpp_does(k_model, tmp_path):
    base, _, _ = k_model[False]
    types = {n: t for n, (t, _) in stored(export_gguf(base, tmp_path, gguf_type="q4_k_m")["path"]).items()}
    # use_more_bits for 8 layers: the first and last eighth and every third layer between (0, 3, 6, 7)
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == [
        "Q6_K",
        *["Q4_K"] * 2,
        "Q6_K",
        "Q4_K",
        "Q4_K",
        "Q6_K",
        "Q6_K",
    ]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [types[f"blk.{i}.attn_v.weight"] for i in range(8)]
    assert (
        types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    )  # untied: the embedding is not output
    assert types["blk.0.attn_output.weight"] == "Q5_0"  # 128 values a row: llama.cpp's fallback for Q4_K
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_read_back_needs_the_importance_matrix_the_export_used(k_model, tmp_path):
    base, _, imatrix = k_model[True]
    path = export_gguf(base, tmp_path, gguf_type="q4_k_m", imatrix=imatrix)["path"]
    assert read_back(path, base, imatrix)["tensors"] == len(gguf.GGUFReader(path).tensors)
    with pytest.raises(Exception, match="differs from the merge"):
        read_back(path, base)  # re-quantized without it, the blocks differ: the read-back compares real bytes


@pytest.mark.parametrize(
    "tied, output_type, token_type", [(False, "q8_0", "q5_k"), (True, "q4_k", None), (True, None, "q6_k")]
)
def test_output_and_token_embedding_types_as_llama_quantize_sets_them(k_model, tmp_path, tied, output_type, token_type):
    """gguf_output_type and gguf_token_embedding_type reach export_gguf as these arguments (and are refused without a
    GGUF to apply to: test_config_validator)."""
    pytest.importorskip("llama_cpp")
    base, f32, _ = k_model[tied]
    path = export_gguf(
        base, tmp_path / "ours", gguf_type="q4_k_m", output_type=output_type, token_embedding_type=token_type
    )["path"]
    ours = stored(path)
    theirs = stored(llama_quantize(f32, tmp_path / "theirs.gguf", "q4_k_m", None, output_type, token_type))
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    assert [n for n in ours if ours[n][1] != theirs[n][1]] == []
    embedding = (token_type or output_type if tied else token_type).upper()
    assert ours["token_embd.weight"][0] == embedding
