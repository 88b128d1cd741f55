"""validate_config: every cross-field problem at once, each naming the key and the fix."""

import onnx
import pytest
import yaml

from model_export import ConfigError, ExportConfiguration, check_config, i18n, validate_config


def rules(config):
    """The configuration's own rules, without looking for its inputs (these tests name paths that do not exist)."""
    return validate_config(config, inputs=False)


def kinds(problems):
    return sorted((p.key, p.kind) for p in problems)


def test_tensorrt_is_a_format_like_the_others_and_bitsandbytes_needs_the_gpu():
    assert rules(ExportConfiguration(export_formats=["safetensors", "tensorrt"], quantization_level="fp16")) == []
    problems = rules(ExportConfiguration(base_model_load_in_4bit=True, device_map="cpu"))
    assert [p.render() for p in problems] == [
        "base_model_load_in_4bit: base_model_load_in_4bit loads the base model through bitsandbytes on a CUDA GPU, but "
        "device_map "
        "is cpu -> set device_map: auto (or cuda), or base_model_load_in_4bit: false (on the CPU the reference runs in "
        "full precision)"
    ]
    assert kinds(rules(ExportConfiguration(base_model_load_in_8bit=True, device_map="cpu"))) == [
        ("base_model_load_in_8bit", "bits_on_cpu")
    ]
    assert rules(ExportConfiguration(base_model_load_in_8bit=True, device_map="auto")) == []


def test_onnx_alone_takes_every_level_it_can_hold():
    for level in ("none", "fp16", "int8", "int4"):
        assert (
            rules(ExportConfiguration(export_formats=["safetensors", "onnx", "gguf"], quantization_level=level)) == []
        )
    problems = rules(ExportConfiguration(export_formats=["onnx"], quantization_level="int4", onnx_block_size=48))
    assert [(p.key, p.kind) for p in problems] == [("onnx_block_size", "block_size_invalid")]


def test_a_sound_configuration_has_no_problems(tmp_path, adapter):
    assert rules(ExportConfiguration(checkpoint_path=str(tmp_path / "run"), output_dir=str(tmp_path / "out"))) == []
    assert validate_config(ExportConfiguration(checkpoint_path=str(adapter), output_dir=str(tmp_path / "out"))) == []


def test_the_inputs_are_checked_as_the_run_would_find_them(tmp_path, adapter, monkeypatch):
    """Issue 24: validate-config said "no problems" for what the run stopped on at once."""
    out = str(tmp_path / "out")
    cases = {
        "checkpoint_path": ({"checkpoint_path": str(tmp_path / "nope")}, "ME201"),
        "base_model_name": ({"checkpoint_path": str(adapter), "base_model_name": str(tmp_path / "no-base")}, "ME301"),
        "device_map": ({"checkpoint_path": str(adapter), "device_map": "cuda"}, "ME405"),
    }
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, (settings, code) in cases.items():
        problems = validate_config(ExportConfiguration(output_dir=out, **settings))
        assert [(p.key, p.params.get("code")) for p in problems] == [(key, code)], key
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    [problem] = validate_config(ExportConfiguration(checkpoint_path=str(adapter), base_model_name="Org/Missing"))
    assert problem.params["code"] == "ME301" and "unset HF_HUB_OFFLINE" in problem.render()
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the run may download it, which validate-config never does
    assert validate_config(ExportConfiguration(checkpoint_path=str(adapter), base_model_name="Org/Missing")) == []
    # the run itself raises the typed error from its step, as the guide shows it (not ME101)
    assert validate_config(ExportConfiguration(checkpoint_path=str(tmp_path / "nope")), inputs=False) == []


def test_4bit_and_8bit_together():
    problems = rules(ExportConfiguration(base_model_load_in_4bit=True, base_model_load_in_8bit=True))
    assert kinds(problems) == [("base_model_load_in_8bit", "both_4bit_8bit")]
    assert "keep at most one of them true" in problems[0].render()


@pytest.mark.parametrize("fmt,level", [("pytorch", "int4"), ("onnx", "bf16"), ("tensorrt", "int8")])
def test_quantization_level_a_format_cannot_hold(fmt, level):
    problems = rules(ExportConfiguration(export_formats=[fmt], quantization_level=level))
    assert ("quantization_level", "quant_format") in kinds(problems)
    text = next(p for p in problems if p.kind == "quant_format").render()
    assert f"quantization_level {level} cannot be stored in the {fmt} format" in text


def test_opset_too_low_states_the_minimum():
    problems = [
        p
        for p in rules(ExportConfiguration(export_formats=["onnx"], onnx_opset_version=11))
        if p.kind == "opset_too_low"
    ]
    assert (
        "needs at least 14" in problems[0].render() and "set onnx_opset_version: 14 or higher" in problems[0].render()
    )
    problems = [
        p
        for p in rules(ExportConfiguration(export_formats=["onnx"], onnx_backend="torch", onnx_opset_version=17))
        if p.kind == "opset_too_low"
    ]
    assert "needs at least 18" in problems[0].render()
    assert rules(ExportConfiguration(export_formats=["safetensors"], onnx_opset_version=11)) == []


def test_opset_newer_than_installed_onnx():
    too_new = onnx.defs.onnx_opset_version() + 1
    problems = rules(ExportConfiguration(export_formats=["onnx"], onnx_opset_version=too_new))
    assert kinds(problems) == [("onnx_opset_version", "opset_too_high")]


def test_an_opset_every_allowed_onnx_knows_is_checked_without_importing_onnx():
    """The check imports onnx (half a second) only above the newest opset of the oldest onnx the extra allows; that
    opset is onnx's own table's for that version, and the installed onnx knows at least as many."""
    import re
    from pathlib import Path

    from onnx.helper import VERSION_TABLE

    from model_export.pipeline.validate import OPSET_OF_OLDEST_ONNX

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    oldest = re.search(r'^onnx = \["onnx>=([\d.]+)"', pyproject, re.MULTILINE).group(1)
    assert max(opset for version, _, opset, *_ in VERSION_TABLE if version.startswith(oldest)) == OPSET_OF_OLDEST_ONNX
    assert onnx.defs.onnx_opset_version() >= OPSET_OF_OLDEST_ONNX
    assert rules(ExportConfiguration(export_formats=["onnx"], onnx_opset_version=OPSET_OF_OLDEST_ONNX)) == []


def test_dynamic_axes_must_name_real_inputs_and_axes():
    axes = {
        "input_ids": {0: "b", 2: "x"},
        "pixel_values": {0: "b"},
        "past_key_values.3.key": {2: "past"},
        "present.0.value": {5: "y"},
    }
    problems = rules(ExportConfiguration(onnx_dynamic_axes=axes))
    assert kinds(problems) == [
        ("onnx_dynamic_axes.input_ids", "dynamic_axes_bad_axis"),
        ("onnx_dynamic_axes.pixel_values", "dynamic_axes_unknown_input"),
        ("onnx_dynamic_axes.present.0.value", "dynamic_axes_bad_axis"),
    ]
    assert "past_key_values.{i}.key/value" in problems[1].render()


def test_non_positive_numbers_are_reported_from_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 0\nmax_sequence_length: -5\nvalidation_tolerance: 0\n")
    problems = rules(path)
    assert [(p.key, p.line) for p in problems] == [
        ("batch_size", 1),
        ("max_sequence_length", 2),
        ("validation_tolerance", 3),
    ]


@pytest.mark.parametrize("inside", [False, True])
def test_output_dir_inside_an_input(tmp_path, tiny_base, inside):
    run = tmp_path / "run"
    run.mkdir()
    output = run / "export" if inside else run
    problems = rules(ExportConfiguration(checkpoint_path=str(run), output_dir=str(output)))
    assert kinds(problems) == [("output_dir", "output_inside_input")]
    assert ("inside" if inside else "the same directory as") in problems[0].render()
    problems = rules(
        ExportConfiguration(checkpoint_path=str(run), base_model_name=str(tiny_base), output_dir=str(tiny_base / "out"))
    )
    assert "base model directory" in problems[0].render()


def test_formats_samples_and_calibration(tmp_path):
    config = ExportConfiguration(
        export_formats=["tensorrt"], test_input_samples=[], calibration_data=str(tmp_path / "none.txt")
    )
    assert kinds(rules(config)) == [
        ("calibration_data", "calibration_missing"),
        ("test_input_samples", "no_test_samples"),
    ]
    # The key that emptied the list is the one named (issue 24: export_formats was blamed for export_onnx: false)
    assert kinds(rules(ExportConfiguration(export_formats=["onnx"], export_onnx=False))) == [
        ("export_onnx", "export_onnx_removes_all")
    ]
    assert kinds(rules(ExportConfiguration(export_formats=[]))) == [("export_formats", "no_formats")]
    assert rules(ExportConfiguration(export_formats=["onnx", "gguf"], export_onnx=False)) == []


def test_gguf_keys_without_a_gguf_are_refused():
    config = ExportConfiguration(export_formats=["onnx"], gguf_output_type="q8_0", gguf_token_embedding_type="q6_k")
    problems = rules(config)
    assert kinds(problems) == [
        ("gguf_output_type", "key_without_format"),
        ("gguf_token_embedding_type", "key_without_format"),
    ]
    assert "export_formats has no gguf" in problems[0].message()
    assert not rules(ExportConfiguration(export_formats=["gguf"], gguf_output_type="q8_0"))


def test_every_problem_at_once_from_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    data = {
        "checkpoint_path": str(run),
        "output_dir": str(run),
        "base_model_load_in_4bit": True,
        "base_model_load_in_8bit": True,
        "export_formats": ["pytorch", "onnx"],
        "quantization_level": "int4",
        "onnx_opset_version": 9,
        "onnx_dynamic_axes": {"inputs": {0: "b"}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    problems = [p for p in rules(path) if p.kind != "format_unavailable"]
    assert len(problems) == 5
    assert all(p.line for p in problems)
    with pytest.raises(ConfigError) as err:
        check_config(ExportConfiguration(**data), "c.yaml")
    assert err.value.code == "ME101" and str(err.value).startswith("The configuration (c.yaml) has 5 problem(s):")
    i18n.set_language("zh")
    assert str(err.value).startswith("配置参数存在问题 (c.yaml)，共 5 项:")
    assert "最多只启用其中一个" in str(err.value)


def test_gptq_needs_data_int4_safetensors_and_one_pass_of_tokens():
    config = ExportConfiguration(
        export_formats=["onnx"],
        quantization_level="int8",
        quantization_method="gptq",
        calibration_samples=200,
        calibration_sequence_length=512,
    )
    assert sorted(kinds(rules(config))) == [
        ("calibration_samples", "gptq_too_many_tokens"),
        ("quantization_method", "gptq_not_int4"),
        ("quantization_method", "gptq_without_data"),
    ]
