"""Many adapters in one run (issue 18): a sweep folder of three Trainer runs, through the local pool and through Ray
(a local instance, and a head plus a second node on loopback), with a bad adapter, a killed worker and a rerun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_export import BatchResult, ConfigError, ExportConfiguration, extras, run
from model_export.cli import main
from model_export.verify.references import load_reference, shared_path

pytestmark = pytest.mark.integration

LEARNING_RATES = ("1e-3", "3e-3", "1e-2")
LLAMA = extras.is_available("llama_cpp")
needs_ray = pytest.mark.skipif(not extras.is_available("ray"), reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A learning-rate sweep: three run folders of the demo's Trainer (checkpoint-10 each), one base."""
    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    root = tmp_path_factory.mktemp("sweep") / "runs"
    for lr in LEARNING_RATES:
        build_training_run(shipped_base(), root / f"lr-{lr}", steps=10, learning_rate=float(lr))
    return root


def batch_config(checkpoint_path, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {
        "export_formats": ["safetensors", "gguf"],
        "batch_outputs": "both",
        "test_input_samples": ["Hello", "Write a haiku about autumn."],
        "validation_new_tokens": 4,
        **overrides,
    }
    return ExportConfiguration(
        checkpoint_path=str(checkpoint_path), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


def artifact_bytes(out: Path) -> dict[str, bytes]:
    """Every file each adapter exported, by its path under output_dir."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.glob("*/export/**/*"))
        if p.is_file() and p.name != ".step.json"
    }


def check_all_verified(result: BatchResult, out: Path, adapters: int = 3) -> None:
    """Every adapter done; every artifact verified (the GGUFs not run, and said so, without llama-cpp-python)."""
    assert [a["status"] for a in result.adapters] == ["done"] * adapters
    assert result.counts["failed"] == 0 and result.counts["artifacts_failed"] == 0
    for line in result.adapters:
        rows = {a["format"]: a for a in line["artifacts"]}
        assert set(rows) == {"safetensors", "gguf", "peft", "gguf_lora"}
        for fmt, row in rows.items():
            if fmt.startswith("gguf") and not LLAMA:
                assert row["status"] == "not_run" and "llama-cpp-python" in row["reason"]
            else:
                assert row["status"] == "verified", (line["name"], fmt, row)
    assert result.passed is (True if LLAMA else None)


@pytest.fixture(scope="module")
def pooled(sweep, tmp_path_factory):
    """The sweep folder through the local pool (the default executor)."""
    out = tmp_path_factory.mktemp("pool") / "out"
    return run(batch_config(sweep, out)), out


def test_a_sweep_folder_exports_every_run_with_the_local_pool(pooled, sweep):
    result, out = pooled
    assert isinstance(result, BatchResult)
    assert [a["name"] for a in result.adapters] == sorted(f"lr-{lr}" for lr in LEARNING_RATES)  # by folder name
    check_all_verified(result, out)
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["executor"]["name"] == "local" and manifest["executor"]["width"] >= 1
    assert "memory" in manifest["executor"]["rule"] and "cores" in manifest["executor"]["rule"]
    for lr in LEARNING_RATES:  # each adapter is a whole run of its own, of its run folder's latest checkpoint
        run_json = json.loads((out / f"lr-{lr}" / "run.json").read_text())
        assert run_json["steps"]["detect"]["result"]["selected"].endswith(f"lr-{lr}/checkpoint-10")
        assert (out / f"lr-{lr}" / "report.html").is_file()
        # every adapter's reference was computed once, in base/'s one pass for all of them, and taken from there
        log = (out / f"lr-{lr}" / "export.log").read_text()
        assert "Reference taken from the batch's shared pass" in log and "Reference streamed layer by layer" not in log
        selected = Path(run_json["steps"]["detect"]["result"]["selected"])  # its run's cache is that file, linked
        cache = out / f"lr-{lr}" / "verify" / ".reference.cache"
        assert os.path.samefile(cache, shared_path(out / "base" / "verify" / "references", selected))
        assert load_reference(cache).greedy and load_reference(cache).kept_in is None
        modelfile = (out / f"lr-{lr}" / "export" / "gguf_lora" / "Modelfile").read_text()
        assert "FROM ../../../base/export/gguf/model-" in modelfile and "ADAPTER ./adapter-lora-f32.gguf" in modelfile
        if LLAMA and shutil.which("go"):  # the LoRA's Modelfile is served as the model was trained (issue 26)
            verdict = run_json["steps"]["verify"]["result"]["verdicts"]["gguf_lora"]
            assert verdict["serving"]["status"] == "verified" and len(verdict["serving"]["checks"]) == 2
    # the base alone on the held-out text was scored in the shared pass: verify:heldout, after it, found it made
    lines = (out / "export.log").read_text().splitlines()
    after = [i for i, line in enumerate(lines) if "Step verify:references finished" in line][0]
    heldout = [i for i, line in enumerate(lines) if "Step verify:heldout finished" in line][0]
    assert after < heldout and any("base-heldout.pt" in line for line in lines[after:heldout])
    assert len(list(out.glob("base/export/gguf/model-*.gguf"))) == 1
    step = json.loads((out / "base" / "run.json").read_text())["steps"]["verify:references"]
    assert step["status"] == "done" and len(step["result"]["files"]) == 3 and not step["result"]["left"]
    assert "The references of the 3 adapters in one layer-streamed pass" in (out / "export.log").read_text()
    page = (out / "report.html").read_text()
    for lr in LEARNING_RATES:
        assert f'<a href="lr-{lr}/report.html">lr-{lr}</a>' in page
    assert "--lora-modules lr-1e-2=" in page and " lr-3e-3=" in page and "ollama create lr-1e-3 -f" in page
    # the adapters differ (three learning rates), and the merged artifacts with them
    weights = {
        (out / f"lr-{lr}" / "export" / "peft" / "adapter_model.safetensors").read_bytes() for lr in LEARNING_RATES
    }
    assert len(weights) == 3


def test_a_batch_on_ray_or_of_one_adapter_computes_each_reference_in_its_run(tmp_path):
    """The shared pass needs two adapters verified on the local pool: Ray's driver holds no model, one adapter has
    nothing to share, and without verification there is no reference."""
    from model_export.checkpoint.base_model import inspect_base_model
    from model_export.pipeline.batch_base import share_references

    config = batch_config(tmp_path, tmp_path / "out")
    info = inspect_base_model(config.base_model_name)
    assert share_references(config, info, 2) is True
    assert share_references(config, info, 1) is False
    assert share_references(config.model_copy(update={"executor": "ray"}), info, 2) is False
    assert share_references(config.model_copy(update={"run_validation_tests": False}), info, 2) is False


def test_benchmark_takes_a_batch_and_each_adapters_run(pooled, capsys):
    """A batch's output_dir and an adapter's run with batch_outputs both (PEFT folder, LoRA GGUF): every runnable
    artifact, labelled with its adapter; a traceback (KeyError 'peft') before."""
    _, out = pooled
    assert main(["benchmark", str(out), "--json", "--repeats", "1", "--new-tokens", "2"]) == 0
    labels = {r["label"]: r for r in json.loads(capsys.readouterr().out)}
    for lr in LEARNING_RATES:
        assert {f"lr-{lr}/safetensors", f"lr-{lr}/gguf", f"lr-{lr}/gguf_lora"} <= set(labels)
    assert all(r["status"] in ("measured", "not_run") for r in labels.values())
    assert labels["lr-1e-3/gguf_lora"]["status"] == ("measured" if LLAMA else "not_run")


def test_a_rerun_skips_the_adapters_that_are_done_and_redoes_one_whose_file_changed(pooled, sweep):
    _, out = pooled
    config = batch_config(sweep, out)
    again = run(config)
    assert [a.get("skipped") for a in again.adapters] == [True, True, True]
    damaged = out / "lr-3e-3" / "export" / "peft" / "adapter_config.json"
    damaged.write_text(damaged.read_text() + " ")
    again = run(config)
    assert [bool(a.get("skipped")) for a in again.adapters] == [True, True, False]
    assert json.loads(damaged.read_text())  # written again by its export step
    check_all_verified(again, out)


@needs_ray
def test_ray_gives_the_same_artifacts_as_the_local_pool(pooled, sweep, tmp_path):
    _, pool_out = pooled
    out = tmp_path / "ray"
    result = run(batch_config(sweep, out, executor="ray"))
    check_all_verified(result, out)
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["executor"]["name"] == "ray" and manifest["executor"]["address"] == "local instance"
    assert manifest["executor"]["task"]["num_cpus"] == 1 and manifest["executor"]["task"]["memory"] > 0
    assert len({line["pid"] for line in result.adapters}) >= 2  # at least two worker processes did the work
    assert artifact_bytes(out) == artifact_bytes(pool_out)
    assert len(artifact_bytes(out)) >= 3 * 6


def test_a_bad_adapter_fails_alone_and_the_exit_code_says_so(sweep, tmp_path, capfd):
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    broken = runs / "lr-3e-3" / "checkpoint-10" / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # cut short, as a copy that stopped would leave it
    out = tmp_path / "out"
    path = tmp_path / "batch.yaml"
    config = batch_config(runs, out, export_formats=["safetensors"], batch_outputs="merged", max_parallel_adapters=1)
    path.write_text(json.dumps(config.model_dump(mode="json")))
    assert main(["run", str(path)]) == 1
    manifest = json.loads((out / "batch.json").read_text())
    lines = {line["name"]: line for line in manifest["adapters"]}
    assert lines["lr-3e-3"]["status"] == "failed" and lines["lr-3e-3"]["error"]["code"].startswith("ME2")
    assert [lines[f"lr-{lr}"]["status"] for lr in ("1e-3", "1e-2")] == ["done", "done"]
    assert manifest["passed"] is False and manifest["counts"]["failed"] == 1
    assert manifest["executor"]["width"] == 1 and "max_parallel_adapters 1" in manifest["executor"]["rule"]
    page = (out / "report.html").read_text()
    assert lines["lr-3e-3"]["error"]["code"] in page and "Failed: 1 of 3 adapter(s) failed" in page
    # Issue 24: the console keeps the code and the fix batch.json has; lines from workers say whose they are; each
    # adapter's checkpoint is named; the executor reads as a sentence.
    code, hint = lines["lr-3e-3"]["error"]["code"], lines["lr-3e-3"]["error"]["hint"]
    err = capfd.readouterr().err
    failed = err[err.index("Adapter lr-3e-3 failed") :]
    assert failed.startswith(f"Adapter lr-3e-3 failed: {code} ") and f"(what to do: {hint})" in failed
    assert " - INFO - [lr-1e-3] " in err and " - INFO - [lr-1e-2] " in err  # "... - INFO - [lr-1e-3] Step merge ..."
    for name in ("lr-1e-3", "lr-1e-2"):
        assert lines[name]["checkpoint"].endswith(f"{name}/checkpoint-10")
        assert f"checkpoint {lines[name]['checkpoint']}" in page
    assert "A local process pool ran 1 adapter(s) at a time with" in page and "{&quot;" not in page


def test_names_that_collide_stop_before_anything_is_written(sweep, tmp_path):
    other = tmp_path / "other" / "lr-1e-3"
    shutil.copytree(sweep / "lr-1e-3", other)
    out = tmp_path / "out"
    config = batch_config(sweep, out, adapters=[str(sweep / "lr-1e-3"), str(other)])
    with pytest.raises(ConfigError) as caught:
        run(config)
    assert (
        caught.value.code == "ME111"
        and str(other) in str(caught.value)
        and "adapters: {name: path" in (caught.value.hint())
    )
    assert not out.exists()
    named = run(
        batch_config(
            sweep,
            out,
            adapters={"first": str(sweep / "lr-1e-3"), "second": str(other)},
            export_formats=["safetensors"],
            batch_outputs="adapters",
        )
    )
    assert [a["name"] for a in named.adapters] == ["first", "second"]
    assert sorted(p.name for p in (out / "first" / "export").iterdir() if p.is_dir()) == ["peft"]  # no merge
    assert not (out / "first" / "merge").exists()


def test_a_killed_worker_is_run_again_and_resumes(sweep, tmp_path, monkeypatch):
    """The first process to record its third step dies (SIGKILL, as the OOM killer would): the pool runs that adapter
    again, which resumes after its last finished step (the count is each process's own: the batch's, which does the
    base's steps, starts from none here)."""
    monkeypatch.setattr("model_export.faults._counts", {})
    monkeypatch.setenv("MODEL_EXPORT_CRASH_AT", "step:3")
    monkeypatch.setenv("MODEL_EXPORT_CRASH_ONCE", str(tmp_path / "killed-once"))
    out = tmp_path / "out"
    result = run(batch_config(sweep, out, export_formats=["safetensors"], batch_outputs="merged"))
    assert (tmp_path / "killed-once").exists()
    assert [a["status"] for a in result.adapters] == ["done"] * 3
    logs = [(out / f"lr-{lr}" / "export.log").read_text() for lr in LEARNING_RATES]
    # the killed one resumed with its first steps kept (a broken pool also stops the adapter running beside it,
    # which resumes the same way)
    assert 1 <= sum("Step detect skipped" in log for log in logs) <= 2


@needs_ray
def test_a_killed_ray_worker_is_retried_by_ray(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr("model_export.faults._counts", {})
    monkeypatch.setenv("MODEL_EXPORT_CRASH_AT", "step:3")
    monkeypatch.setenv("MODEL_EXPORT_CRASH_ONCE", str(tmp_path / "killed-once"))
    out = tmp_path / "out"
    result = run(batch_config(sweep, out, executor="ray", export_formats=["safetensors"], batch_outputs="merged"))
    assert (tmp_path / "killed-once").exists()
    assert [a["status"] for a in result.adapters] == ["done"] * 3
    logs = [(out / f"lr-{lr}" / "export.log").read_text() for lr in LEARNING_RATES]
    assert sum("Step detect skipped" in log for log in logs) == 1


@needs_ray
def test_a_head_and_a_second_node_on_loopback_share_the_batch(sweep, tmp_path, monkeypatch):
    """`ray start --head` and `ray start --address` on this machine: two nodes, one CPU each; the batch reaches the
    cluster through RAY_ADDRESS and its tasks run on both nodes."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    port = "6391"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [ray_cli, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True, capture_output=True
        )
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        out = tmp_path / "out"
        result = run(batch_config(sweep, out, executor="ray", export_formats=["safetensors"], batch_outputs="merged"))
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)
    assert [a["status"] for a in result.adapters] == ["done"] * 3
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["executor"]["nodes"] == 2 and manifest["executor"]["address"] == f"127.0.0.1:{port}"
    assert len({line["node"] for line in result.adapters}) == 2


def test_a_node_that_cannot_see_output_dir_fails_clearly(sweep, tmp_path):
    """The task checks the file the driver wrote in output_dir; here it reads another (as a node without the shared
    mount would find nothing), so every adapter fails with ME407 naming the host and the path."""
    from model_export.pipeline.batch import adapter_task

    line = adapter_task(
        {
            "name": "lr-1e-3",
            "path": str(sweep / "lr-1e-3"),
            "config": batch_config(sweep / "lr-1e-3", tmp_path / "out" / "lr-1e-3").model_dump(mode="json"),
            "shared": {},
            "token": "abc",
            "token_file": str(tmp_path / "not-there"),
        }
    )
    assert line["status"] == "failed" and line["error"]["code"] == "ME407"
    assert str(tmp_path / "out") in line["error"]["message"] and "NFS" in line["error"]["hint"]


def test_kill_9_of_the_batch_stops_its_workers_and_the_rerun_resumes_them(sweep, tmp_path):
    """kill -9 of the batch's own process alone (as a terminal closed on it, or the OOM killer choosing it): its pool
    workers end with it instead of going on for seconds; their adapters resume on the rerun."""
    import signal
    import time

    import psutil

    config, out, process = _batch_process(sweep, tmp_path, width=2)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and process.poll() is None:
        started = [p for p in out.glob("lr-*/run.json")]
        workers = _pool_workers(process.pid)
        if started and workers:
            break
        time.sleep(0.1)
    assert workers, "no worker started before the deadline"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=3)
    alive = [p for p in alive if _running(p)]  # a zombie has ended (its parent, gone too, cannot reap it here)
    assert not alive, f"workers still running 3 s after the batch was killed: {[p.pid for p in alive]}"
    result = run(config)
    assert [a["status"] for a in result.adapters] == ["done"] * 3


def _batch_process(sweep, tmp_path, width, **popen):
    """`model-export run` of the sweep (safetensors, merged) in a process of its own: (config, out, process)."""
    out = tmp_path / "out"
    config = batch_config(
        sweep, out, export_formats=["safetensors"], batch_outputs="merged", max_parallel_adapters=width
    )
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "model_export.cli", "run", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return config, out, process


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pool_workers(pid):
    """The processes of the batch's pool (forked from multiprocessing's fork server, whose command line they share;
    spawned where there is none: their command line names the spawn entry), not its resource tracker."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # gone, or a zombie, between listing and reading
            continue
        if "spawn_main" in command or "forkserver" in command:
            found.append(child)
    return found


def test_a_batch_killed_whole_resumes_per_adapter(sweep, tmp_path):
    """kill -9 of the whole process group once the first adapter is recorded in batch.json; the rerun skips what was
    recorded done and finishes the rest."""
    import signal
    import time

    config, out, process = _batch_process(sweep, tmp_path, width=1, start_new_session=True)
    deadline = time.time() + 120
    recorded = []
    while time.time() < deadline and process.poll() is None:
        try:
            recorded = [a for a in json.loads((out / "batch.json").read_text())["adapters"] if a["status"] == "done"]
        except (OSError, ValueError, KeyError):
            recorded = []
        if recorded:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert recorded, "no adapter was recorded before the deadline"
    result = run(config)
    assert [a["status"] for a in result.adapters] == ["done"] * 3
    skipped = [a["name"] for a in result.adapters if a.get("skipped")]
    assert recorded[0]["name"] in skipped and len(skipped) < 3
