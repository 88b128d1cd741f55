"""The serving check, part of every artifact's verdict: where it is served, the artifact renders the chat template as
the training run's tokenizer does (``apply_chat_template``), and its stop set holds the model's end-of-turn token.

Runtimes and what each is asked:

- GGUF: the Ollama Modelfile's TEMPLATE (and SYSTEM) executed by Go's text/template with Ollama's chat data
  (data/ollama_render.go, built with the Go toolchain on first use; its header says what it assumes of Ollama), the
  Modelfile's stop parameters; the GGUF's embedded ``tokenizer.chat_template`` rendered by llama-cpp-python's chat path
  (its Jinja2ChatFormatter), and llama.cpp's own end-of-generation set (``llama_vocab_is_eog``).
- ONNX: onnxruntime-genai's tokenizer (``apply_chat_template``) and its eos ids.
- safetensors: the artifact's own tokenizer files (transformers) and its generation_config eos ids.

Conversations: one user turn and several turns, each with a system message when the template renders one, and, when
the template takes tools, the same with a tool definition in the request (Ollama's TEMPLATE writes no tools: that
check is not run, saying why). A rendering that differs fails the artifact, naming the first conversation that
differs and both renderings. A runtime that cannot start here (no Go, no llama-cpp-python) is ``not run, because
...`` and counts neither way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import i18n
from ..exporters.modelfile import TOOL, conversations, end_of_turn, read_modelfile, runtime_bos, tool_conversations
from ..runtimes.genai import PAIR_FILE

__all__ = ["serving_check", "serving_inputs", "serving_line", "ollama_renderings", "Probes", "GO_SOURCE"]

GO_SOURCE = Path(__file__).resolve().parents[1] / "data" / "ollama_render.go"


def serving_inputs(path: Path) -> list[Any]:
    """What a GGUF's serving check depends on beside its files: whether Go is here to render the Modelfile, and the
    renderer's source (a verdict checked without Go is checked again once Go is installed)."""
    if path.suffix != ".gguf":
        return []
    return [shutil.which("go") is not None, hashlib.sha256(GO_SOURCE.read_bytes()).hexdigest()[:12]]


@dataclass
class Probes:
    """What every runtime is asked to render, and what the training run's tokenizer renders for it: the
    conversations, those with ``tools=[TOOL]`` (when the template takes tools), and the end-of-turn token."""

    convs: list
    expected: list[str]
    turn: tuple[str, int] | None
    tool_convs: list = field(default_factory=list)
    tool_expected: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, tokenizer: Any) -> Probes:
        convs, tools = conversations(tokenizer), tool_conversations(tokenizer)

        def render(conversation: list, **extra: Any) -> str:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **extra)

        return cls(
            convs,
            [render(c) for c in convs],
            end_of_turn(tokenizer),
            tools,
            [render(c, tools=[TOOL]) for c in tools],
        )

    def compare(self, runtime: str, render: Any) -> list[dict[str, Any]]:
        """The runtime's renderings (``render(conversation, tools)``, tools None or [TOOL]) against the tokenizer's:
        one check for the conversations, one for those with tools when there are any."""
        checks = [_compare(runtime, self.convs, self.expected, [render(c, None) for c in self.convs])]
        if self.tool_convs:
            got = [render(c, [TOOL]) for c in self.tool_convs]
            checks.append(
                _compare(i18n.ui("serving_with_tools", runtime=runtime), self.tool_convs, self.tool_expected, got)
            )
        return checks


def _check(runtime: str, status: str, **detail: Any) -> dict[str, Any]:
    return {"runtime": runtime, "status": status, **detail}


def _compare(runtime: str, convs: list, expected: list[str], got: list[str]) -> dict[str, Any]:
    for number, (conversation, want, have) in enumerate(zip(convs, expected, got), 1):
        if want != have:
            roles = " + ".join(m["role"] for m in conversation)
            return _check(runtime, "failed", conversation=number, roles=roles, expected=want, got=have)
    return _check(runtime, "verified", conversations=len(convs))


def _stops(runtime: str, turn: tuple[str, int] | None, held: list[Any], by: str) -> dict[str, Any]:
    """The end-of-turn token (by text or id, as ``by`` says) among what the runtime stops on."""
    if turn is None:
        return _check(runtime, "not_run", reason=i18n.ui("serving_no_turn"))
    wanted = turn[0] if by == "text" else turn[1]
    if wanted in held:
        return _check(runtime, "verified", stop=wanted)
    return _check(runtime, "failed", stop=wanted, held=held)


def _go_binary() -> Path | str:
    """The Ollama renderer, built once per source version into the user's cache; the reason when Go is missing."""
    go = shutil.which("go")
    if go is None:
        return i18n.ui("serving_no_go")
    digest = hashlib.sha256(GO_SOURCE.read_bytes()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "model-export" / f"ollama-render-{digest}"
    binary = folder / "ollama-render"
    if not binary.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GO_SOURCE, folder / "main.go")
        (folder / "go.mod").write_text("module ollamarender\n\ngo 1.19\n", encoding="utf-8")
        env = {"GOCACHE": str(folder / ".gocache"), "HOME": str(Path.home()), "PATH": str(Path(go).parent)}
        built = folder / f"ollama-render.{os.getpid()}"  # processes building at once (a batch) each rename theirs
        done = subprocess.run([go, "build", "-o", str(built), "."], cwd=folder, capture_output=True, text=True, env=env)
        if done.returncode:
            return i18n.ui("serving_go_failed", error=done.stderr.strip()[-300:])
        os.replace(built, binary)
    return binary


def ollama_renderings(template: str, system: str | None, convs: list) -> list[str] | str:
    """Each conversation as Ollama renders it with this TEMPLATE and SYSTEM (Go's text/template, Ollama's data), or
    why it could not be rendered here."""
    binary = _go_binary()
    if isinstance(binary, str):
        return binary
    request = json.dumps({"template": template, "system": system or "", "conversations": convs})
    done = subprocess.run([str(binary)], input=request, capture_output=True, text=True, timeout=60)
    if done.returncode:
        return i18n.ui("serving_template_error", error=done.stderr.strip()[-300:])
    renderings = json.loads(done.stdout)
    errors = [r["error"] for r in renderings if r.get("error")]
    if errors:
        return i18n.ui("serving_template_error", error=errors[0][-300:])
    return [r["text"] for r in renderings]


def _modelfile(folder: Path, probes: Probes) -> list[dict[str, Any]]:
    runtime = i18n.ui("serving_runtime_ollama")
    path = folder / "Modelfile"
    if not path.is_file():
        return [_check(runtime, "not_run", reason=i18n.ui("serving_no_modelfile"))]
    modelfile = read_modelfile(path)
    checks = [_stops(i18n.ui("serving_runtime_ollama_stop"), probes.turn, modelfile["stop"], "text")]
    if probes.tool_convs:  # the derived TEMPLATE writes no tools: Go's json cannot write them as the template's tojson
        reason = i18n.ui("serving_ollama_tools")
        checks.append(_check(i18n.ui("serving_with_tools", runtime=runtime), "not_run", reason=reason))
    if modelfile["template"] is None:
        note = next(
            (line[2:].strip() for line in path.read_text(encoding="utf-8").splitlines() if line[:2] == "# "), ""
        )
        return [_check(runtime, "not_run", reason=i18n.ui("serving_no_template", note=note)), *checks]
    got = ollama_renderings(modelfile["template"], modelfile["system"], probes.convs)
    if isinstance(got, str):
        return [_check(runtime, "not_run", reason=got), *checks]
    bos = runtime_bos(folder / modelfile["from"]) if modelfile["from"] else ""
    return [_compare(runtime, probes.convs, probes.expected, [bos + text for text in got]), *checks]


def _gguf(path: Path, probes: Probes) -> list[dict[str, Any]]:
    """The GGUF's embedded template through llama-cpp-python's chat path, and llama.cpp's end-of-generation set."""
    from ..runtimes import runtime_problem

    runtime, stop_runtime = i18n.ui("serving_runtime_llamacpp"), i18n.ui("serving_runtime_llamacpp_stop")
    problem = runtime_problem(path)
    if problem is not None:
        return [_check(runtime, "not_run", reason=problem), _check(stop_runtime, "not_run", reason=problem)]
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ..runtimes.llamacpp import load_llama

    model = load_llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        metadata = model.metadata
        template = metadata.get("tokenizer.chat_template")
        # the tokens' texts as llama-cpp-python gives them to the formatter it builds from the GGUF's template
        eos = model._model.token_get_text(model.token_eos()) if model.token_eos() != -1 else ""
        bos = model._model.token_get_text(model.token_bos()) if model.token_bos() != -1 else ""
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        turn = probes.turn
        eog = [t for t in {turn[1], model.token_eos()} if turn and llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        model.close()
    stops = _stops(stop_runtime, probes.turn, eog, "id")
    if not template:
        return [_check(runtime, "failed", reason=i18n.ui("serving_no_embedded")), stops]
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    return [*probes.compare(runtime, lambda c, tools: formatter(messages=c, tools=tools).prompt), stops]


def _onnx(graph: Path, probes: Probes) -> list[dict[str, Any]]:
    """onnxruntime-genai's tokenizer on the folder (its chat template, its eos ids)."""
    from ..extras import import_problem

    runtime, stop_runtime = i18n.ui("serving_runtime_genai"), i18n.ui("serving_runtime_genai_stop")
    problem = import_problem("onnxruntime_genai")
    if problem is not None or not (graph.parent / "genai_config.json").is_file():
        reason = problem or i18n.ui("serving_no_genai_config")
        return [_check(runtime, "not_run", reason=reason), _check(stop_runtime, "not_run", reason=reason)]
    import onnxruntime_genai as og

    try:
        tokenizer = og.Tokenizer(og.Config(str(graph.parent)))
    except Exception as exc:  # noqa: BLE001 - genai cannot read the folder: a user's genai cannot serve it either
        reason = i18n.ui("serving_genai_refuses", error=str(exc)[:300])
        return [_check(runtime, "failed", reason=reason), _check(stop_runtime, "failed", reason=reason)]

    def render(conversation: list, tools: list | None) -> str:
        extra = {"tools": json.dumps(tools)} if tools else {}
        return tokenizer.apply_chat_template(json.dumps(conversation), add_generation_prompt=True, **extra)

    eos = json.loads((graph.parent / "genai_config.json").read_text(encoding="utf-8"))["model"].get("eos_token_id")
    held = eos if isinstance(eos, list) else [eos]
    return [*probes.compare(runtime, render), _stops(stop_runtime, probes.turn, held, "id")]


def _onnx_adapter(pair: Path, probes: Probes) -> list[dict[str, Any]]:
    """An adapter's base graph, through the same onnxruntime-genai tokenizer (the adapter changes no template)."""
    from ..errors import ExportError
    from ..runtimes.genai import adapter_base

    try:
        base = adapter_base(pair)
    except ExportError as exc:
        runtime, stop_runtime = i18n.ui("serving_runtime_genai"), i18n.ui("serving_runtime_genai_stop")
        return [_check(runtime, "failed", reason=str(exc)), _check(stop_runtime, "failed", reason=str(exc))]
    return _onnx(base / "model.onnx", probes)


def _folder(folder: Path, probes: Probes) -> list[dict[str, Any]]:
    """A transformers folder as a server loads it: its own tokenizer files and generation_config's eos ids."""
    from transformers import AutoTokenizer

    runtime, stop_runtime = i18n.ui("serving_runtime_transformers"), i18n.ui("serving_runtime_generation_config")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def render(conversation: list, tools: list | None) -> str:
        return tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)

    generation = folder / "generation_config.json"
    eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file() else None
    held = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [*probes.compare(runtime, render), _stops(stop_runtime, probes.turn, held, "id")]


def serving_check(path: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """The serving check of one artifact (a GGUF file, an ONNX graph, a transformers folder) against the training
    run's tokenizer in ``tokenizer_dir``: {"status": verified | failed | not_run, "checks": [...]}; failed when any
    check failed, not_run when none failed and some did not run, verified when every one ran and passed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tokenizer, "chat_template", None):
        return {"status": "not_run", "reason": i18n.ui("serving_no_chat_template"), "checks": []}
    probes = Probes.of(tokenizer)
    if path.suffix == ".gguf":
        checks = _gguf(path, probes) + _modelfile(path.parent, probes)
    elif path.is_dir() and (path / "Modelfile").is_file():  # a batch's LoRA GGUF on the shared base, for Ollama
        checks = _modelfile(path, probes)
    elif path.suffix == ".onnx":
        checks = _onnx(path, probes)
    elif path.is_dir() and (path / PAIR_FILE).is_file():  # an .onnx_adapter: served by genai on its base graph
        checks = _onnx_adapter(path / PAIR_FILE, probes)
    elif path.is_dir() and (path / "config.json").is_file():
        checks = _folder(path, probes)
    else:
        return {"status": "not_run", "reason": i18n.ui("serving_no_runtime"), "checks": []}
    statuses = {c["status"] for c in checks}
    status = "failed" if "failed" in statuses else "not_run" if "not_run" in statuses else "verified"
    return {"status": status, "checks": checks, "end_of_turn": probes.turn[0] if probes.turn else None}


def serving_line(serving: dict[str, Any] | None) -> str | None:
    """``serving check: 3 of 4 verified; not run: Ollama's TEMPLATE (...): Go is not installed ...``."""
    if not serving or not serving.get("checks"):
        return None
    checks = serving["checks"]
    line = i18n.ui("serving_line", verified=sum(c["status"] == "verified" for c in checks), total=len(checks))
    skipped = [f"{c['runtime']}: {c.get('reason', '')}" for c in checks if c["status"] == "not_run"]
    return line + (i18n.ui("serving_not_run_part", what="; ".join(skipped)) if skipped else "")
