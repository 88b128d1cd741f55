"""Issue 26: vLLM as a runtime. ``verification_servers: [vllm]`` starts vLLM's OpenAI-compatible server (the CPU build,
from the interpreter ``make vllm`` builds) on the demo's run: the merged safetensors and the adapter served as a LoRA on
the base are judged on vLLM's own log-probabilities against the reference, with vLLM's chat template and stop set; a
quantized checkpoint vLLM's CPU build has no kernel for is not run, quoting vLLM; the server never outlives the run.

These tests start real servers (about 30 s each here) and form the second tier: ``make test-servers`` (which runs
``make vllm`` first; .ci/run runs it). Where vLLM's interpreter is missing they skip, saying so."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from model_export import ExportConfiguration, run
from model_export.runtimes.vllm import VLLM_PYTHON_ENV, vllm_problem
from model_export.verify.references import load_reference

pytestmark = [pytest.mark.integration, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get(VLLM_PYTHON_ENV) or str(ROOT / ".venv-vllm" / "bin" / "python")
PROBLEM = vllm_problem(PYTHON)
if PROBLEM is not None:
    pytestmark.append(pytest.mark.skip(reason=f"vLLM's server cannot start here: {PROBLEM}"))

# The hand-written ChatML template this project once wrote for Ollama: no <think> after the generation prompt.
HANDWRITTEN = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _config(training, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["safetensors"], "verification_servers": ["vllm"], "vllm_python": PYTHON}
    return ExportConfiguration(
        checkpoint_path=str(training),
        base_model_name=str(shipped_base()),
        output_dir=str(out),
        **{**settings, **overrides},
    )


def _vllm_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        line = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "VLLM::" in line or "vllm.entrypoints" in line:
            found.append(process)
    return found


@pytest.fixture(scope="module")
def served(training, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "out"
    return out, run(_config(training, out))


def test_the_merged_model_and_the_adapter_as_a_lora_are_verified_in_vllms_server(served, training):
    out, result = served
    verdicts = result.steps["verify"]["result"]["verdicts"]
    assert set(verdicts) == {"safetensors", "safetensors@vllm", "adapter@vllm"}
    for label in ("safetensors@vllm", "adapter@vllm"):
        verdict = verdicts[label]
        assert verdict["status"] == "verified", (label, verdict)
        assert verdict["runtime"].startswith("vLLM 0.") and verdict["rule"].startswith("vLLM, top-20 log-probabilities")
        # fp32 served in fp32: vLLM's log-probabilities within the full-precision bound, its greedy tokens the same
        assert verdict["max_abs_diff"] <= 1e-3 and verdict["top1_agreement"] == 1.0
        generated = [sample for sample in verdict["samples"] if sample["greedy_agreement"] is not None]
        assert generated and all(sample["greedy_agreement"] == 1.0 for sample in generated)
        assert abs(verdict["perplexity"] - verdict["reference_perplexity"]) < 1e-2 * verdict["reference_perplexity"]
        server = verdict["server"]
        assert server["start_seconds"] > 0 and server["peak_rss"] > 100 << 20 and Path(server["log"]).is_file()
        checks = {c["runtime"]: c for c in verdict["serving"]["checks"]}
        assert checks["vLLM's chat template (/tokenize with the messages)"]["status"] == "verified"
        assert checks["vLLM's stop set (a generation forced to the end-of-turn token)"] == {
            "runtime": "vLLM's stop set (a generation forced to the end-of-turn token)",
            "status": "verified",
            "stop": 2,
        }
    lora = verdicts["adapter@vllm"]["server"]["command"]
    assert "--enable-lora" in lora and f"adapter={(training / 'checkpoint-30').resolve()}" in lora
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "vllm serve" in html and "adapter@vllm" in html
    assert not _vllm_processes()  # every server was stopped


def test_a_wrong_chat_template_in_the_served_folder_fails_with_both_renderings(served, tmp_path):
    import shutil

    from model_export.demo.run import shipped_base
    from model_export.verify.judge import Bounds
    from model_export.verify.served import verify_served

    out, _ = served
    folder = tmp_path / "served"
    shutil.copytree(out / "export" / "safetensors", folder)
    (folder / "chat_template.jinja").write_text(HANDWRITTEN, encoding="utf-8")
    reference = load_reference(out / "verify" / ".reference.cache")
    verdict = verify_served(
        "safetensors@vllm",
        folder,
        reference,
        Bounds(),
        base_dir=shipped_base(),
        tokenizer_dir=out / "export" / "safetensors",  # the training run's template
        python=PYTHON,
        max_len=512,
        floor="full",
        log=tmp_path / "server.log",
    )
    assert verdict.status == "failed" and verdict.top1_agreement == 1.0  # the weights are right; the template is not
    message = str(verdict.failure)
    assert verdict.failure.code == "ME607" and "vLLM's chat template" in message
    assert "renders conversation 1 (user) otherwise than apply_chat_template" in message
    assert "<|im_start|>assistant\\n<think>\\n'" in message and "got '<|im_start|>user" in message


def test_an_int4_checkpoint_is_verified_or_not_run_with_vllms_own_reason(training, tmp_path):
    # the tiny model's int4 weights agree with the reference on top-1 about 0.7: bounds for this test's subject only
    loose = {"validation_int4_min_top1": 0.5, "validation_int4_max_kl": 0.5}
    result = run(_config(training, tmp_path / "out", quantization_level="int4", **loose))
    verify = result.steps["verify"]["result"]
    verdict = verify["verdicts"]["safetensors@vllm"]
    if verdict["status"] == "not_run":  # vLLM 0.32's CPU build: no W4A16 kernel for fp32 activations
        assert verdict["reason"].startswith("vLLM has no kernel for it in this build: ")
        assert "NotImplementedError" in verdict["reason"] or "kernel" in verdict["reason"]
        assert verify["passed"] is None and verify["counts"]["not_run"] == 1  # counted neither way
    else:
        assert verdict["status"] == "verified", verdict
    assert verify["verdicts"]["safetensors"]["status"] == "verified"
    assert not _vllm_processes()


def test_killing_the_run_stops_every_vllm_process(training, tmp_path):
    out = tmp_path / "out"
    config = _config(training, out).model_dump(mode="json")
    (tmp_path / "c.json").write_text(json.dumps(config))
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        cli = [sys.executable, "-m", "model_export.cli", "run", str(tmp_path / "c.json")]
        process = subprocess.Popen(cli, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "answered after" not in log.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(1)
    servers = _vllm_processes()
    assert servers, "the server was not up"
    process.send_signal(signal.SIGKILL)
    process.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, [p.info for p in alive]


def test_a_batchs_adapters_are_served_in_one_vllm_server_each_on_its_own_reference(tmp_path):

    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    runs = tmp_path / "runs"
    for lr in ("1e-3", "3e-3"):
        build_training_run(shipped_base(), runs / f"lr-{lr}", steps=10, learning_rate=float(lr))
    out = tmp_path / "out"
    config = _config(runs, out, batch_outputs="adapters")
    result = run(config)
    manifest = json.loads((out / "batch.json").read_text())
    served = manifest["served"]["verdicts"]
    assert set(served) == {"lr-1e-3", "lr-3e-3"} and result.passed is True
    commands = {verdict["server"]["command"] for verdict in served.values()}
    assert len(commands) == 1  # one server for both
    (command,) = commands
    assert "lr-1e-3=" in command and "lr-3e-3=" in command and "--max-loras 2" in command
    for line in manifest["adapters"]:
        rows = {r["format"]: r for r in line["artifacts"]}
        assert rows["peft@vllm"]["status"] == "verified" and line["counts"]["verified"] == 2
        assert (out / line["name"] / "verify" / "peft@vllm.json").is_file()
        assert served[line["name"]]["max_abs_diff"] <= 1e-3
    # each was judged on its own reference, and the two references differ far beyond the bound: the right LoRA ran
    a, b = (load_reference(out / n / "verify" / ".reference.cache") for n in ("lr-1e-3", "lr-3e-3"))
    assert max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits)) > 0.1
    assert command in (out / "report.html").read_text(encoding="utf-8")  # the aggregate report's serving command
    run(config)  # nothing changed: the batch's vLLM verdicts are kept
    assert json.loads((out / "batch.json").read_text())["served"] == manifest["served"]
    assert not _vllm_processes()
