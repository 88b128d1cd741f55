"""Calibration data: the text quantizers calibrate on (the importance matrix of GGUF K-quants), read and checked before
anything is written, then tokenized into equal-length samples.

Accepted files (``calibration_data``):

- plain text (any extension but .jsonl/.json): the whole file is one text;
- JSON Lines with a ``text`` field per line;
- JSON Lines chat records with ``messages`` (a list of ``{"role", "content"}``), each rendered through the model's own
  chat template (Qwen3 Thinking templates included), as the model saw its training data.

The texts are tokenized, joined and cut into ``calibration_samples`` samples of ``calibration_sequence_length`` tokens,
as llama.cpp's ``llama-imatrix`` cuts its text into chunks. A file that cannot be read, a line that is not a record, a
record without text, or fewer tokens than one sample is a configuration error naming the file (and line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_problems import ConfigProblem

__all__ = [
    "CalibrationSet",
    "calibration_problems",
    "calibration_samples",
    "read_calibration",
    "calibration_used",
    "calibration_unused",
    "gptq_formats",
    "gptq_wanted",
    "sample_problems",
]

KEY = "calibration_data"


@dataclass
class CalibrationSet:
    path: str
    kind: str  # "text", "jsonl text" or "jsonl chat"
    samples: list[list[int]]
    tokens_available: int

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def _problem(kind: str, path: Path, line: int | None = None, **params: Any) -> ConfigProblem:
    where = f"{path}:{line}" if line else str(path)  # file:line, as compilers and editors name a line
    return ConfigProblem(KEY, kind, {"path": str(path), "where": where, **params})


def _record(value: Any) -> tuple[str | None, str | None]:
    """(kind, what is wrong) of one JSON Lines record: 'text' or 'chat'."""
    if not isinstance(value, dict):
        return None, "not a JSON object"
    if "text" in value:
        return ("text", None) if isinstance(value["text"], str) and value["text"].strip() else (None, "empty text")
    messages = value.get("messages")
    if messages is None:
        return None, "neither a 'text' nor a 'messages' field"
    if not isinstance(messages, list) or not messages:
        return None, "'messages' is not a non-empty list"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, "a message without a 'role'"
        if not isinstance(message.get("content"), str):
            return None, "a message whose 'content' is not text"
    return "chat", None


def read_calibration(path: str | Path) -> tuple[str, list[Any]]:
    """(kind, records): the texts of a plain file, or the JSON Lines records (text or chat). Raises ConfigError
    (config_invalid) naming the file and the first bad line."""
    from ..errors import ConfigError

    path = Path(path).expanduser()
    problems = calibration_problems(path)
    if problems:
        raise ConfigError("config_invalid", problems=problems, where=f" ({path})")
    text = path.read_text(encoding="utf-8")
    if not _is_jsonl(path):
        return "text", [text]
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    kinds = {_record(r)[0] for r in records}
    return ("jsonl chat" if kinds == {"chat"} else "jsonl text"), records


def calibration_problems(path: str | Path) -> list[ConfigProblem]:
    """What is wrong with a calibration file, by line (empty when it can be used); no tokenizer needed."""
    path = Path(path).expanduser()
    if not path.is_file():
        return [_problem("calibration_missing", path)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        return [_problem("calibration_bad_record", path, line, detail="not UTF-8 text")]
    if not text.strip():
        return [_problem("calibration_bad_record", path, None, detail="the file is empty")]
    if not _is_jsonl(path):
        return []
    kinds = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return [_problem("calibration_bad_record", path, number, detail=f"not JSON ({exc.msg})")]
        kind, wrong = _record(value)
        if wrong:
            return [_problem("calibration_bad_record", path, number, detail=wrong)]
        kinds.add(kind)
    if len(kinds) > 1:
        return [_problem("calibration_bad_record", path, None, detail="both 'text' and 'messages' records")]
    return []


def _texts(kind: str, records: list[Any], tokenizer: Any, path: Path) -> list[str]:
    from ..errors import ConfigError

    if kind == "text":
        return records
    if kind == "jsonl text":
        return [r["text"] for r in records]
    if not getattr(tokenizer, "chat_template", None):
        problem = _problem("calibration_no_template", path)
        raise ConfigError("config_invalid", problems=[problem], where=f" ({path})")
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]


def calibration_samples(path: str | Path, tokenizer: Any, samples: int, length: int) -> CalibrationSet:
    """The calibration file as up to ``samples`` samples of exactly ``length`` tokens (texts joined, then cut).
    Raises ConfigError when the file is unusable or holds fewer tokens than one sample."""
    from ..errors import ConfigError

    path = Path(path).expanduser()
    kind, records = read_calibration(path)
    ids: list[int] = []
    for text in _texts(kind, records, tokenizer, path):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and kind != "text":
            ids.append(tokenizer.eos_token_id)  # records are separate documents
        if len(ids) >= samples * length:
            break
    if len(ids) < length:
        problem = _problem("calibration_too_short", path, None, tokens=len(ids), length=length)
        raise ConfigError("config_invalid", problems=[problem], where=f" ({path})")
    chunks = [ids[i : i + length] for i in range(0, min(len(ids), samples * length) - length + 1, length)]
    return CalibrationSet(str(path), kind, chunks, len(ids))


def gptq_formats(c: Any) -> list[str]:
    """The int4 formats quantized by GPTQ (asked for, or auto with calibration data): safetensors, and ONNX from
    the streaming builder."""
    if c.quantization_level != "int4" or c.quantization_method == "rtn" or not c.calibration_data:
        return []
    return [f for f in c.formats if f == "safetensors" or (f == "onnx" and c.onnx_backend != "torch")]


def gptq_wanted(c: Any) -> bool:
    return bool(gptq_formats(c))


def calibration_used(c: Any) -> bool:
    """Whether an artifact of this configuration is quantized on calibration_data: the GGUF's importance matrix (K
    mixtures, q4_0 ... q5_1) or GPTQ."""
    from .gguf_types import uses_importance

    return bool(c.calibration_data) and (("gguf" in c.formats and uses_importance(c)) or gptq_wanted(c))


def calibration_unused(c: Any) -> list[str]:
    """The quantized artifacts of this run that calibration_data does not change (round-to-nearest: no data)."""
    from .gguf_types import uses_importance

    if not c.calibration_data or c.quantization_level not in ("int8", "int4"):
        return []
    used = {"gguf": uses_importance(c), **dict.fromkeys(gptq_formats(c), True)}
    return [f for f in c.formats if not used.get(f, False)]


def sample_problems(c: Any, tokenizer_dirs: list[Path]) -> list[ConfigProblem]:
    """What the run would find only once it tokenizes the data: fewer tokens than one sample, or chat records for a
    tokenizer without a chat template. Checked with the first tokenizer found in ``tokenizer_dirs`` (the checkpoint's,
    its run's, the base's), as the run reads it; [] when the data is not used or no tokenizer is found here."""
    from ..errors import ConfigError

    if not calibration_used(c) or calibration_problems(c.calibration_data):
        return []
    from ..checkpoint.base_model import tokenizer_source

    folder = tokenizer_source(tokenizer_dirs)
    if folder is None:
        return []
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is the check step's to explain
        return []
    try:
        calibration_samples(c.calibration_data, tokenizer, c.calibration_samples, c.calibration_sequence_length)
    except ConfigError as exc:
        return exc.problems
    return []
