"""A configuration problem as the user reads it: the key, its line in the file, what is wrong and the fix, in English or
Chinese (pydantic's errors translated by type). Every problem is reported at once."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import pydantic

from . import i18n
from .errors import ConfigError

__all__ = ["ConfigProblem", "ReportedModel", "unknown_key_problem", "problems_from_pydantic"]


@dataclass
class ConfigProblem:
    """One problem with one key. ``kind`` names its entry in the ``problems`` section of messages.yaml."""

    key: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    def message(self, lang: str | None = None) -> str:
        return i18n.render("problems", self.kind, lang=lang, key=self.key, **self._params(lang))

    def fix(self, lang: str | None = None) -> str:
        return i18n.render("problems", self.kind, "fix", lang=lang, key=self.key, **self._params(lang))

    def _params(self, lang: str | None) -> dict[str, Any]:
        # A parameter may be a text of its own (a library's message): rendered in the same language.
        return {k: (v.render(lang) if hasattr(v, "render") else v) for k, v in self.params.items()}

    def render(self, lang: str | None = None) -> str:
        where = i18n.render("ui", "problem_line", lang=lang, line=self.line) if self.line else ""
        return f"{where}{self.key}: {self.message(lang)} -> {self.fix(lang)}"

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "line": self.line, "message": self.message(), "fix": self.fix()}


def unknown_key_problem(key: str, known: list[str], line: int | None = None) -> ConfigProblem:
    """``key`` is not a configuration key; the closest of ``known`` is suggested."""
    head = key.split(".")[0]
    close = difflib.get_close_matches(head, known, n=1, cutoff=0.6)
    suggestion = i18n.render("problems", "did_you_mean", candidate=close[0]) if close else ""
    return ConfigProblem(key, "unknown_key", {"suggestion": suggestion}, line)


def problems_from_pydantic(exc: pydantic.ValidationError, known: list[str]) -> list[ConfigProblem]:
    """Every error of a pydantic validation as a problem (``known``: the configuration's keys, for suggestions)."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] in ("extra_forbidden", "no_such_attribute"):
            problems.append(unknown_key_problem(key, known))
        else:
            problems.append(ConfigProblem(key, "field_invalid", {"problem": i18n.Foreign.pydantic(err)}))
    return problems


class ReportedModel(pydantic.BaseModel):
    """A pydantic model whose problems, when it is built or assigned, are one ConfigError listing them all (unknown
    keys included)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ConfigError(
                "config_invalid", problems=problems_from_pydantic(exc, list(type(self).model_fields)), where=""
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except pydantic.ValidationError as exc:
            raise ConfigError(
                "config_invalid", problems=problems_from_pydantic(exc, list(type(self).model_fields)), where=""
            ) from None
        except (AttributeError, ValueError) as exc:  # unknown attribute
            if name in type(self).model_fields:
                raise
            raise ConfigError(
                "config_invalid", problems=[unknown_key_problem(name, list(type(self).model_fields))], where=""
            ) from exc
