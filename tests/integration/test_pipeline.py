"""The whole run: detect -> check -> merge -> export -> verify -> report, resumable, with a report a person can read."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_export import ExportConfiguration, ResourceError, ValidationError, i18n, run
from model_export.cli import main
from tests.conftest import tree_digest
from tests.reference import DEMO_INT4_BOUNDS

pytestmark = pytest.mark.integration


def config_for(training, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["safetensors", "pytorch"], "max_shard_size": "200KB", **overrides}
    return ExportConfiguration(
        checkpoint_path=str(training), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


def test_a_run_exports_verifies_and_reports(training, tmp_path):
    result = run(config_for(training, tmp_path / "out"))
    assert result.passed is True and set(result.artifacts) == {"safetensors", "pytorch"}
    assert [name for name, step in result.steps.items() if step["status"] == "done"] == [
        "detect",
        "check",
        "merge",
        "export",
        "export:safetensors",
        "export:pytorch",
        "verify",
        "verify:reference",
        "verify:safetensors",
        "verify:pytorch",
    ]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "passed" and {a["format"] for a in report["artifacts"]} == {"safetensors", "pytorch"}
    for artifact in report["artifacts"]:
        assert artifact["verified"] and artifact["max_abs_diff"] < 1e-3 and artifact["top1"] == 1.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Passed: 2 artifact(s)" in page and page.count("<svg") >= 5 and "http" not in page.replace("http-equiv", "")
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    for name, step in manifest["steps"].items():  # a unit of export or verify: its own time, its declared values
        assert {"status", "key", "seconds", "values"} <= set(step) if ":" in name else {"peak_rss"} <= set(step), name
    assert "Memory usage" not in (tmp_path / "out" / "export.log").read_text()  # memory_monitoring is off by default
    i18n.set_language("zh")
    try:
        run(config_for(training, tmp_path / "out"))
    finally:
        i18n.set_language(None)
    page = (tmp_path / "out" / "report.html").read_text()
    assert (
        '<html lang="zh">' in page and "导出产物" in page and "通过: 2 个产物" in page and "（已跳过：未改变）" in page
    )


def test_rerun_skips_and_a_changed_setting_reruns_what_follows(training, tmp_path, caplog):
    config = config_for(training, tmp_path / "out")
    run(config)
    again = run(config)
    assert all(step["skipped"] for step in again.steps.values())
    changed = run(config_for(training, tmp_path / "out", validation_new_tokens=4))
    verify = ["verify", "verify:reference", "verify:safetensors", "verify:pytorch"]
    assert [name for name, step in changed.steps.items() if not step["skipped"]] == verify
    assert changed.steps["verify:reference"]["values"]["validation_new_tokens"] == 4
    # a layout key: the merge's shards change, not its tensors; the formats that declare it rewrite their files,
    # and only their verifications run again (the reference needs no merge)
    changed = run(config_for(training, tmp_path / "out", validation_new_tokens=4, max_shard_size="300KB"))
    assert [name for name, step in changed.steps.items() if not step["skipped"]] == [
        "merge",
        "export",
        "export:safetensors",
        "export:pytorch",
        "verify",
        "verify:safetensors",
        "verify:pytorch",
    ]


def test_a_broken_artifact_fails_verification_with_the_guides_message(training, tmp_path, monkeypatch, capsys):
    import numpy as np

    from model_export.merging import arithmetic as merge_math

    original = merge_math._apply
    noise = np.random.default_rng(0)

    def perturbed(lora, weight, start, stop, backend):
        merged = original(lora, weight, start, stop, backend)
        return merged + 0.05 * noise.standard_normal(merged.shape, dtype=np.float32)

    monkeypatch.setattr(merge_math, "_apply", perturbed)
    with pytest.raises(ValidationError) as err:
        run(config_for(training, tmp_path / "out"))
    assert err.value.code == "ME601" and str(err.value).startswith("Model outputs differ too much: ")
    assert str(err.value).endswith(" > 0.001")  # the default validation_tolerance, written as the guide writes numbers
    i18n.set_language("zh")
    assert str(err.value).startswith("模型输出差异过大: ") and "validation_tolerance: 1e-3" in err.value.hint()
    i18n.set_language(None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "failed" and report["error"]["code"] == "ME601"
    assert "Failed: " in (tmp_path / "out" / "report.html").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(config_for(training, tmp_path / "out2").model_dump_json())
    path = path.rename(tmp_path / "c.json")
    assert main(["run", str(path)]) == 1
    assert "ValidationError: Model outputs differ too much" in capsys.readouterr().err


def test_killed_runs_resume_to_identical_artifacts(training, tmp_path):
    def cli(out, crash_at=None):
        env = {k: v for k, v in os.environ.items() if k != "MODEL_EXPORT_CRASH_AT"}
        if crash_at:
            env["MODEL_EXPORT_CRASH_AT"] = crash_at
        config = tmp_path / f"{out.name}.json"
        config.write_text(config_for(training, out).model_dump_json())
        return subprocess.run(
            [sys.executable, "-m", "model_export.cli", "run", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    clean = cli(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]

    def artifacts(out):
        return [tree_digest(out / "export" / fmt) for fmt in ("safetensors", "pytorch")]

    expected = artifacts(tmp_path / "clean")
    for point in ("step:2", "tensor:5", "step:3", "tensor:40", "step:4"):
        out = tmp_path / point.replace(":", "-")
        killed = cli(out, point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        resumed = cli(out)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "skipped: inputs and settings unchanged" in resumed.stderr
        assert artifacts(out) == expected, point


def test_housekeeping_settings(training, tmp_path):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "stale.partial").write_text("left by a killed run")
    result = run(
        config_for(
            training,
            out,
            save_intermediate_results=True,
            memory_monitoring=True,
            memory_monitoring_interval=0.2,
            export_formats=["safetensors"],
        )
    )
    assert result.passed and not list(out.rglob("*.partial"))  # cleanup_temp_files
    import torch

    reference = torch.load(out / "verify" / "reference.pt", weights_only=True)  # save_intermediate_results
    assert len(reference["logits"]) == 3 and reference["prompts"][1] == "简单测试"
    for step in ("detect", "check", "merge", "export", "verify"):
        assert (out / step / ".step.json").is_file()
    log = (out / "export.log").read_text(encoding="utf-8")
    assert (
        " - INFO - Memory usage: " in log
        and "Processing checkpoint: 100% complete" in log
        and "Step verify finished" in log
    )
    (out / "export" / "x.partial").write_text("kept")
    again = run(
        config_for(
            training,
            out,
            cleanup_temp_files=False,
            export_formats=["safetensors"],
            run_validation_tests=False,
            remove_training_artifacts=False,
        )
    )
    assert (out / "export" / "x.partial").exists() and "verify" not in again.steps and again.passed is None
    assert (out / "export" / "safetensors" / "training_artifacts" / "optimizer.pt").is_file()


def test_onnx_in_the_pipeline_both_graphs_verified_in_onnxruntime(training, tmp_path):
    out = tmp_path / "out"
    result = run(config_for(training, out, export_formats=["safetensors", "onnx"]))
    assert result.passed is True
    onnx_dir = out / "export" / "onnx"
    assert {"model.onnx", "model.onnx.data", "model.optimized.onnx", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in onnx_dir.iterdir()
    }
    verdicts = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]
    assert set(verdicts) == {"safetensors", "onnx", "onnx-optimized"}
    for label in ("onnx", "onnx-optimized"):
        assert (
            verdicts[label]["status"] == "verified"
            and verdicts[label]["precision"] == "full"
            and verdicts[label]["max_abs_diff"] < 1e-3
        )
        generated = [s for s in verdicts[label]["samples"] if s["greedy_agreement"] is not None]
        assert len(generated) == 3 and all(s["greedy_agreement"] == 1.0 for s in generated)
    rows = {a["format"]: a for a in json.loads((out / "report.json").read_text())["artifacts"]}
    assert set(rows) == {"safetensors", "onnx", "onnx-optimized"} and rows["onnx-optimized"]["path"].endswith(
        "model.optimized.onnx"
    )
    for row in rows.values():  # fp32 artifacts: the held-out perplexity is the reference's
        assert row["perplexity"] == pytest.approx(row["reference_perplexity"], rel=1e-4) and row["perplexity"] > 1
    assert "Perplexity on the held-out text" in (out / "report.html").read_text()
    # a changed ONNX setting reruns export and verify only
    run(config_for(training, out, export_formats=["safetensors", "onnx"], onnx_optimize_graph=False))
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert [s for s in ("merge", "export", "verify") if steps[s]["skipped"]] == ["merge"]
    assert not (onnx_dir / "model.optimized.onnx").exists()


def test_a_damaged_onnx_graph_fails_verification(training, tmp_path):
    """The ONNX check can fail: one weight changed in model.onnx.data is caught against the reference."""
    import onnx

    from model_export.verify.artifacts import verify_artifact
    from model_export.verify.reference import compute_reference

    out = tmp_path / "out"
    run(config_for(training, out, export_formats=["onnx"], onnx_optimize_graph=False, run_validation_tests=False))
    graph = out / "export" / "onnx" / "model.onnx"
    tensor = next(
        t
        for t in onnx.load(str(graph), load_external_data=False).graph.initializer
        if t.name == "model.layers.0.mlp.down_proj.weight"
    )
    offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
    data = bytearray((graph.parent / "model.onnx.data").read_bytes())
    values = np.frombuffer(data, dtype=np.float32, count=256, offset=offset).copy() * -3.0
    data[offset : offset + values.nbytes] = values.tobytes()
    (graph.parent / "model.onnx.data").write_bytes(bytes(data))
    from model_export.demo.run import shipped_base

    reference = compute_reference(shipped_base(), training / "checkpoint-30", shipped_base(), ["Hello"], 4)
    with pytest.raises(ValidationError) as err:
        verify_artifact(graph, reference)
    assert err.value.code == "ME601"


def test_gguf_in_the_pipeline_is_read_back_and_reported(training, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "out"
    result = run(config_for(training, out, export_formats=["gguf"], quantization_level="int8", gguf_lora_adapter=True))
    files = sorted(p.name for p in (out / "export" / "gguf").iterdir())
    assert files == ["Modelfile", "adapter-lora-f32.gguf", "model-q8_0.gguf"]
    details = json.loads((out / "run.json").read_text())["steps"]["export"]["result"]["details"]["gguf"]
    assert details["lora_adapter"]["tensors"] == 2 * details["lora_adapter"]["modules"] > 0
    # Every path the export reports is where the file is now, not in the .partial folder it was written in.
    assert (
        Path(details["modelfile"]).is_file()
        and Path(details["path"]).is_file()
        and Path(details["lora_adapter"]["path"]).is_file()
    )
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out / "export" / "gguf" / "model-q8_0.gguf")).tensors} == {
        "F32",
        "Q8_0",
    }
    verdict = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]["gguf"]
    assert verdict["readback"]["tensors"] > 0
    report = json.loads((out / "report.json").read_text())
    row = report["artifacts"][0]
    if importlib.util.find_spec("llama_cpp") is None:  # read back, never run: not a pass, and said so everywhere
        assert result.passed is None and result.counts == {"verified": 0, "failed": 0, "not_run": 1}
        assert verdict["status"] == row["status"] == "not_run" and "llama-cpp-python is not installed" in row["reason"]
        assert verdict["max_abs_diff"] is None and verdict["top1_agreement"] is None
        assert (
            report["status"] == "not_verified" and "0 verified, 1 not run (gguf: llama-cpp-python" in report["summary"]
        )
        assert (
            "Not run, so not verified" in (out / "export.log").read_text()
            and "nan" not in (out / "export.log").read_text()
        )
    else:
        assert (
            result.passed is True
            and verdict["status"] == row["status"] == "verified"
            and verdict["top1_agreement"] >= 0.9
        )


def test_benchmark_step_and_command_compare_every_artifact(training, tmp_path, capsys):
    out = tmp_path / "out"
    config = config_for(
        training,
        out,
        export_formats=["safetensors", "onnx"],
        run_benchmarks=True,
        benchmark_new_tokens=4,
        benchmark_repeats=2,
        batch_size=2,
        onnx_optimize_graph=False,
    )
    result = run(config)
    assert result.steps["benchmark"]["status"] == "done"
    rows = {r["label"]: r for r in result.steps["benchmark"]["result"]["results"]}
    assert set(rows) == {"safetensors", "onnx"}
    for row in rows.values():
        assert row["error"] is None and row["load_s"] > 0 and row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["decode_tokens_per_s_batch"] > 0 and row["peak_rss_gib"] > 0 and len(row["runs"]) == 2
    assert rows["safetensors"]["runtime"] == "transformers" and rows["onnx"]["runtime"] == "onnxruntime"
    assert rows["safetensors"]["prompt_tokens"] == rows["onnx"]["prompt_tokens"] > 0  # the same chat-templated prompt
    assert "Decode speed at batch 1" in (out / "report.html").read_text()
    assert main(["benchmark", str(out), "--new-tokens", "2", "--repeats", "1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in again] == ["safetensors", "onnx"]
    assert json.loads((out / "benchmark" / "benchmark.json").read_text())[0]["new_tokens"] == 2
    assert main(["benchmark", str(tmp_path / "nothing-here")]) == 1


def test_a_second_run_on_the_same_output_dir_fails_at_once_and_a_dead_holder_does_not_block(training, tmp_path):
    from model_export import ResourceError

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"f = open({str(out / '.model-export.lock')!r}, 'a+')\n"
                "fcntl.flock(f, fcntl.LOCK_EX)\n"
                "f.write(f'pid={os.getpid()}\\nhost=h\\nstarted=now\\n'); f.flush()\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(ResourceError) as err:
            run(config_for(training, out))
        assert err.value.code == "ME402" and f"process {holder.pid} on h" in str(err.value)
        assert not (out / "merge").exists()  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(config_for(training, out)).passed is True  # the dead process's lock is taken over


def test_a_full_run_never_modifies_its_inputs(training, tmp_path):
    from model_export.demo.run import shipped_base

    before = tree_digest(training), tree_digest(shipped_base())
    formats = ["safetensors", "pytorch", "onnx"] + (["gguf"] if __import__("importlib").util.find_spec("gguf") else [])
    result = run(config_for(training, tmp_path / "out", export_formats=formats, gguf_lora_adapter="gguf" in formats))
    assert result.passed is (
        True if importlib.util.find_spec("llama_cpp") else None
    )  # its GGUF is run only with llama.cpp
    assert (tree_digest(training), tree_digest(shipped_base())) == before


def test_a_full_disk_mid_step_is_explained_marks_nothing_done_and_a_rerun_finishes(training, tmp_path, monkeypatch):
    import errno

    from model_export import ResourceError
    from model_export.pipeline import run as pipeline

    original = pipeline.merge

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "merge", full_disk)
    out = tmp_path / "out"
    with pytest.raises(ResourceError) as err:
        run(config_for(training, out))
    assert err.value.code == "ME403" and "during the merge step" in str(err.value) and "B free now" in str(err.value)
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert steps["merge"]["status"] == "failed" and "export" not in steps
    monkeypatch.setattr(pipeline, "merge", original)
    assert run(config_for(training, out)).passed is True


def test_a_disk_too_small_stops_the_run_before_anything_is_written(training, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from model_export import ResourceError
    from model_export.checkpoint.base_model import inspect_base_model
    from model_export.demo.run import shipped_base
    from model_export.pipeline import preflight

    config = config_for(
        training, tmp_path / "out", export_formats=["safetensors", "onnx", "gguf"], quantization_level="int4"
    )
    needs = preflight.disk_needed(config, inspect_base_model(str(shipped_base())))
    params = sum(__import__("math").prod(t.shape) for t in inspect_base_model(str(shipped_base())).tensors.values())
    assert needs["merge"] == 4 * params and needs["safetensors"] == int(0.56 * params)  # fp32 demo base; int4 blocks
    assert needs["onnx"] == int(2 * 0.57 * params) and needs["gguf"] == int(
        0.61 * params
    )  # onnx: plain + optimized; gguf q4_k_m
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError) as err:
        run(config)
    # Sizes in units people read: "1.00 KB free, but this run needs about 13.46 MB", never "0.00 GB free, needs 0.00
    # GB".
    assert err.value.code == "ME404" and "has 1.00 KB free, but this run needs about " in str(err.value)
    assert "0.00 GB" not in str(err.value) and " MB (merge " in str(err.value)
    assert not (tmp_path / "out" / "merge").exists() and not (tmp_path / "out" / "export").exists()


def test_the_demo_at_int4_verifies_every_artifact_on_the_int4_bounds(training, tmp_path):
    """Issue 6's done-when: the demo's formats at int4, each artifact verified, its quality in the report."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gguf")
    from model_export.demo.tiny import TASK_PROMPTS

    out = tmp_path / "out"
    config = config_for(
        training,
        out,
        export_formats=["safetensors", "onnx", "gguf"],
        quantization_level="int4",
        test_input_samples=TASK_PROMPTS,
        onnx_optimize_graph=False,
        **DEMO_INT4_BOUNDS,  # tests/reference.py: what int4 costs the demo's tiny model
    )
    llama = importlib.util.find_spec("llama_cpp") is not None
    assert run(config).passed is (True if llama else None)
    verdicts = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]
    assert set(verdicts) == {"safetensors", "onnx", "gguf"}
    ran = {
        label: v for label, v in verdicts.items() if llama or label != "gguf"
    }  # without llama.cpp the GGUF is not run
    for verdict in ran.values():
        assert verdict["status"] == "verified" and verdict["precision"] == "int4"
        assert verdict["rule"].endswith("top-1 >= 0.75, KL <= 0.2")
        assert verdict["top1_agreement"] >= 0.75 and 0 < verdict["mean_kl"] <= 0.2 and verdict["perplexity"] > 0
    if not llama:
        assert verdicts["gguf"]["status"] == "not_run" and verdicts["gguf"]["precision"] == "int4"
    rows = json.loads((out / "report.json").read_text())["artifacts"]
    assert all(
        row["status"] == ("verified" if llama or row["format"] != "gguf" else "not_run") and row["size_vs_base"] < 0.3
        for row in rows
    )
    # The same artifacts judged on the 8-bit bounds fail: the int4 bounds are what lets them pass, nothing else.
    with pytest.raises(ValidationError) as err:
        run(config.model_copy(update={"validation_int4_min_top1": 0.9, "validation_int4_max_kl": 0.05}))
    assert err.value.code in ("ME601", "ME603")


def test_tensorrt_without_its_package_or_a_gpu_stops_before_anything_is_written(training, tmp_path):
    from model_export import ExportFormatError
    from model_export.exporters.tensorrt_export import missing_for_tensorrt

    missing = missing_for_tensorrt()
    if not missing:
        pytest.skip("tensorrt and a GPU are both here: the engine tests below run instead")
    out = tmp_path / "out"
    with pytest.raises(ExportFormatError) as err:
        run(config_for(training, out, export_formats=["safetensors", "tensorrt"]))
    assert err.value.code == "ME810" and all(m in str(err.value) for m in missing)
    assert not (out / "merge").exists() and not (out / "export").exists()


def test_device_map_cuda_without_a_gpu_stops_before_anything_is_written(training, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "out"
    with pytest.raises(ResourceError) as err:
        run(config_for(training, out, device_map="cuda"))
    assert err.value.code == "ME405" and not (out / "merge").exists()


# ---- on a GPU (the device run recorded in docs/benchmarks.md); skipped without CUDA ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_a_run_on_the_gpu_verifies_and_benchmarks_there(training, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    config = config_for(
        training,
        out,
        export_formats=["safetensors", "onnx"],
        device_map="cuda",
        run_benchmarks=True,
        benchmark_new_tokens=8,
        benchmark_repeats=2,
        batch_size=2,
        onnx_optimize_graph=False,
    )
    assert run(config).passed is True
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert steps["verify"]["result"]["reference"] == {"device": "cuda", "precision": "full"}
    assert steps["verify"]["result"]["verdicts"]["safetensors"]["max_abs_diff"] < 1e-3
    bench = {r["label"]: r for r in steps["benchmark"]["result"]["results"]}
    assert bench["safetensors"]["device"] != "cpu" and bench["safetensors"]["peak_gpu_gib"] > 0
    assert bench["onnx"]["device"] == "cpu" and bench["safetensors"]["decode_tokens_per_s_batch"] > 0


@pytest.mark.gpu
@needs_cuda
def test_a_4bit_reference_on_the_gpu_judges_on_the_4bit_bounds(training, tmp_path):
    pytest.importorskip("bitsandbytes")
    from model_export.demo.tiny import TASK_PROMPTS

    out = tmp_path / "out"
    config = config_for(training, out, device_map="auto", base_model_load_in_4bit=True, test_input_samples=TASK_PROMPTS)
    assert run(config).passed is True
    result = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]
    assert result["reference"] == {"device": "cuda", "precision": "int4"}
    assert all(v["rule"].endswith("(reference in 4-bit)") for v in result["verdicts"].values())
    assert "bitsandbytes 4-bit" in (out / "report.html").read_text()


@pytest.mark.gpu
@needs_cuda
def test_a_tensorrt_engine_is_built_and_verified(training, tmp_path):
    pytest.importorskip("tensorrt")
    out = tmp_path / "out"
    assert run(config_for(training, out, export_formats=["tensorrt"], device_map="cuda")).passed is True
    verdict = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]["tensorrt"]
    assert verdict["precision"] == "full" and verdict["max_abs_diff"] < 1e-3
