"""End to end on what transformers' Trainer + PEFT really leave behind, and the demo command."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from model_export import CheckpointDetector, detect, validate_checkpoint
from model_export.cli import main
from model_export.demo.tiny import build_training_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def trainer_run(tiny_base, tmp_path_factory):
    return build_training_run(tiny_base, tmp_path_factory.mktemp("train") / "qwen3-finetuned")


def test_trainer_output_is_detected_and_valid(trainer_run, tiny_base):
    names = sorted(p.name for p in trainer_run.iterdir() if p.is_dir())
    assert names == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    checkpoint = CheckpointDetector().detect_latest_checkpoint(trainer_run)
    assert checkpoint == trainer_run / "checkpoint-30"
    report = validate_checkpoint(checkpoint, str(tiny_base))
    assert report.fit_checked and report.rank == 8 and report.num_modules == 14
    assert set(report.training_artifacts) >= {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
    }
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert detect(trainer_run, "best").path.name == os.path.basename(state["best_model_checkpoint"])


def test_cli_on_the_trainer_output(trainer_run, tiny_base, capsys):
    assert main(["check", str(trainer_run), "--base", str(tiny_base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(trainer_run / "checkpoint-30")


def test_demo_command_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}
    cli = os.path.join(os.path.dirname(sys.executable), "model-export")
    out = subprocess.run([cli, "demo", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    llama = importlib.util.find_spec("llama_cpp") is not None  # without it the GGUF is read back, not run: not verified
    assert result["passed"] is (True if llama else None) and result["report"] == "export-demo/report.html"
    assert result["counts"] == {"verified": 4 if llama else 3, "failed": 0, "not_run": 0 if llama else 1}
    assert sorted(p.name for p in (tmp_path / "qwen3-finetuned").iterdir() if p.is_dir()) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    assert (tmp_path / "export-demo" / "export" / "safetensors" / "model.safetensors").is_file()
    assert set(result["artifacts"]) == {"safetensors", "onnx", "gguf"}  # the extras are installed by make test
    assert (tmp_path / "export-demo" / "export" / "onnx" / "genai_config.json").is_file()
    assert "Report: export-demo/report.html" in out.stderr
    again = subprocess.run(
        [cli, "--lang", "zh", "demo"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert (
        again.returncode == 0
        and "复用已有的" in again.stderr
        and "演示完成" in again.stderr
        and "报告: export-demo/report.html" in again.stdout
    )


def test_the_shipped_demo_model_is_pretrained():
    """Its outputs are not random: it continues a line of the corpus it was trained on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_export.demo.run import shipped_base

    tokenizer = AutoTokenizer.from_pretrained(str(shipped_base()))
    model = AutoModelForCausalLM.from_pretrained(str(shipped_base()))
    prompt = tokenizer("The export tool", return_tensors="pt")
    with torch.no_grad():
        text = tokenizer.decode(model.generate(**prompt, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("The export tool reads a checkpoint")
