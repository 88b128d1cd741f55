"""The public API: a complete __all__, light imports, optional extras reported with their pip command."""

import subprocess
import sys

import pytest

import model_export
from model_export import MissingDependencyError
from model_export.extras import require


def test_all_is_complete_and_importable():
    """Every name of __all__ imports (each on first use: the package imports nothing heavy up front), and nothing
    public is missing from it."""
    import inspect

    for name in model_export.__all__:
        assert getattr(model_export, name) is not None
    public = {
        name for name, value in vars(model_export).items() if not name.startswith("_") and not inspect.ismodule(value)
    }
    listed = {n for n in dir(model_export) if not n.startswith("_") and not inspect.ismodule(getattr(model_export, n))}
    assert public == set(model_export.__all__) == listed


def test_import_does_not_pull_heavy_backends():
    heavy = "('torch', 'transformers', 'onnx', 'gguf', 'peft')"
    code = f"import sys, model_export; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_extra_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    with pytest.raises(MissingDependencyError) as err:
        require("onnx", "ONNX export")
    assert err.value.code == "ME501" and isinstance(err.value, ImportError)
    assert str(err.value) == "ONNX export needs the Python package 'onnx', which is not installed"
    assert err.value.hint() == "Install it with: pip install 'model-export[onnx]'"


def test_guide_snippets_work_with_the_package_prefix(tmp_path, make_run):
    from model_export.checkpoint.detect import CheckpointDetector
    from model_export.pipeline.validate import validate_config

    config = model_export.ExportConfiguration(base_model_load_in_4bit=True)
    config.checkpoint_path = str(make_run([10, 30]))
    config.output_dir = str(tmp_path / "out")
    assert validate_config(config) == []
    assert CheckpointDetector().detect_latest_checkpoint(config.checkpoint_path).name == "checkpoint-30"
