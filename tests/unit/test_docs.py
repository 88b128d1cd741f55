"""The project's troubleshooting guides quote only errors the code produces, and cover every error code."""

import re
import string
from pathlib import Path

import pytest

from model_export import errors, i18n

DOCS = Path(__file__).parents[2] / "docs"
ERROR_LINE = re.compile(r"^(\w+Error): (.*)$")


def quoted_errors(path):
    """(class, message) for each error quoted in a ```text block; '  - ' lines continue a message."""
    quotes, block = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = line.strip() == "```text"
            continue
        if not block:
            continue
        match = ERROR_LINE.match(line)
        if match:
            quotes.append([match.group(1), match.group(2)])
        elif line.startswith("  - ") and quotes:
            quotes[-1][1] += "\n" + line
    return [tuple(q) for q in quotes]


def fields(template):
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def template_regex(template):
    parts, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[\\s\\S]+?)")
            seen.add(name)
    return re.compile("".join(parts) + r"\Z")


def produce(cls_name, message, lang):
    """Build the error whose template matches ``message`` with the captured values; return its rendering."""
    cls = getattr(errors, cls_name)
    for key, entry in i18n.catalogue()["errors"].items():
        if entry["class"] != cls_name:
            continue
        match = template_regex(entry[lang]).match(message)
        if not match:
            continue
        params = {name: "x" for name in fields(entry["hint"][lang]) + fields(entry[lang])}
        params.update(match.groupdict())
        if key == "config_invalid":
            assert_problem_lines(params.pop("problems"), lang)
            params.pop("count")
            exc = cls(key, problems=[_Quoted(line) for line in match.group("problems").splitlines()], **params)
        else:
            if key == "no_complete_checkpoint":
                assert_reason_lines(params["reasons"], lang)
            exc = cls(key, **params)
        return exc.render(lang)
    raise AssertionError(f"no {cls_name} message in messages.yaml matches {message!r}")


class _Quoted:
    def __init__(self, line):
        self.line = line.removeprefix("  - ")

    def render(self, lang=None):
        return self.line


def assert_problem_lines(text, lang):
    for line in text.splitlines():
        body = re.sub(r"^  - (line \d+: )?[\w.]+: ", "", line)
        message, _, fix = body.partition(" -> ")
        ok = any(
            template_regex(e[lang]).match(message) and template_regex(e["fix"][lang]).match(fix)
            for e in i18n.catalogue()["problems"].values()
            if "fix" in e
        )
        assert ok, line


def assert_reason_lines(text, lang):
    for line in text.splitlines():
        reason = re.sub(r"^  - [\w-]+: ", "", line)
        assert any(template_regex(e[lang]).match(reason) for e in i18n.catalogue()["errors"].values()), line


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_quoted_error_is_produced_by_the_code(lang):
    quotes = quoted_errors(DOCS / f"troubleshooting.{lang}.md")
    assert len(quotes) >= 20
    for cls_name, message in quotes:
        assert produce(cls_name, message, lang) == message


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_error_code_is_documented(lang):
    text = (DOCS / f"troubleshooting.{lang}.md").read_text(encoding="utf-8")
    quoted = {cls + ": " + msg for cls, msg in quoted_errors(DOCS / f"troubleshooting.{lang}.md")}
    for key, entry in i18n.catalogue()["errors"].items():
        documented = entry["code"] in text or any(
            template_regex(entry[lang]).match(q.split(": ", 1)[1]) for q in quoted
        )
        assert documented, f"{entry['code']} ({key}) is not in troubleshooting.{lang}.md"


def test_guide_chinese_texts_are_used_verbatim():
    """The texts the user's guide quotes in Chinese are the code's Chinese texts."""
    exc = errors.CheckpointValidationError("checkpoint_not_found", path="./qwen3-finetuned", cwd=".")
    assert exc.render("zh") == "Checkpoint目录不存在: ./qwen3-finetuned"
    exc = errors.CheckpointValidationError("missing_file", name="adapter_model.safetensors", directory=".", example=".")
    assert exc.render("zh") == "缺少必要文件: adapter_model.safetensors"
    exc = errors.CheckpointValidationError("adapter_config_not_found", path="./qwen3-finetuned")
    assert exc.render("zh") == exc.render("en") == "Can't find adapter_config.json in ./qwen3-finetuned"


def test_configuration_reference_is_generated_from_the_schema():
    from model_export.pipeline.validate import configuration_markdown

    assert (DOCS / "configuration.md").read_text(encoding="utf-8") == configuration_markdown(), (
        "run python scripts/gen_config_docs.py"
    )


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    root = DOCS.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (root / ".ci" / "run").read_text(encoding="utf-8")
