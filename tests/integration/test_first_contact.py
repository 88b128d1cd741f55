"""Issue 13: what a new user meets first. A bf16 base verifies by default; verdicts say only what was checked; every way
out of a run is explained and recorded; the guide's keys each change something; the console and log stay readable."""

import importlib.util
import json
from pathlib import Path

import pytest

from model_export import ExportConfiguration, i18n, run
from model_export.cli import main
from model_export.errors import InternalError, ResourceError

pytestmark = pytest.mark.integration

LLAMA = importlib.util.find_spec("llama_cpp") is not None


def cli_sets(training, out):
    """The --set options that point a CLI run at the demo's training run, its base and ``out``."""
    base = config_for(training, out).base_model_name
    return ["--set", f"checkpoint_path={training}", "--set", f"output_dir={out}", "--set", f"base_model_name={base}"]


def config_for(training, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["safetensors"], **overrides}
    return ExportConfiguration(
        checkpoint_path=str(training), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory):
    """A bf16 base (as every Qwen3 checkpoint on the hub) and a PEFT adapter on it."""
    from model_export.demo.tiny import build_adapter, build_base_model

    root = tmp_path_factory.mktemp("bf16-run")
    base = build_base_model(root / "base", dtype="bfloat16")
    return base, build_adapter(base, root / "adapter")


def test_a_bf16_base_with_default_settings_verifies_every_artifact_it_ran(bf16_adapter, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gguf")
    base, adapter = bf16_adapter
    out = tmp_path / "out"
    config = ExportConfiguration(
        checkpoint_path=str(adapter),
        base_model_name=str(base),
        output_dir=str(out),
        export_formats=["safetensors", "onnx", "gguf"],
    )
    result = run(config)  # raised ME601 "0.0164 > 0.001" before: the fp32 graph was judged as if its weights were fp32
    verdicts = result.steps["verify"]["result"]["verdicts"]
    assert result.steps["verify"]["result"]["reference"]["merge"] == "reduced"
    for label in ("onnx", "onnx-optimized"):
        # An fp32 graph (onnxruntime computes in fp32 on the CPU) of bf16 values: judged on the bf16 bounds, and it
        # says so.
        assert verdicts[label]["status"] == "verified" and verdicts[label]["precision"] == "full"
        assert verdicts[label]["rule"] == "top-1 >= 0.9, KL <= 0.05 (weights rounded in the merge)"
    assert verdicts["safetensors"]["status"] == "verified"
    assert verdicts["gguf"]["status"] == ("verified" if LLAMA else "not_run")
    assert result.passed is (True if LLAMA else None)
    assert result.counts == {"verified": 4 if LLAMA else 3, "failed": 0, "not_run": 0 if LLAMA else 1}
    rows = {r["format"]: r for r in json.loads((out / "report.json").read_text())["artifacts"]}
    assert (
        "widened to fp32, exactly" in rows["onnx"]["warning"] and "quantization_level: fp16" in rows["onnx"]["warning"]
    )


def test_the_guides_fp32_bound_still_applies_to_an_fp32_merge(training, tmp_path):
    """The floor follows the merge: an fp32 base's artifacts keep the strict validation_tolerance rule."""
    result = run(config_for(training, tmp_path / "out"))
    verdict = result.steps["verify"]["result"]["verdicts"]["safetensors"]
    assert verdict["rule"] == "max |logit diff| <= 0.001" and verdict["max_abs_diff"] < 1e-3


def test_ctrl_c_in_a_step_is_recorded_reported_and_printed_without_a_traceback(training, tmp_path, monkeypatch, capsys):
    import model_export.verify.reference as verify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "compute_reference", interrupted)
    out = tmp_path / "out"
    with pytest.raises(InternalError) as err:
        run(config_for(training, out))
    assert err.value.code == "ME998" and err.value.exit_code == 130
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert all(step["status"] != "running" for step in steps.values())
    assert steps["verify"]["status"] == "failed" and steps["verify"]["error"]["code"] == "ME998"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["error"]["code"] == "ME998"
    code = main(["run", *cli_sets(training, out)])
    captured = capsys.readouterr()
    assert code == 130 and "Traceback" not in captured.err
    assert (
        "InternalError: Interrupted (Ctrl-C) during the verify step" in captured.err and "code: ME998" in captured.err
    )
    monkeypatch.undo()
    assert run(config_for(training, out)).passed is True  # the rerun resumes: detect .. export are skipped
    assert json.loads((out / "run.json").read_text())["steps"]["export"]["skipped"] is True


def test_memory_error_gets_the_guides_memory_message(training, tmp_path, monkeypatch, capsys):
    import model_export.verify.artifacts as verify

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate array with shape (151936, 2560)")

    monkeypatch.setattr(verify, "_run_artifact", out_of_memory)  # not "inference failed": the machine's fault
    out = tmp_path / "out"
    with pytest.raises(ResourceError) as err:
        run(config_for(training, out))
    assert err.value.code == "ME406" and str(err.value).startswith("MemoryError: Unable to allocate")
    assert (
        "batch_size: 1, max_sequence_length: 1024" in err.value.hint()
        and "use_memory_mapping: true" in err.value.hint()
    )
    assert "系统RAM不足" in err.value.hint("zh")
    assert json.loads((out / "run.json").read_text())["steps"]["verify"]["error"]["code"] == "ME406"


def test_an_unexpected_exception_is_one_line_naming_the_log(training, tmp_path, monkeypatch, capsys):
    import model_export.pipeline.run as pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "merge", broken)
    out = tmp_path / "out"
    code = main(["run", *cli_sets(training, out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "InternalError: Internal error during the merge step: ZeroDivisionError: division by zero" in err
    assert "code: ME999" in err and str(out / "export.log") in err and "--debug" in err
    assert json.loads((out / "run.json").read_text())["steps"]["merge"]["status"] == "failed"
    assert (out / "report.html").is_file()


def test_log_level_debug_logs_debug_lines_and_info_does_not(training, tmp_path):
    out = tmp_path / "out"
    # batch_size groups the passes of whole-model runs (the layer-streamed one puts every prompt in one pass)
    run(config_for(training, out, log_level="DEBUG", batch_size=2, verification_runtime="transformers"))
    log = (out / "export.log").read_text(encoding="utf-8")
    assert " - DEBUG - " in log and "step merge: key" in log and "forward pass: batch of 2" in log
    again = tmp_path / "again"
    run(config_for(training, again))
    assert " - DEBUG - " not in (again / "export.log").read_text(encoding="utf-8")


def test_cli_log_flags_win_over_the_configuration(training, tmp_path, capsys):
    out, log = tmp_path / "out", tmp_path / "x.log"
    args = cli_sets(training, out)
    assert main(["--log-level", "DEBUG", "--log-file", str(log), "run", *args]) == 0
    assert " - DEBUG - " in log.read_text(encoding="utf-8") and not (out / "export.log").exists()
    capsys.readouterr()
    assert main(["--log-level", "ERROR", "run", *args, "--set", "export_formats=[safetensors,pytorch]"]) == 0
    assert " - INFO - " not in capsys.readouterr().err


def test_batch_size_batches_the_forward_passes_without_changing_the_logits(training, tmp_path):
    from model_export.demo.run import shipped_base
    from model_export.verify.reference import RunOptions, compute_reference

    prompts = ["Hello", "简单测试", "Write a haiku about autumn, the falling leaves and the cold wind."]
    checkpoint = training / "checkpoint-30"
    one = compute_reference(shipped_base(), checkpoint, shipped_base(), prompts, 2, options=RunOptions(batch_size=1))
    three = compute_reference(shipped_base(), checkpoint, shipped_base(), prompts, 2, options=RunOptions(batch_size=3))
    for a, b in zip(one.logits, three.logits):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4
    assert one.greedy == three.greedy


def test_max_sequence_length_cuts_a_long_prompt_instead_of_failing_in_onnxruntime(training, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    long_prompt = "autumn leaves fall " * 1000  # about 3000 tokens; the demo model has 512 positions
    result = run(
        config_for(
            training,
            out,
            export_formats=["onnx"],
            onnx_optimize_graph=False,
            test_input_samples=[long_prompt, "Hello"],
            max_sequence_length=100,
        )
    )
    assert result.passed is True
    reference = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]["onnx"]
    assert reference["status"] == "verified"
    assert "cut to the first 84 so that it and its generated tokens fit in 100" in (out / "export.log").read_text(
        encoding="utf-8"
    )
    # Left at its default (2048), the model's own 512 positions bound it: no "inference failed".
    again = run(
        config_for(
            training,
            tmp_path / "again",
            export_formats=["onnx"],
            onnx_optimize_graph=False,
            test_input_samples=[long_prompt],
        )
    )
    assert again.passed is True and "fit in 512" in (tmp_path / "again" / "export.log").read_text(encoding="utf-8")


def test_use_memory_mapping_decides_how_transformers_reads_the_weights(training, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("disable_mmap"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    run(config_for(training, tmp_path / "mapped", verification_runtime="transformers"))
    run(config_for(training, tmp_path / "read", use_memory_mapping=False, verification_runtime="transformers"))
    assert seen == [False, False, True, True]  # reference and artifact, in each run


def test_cleanup_temp_files_decides_what_a_failed_step_leaves(training, tmp_path, monkeypatch):
    import model_export.exporters.onnx_export as onnx_export

    def half_written(merged, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.onnx").write_bytes(b"half")
        raise RuntimeError("the exporter died")

    monkeypatch.setattr(onnx_export, "export_onnx", half_written)
    for cleanup in (True, False):
        out = tmp_path / f"cleanup-{cleanup}"
        with pytest.raises(InternalError):
            run(config_for(training, out, export_formats=["onnx"], cleanup_temp_files=cleanup))
        assert (out / "export" / ".onnx.partial" / "model.onnx").exists() is (not cleanup)
    assert "Kept for debugging (cleanup_temp_files: false)" in (tmp_path / "cleanup-False" / "export.log").read_text()


def test_save_intermediate_results_keeps_every_run_output_even_on_failure_and_is_part_of_the_key(training, tmp_path):
    import torch

    from model_export import ValidationError

    out = tmp_path / "out"
    run(config_for(training, out, export_formats=["safetensors", "pytorch"]))
    assert not list((out / "verify").glob("*.pt"))
    result = run(config_for(training, out, export_formats=["safetensors", "pytorch"], save_intermediate_results=True))
    assert result.steps["verify"]["skipped"] is False  # a changed key: the verify step ran again to save them
    assert {p.name for p in (out / "verify").glob("*.pt")} == {"reference.pt", "safetensors.pt", "pytorch.pt"}
    saved = torch.load(out / "verify" / "safetensors.pt", weights_only=True)
    assert len(saved["logits"]) == 3 and len(saved["greedy"]) == 3
    with pytest.raises(ValidationError):  # an impossible bound: the outputs are still kept to debug the failure
        run(
            config_for(
                training,
                out,
                export_formats=["safetensors", "pytorch"],
                save_intermediate_results=True,
                validation_tolerance=1e-12,
            )
        )
    assert (out / "verify" / "safetensors.pt").is_file()


def test_progress_is_a_line_every_few_seconds_not_ten_in_a_millisecond(training, tmp_path):
    out = tmp_path / "out"
    run(config_for(training, out))
    log = (out / "export.log").read_text(encoding="utf-8")
    assert log.count("Processing checkpoint:") <= 2 and "Processing checkpoint: 100% complete" in log
    assert "Loading weights" not in log and "FutureWarning" not in log


def test_the_log_file_is_english_whatever_the_console_shows(training, tmp_path, capsys):
    """The guide's log lines and grep commands are English; the console speaks the user's language in full."""
    out = tmp_path / "out"
    assert main(["--lang", "zh", "run", *cli_sets(training, out)]) == 0
    err = capsys.readouterr().err
    assert "步骤 check 完成（耗时" in err and "duration" not in err
    log = (out / "export.log").read_text(encoding="utf-8")
    assert "Step check finished (duration" in log and "步骤" not in log


def test_detect_says_its_result_once(make_run, capsys):
    root = make_run([10, 20])
    assert main(["detect", str(root)]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("Detected checkpoint") == 1


def test_square_brackets_in_messages_are_printed_not_swallowed(capsys, tmp_path):
    """Rich markup would drop '[llamacpp]' from the hints, and '[/]' in a path could break the printer."""
    path = tmp_path / "odd [bold]name[/]"
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"Checkpoint directory does not exist: {path}" in err
    assert i18n.ui("reason_no_llama_cpp").count("[llamacpp]") == 1


def test_verification_runtime_streams_the_reference_or_loads_it_whole(training, tmp_path, monkeypatch):
    """auto (the default, on the CPU): the reference and the safetensors artifact go through the layer-streamed pass
    and transformers never loads a whole model; transformers: today's whole-model loading. Both give the same verdicts
    and the same metrics to fp32 rounding."""
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    streamed = run(config_for(training, tmp_path / "streamed"))
    log = (tmp_path / "streamed" / "export.log").read_text(encoding="utf-8")
    assert loads == [] and "Reference streamed layer by layer (2 decoder layers" in log
    whole = run(config_for(training, tmp_path / "whole", verification_runtime="transformers"))
    assert len(loads) == 2 and "streamed layer by layer" not in (tmp_path / "whole" / "export.log").read_text()
    a = streamed.steps["verify"]["result"]["verdicts"]["safetensors"]
    b = whole.steps["verify"]["result"]["verdicts"]["safetensors"]
    # The report says what ran each artifact: the two ways are not the same arithmetic for a bf16 artifact.
    assert a["runtime"] == "transformers (layer-streamed) on cpu" and b["runtime"] == "transformers on cpu"
    assert "transformers (layer-streamed) on cpu" in (tmp_path / "streamed" / "report.html").read_text()
    # ... and how much memory it took (this process's resident peak while the artifact was loaded and run)
    assert (
        10_000_000 < a["peak_rss"] < 8 << 30
        and " resident at peak" in (tmp_path / "streamed" / "report.html").read_text()
    )
    assert a["status"] == b["status"] == "verified" and abs(a["max_abs_diff"] - b["max_abs_diff"]) < 1e-4
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-3 * b["perplexity"]


def test_every_export_and_verification_says_how_far_it_is(training, tmp_path):
    """Issue 16: no long step is silent: each exporter logs its progress (a line every few seconds and the last),
    verification names what it runs, in which runtime, on how many inputs and tokens."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    run(
        config_for(
            training,
            out,
            export_formats=["safetensors", "onnx", "gguf"],
            quantization_level="int8",
            onnx_optimize_graph=False,
            validation_min_top1=0.5,
            validation_max_kl=1.0,
        )
    )
    log = (out / "export.log").read_text(encoding="utf-8")
    for line in (
        "Writing int8 safetensors: 100% complete",
        "Writing ONNX: 100% complete",
        "Writing GGUF q8_0: 100% complete",
    ):
        assert line in log
    assert "in onnxruntime: 4 inputs" in log and "one pass over the reference's own tokens (teacher-forced)" in log
