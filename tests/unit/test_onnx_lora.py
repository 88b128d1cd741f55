"""Adapters served unmerged in onnxruntime-genai (exporters/onnx_lora.py, runtimes/genai.py): the base graph with LoRA
inputs and an .onnx_adapter per adapter, run in onnxruntime-genai with the adapter active, against PEFT's own unmerged
forward on the same tokens (the reference implementation), for each of PEFT's scalings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model_export.config import default_dynamic_axes
from model_export.demo.tiny import build_adapter
from model_export.errors import ExportFormatError
from tests.reference import model_logits, unmerged_logits

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx")

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61, 7, 12, 300, 45]])
SETTINGS = {"backend": "builder", "level": "none", "opset": 17, "dynamic_axes": default_dynamic_axes()}


def _serve(base: Path, adapters: list[Path], out: Path, **settings) -> tuple[Path, list[Path]]:
    """The base graph for ``adapters`` and each adapter's folder (as a batch lays them out): (graph, adapter files)."""
    from model_export.exporters.onnx_export import base_graph
    from model_export.exporters.onnx_lora import adapter_files, lora_targets

    graph = out / "base"
    base_graph(base, graph, lora_targets(adapters, base), {**SETTINGS, **settings})
    files = [Path(adapter_files(a, graph, out / f"adapter-{i}")["path"]) for i, a in enumerate(adapters)]
    return graph, files


def _genai(path: Path) -> torch.Tensor:
    from model_export.runtimes import runtime_for

    runtime = runtime_for(path)
    try:
        assert runtime.name == "onnxruntime-genai"
        return runtime.score([IDS[0]])[0]
    finally:
        runtime.close()


@pytest.mark.parametrize(
    "lora",
    [
        {},  # alpha / r
        {"use_rslora": True, "r": 8, "lora_alpha": 5},  # alpha / sqrt(r)
        {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3, "down_proj": 20}},
        {"target_modules": ["embed_tokens", "lm_head", "q_proj"]},  # an embedding's A gathered; a tied head's LoRA
    ],
    ids=["alpha-over-r", "rslora", "patterns", "embedding-and-head"],
)
def test_the_adapter_active_in_genai_gives_peft_s_logits(tiny_base, tmp_path, lora):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", seed=3, **lora)
    graph, [file] = _serve(tiny_base, [adapter], tmp_path)
    reference = unmerged_logits(tiny_base, adapter, IDS)[0]
    assert (_genai(file) - reference).abs().max() < 1e-4
    # the base alone (no adapter active: every LoRA input at rank 0) is the base model
    base = model_logits(tiny_base, IDS)[0]
    assert (_genai(graph) - base).abs().max() < 1e-4
    assert (reference - base).abs().max() > 0.05  # the adapter changes the logits: the check could fail


def test_adapters_of_other_ranks_and_targets_load_on_one_graph_unpadded(tiny_base, tmp_path):
    small = build_adapter(tiny_base, tmp_path / "small", seed=4, r=2, target_modules=["q_proj", "v_proj"])
    large = build_adapter(tiny_base, tmp_path / "large", seed=5, r=8)
    graph, files = _serve(tiny_base, [small, large], tmp_path)
    targets = json.loads((graph / "lora.json").read_text())["targets"]
    assert len(targets) == 2 * 7  # the union: every projection of both layers
    import onnxruntime as ort

    stored = ort.AdapterFormat.read_adapter(str(files[0])).get_parameters()
    assert len(stored) == 2 * 2 * 2 and {v.shape()[1] for k, v in stored.items() if k.endswith("lora_A")} == {2}
    for adapter, file in zip([small, large], files):
        assert (_genai(file) - unmerged_logits(tiny_base, adapter, IDS)[0]).abs().max() < 1e-4
    # as a server holds them: both loaded on one model, a generator per request with its own adapter active
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(graph))
    adapters = og.Adapters(model)
    for name, file in zip(["small", "large"], files):
        adapters.load(str(file), name)
    for name, adapter in [("large", large), ("small", small), ("large", large)]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=IDS.shape[1] + 1)
        generator = og.Generator(model, params)
        generator.set_active_adapter(adapters, name)
        generator.append_tokens(IDS.numpy().astype(np.int32))
        got = torch.from_numpy(np.array(generator.get_output("logits"), dtype=np.float32))[0]
        assert (got - unmerged_logits(tiny_base, adapter, IDS)[0]).abs().max() < 1e-4


def test_an_fp16_graph_takes_an_fp16_adapter(tiny_base, tmp_path):
    import onnxruntime as ort

    adapter = build_adapter(tiny_base, tmp_path / "adapter", seed=6)
    graph, [file] = _serve(tiny_base, [adapter], tmp_path, level="fp16")
    assert json.loads((graph / "lora.json").read_text())["dtype"] == "float16"
    values = ort.AdapterFormat.read_adapter(str(file)).get_parameters().values()
    assert {str(v.data_type()) for v in values} == {"tensor(float16)"}
    got, reference = _genai(file), unmerged_logits(tiny_base, adapter, IDS)[0]
    assert (got.argmax(-1) == reference.argmax(-1)).all() and (got - reference).abs().max() < 0.05


@pytest.mark.parametrize(
    "lora, named",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}, "modules_to_save"),
        ({"trainable_token_indices": [3, 4], "target_modules": ["q_proj"]}, "trainable_tokens"),
        ({"lora_bias": True}, "lora_bias"),
    ],
    ids=["dora", "modules-to-save", "added-tokens", "lora-bias"],
)
def test_what_is_not_a_lora_on_the_base_s_matrices_is_refused_with_the_reason(tiny_base, tmp_path, lora, named):
    from model_export.exporters.onnx_lora import adapter_files, adapter_problems, lora_targets

    adapter = build_adapter(tiny_base, tmp_path / "adapter", seed=7, **lora)
    if "modules_to_save" in lora:
        assert adapter_problems(adapter, tiny_base) == []  # saved as the base has it: nothing of its own yet
        _trained_whole_tensors(adapter)
    assert any(named in problem for problem in adapter_problems(adapter, tiny_base))
    assert lora_targets([adapter], tiny_base) == {}  # left out of the base graph's union: its run says why
    with pytest.raises(ExportFormatError) as alone:  # a single run's own base graph: refused before it is written
        lora_targets([adapter], tiny_base, refuse=True)
    assert alone.value.code == "ME813" and named in str(alone.value)
    plain = build_adapter(tiny_base, tmp_path / "plain", seed=8)
    graph, _ = _serve(tiny_base, [plain], tmp_path)
    with pytest.raises(ExportFormatError) as err:
        adapter_files(adapter, graph, tmp_path / "refused")
    assert err.value.code == "ME813" and named in str(err.value) and "batch_outputs: merged" in err.value.hint()
    assert not (tmp_path / "refused" / "adapter.onnx_adapter").exists()


def _trained_whole_tensors(adapter: Path) -> None:
    """Change the adapter's whole tensors (modules_to_save), as training them would."""
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    whole = [k for k in tensors if ".lora_" not in k]
    assert whole == ["base_model.model.lm_head.weight"]
    save_file({k: v + 0.01 if k in whole else v for k, v in tensors.items()}, str(file))


def test_an_adapter_apart_from_its_base_graph_says_where_it_must_be(tiny_base, tmp_path):
    from model_export.runtimes.genai import adapter_base

    adapter = build_adapter(tiny_base, tmp_path / "adapter", seed=9)
    _, [file] = _serve(tiny_base, [adapter], tmp_path)
    moved = Path(shutil.copytree(file.parent, tmp_path / "elsewhere" / "deeper" / "adapter"))
    with pytest.raises(ExportFormatError) as err:
        adapter_base(moved / file.name)
    assert err.value.code == "ME815" and "beside the base graph" in err.value.hint()


def test_an_adapter_targeting_what_the_graph_does_not_take_is_refused(tiny_base, tmp_path):
    from model_export.exporters.onnx_lora import adapter_files

    narrow = build_adapter(tiny_base, tmp_path / "narrow", seed=10, target_modules=["q_proj"])
    wide = build_adapter(tiny_base, tmp_path / "wide", seed=11)
    graph, _ = _serve(tiny_base, [narrow], tmp_path)
    with pytest.raises(ExportFormatError) as err:
        adapter_files(wide, graph, tmp_path / "wide-out")
    assert err.value.code == "ME814"
