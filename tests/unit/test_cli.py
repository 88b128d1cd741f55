"""The CLI: a thin layer that prints results, codes and hints in English or Chinese, with --json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_export.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_detect_human_and_json(capsys, make_run):
    root = make_run([10, 20, 30])
    (root / "checkpoint-30" / "adapter_model.safetensors").write_bytes(b"")
    code, out, err = run(capsys, "detect", str(root))
    assert code == 0 and f"Detected checkpoint: {root / 'checkpoint-20'}" in out
    assert (out + err).count("Skipped") == 1 and "Skipped" in err  # logged once, not printed again
    code, out, _ = run(capsys, "detect", str(root), "--json")
    data = json.loads(out)
    assert data["selected"] == str(root / "checkpoint-20") and [c["complete"] for c in data["candidates"]] == [
        True,
        True,
        False,
    ]
    code, out, err = run(capsys, "detect", str(root), "--lang", "zh")
    assert f"检测到checkpoint: {root / 'checkpoint-20'}" in out and "跳过" in err


def test_check_human_json_and_chinese(capsys, adapter, tiny_base):
    code, out, _ = run(capsys, "check", str(adapter), "--base", str(tiny_base))
    assert code == 0 and f"Checkpoint {adapter} is valid" in out and f"Fits the base model {tiny_base}" in out
    code, out, _ = run(capsys, "--lang", "zh", "check", str(adapter), "--json")
    assert json.loads(out)["fit_checked"] is True
    code, out, _ = run(capsys, "check", str(adapter), "--lang", "zh")
    assert "验证通过" in out and "匹配" in out


def test_errors_print_class_code_and_hint_and_exit_1(capsys, tmp_path):
    code, out, err = run(capsys, "check", "./qwen3-finetuned-nowhere")
    assert code == 1 and out == ""
    assert "CheckpointValidationError: Checkpoint directory does not exist: ./qwen3-finetuned-nowhere" in err
    assert "code: ME201" in err and "what to do:" in err and "Traceback" not in err
    code, out, err = run(capsys, "check", "./qwen3-finetuned-nowhere", "--lang", "zh")
    assert "CheckpointValidationError: Checkpoint目录不存在: ./qwen3-finetuned-nowhere" in err and "解决方案" in err
    code, out, _ = run(capsys, "check", "./qwen3-finetuned-nowhere", "--json")
    assert json.loads(out)["code"] == "ME201"


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--debug", "detect", "./nowhere")
    assert code == 1 and "Traceback" in err


def test_zh_locale_selects_chinese(capsys, monkeypatch):
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    code, _, err = run(capsys, "detect", "./qwen3-finetuned")
    assert "Checkpoint目录不存在: ./qwen3-finetuned" in err


def test_validate_config_prints_every_problem_and_exits_2(capsys, tmp_path, adapter):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base_model_load_in_4bit: true\nbase_model_load_in_8bit: true\nexport_formats: [onnx]\n"
        "onnx_opset_version: 9\nbatchsize: 2\n"
    )
    code, out, _ = run(capsys, "validate-config", str(path))
    assert code == 2 and out.count(f"{path}:") == 3  # field and cross-field problems in one pass
    assert "line 5: batchsize: unknown key (did you mean 'batch_size'?)" in out
    path.write_text(
        "base_model_load_in_4bit: true\nbase_model_load_in_8bit: true\nexport_formats: [onnx]\nonnx_opset_version: 9\n"
    )
    code, out, _ = run(capsys, "validate-config", str(path), "--json")
    data = json.loads(out)
    assert code == 2 and [p["key"] for p in data["problems"]] == ["base_model_load_in_8bit", "onnx_opset_version"]
    code, out, _ = run(
        capsys,
        "validate-config",
        str(path),
        "--set",
        "base_model_load_in_8bit=false",
        "--set",
        "onnx_opset_version=17",
        "--set",
        "export_formats=[safetensors]",
    )
    # a sound configuration whose checkpoint is not there: the run's own error, found before the run (issue 24)
    assert code == 2 and "checkpoint_path: Checkpoint directory does not exist: ./qwen3-finetuned (ME201)" in out
    sound = [
        "--set",
        "base_model_load_in_8bit=false",
        "--set",
        "onnx_opset_version=17",
        "--set",
        f"checkpoint_path={adapter}",
    ]
    code, out, _ = run(capsys, "validate-config", str(path), *sound, "--set", "export_formats=[safetensors]")
    assert code == 0 and "no problems found" in out
    path.write_text("lang: zh\nbatch_size: 0\n")
    code, out, _ = run(capsys, "validate-config", str(path))
    assert "batch_size" in out and "参见" in out


def test_validate_config_parse_error_exits_2(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: [1,\n")
    code, _, err = run(capsys, "validate-config", str(path))
    assert code == 2 and "ConfigError: Cannot parse" in err and "code: ME102" in err


def test_init_config(capsys, tmp_path, make_run):
    code, out, _ = run(capsys, "init-config", str(tmp_path / "m.yaml"))
    assert code == 0 and (tmp_path / "m.yaml").is_file()
    code, _, err = run(capsys, "init-config", str(tmp_path / "m.yaml"))
    assert code == 2 and "ME107" in err
    code, out, _ = run(capsys, "validate-config", str(tmp_path / "m.yaml"))
    assert code == 2 and "Checkpoint directory does not exist: ./qwen3-finetuned (ME201)" in out  # none here yet
    make_run([10, 20], root=Path.cwd() / "qwen3-finetuned")
    code, out, _ = run(capsys, "validate-config", str(tmp_path / "m.yaml"))
    assert code == 0


def test_doctor_table_and_json(capsys, adapter, tiny_base, tmp_path):
    code, out, _ = run(capsys, "doctor", "--checkpoint", str(adapter), "--output-dir", str(tmp_path))
    assert code == 0 and "python" in out and "torch" in out and "checkpoint" in out
    code, out, _ = run(capsys, "doctor", "--json", "--base", str(tiny_base), "--output-dir", str(tmp_path))
    data = json.loads(out)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["ok"] is True and checks["hub"]["status"] == "skip" and "needs at least" in checks["disk"]["detail"]
    code, out, _ = run(capsys, "doctor", "--lang", "zh", "--checkpoint", str(tmp_path / "missing"))
    assert code == 1 and "Checkpoint目录不存在" in out


def test_doctor_lists_every_package_of_every_extra(capsys, tmp_path):
    """Issue 24: onnxruntime-genai and ray, which `make` installs, were missing from doctor's table."""
    from importlib import metadata

    from packaging.requirements import Requirement

    code, out, _ = run(capsys, "doctor", "--json", "--output-dir", str(tmp_path))
    listed = {c["name"].lower() for c in json.loads(out)["checks"]}
    extras = [e for e in metadata.metadata("model-export").get_all("Provides-Extra") if e != "dev"]
    wanted = {
        r.name.lower()
        for r in map(Requirement, metadata.requires("model-export"))
        if r.marker and any(r.marker.evaluate({"extra": e}) for e in extras)
    }
    assert wanted and wanted <= listed, wanted - listed


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2


def test_console_script_is_installed():
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "model-export"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("doctor", "detect", "check", "validate-config", "init-config", "demo"):
        assert command in out.stdout


def test_check_takes_its_settings_from_a_config_file(capsys, make_run, tiny_base, tmp_path):
    root = make_run([10, 20], best=10)
    log = tmp_path / "export.log"
    path = tmp_path / "export.yaml"
    path.write_text(
        f"checkpoint_path: {root}\nbase_model_name: {tiny_base}\ncheckpoint_selection: best\n"
        f"memory_monitoring: true\nlog_file: {log}\nlang: zh\n"
    )
    code, out, _ = run(capsys, "check", "--config", str(path))
    assert code == 0 and f"Checkpoint {root / 'checkpoint-10'} 验证通过" in out
    text = log.read_text(encoding="utf-8")
    assert " - INFO - Memory usage: " in text and "Processing checkpoint: 100% complete" in text
    code, out, _ = run(
        capsys,
        "check",
        "--config",
        str(path),
        "--set",
        "enable_progress_monitoring=false",
        "--set",
        "checkpoint_selection=latest",
        "--lang",
        "en",
    )
    assert code == 0 and f"Checkpoint {root / 'checkpoint-20'} is valid" in out
    assert text.count("Processing checkpoint: 100% complete") == log.read_text(encoding="utf-8").count(
        "Processing checkpoint: 100% complete"
    )
    code, out, _ = run(capsys, "detect", "--config", str(path), "--json")
    assert json.loads(out)["selected"] == str(root / "checkpoint-10")
