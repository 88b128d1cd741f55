"""Issue 25: each format's export and each artifact's verification is a step that declares the keys it reads; a
rerun redoes only the steps whose declared values or inputs changed, says why, and judges a bound change again from
the recorded metrics without running a model; the reference can run beside the merge and export."""

import json

import pytest

from model_export import ExportConfiguration, run
from model_export.cli import main
from model_export.steps import ConfigView, UndeclaredKey, Unit
from model_export.verify.step import RUN_KEYS

pytestmark = pytest.mark.integration


def _config(training, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["safetensors", "onnx", "gguf"], "quantization_level": "int8", **overrides}
    return ExportConfiguration(
        checkpoint_path=str(training), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


def _state(folder):
    """Every file under ``folder``: its bytes and its modification time (untouched means both are equal)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def first_run(training, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    run(_config(training, out))
    return out


def test_a_gguf_setting_redoes_the_gguf_alone_and_says_which_key(first_run, training, capsys):
    out = first_run
    onnx = _state(out / "export" / "onnx")
    verdicts = {name: _state_of(out / "verify" / f"{name}.json") for name in ("safetensors", "onnx", "onnx-optimized")}
    gguf_before = _state(out / "export" / "gguf")
    sets = [
        "--set",
        f"checkpoint_path={training}",
        "--set",
        f"output_dir={out}",
        "--set",
        "export_formats=[safetensors,onnx,gguf]",
    ]
    sets += ["--set", "quantization_level=int8", "--set", "gguf_output_type=q6_k"]
    from model_export.demo.run import shipped_base

    assert main(["run", *sets, "--set", f"base_model_name={shipped_base()}"]) == 0
    err = capsys.readouterr().err
    assert "export:gguf reruns: gguf_output_type null -> q6_k" in err
    assert "export:onnx skipped (unchanged)" in err and "verify:onnx skipped (unchanged)" in err
    assert "verify:gguf reruns" in err and "verify:reference skipped (unchanged)" in err
    assert _state(out / "export" / "onnx") == onnx  # byte-identical and untouched
    for name, before in verdicts.items():
        assert _state_of(out / "verify" / f"{name}.json") == before, name
    steps = json.loads((out / "run.json").read_text())["steps"]
    # each format is a step of run.json recording the keys it reads, no others; a kept one says so
    assert steps["export:gguf"]["values"]["gguf_output_type"] == "q6_k" and not steps["export:gguf"]["skipped"]
    assert "onnx_backend" in steps["export:onnx"]["values"] and "gguf_output_type" not in steps["export:onnx"]["values"]
    assert steps["export:onnx"]["skipped"] and steps["verify:onnx"]["skipped"] and not steps["verify:gguf"]["skipped"]
    assert set(steps["verify:onnx"]["values"]) == set(RUN_KEYS)
    assert "validation_min_top1" in steps["verify:onnx"]["result"]["bounds"]
    assert _state(out / "export" / "gguf") != gguf_before  # written anew, its output tensor in q6_k now


def _state_of(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_bound_change_is_judged_again_without_running_a_model(first_run, training, monkeypatch, caplog):
    import model_export.runtimes as runtimes
    import model_export.verify.reference as verify

    def no_model(*args, **kwargs):
        raise AssertionError("a model was run to judge a bound change")

    monkeypatch.setattr(runtimes, "runtime_for", no_model)
    monkeypatch.setattr(verify, "compute_reference", no_model)
    with pytest.raises(Exception, match="top-1 agreement"):
        run(_config(training, first_run, validation_min_top1=0.999))
    assert "verify:onnx judged again from its recorded metrics (no model runs): validation_min_top1 0.9 -> 0.999" in (
        caplog.text
    )
    verdict = json.loads((first_run / "verify" / "onnx.json").read_text())
    assert verdict["status"] == "failed" and verdict["rule"].startswith("top-1 >= 0.999")
    result = run(_config(training, first_run))  # back to the default bound: every verdict as before, nothing run
    assert result.counts["failed"] == 0
    gguf = result.steps["verify"]["result"]["verdicts"]["gguf"]
    assert gguf["rule"].startswith("read back (")  # the GGUF's read-back words are kept when it is judged again


def test_a_unit_reads_only_what_it_declares():
    config = ExportConfiguration(gguf_output_type="q6_k")
    view = ConfigView(config, ("gguf_output_type", "max_shard_size"), "export:gguf")
    assert view.gguf_output_type == "q6_k" and view.max_shard_size_bytes == 5 * 10**9
    with pytest.raises(UndeclaredKey, match="export:gguf reads onnx_backend, which it does not declare"):
        view.onnx_backend  # noqa: B018 - the read is the test
    assert view.values() == {"gguf_output_type": "q6_k", "max_shard_size": "5GB"}
    unit = Unit("export:gguf", view.values(), ["merge-key"])
    changed = Unit("export:gguf", {**view.values(), "gguf_output_type": "q8_0"}, ["merge-key"])
    assert changed.why(unit.record()) == "gguf_output_type q6_k -> q8_0"
    assert Unit("export:gguf", view.values(), ["other"]).why(unit.record()).startswith("its inputs changed")


def test_every_format_declares_what_its_export_reads(training, tmp_path):
    """Each exporter runs against a view of its declared keys (the runs above and in test_pipeline.py export every
    format the CPU can): a key read without being declared fails there. Here: the declarations name real keys."""
    from model_export.exporters import FORMATS

    fields = set(ExportConfiguration.model_fields)
    for fmt in FORMATS.values():
        assert fmt.keys and set(fmt.keys) <= fields, fmt.name


def test_a_verdict_file_removed_since_is_made_again(first_run, training, caplog):
    (first_run / "verify" / "onnx.json").unlink()
    run(_config(training, first_run))
    assert "verify:onnx reruns: its files changed since" in caplog.text
    assert "verify:safetensors skipped (unchanged)" in caplog.text
    assert (first_run / "verify" / "onnx.json").is_file()


def _metrics(result):
    keep = ("status", "max_abs_diff", "mean_kl", "top1_agreement", "perplexity")
    return {label: {k: v.get(k) for k in keep} for label, v in result.steps["verify"]["result"]["verdicts"].items()}


def test_the_reference_beside_the_export_gives_the_same_verdicts(training, tmp_path):
    """steps_side_by_side: on computes verify:reference in a process of its own while the merge and export run; the
    verify step reads it back, so every verdict is what one step after another gives. auto on the demo's tiny base
    waits (a process costs more than its reference), and says why."""
    pytest.importorskip("onnxruntime")

    def log(name):
        return (tmp_path / name / "export.log").read_text(encoding="utf-8")

    formats = ["safetensors", "onnx"]
    beside = run(_config(training, tmp_path / "beside", export_formats=formats, steps_side_by_side="on"))
    assert "verify:reference runs beside the merge and export, in a process of its own: memory" in log("beside")
    assert "verify:reference was computed beside the merge and export" in log("beside")
    assert "[verify:reference]" in log("beside")  # the reference's own lines, from its process, in the run's log
    record = beside.steps["verify:reference"]
    assert not record["skipped"] and record["seconds"] > 0 and record["result"]["precision"] == "full"
    serial = run(_config(training, tmp_path / "serial", export_formats=formats))
    assert "verify:reference waits for the export (one step after another): the base's weights" in log("serial")
    assert _metrics(beside) == _metrics(serial) and beside.passed is serial.passed is True
    size = len(log("beside"))
    again = run(_config(training, tmp_path / "beside", export_formats=formats, steps_side_by_side="on"))
    assert "runs beside" not in log("beside")[size:] and again.steps["verify:reference"]["skipped"]  # kept
    off = run(_config(training, tmp_path / "off", export_formats=["safetensors"], steps_side_by_side="off"))
    assert "one step after another): steps_side_by_side: off" in log("off") and off.passed is True


def test_a_failed_run_stops_its_reference_beside_it(training, tmp_path, monkeypatch):
    import psutil

    from model_export.pipeline import run as pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "merge", broken)
    with pytest.raises(Exception, match="division by zero"):
        run(_config(training, tmp_path / "out", export_formats=["safetensors"], steps_side_by_side="on"))
    assert "runs beside the merge and export" in (tmp_path / "out" / "export.log").read_text(encoding="utf-8")
    children = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    assert not [c for c in children if "model_export.pipeline.beside" in c]  # stopped with the run, not left running
