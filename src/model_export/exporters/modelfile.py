"""The Ollama Modelfile beside a GGUF: its TEMPLATE (and SYSTEM) carried over from the model's own chat template where
that can be done faithfully, and its stop tokens.

Ollama renders a chat with its TEMPLATE in Go's text/template (not Jinja): the Modelfile's TEMPLATE has to say in that
language what the model's Jinja chat template says. It is derived, not guessed: where the template writes each message
between fixed texts per role (ChatML with or without thinking, Llama 3's headers, Mistral's [INST] form), those texts,
what comes before the first message, the generation prompt (``...assistant\n<think>\n`` for a thinking template) and a
default system prompt are read off the template's own renderings of probe conversations; a BOS the GGUF adds itself is
left to the runtime. The derived template is kept only when it gives, for every conversation of the serving check
(verify/serving.py), exactly what ``apply_chat_template`` gives, as Ollama feeds it (a SYSTEM prepended where a request
has no system message). Otherwise the Modelfile has no TEMPLATE and says why in a comment: Ollama then picks a
template of its own for the GGUF, and the verdict says that the check could not run. The verify step executes the
written TEMPLATE in Go itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_atomic

__all__ = [
    "write_modelfile",
    "ollama_template",
    "runtime_bos",
    "conversations",
    "tool_conversations",
    "TOOL",
    "end_of_turn",
    "read_modelfile",
]

_PROBE = "Probe text 1"


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


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}


def tool_conversations(tokenizer: Any) -> list[list[dict[str, str]]]:
    """The conversations the serving check renders with ``tools=[TOOL]``, when the template takes tools (the tool's
    name appears in its rendering): one user turn, and with a system message when the template renders one."""
    user = {"role": "user", "content": "What is the weather in Paris?"}
    system = {"role": "system", "content": "You answer in one line."}
    chosen = []
    for conversation in ([user], [system, user]):
        try:
            text = tokenizer.apply_chat_template(conversation, tools=[TOOL], tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that takes no tools, or no system message
            continue
        if "get_weather" in text and all(m["content"] in text for m in conversation):
            chosen.append(conversation)
    return chosen


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


_PROBES = ("Probe text 1", "Probe text 2", "Probe text 3", "Probe system 4")


def _between(text: str, marks: tuple[str, ...]) -> list[str] | None:
    """``text`` cut at each of ``marks`` in order (each appearing exactly once): the pieces before, between and after
    them; None when a mark is missing or repeated."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            return None
        head, text = text.split(mark)
        pieces.append(head)
    return [*pieces, text]


def _affixes(tokenizer: Any) -> dict[str, Any] | str:
    """What the template writes around each message, read off its own renderings of probe conversations: the text
    before the first message (``head``), each role's prefix and suffix, a default system prompt, the generation prompt;
    or why they cannot be read (the template does more than write each message between fixed texts)."""
    a, b, c, d = _PROBES
    user, reply, again = (
        {"role": "user", "content": a},
        {"role": "assistant", "content": b},
        {"role": "user", "content": c},
    )
    plain, prompted = _render(tokenizer, [user], False), _render(tokenizer, [user], True)
    if not prompted.startswith(plain):
        return "the generation prompt is not added after the conversation"
    three = _between(_render(tokenizer, [user, reply, again], False), (a, b, c))
    closed = _between(_render(tokenizer, [user, reply], False), (a, b))
    if three is None or closed is None:
        return "a message's content does not appear once, as written, in the rendering"
    before, user_then_reply, reply_then_user, user_suffix = three
    reply_suffix = closed[2]
    if not (user_then_reply.startswith(user_suffix) and reply_then_user.startswith(reply_suffix)):
        return "a message is not closed the same way wherever it stands"
    found = {"user": (reply_then_user[len(reply_suffix) :], user_suffix)}
    found["assistant"] = (user_then_reply[len(user_suffix) :], reply_suffix)
    if not before.endswith(found["user"][0]):
        return "the first user message is opened otherwise than the others"
    head, system = before[: len(before) - len(found["user"][0])], None
    try:
        with_system = _render(tokenizer, [{"role": "system", "content": d}, user], False)
    except Exception:  # noqa: BLE001 - a template that refuses a system message (Mistral's first form)
        with_system = ""
    if d in with_system:
        pieces = _between(with_system, (d, a))
        if pieces is None or not pieces[1].endswith(found["user"][0]):
            return "a system message is not written between fixed texts"
        bos = tokenizer.bos_token or ""
        start = bos if bos and pieces[0].startswith(bos) else ""
        found["system"] = (pieces[0][len(start) :], pieces[1][: len(pieces[1]) - len(found["user"][0])])
        opened, closing = start + found["system"][0], found["system"][1]
        if head != start and head.startswith(opened) and head.endswith(closing):  # a default system prompt
            head, system = start, head[len(opened) : len(head) - len(closing)]
    return {"head": head, "roles": found, "system": system, "generation": prompted[len(plain) :]}


def _go_messages(roles: dict[str, tuple[str, str]]) -> str:
    """The loop over Ollama's .Messages writing each role between its texts: compact when every role is written
    alike (``<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n`` for ChatML), else one branch per role."""
    shapes = {(p.replace(role, "\0"), s) for role, (p, s) in roles.items()}
    if len(shapes) == 1 and all(p.count(role) == 1 for role, (p, _) in roles.items()):
        ((prefix, suffix),) = shapes
        opened, closed = prefix.split("\0")
        return f"{{{{- range .Messages }}}}{opened}{{{{ .Role }}}}{closed}{{{{ .Content }}}}{suffix}{{{{ end }}}}"
    branches = "{{ else if ".join(f'eq .Role "{role}" }}}}{p}{{{{ .Content }}}}{s}' for role, (p, s) in roles.items())
    return f"{{{{- range .Messages }}}}{{{{ if {branches}{{{{ end }}}}{{{{ end }}}}"


def _as_ollama(found: dict[str, Any], system: str | None, messages: list[dict[str, str]], bos: str) -> str:
    """What the derived TEMPLATE renders in Ollama for ``messages`` (SYSTEM prepended where the first message is not
    a system message; the runtime's BOS before it), computed here to decide whether to write the template at all."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    roles = found["roles"]
    body = "".join(roles[m["role"]][0] + m["content"] + roles[m["role"]][1] for m in messages if m["role"] in roles)
    return bos + found["head"][len(bos) :] + body + found["generation"]


def runtime_bos(gguf_path: Path) -> str:
    """The BOS token's text when llama.cpp (and Ollama, which runs it) adds BOS to every prompt it tokenizes with this
    GGUF, else empty: what the model reads is that BOS, then the rendered template. The GGUF's
    ``tokenizer.ggml.add_bos_token`` when it says; else llama.cpp's own default for the vocabulary, where
    llama-cpp-python is installed; else none."""
    if not gguf_path.is_file():
        return ""
    from ..runtimes.gguf_file import read_gguf

    try:
        values = read_gguf(gguf_path)
    except ValueError:  # not a GGUF this reads: nothing is known of its BOS
        return ""
    said, bos = values.fields.get("tokenizer.ggml.add_bos_token"), values.fields.get("tokenizer.ggml.bos_token_id")
    text = None if bos is None else values.string_item("tokenizer.ggml.tokens", int(bos))
    if text is None:
        return ""
    if said is not None:
        return text if said else ""
    from ..extras import import_problem

    if import_problem("llama_cpp") is not None:
        return ""
    import llama_cpp

    from ..runtimes.llamacpp import load_llama

    model = load_llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        adds = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(model.model))
    finally:
        model.close()
    return text if adds else ""


def ollama_template(tokenizer: Any, bos_added: bool = False) -> tuple[str | None, str | None, str]:
    """(TEMPLATE, SYSTEM, a note): the model's chat template in Ollama's template language where it can be carried
    over faithfully - each message written between fixed texts per role (ChatML with or without thinking, Llama 3,
    Mistral's [INST] form), read off the template's own renderings - else (None, None, why not). With ``bos_added``
    (the GGUF adds BOS when it tokenizes) the template's leading BOS is left to the runtime."""
    try:
        found = _affixes(tokenizer)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render these conversations
        return None, None, f"the chat template does not render a plain conversation: {exc}"
    if isinstance(found, str):
        return None, None, found
    bos = (
        tokenizer.bos_token
        if bos_added and tokenizer.bos_token and found["head"].startswith(tokenizer.bos_token)
        else ""
    )
    texts = [found["head"], found["generation"], found["system"] or ""] + [
        t for pair in found["roles"].values() for t in pair
    ]
    if any(mark in text for text in texts for mark in ("{{", '"""')):
        return None, None, "the template's fixed texts hold '{{' or '\"\"\"' (Modelfile syntax)"
    for number, conversation in enumerate(conversations(tokenizer), 1):
        if _as_ollama(found, found["system"], conversation, bos) != _render(tokenizer, conversation, True):
            return None, None, f"conversation {number} renders otherwise than its messages between fixed texts"
    head = found["head"][len(bos) :]
    loop = _go_messages(found["roles"])
    if head:  # "{{-" would trim the head's trailing white space
        loop = loop.replace("{{- range", "{{ range", 1)
    template = head + loop + found["generation"]
    return template, found["system"], "carried over from the model's chat template"


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
    template, system, note = ollama_template(tokenizer, bool(runtime_bos(out / gguf_name)))
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
    """TEMPLATE, SYSTEM (triple-quoted or to the end of the line), FROM and the stop parameters of a Modelfile."""
    text = path.read_text(encoding="utf-8")
    found: dict[str, Any] = {"template": None, "system": None, "stop": [], "from": None}
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
        elif word == "FROM":
            found["from"] = rest.strip()
        elif word == "PARAMETER" and rest.startswith("stop "):
            value = rest[5:].strip()
            found["stop"].append(json.loads(value) if value.startswith('"') else value)
        at = end + 1
    return found
