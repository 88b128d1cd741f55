"""ExportConfiguration and load_config: defaults, files, overrides and every field problem at once."""

import json
from pathlib import Path

import pytest
import yaml

from model_export import ConfigError, ExportConfiguration, load_config
from model_export.config import parse_size
from model_export.config_file import apply_overrides, example_yaml, init_config

GUIDE_KEYS = [
    "checkpoint_path",
    "base_model_name",
    "base_model_load_in_4bit",
    "base_model_load_in_8bit",
    "device_map",
    "batch_size",
    "max_sequence_length",
    "use_memory_mapping",
    "export_onnx",
    "onnx_opset_version",
    "onnx_optimize_graph",
    "onnx_dynamic_axes",
    "quantization_level",
    "validation_tolerance",
    "test_input_samples",
    "run_validation_tests",
    "remove_training_artifacts",
    "compress_weights",
    "log_level",
    "enable_progress_monitoring",
    "memory_monitoring",
    "cleanup_temp_files",
    "save_intermediate_results",
]


def test_every_guide_key_exists_with_a_description_and_default():
    fields = ExportConfiguration.model_fields
    for key in GUIDE_KEYS + [
        "output_dir",
        "export_formats",
        "checkpoint_selection",
        "calibration_data",
        "max_shard_size",
        "lang",
    ]:
        assert key in fields, key
    for name, info in fields.items():
        assert info.description and len(info.description) > 15, name
    ExportConfiguration()  # every default is valid


def test_quantization_levels_and_formats():
    assert set(ExportConfiguration.model_fields["quantization_level"].annotation.__args__) == {
        "none",
        "bf16",
        "fp16",
        "int8",
        "int4",
    }
    config = ExportConfiguration(export_formats=["safetensors", "pytorch", "onnx", "gguf", "tensorrt", "onnx"])
    assert config.export_formats == ["safetensors", "pytorch", "onnx", "gguf", "tensorrt"]


def test_guide_style_assignment_is_validated():
    config = ExportConfiguration()
    config.checkpoint_path = "./qwen3-finetuned/checkpoint-30"
    config.validation_tolerance = 1e-3
    config.onnx_dynamic_axes = None
    with pytest.raises(ConfigError) as err:
        config.batch_size = 0
    assert err.value.code == "ME101" and "batch_size" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config.batch_sise = 1
    assert "did you mean 'batch_size'" in str(err.value)


def test_constructor_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        ExportConfiguration(batch_size=0, quantization_level="int3", max_sequence_lenght=5, validation_tolerance=-1)
    keys = [p.key for p in err.value.problems]
    assert keys == sorted(keys, key=keys.index) and set(keys) == {
        "batch_size",
        "quantization_level",
        "max_sequence_lenght",
        "validation_tolerance",
    }
    assert "did you mean 'max_sequence_length'" in str(err.value)
    assert err.value.exit_code == 2


def test_export_onnx_shortcut():
    assert ExportConfiguration(export_onnx=True).formats == ["safetensors", "onnx"]
    assert ExportConfiguration(export_formats=["onnx", "gguf"], export_onnx=False).formats == ["gguf"]
    assert ExportConfiguration(export_formats=["onnx"]).formats == ["onnx"]


def test_max_shard_size_is_parsed():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    assert ExportConfiguration(max_shard_size="200MB").max_shard_size_bytes == 2 * 10**8
    with pytest.raises(ConfigError, match="max_shard_size"):
        ExportConfiguration(max_shard_size="lots")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_yaml_and_json(tmp_path, suffix):
    data = {
        "checkpoint_path": "./run",
        "quantization_level": "int8",
        "export_formats": ["safetensors", "gguf"],
        "onnx_dynamic_axes": {"input_ids": {0: "batch"}},
    }
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    config = load_config(path)
    assert config.quantization_level == "int8" and config.onnx_dynamic_axes == {"input_ids": {0: "batch"}}


def test_yaml_parse_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("checkpoint_path: ./run\nexport_formats: [safetensors, onnx\nbatch_size: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.code == "ME102"
    assert str(err.value).startswith(f"Cannot parse {path} at line 3, column 11:")


def test_json_parse_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "batch_size": 2,\n  "lang": "zh",,\n}')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"Cannot parse {path} at line 3, column 16:")


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert err.value.code == "ME103"
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "list.yaml")
    assert err.value.code == "ME104"
    (tmp_path / "c.toml").write_text("a = 1")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.toml")
    assert err.value.code == "ME106"


def test_unknown_keys_with_suggestion_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_path: ./run\nquantisation_level: int8\nbatch_size: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "line 2: quantisation_level: unknown key (did you mean 'quantization_level'?)" in text
    assert "line 3: batch_size: Input should be greater than 0 (got -1)" in text
    assert err.value.params["count"] == 2


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_path: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.code == "ME102"


def test_yaml_aliases_are_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "test_input_samples: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.code == "ME102"
    assert (
        str(err.value) == f"Cannot parse {path} at line 2, column 8: aliases (*name) are not allowed in a configuration"
    )


def test_set_overrides():
    data = apply_overrides(
        {"batch_size": 1},
        [
            "batch_size=4",
            "export_formats=[safetensors,onnx]",
            "onnx_dynamic_axes.input_ids.0=b",
            "base_model_name=Qwen/Qwen3-4B-Thinking-2507",
            "run_validation_tests=false",
        ],
    )
    assert data == {
        "batch_size": 4,
        "export_formats": ["safetensors", "onnx"],
        "onnx_dynamic_axes": {"input_ids": {0: "b"}},
        "base_model_name": "Qwen/Qwen3-4B-Thinking-2507",
        "run_validation_tests": False,
    }
    config = load_config(None, ["quantization_level=fp16"])
    assert config.quantization_level == "fp16"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["quantization_level"])
    assert err.value.code == "ME105"
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(None, ["batchsize=2"])


def test_example_yaml_round_trips_to_the_defaults(tmp_path):
    path = init_config(tmp_path / "model-export.yaml")
    text = path.read_text(encoding="utf-8")
    for info in ExportConfiguration.model_fields.values():
        assert f"# {info.description}" in text
    assert load_config(path) == ExportConfiguration()
    with pytest.raises(ConfigError) as err:
        init_config(path)
    assert err.value.code == "ME107"
    assert init_config(path, force=True) == path
    assert example_yaml() == text


def test_shipped_example_configs_are_valid():
    from model_export import validate_config

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for example in examples:
        load_config(example)
        problems = validate_config(example, inputs=False)  # their paths are the user's, not this machine's
        assert not [p for p in problems if p.key != "output_dir"], (example, problems)
