"""The Ollama Modelfile beside a GGUF: its TEMPLATE (and SYSTEM) carried over from the model's own chat template where
that can be done faithfully, and its stop tokens.

Ollama renders a chat with its TEMPLATE in Go's text/template (not Jinja): the Modelfile's TEMPLATE has to say in that
language what the model's Jinja chat template says. It is derived, not guessed: for the ChatML family (Qwen, with or
without thinking) the generation prompt (``<|im_start|>assistant\\n``, or ``...assistant\\n<think>\\n`` for a thinking
template) and a default system prompt are read off the model's own renderings, and the derived template is kept only
when it gives, for every conversation of the serving check (verify/serving.py), exactly what ``apply_chat_template``
gives, as Ollama feeds it (a SYSTEM prepended where a request has no system message). Otherwise the Modelfile has no
TEMPLATE and says why in a comment: Ollama then picks a template of its own for the GGUF, and the verdict says that
the check could not run. The verify step executes the written TEMPLATE in Go itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_atomic

__all__ = ["write_modelfile", "ollama_template", "conversations", "end_of_turn", "read_modelfile"]

_PROBE = "Probe text 1"
_MESSAGES = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"


def conversations(tokenizer: Any) -> list[list[dict[str, str]]]:
    """The conversations the serving check renders: one user turn, several turns, each with and without a system
    message when the template renders one (its content appears in the rendering)."""
    user = {"role": "user", "content": "What is 2 + 3?"}
    reply = {"role": "assistant", "content": "2 + 3 = 5."}
    again = {"role": "user", "content": "And 2 + 4?"}
    chosen = [[user], [user, reply, again]]
    system = {"role": "system", "content": "You answer in one line."}
    try:
        if system["content"] in _render(tokenizer, [system, user], True):
            chosen += [[system, user], [system, user, reply, again]]
    except Exception:  # noqa: BLE001 - a template that refuses a system message: none is checked
        pass
    return chosen


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _as_ollama(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """What ``_MESSAGES + generation prompt`` renders in Ollama (a plain loop over the messages; SYSTEM prepended where
    the first message is not a system message), computed here to decide whether to write the template at all."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + template


def ollama_template(tokenizer: Any) -> tuple[str | None, str | None, str]:
    """(TEMPLATE, SYSTEM, a note): the model's chat template in Ollama's template language where it can be carried
    over faithfully, else (None, None, why not)."""
    source = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" not in source:
        return None, None, "the chat template is not ChatML (<|im_start|>): no faithful Ollama TEMPLATE is known for it"
    user = [{"role": "user", "content": _PROBE}]
    try:
        plain, prompted = _render(tokenizer, user, False), _render(tokenizer, user, True)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render a user turn
        return None, None, f"the chat template does not render a user turn: {exc}"
    if not prompted.startswith(plain):
        return None, None, "the generation prompt is not added after the conversation"
    generation, system = prompted[len(plain) :], None
    head = "<|im_start|>system\n"
    if plain.startswith(head) and "<|im_end|>" in plain:
        system = plain[len(head) : plain.index("<|im_end|>")]  # a default system prompt the template adds
    if any(mark in text for text in (generation, system or "") for mark in ("{{", '"""')):
        return None, None, "the generation prompt or default system prompt holds '{{' or '\"\"\"' (Modelfile syntax)"
    for number, conversation in enumerate(conversations(tokenizer), 1):
        expected = _render(tokenizer, conversation, True)
        if _as_ollama(generation, system, conversation) != expected:
            return None, None, f"conversation {number} renders otherwise than a ChatML loop over the messages"
    return _MESSAGES + generation, system, "carried over from the model's chat template"


def end_of_turn(tokenizer: Any) -> tuple[str, int] | None:
    """The special token that ends an assistant turn in the model's template (``<|im_end|>`` for ChatML), with its id:
    the first special token after an assistant reply's text."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = _render(tokenizer, messages, False)
    except Exception:  # noqa: BLE001 - no assistant turns in this template
        return None
    after = rendered.rsplit(_PROBE, 1)[-1] if _PROBE in rendered else ""
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    for start in range(len(after)):
        for token in specials:
            if token and after.startswith(token, start):
                return token, tokenizer.convert_tokens_to_ids(token)
    return None


def _go_string(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama's syntax): a value holding triple quotes cannot be written."""
    if '"""' in text:
        raise ValueError("a triple quote in a Modelfile value")
    return f'"""{text}"""'


def write_modelfile(out: Path, gguf_name: str, merged: Path, adapter: str | None = None) -> Path | None:
    """An Ollama Modelfile: FROM the GGUF (a file name in ``out``, or a path relative to it), ADAPTER a LoRA GGUF in
    ``out`` when given, the TEMPLATE and SYSTEM carried over from the model's chat template (or a comment saying why
    not), and stop tokens: the model's eos tokens and its end-of-turn token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    generation = merged / "generation_config.json"
    eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file() else None
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    turn = end_of_turn(tokenizer)
    for token in (tokenizer.eos_token, turn and turn[0]):
        if token and token not in stops:
            stops.append(token)
    lines = [f"FROM {gguf_name if '/' in gguf_name else './' + gguf_name}\n"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}\n")
    template, system, note = ollama_template(tokenizer)
    if template is None:
        lines.append(f"# No TEMPLATE: {note}. Ollama chooses a template of its own for this GGUF.\n")
    else:
        lines.append(f"TEMPLATE {_go_string(template)}\n")
        if system:
            lines.append(f"SYSTEM {_go_string(system)}\n")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}\n" for stop in stops if stop]
    path = out / "Modelfile"
    write_atomic(path, "".join(lines))
    return path


def read_modelfile(path: Path) -> dict[str, Any]:
    """TEMPLATE, SYSTEM (triple-quoted or to the end of the line) and the stop parameters of a Modelfile."""
    text = path.read_text(encoding="utf-8")
    found: dict[str, Any] = {"template": None, "system": None, "stop": []}
    at = 0
    while at < len(text):
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        line = text[at:end]
        word, _, rest = line.partition(" ")
        if word in ("TEMPLATE", "SYSTEM") and rest.startswith('"""'):
            close = text.index('"""', at + len(word) + 4)
            found[word.lower()] = text[at + len(word) + 4 : close]
            at = text.find("\n", close) + 1 or len(text)
            continue
        if word in ("TEMPLATE", "SYSTEM"):
            found[word.lower()] = rest
        elif word == "PARAMETER" and rest.startswith("stop "):
            value = rest[5:].strip()
            found["stop"].append(json.loads(value) if value.startswith('"') else value)
        at = end + 1
    return found
