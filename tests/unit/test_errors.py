"""The exception tree, its codes and the message catalogue."""

import re
from pathlib import Path

import pytest

import model_export
from model_export import errors, i18n

SRC = Path(model_export.__file__).parent


def test_tree_is_rooted_at_export_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ExportError)


def test_codes_are_unique_and_well_formed():
    codes = [e["code"] for e in i18n.catalogue()["errors"].values()]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"ME\d{3}", c) for c in codes)


@pytest.mark.parametrize("section", ["errors", "problems", "ui"])
def test_every_message_has_both_languages(section):
    for key, entry in i18n.catalogue()[section].items():
        assert entry["en"] and entry["zh"], key
        if section == "errors":
            assert entry["hint"]["en"] and entry["hint"]["zh"], key
            assert hasattr(errors, entry["class"]), key


def test_every_message_is_used_by_the_code():
    source = "\n".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))
    for section in ("errors", "problems", "ui"):
        for key in i18n.catalogue()[section]:
            assert f'"{key}"' in source or f"'{key}'" in source, f"{section}.{key} is never raised or printed"


def test_error_class_must_match_its_message():
    with pytest.raises(TypeError):
        errors.ConfigError("checkpoint_not_found", path="x", cwd=".")
    with pytest.raises(KeyError):
        errors.ConfigError("no_such_message")


def test_message_renders_in_the_current_language():
    exc = errors.CheckpointValidationError("checkpoint_not_found", path="./qwen3-finetuned", cwd="/w")
    assert str(exc) == "Checkpoint directory does not exist: ./qwen3-finetuned"
    i18n.set_language("zh")
    assert str(exc) == "Checkpoint目录不存在: ./qwen3-finetuned"
    assert "ls -la ./qwen3-finetuned" in exc.hint()
    assert exc.code == "ME201" and exc.exit_code == 1
    assert isinstance(exc, ValueError)


def test_zh_locale_selects_chinese(monkeypatch):
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert i18n.current_language() == "zh"
    monkeypatch.setenv("LC_ALL", "en_US.UTF-8")
    assert i18n.current_language() == "en"


def test_numbers_are_written_as_people_write_them():
    assert i18n.format_number(1e-5) == "1e-5"
    assert i18n.format_number(0.001) == "0.001"
    assert i18n.format_number(1e20) == "1e20"
    assert i18n.format_number(3) == 3
