"""Issue 24: a new user's second trial. No input is ever written into, however it is named; the benchmark speaks the
run's verdicts; a runtime that cannot load is not the artifact's failure; messages say what is true, in both
languages; the report and a batch leave nothing out."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from model_export import ExportConfiguration, run, validate_config
from model_export.cli import main
from model_export.errors import ConfigError
from tests.conftest import tree_digest

pytestmark = pytest.mark.integration


# --- no input is written into ---------------------------------------------------------------------------------------


def _base_named_by_adapter(tiny_base, adapter, tmp_path, base_name=None):
    """A Trainer-like run whose adapter_config.json alone names the base (``base_name``, default its path)."""
    run_dir = tmp_path / "qwen3-finetuned" / "checkpoint-30"
    shutil.copytree(adapter, run_dir)
    config_file = run_dir / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = base_name or str(tiny_base)
    config_file.write_text(json.dumps(data))
    return run_dir.parent


def test_output_dir_in_the_base_that_only_adapter_config_names_is_refused_before_anything_is_written(
    tiny_base, adapter, tmp_path, capsys
):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    training = _base_named_by_adapter(base, adapter, tmp_path)
    before = tree_digest(base)
    for output in (base, base / "exports"):
        settings = {"checkpoint_path": str(training), "output_dir": str(output), "export_formats": ["safetensors"]}
        problems = validate_config(settings)
        assert [p.key for p in problems] == ["output_dir"] and str(base) in problems[0].render()
        with pytest.raises(ConfigError):
            run(ExportConfiguration(**settings))
    link = tmp_path / "looks-elsewhere"
    link.symlink_to(base, target_is_directory=True)  # the same folder through a link
    assert main(["run", "--set", f"checkpoint_path={training}", "--set", f"output_dir={link}/out"]) == 2
    assert "output_dir" in capsys.readouterr().err
    assert tree_digest(base) == before and not (base / ".model-export.lock").exists()


def test_output_dir_in_the_hub_cache_of_a_base_named_by_its_hub_id_is_refused(
    tiny_base, adapter, tmp_path, monkeypatch
):
    """A hub id resolves to a cache snapshot whose files link into the repo's blobs: both are the base."""
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen3-4B-Thinking-2507"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in tiny_base.iterdir():
        blob = repo / "blobs" / file.name
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    training = _base_named_by_adapter(tiny_base, adapter, tmp_path, "Qwen/Qwen3-4B-Thinking-2507")
    for output in (snapshot, repo / "blobs" / "out", repo):
        problems = validate_config({"checkpoint_path": str(training), "output_dir": str(output)})
        assert [p.key for p in problems] == ["output_dir"], output
    assert validate_config({"checkpoint_path": str(training), "output_dir": str(tmp_path / "out")}) == []
