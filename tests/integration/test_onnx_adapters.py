"""Adapters served unmerged in onnxruntime-genai, as the run writes them: a batch of the demo's Trainer runs with
batch_outputs adapters writes one base graph and an .onnx_adapter per adapter, each judged in onnxruntime-genai with
that adapter active; a single run asks for the same with onnx_adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_export import ExportConfiguration, run

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx")

PROMPTS = ["Hello", "Write a haiku about autumn."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two Trainer runs of the demo (other seeds and learning rates), one base."""
    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    root = tmp_path_factory.mktemp("onnx-adapters") / "runs"
    for seed, lr in ((1, 5e-3), (2, 1e-2)):
        build_training_run(shipped_base(), root / f"run-{seed}", steps=10, seed=seed, learning_rate=lr)
    return root


def _config(checkpoint_path, out, **overrides) -> ExportConfiguration:
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["onnx"], "test_input_samples": PROMPTS, "validation_new_tokens": 6, **overrides}
    return ExportConfiguration(
        checkpoint_path=str(checkpoint_path), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


def _peft_greedy(checkpoint: Path, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """PEFT's own greedy continuation of ``ids`` (fp32, base + adapter unmerged): what the adapter means."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model_export.demo.run import shipped_base

    base = AutoModelForCausalLM.from_pretrained(str(shipped_base()), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(checkpoint)).eval()
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.numel() :].tolist()


def test_a_batch_writes_one_base_graph_and_an_adapter_each_served_by_genai_as_peft_runs_them(runs, tmp_path):
    from transformers import AutoTokenizer

    from model_export.demo.run import shipped_base
    from model_export.runtimes.genai import GenaiRuntime
    from model_export.verify.reference import encode_prompt
    from model_export.verify.step import training_tokenizer

    out = tmp_path / "out"
    result = run(_config(runs, out, batch_outputs="adapters"))
    assert result.passed is True and [a["status"] for a in result.adapters] == ["done", "done"]
    assert [p.relative_to(out) for p in out.rglob("*.onnx")] == [Path("base/export/onnx/model.onnx")]  # one graph
    adapters = sorted(out.glob("*/export/onnx_adapter/adapter.onnx_adapter"))
    assert [p.parts[-4] for p in adapters] == ["run-1", "run-2"]
    graph_bytes = (out / "base/export/onnx/model.onnx.data").stat().st_size
    for adapter in adapters:  # the LoRA alone (PEFT's A and B in fp32, no padding), not a model
        peft = adapter.parents[1] / "peft" / "adapter_model.safetensors"
        assert abs(adapter.stat().st_size - peft.stat().st_size) < 0.05 * peft.stat().st_size
        assert adapter.stat().st_size < graph_bytes / 4
    batch = json.loads((out / "batch.json").read_text())
    base_verdict = batch["shared"]["base_onnx_verdict"]  # the base alone, no adapter active, on the held-out text
    assert base_verdict["status"] == "verified" and base_verdict["runtime"] == "onnxruntime-genai on cpu"
    for line in batch["adapters"]:
        rows = {row["format"]: row for row in line["artifacts"]}
        assert set(rows) == {"peft", "onnx_adapter"}
        assert rows["onnx_adapter"]["status"] == "verified" and rows["onnx_adapter"]["runtime"].startswith(
            "onnxruntime-genai"
        )
        assert rows["onnx_adapter"]["max_abs_diff"] < 1e-3  # fp32: judged on the full-precision tolerance
    # Each adapter active in onnxruntime-genai continues a prompt as PEFT does (fp32, greedy, free-running).
    continuations = []
    for adapter in adapters:
        checkpoint = Path(
            json.loads((adapter.parents[2] / "run.json").read_text())["steps"]["detect"]["result"]["selected"]
        )
        tokenizer = AutoTokenizer.from_pretrained(str(training_tokenizer(checkpoint, shipped_base())))
        ids = encode_prompt(tokenizer, PROMPTS[1])
        runtime = GenaiRuntime(adapter)
        try:
            ours = runtime.generate(ids.tolist(), 12)
        finally:
            runtime.close()
        assert ours == _peft_greedy(checkpoint, ids, 12)[: len(ours)] and len(ours) >= 1
        continuations.append(ours)
    assert continuations[0] != continuations[1]  # each file's own adapter is the one active
    page = (out / "report.html").read_text()
    assert "og.Adapters(model)" in page and "set_active_adapter" in page and str(adapters[0]) in page
    assert "the base graph alone (no adapter active)" in page


def test_a_single_run_with_onnx_adapter_ships_the_adapter_on_its_base_graph(runs, tmp_path):
    out = tmp_path / "out"
    result = run(_config(runs / "run-1", out, onnx_adapter=True, quantization_level="int8"))
    folder = out / "export" / "onnx_adapter"
    assert {"model.onnx", "adapter.onnx_adapter", "onnx_adapter.json", "lora.json", "genai_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    verdicts = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]
    verdict = verdicts["onnx_adapter"]
    assert verdict["status"] == "verified" and verdict["precision"] == "reduced" and "top-1 >=" in verdict["rule"]
    assert verdict["serving"]["status"] == "verified"  # genai's tokenizer renders the training run's template
    assert result.passed is True and set(result.artifacts) == {"onnx", "onnx_adapter"}
    # a setting of the ONNX graphs rewrites both; onnx_adapter off drops the unit and its verification
    again = run(_config(runs / "run-1", out, onnx_adapter=True, quantization_level="int8", onnx_block_size=16))
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert not steps["export:onnx_adapter"]["skipped"] and again.passed is True
    run(_config(runs / "run-1", out, quantization_level="int8", onnx_block_size=16))
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert "export:onnx_adapter" not in steps and "verify:onnx_adapter" not in steps
    assert steps["export:onnx"]["skipped"]


def test_onnx_adapter_in_a_merged_batch_adds_the_adapters_on_one_base_graph(runs, tmp_path):
    out = tmp_path / "out"
    result = run(_config(runs, out, onnx_adapter=True, onnx_optimize_graph=False))  # batch_outputs: merged
    assert result.passed is True
    graphs = sorted(str(p.relative_to(out)) for p in out.rglob("model.onnx"))
    assert graphs == ["base/export/onnx/model.onnx", "run-1/export/onnx/model.onnx", "run-2/export/onnx/model.onnx"]
    for line in result.adapters:
        rows = {row["format"]: row["status"] for row in line["artifacts"]}
        assert rows == {"onnx": "verified", "onnx_adapter": "verified"}  # no PEFT folder: the batch is merged
