"""Message catalogue and language choice (English by default, Chinese with --lang zh or a zh_* locale).

All texts live in ``messages.yaml`` beside this module, so that a message is written once
in each language and the documentation test can find every one of them.
"""

from __future__ import annotations

import functools
import os
import re
import string
from importlib import resources
from typing import Any

import yaml

LANGUAGES = ("en", "zh")
_forced: str | None = None


def set_language(lang: str | None) -> None:
    """Force the language of every message (``"en"`` or ``"zh"``); ``None`` goes back to the locale."""
    global _forced
    if lang is not None and lang not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {lang!r}")
    _forced = lang


def current_language() -> str:
    """The forced language, else ``zh`` when the locale (LC_ALL, LC_MESSAGES, LANG, LANGUAGE) is zh_*."""
    if _forced:
        return _forced
    for var in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = os.environ.get(var, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


@functools.cache
def catalogue() -> dict[str, dict[str, Any]]:
    text = resources.files("model_export").joinpath("messages.yaml").read_text(encoding="utf-8")
    # libyaml's loader where PyYAML has it: the pure-Python one took 0.35 s of every command's start
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader


def format_number(value: Any) -> Any:
    """Floats as people write them: 1e-5 rather than 1e-05, 0.001 rather than 0.0010000."""
    if not isinstance(value, float):
        return value
    text = f"{value:.6g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        return super().format_field(format_number(value) if not format_spec else value, format_spec)


_FORMATTER = _Formatter()


def render(section: str, name: str, field: str | None = None, /, lang: str | None = None, **params: Any) -> str:
    """Render ``section.name`` (or its sub-field such as ``hint``) in ``lang`` with ``params``."""
    entry = catalogue()[section][name]
    if field is not None:
        entry = entry[field]
    template = entry[lang or current_language()]
    return _FORMATTER.format(template, **params)


class Text(str):
    """A rendered ``ui`` text that remembers its key and parameters, so that it can be rendered again in another
    language (the log file is written in English, the language of the guide's log lines and of its grep commands,
    whatever language the console shows)."""

    key: str
    params: dict[str, Any]

    def render(self, lang: str | None = None) -> str:
        params = {k: v.render(lang) if isinstance(v, Text) else v for k, v in self.params.items()}
        return render("ui", self.key, lang=lang, **params)


def ui(name: str, /, **params: Any) -> Text:
    """A CLI or log text from the ``ui`` section, in the current language."""
    text = Text(render("ui", name, **params))
    text.key, text.params = name, params
    return text


class Foreign:
    """A message written by another library (pydantic, PyYAML, json): English as the library wrote it; in another
    language from the catalogue (``pydantic`` by error type with its context fields, ``parser`` by pattern), and a text
    the catalogue does not know is wrapped whole in a sentence of that language rather than left bare."""

    def __init__(self, english: str, template: str | None, params: dict[str, Any]) -> None:
        self.english, self.template, self.params = english, template, params

    @classmethod
    def pydantic(cls, error: Any) -> Foreign:
        """One of pydantic's ``ValidationError.errors()``, with the value it got."""
        message = str(error["msg"]).removeprefix("Value error, ")
        english = f"{message} (got {error.get('input')!r})"
        params = {k: str(format_number(v)) for k, v in (error.get("ctx") or {}).items()}
        if "expected" in params:  # "'none', 'bf16' or 'fp16'": the list, in the sentence's language
            params["expected"] = params["expected"].replace(" or ", ", ")
        entries = catalogue()["pydantic"]
        template = entries.get(error.get("type"), entries["unknown"]).get("zh")
        params["message"] = message
        return cls(english, template and template + f"（得到 {error.get('input')!r}）", params)

    @classmethod
    def parser(cls, text: str) -> Foreign:
        """A YAML or JSON parser's problem."""
        for entry in catalogue()["parser"]:
            match = re.fullmatch(entry["pattern"], text.strip(), re.S)
            if match:
                return cls(text, entry["zh"], {**match.groupdict(), "message": text})
        return cls(text, None, {})

    def render(self, lang: str | None = None) -> str:
        if (lang or current_language()) == "en" or self.template is None:
            return self.english
        return _FORMATTER.format(self.template, **self.params)

    def __str__(self) -> str:
        return self.render()
