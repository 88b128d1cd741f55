"""Issue 26 (in part): every artifact is checked where it is served. Its runtime renders the chat template as the
training run's tokenizer does, and its stop set holds the end-of-turn token; the Ollama Modelfile's TEMPLATE is
carried over from the model's own template and executed by Go's text/template with Ollama's data."""

import json
import shutil
from pathlib import Path

import pytest

from model_export import ExportConfiguration, run

pytestmark = pytest.mark.integration

NEEDS_GO = pytest.mark.skipif(
    shutil.which("go") is None,
    reason="Go renders the Modelfile as Ollama does: apt-get install golang-go (make install does it as root)",
)

# A Qwen2.5-style ChatML template whose system turn has a default prompt when the conversation brings none.
DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a careful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _config(training, out, **overrides):
    from model_export.demo.run import shipped_base

    settings = {"export_formats": ["safetensors", "onnx", "gguf"], "quantization_level": "int8", **overrides}
    return ExportConfiguration(
        checkpoint_path=str(training), base_model_name=str(shipped_base()), output_dir=str(out), **settings
    )


def _base_with_template(tmp_path: Path, template: str) -> Path:
    from model_export.demo.run import shipped_base

    base = tmp_path / "base"
    shutil.copytree(shipped_base(), base)
    (base / "chat_template.jinja").write_text(template, encoding="utf-8")
    return base


@NEEDS_GO
def test_the_demo_is_served_as_it_was_trained_in_every_runtime(training, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("llama_cpp")
    result = run(_config(training, tmp_path / "out"))
    modelfile = (tmp_path / "out" / "export" / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert "<|im_start|>assistant\n<think>\n" in modelfile  # the Thinking template's generation prompt, carried over
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    runtimes = {}
    for label, verdict in result.steps["verify"]["result"]["verdicts"].items():
        assert verdict["status"] == "verified" and verdict["serving"]["status"] == "verified", label
        assert verdict["serving"]["end_of_turn"] == "<|im_end|>"
        runtimes[label] = [c["runtime"] for c in verdict["serving"]["checks"]]
    assert "Ollama's TEMPLATE (Go text/template)" in runtimes["gguf"]
    assert "llama.cpp's chat path (the GGUF's embedded template)" in runtimes["gguf"]
    assert "onnxruntime-genai's chat template" in runtimes["onnx"]
    assert "generation_config.json's eos_token_id" in runtimes["safetensors"]


@NEEDS_GO
def test_a_default_system_prompt_becomes_the_modelfiles_system_and_renders_as_in_ollama(tmp_path):
    from transformers import AutoTokenizer

    from model_export.exporters.modelfile import conversations, read_modelfile, write_modelfile
    from model_export.verify.serving import ollama_renderings

    base = _base_with_template(tmp_path, DEFAULT_SYSTEM)
    write_modelfile(tmp_path, "model.gguf", base)
    modelfile = read_modelfile(tmp_path / "Modelfile")
    assert modelfile["system"] == "You are a careful assistant."
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    convs = conversations(tokenizer)
    assert [c[0]["role"] for c in convs] == ["user", "user", "system", "system"]  # with and without a system turn
    expected = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert ollama_renderings(modelfile["template"], modelfile["system"], convs) == expected


@NEEDS_GO
def test_a_wrong_modelfile_template_fails_the_gguf_with_both_renderings(training, tmp_path, monkeypatch):
    """The hand-written ChatML TEMPLATE this project used to write (no <think> in the generation prompt): Ollama would
    render every conversation without it, and the verdict says so."""
    pytest.importorskip("llama_cpp")
    from model_export import ValidationError
    from model_export.exporters import modelfile

    handwritten = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    monkeypatch.setattr(modelfile, "ollama_template", lambda tokenizer, bos=False: (handwritten, None, "hand-written"))
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as err:
        run(_config(training, out, export_formats=["gguf"]))
    message = str(err.value)
    assert err.value.code == "ME607" and "Ollama's TEMPLATE (Go text/template)" in message
    assert "renders conversation 1 (user) otherwise than apply_chat_template" in message
    assert "<|im_start|>assistant\\n<think>\\n'" in message and "got '<|im_start|>user" in message  # both renderings
    verdict = json.loads((out / "run.json").read_text())["steps"]["verify"]["result"]["verdicts"]["gguf"]
    assert verdict["status"] == "failed" and verdict["serving"]["status"] == "failed"


def test_an_end_of_turn_token_missing_from_the_stop_set_fails_the_artifact(training, tmp_path, monkeypatch):
    """A genai_config.json whose eos ids leave out <|im_end|>: onnxruntime-genai would generate past the turn."""
    pytest.importorskip("onnxruntime_genai")
    from model_export import ValidationError
    from model_export.exporters import onnx_export

    original = onnx_export.write_genai_config

    def without_end_of_turn(out, config):
        original(out, config)
        data = json.loads((out / "genai_config.json").read_text())
        data["model"]["eos_token_id"] = [0]
        (out / "genai_config.json").write_text(json.dumps(data))

    monkeypatch.setattr(onnx_export, "write_genai_config", without_end_of_turn)
    with pytest.raises(ValidationError) as err:
        run(_config(training, tmp_path / "out", export_formats=["onnx"]))
    assert err.value.code == "ME607" and "does not stop on the end-of-turn token 2 (it stops on [0])" in str(err.value)


def test_without_go_the_modelfile_check_is_not_run_and_says_why(training, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    import model_export.verify.serving as serving

    real = shutil.which
    monkeypatch.setattr(serving.shutil, "which", lambda name: None if name == "go" else real(name))
    result = run(_config(training, tmp_path / "out", export_formats=["gguf"]))
    verdict = result.steps["verify"]["result"]["verdicts"]["gguf"]
    checks = {c["runtime"]: c for c in verdict["serving"]["checks"]}
    ollama = checks["Ollama's TEMPLATE (Go text/template)"]
    assert ollama["status"] == "not_run" and "apt-get install golang-go" in ollama["reason"]
    assert verdict["status"] == "verified" and verdict["serving"]["status"] == "not_run"  # counted neither way
    assert checks["llama.cpp's chat path (the GGUF's embedded template)"]["status"] == "verified"


def test_without_vllm_its_units_are_not_run_and_say_how_to_get_it(training, tmp_path):
    """The tool's own interpreter has no vLLM (it pins other torch and transformers): the units vLLM would verify are
    'not run' with the way to build its interpreter, counted neither way, and nothing is started."""
    import sys

    result = run(
        _config(
            training,
            tmp_path / "out",
            export_formats=["safetensors"],
            quantization_level="none",
            verification_servers=["vllm"],
            vllm_python=sys.executable,
        )
    )
    verify = result.steps["verify"]["result"]
    for label in ("safetensors@vllm", "adapter@vllm"):
        verdict = verify["verdicts"][label]
        assert verdict["status"] == "not_run" and "run make vllm" in verdict["reason"], verdict
    assert verify["verdicts"]["safetensors"]["status"] == "verified"
    assert verify["passed"] is None and verify["counts"] == {"verified": 1, "failed": 0, "not_run": 2}


# Llama 3's form (a header per message, BOS first) and Mistral's first form ([INST] ... [/INST], no system role), on the
# demo's vocabulary: <|im_end|> ends a turn and <|im_start|> stands for BOS.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|im_end|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + '<|im_end|>' }}{%- else %}{{ raise_exception('Only user and assistant roles') }}"
    "{%- endif %}{%- endfor %}"
)


def _with_bos(base: Path) -> Path:
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(bos_token="<|im_start|>", add_bos_token=True)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


@NEEDS_GO
@pytest.mark.parametrize("template", [LLAMA3, MISTRAL], ids=["llama3", "mistral"])
def test_llama3_and_mistral_templates_are_carried_over_and_render_as_in_ollama(tmp_path, template, monkeypatch):
    """Each message between fixed texts per role, read off the template's own renderings; the runtime's BOS (the GGUF
    adds it) is left out of the TEMPLATE, and BOS + Ollama's rendering is what apply_chat_template renders."""
    from transformers import AutoTokenizer

    from model_export.exporters import modelfile as module
    from model_export.exporters.modelfile import conversations, read_modelfile, write_modelfile
    from model_export.verify.serving import ollama_renderings

    base = _with_bos(_base_with_template(tmp_path, template))
    monkeypatch.setattr(module, "runtime_bos", lambda path: "<|im_start|>")  # a GGUF that adds BOS
    write_modelfile(tmp_path, "model.gguf", base)
    modelfile = read_modelfile(tmp_path / "Modelfile")
    assert modelfile["template"] is not None and not modelfile["template"].startswith("<|im_start|>")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    convs = conversations(tokenizer)
    expected = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert all(text.startswith("<|im_start|>") for text in expected)
    got = ollama_renderings(modelfile["template"], modelfile["system"], convs)
    assert ["<|im_start|>" + text for text in got] == expected
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "Modelfile").read_text()


@NEEDS_GO
def test_a_llama3_template_with_a_bos_adding_gguf_is_verified_where_ollama_serves_it(tmp_path):
    from model_export.demo.tiny import build_training_run

    base = _with_bos(_base_with_template(tmp_path, LLAMA3))
    training = build_training_run(base, tmp_path / "llama3-finetuned", steps=10)  # its tokenizer: this template
    for saved in training.rglob("tokenizer_config.json"):  # the Trainer's files leave add_bos_token out: put it back
        _with_bos(saved.parent)
    settings = {"export_formats": ["gguf"], "quantization_level": "int8"}
    result = run(
        ExportConfiguration(
            checkpoint_path=str(training), base_model_name=str(base), output_dir=str(tmp_path / "out"), **settings
        )
    )
    modelfile = (tmp_path / "out" / "export" / "gguf" / "Modelfile").read_text()
    # the GGUF adds BOS itself (tokenizer.ggml.add_bos_token), so the TEMPLATE leaves it out
    assert 'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>' in modelfile
    verdict = result.steps["verify"]["result"]["verdicts"]["gguf"]  # run in llama.cpp where it is installed
    checks = {c["runtime"]: c for c in verdict["serving"]["checks"]}  # the Modelfile's check needs only Go
    assert checks["Ollama's TEMPLATE (Go text/template)"]["status"] == "verified"
    assert checks["Ollama's stop parameters"]["status"] == "verified"


@NEEDS_GO
def test_a_template_that_is_not_messages_between_fixed_texts_gets_no_template_and_says_why(tmp_path):
    from model_export.exporters.modelfile import read_modelfile, write_modelfile

    numbered = (  # a turn number in every message: not fixed texts, so no faithful TEMPLATE is guessed
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + ' ' + loop.index|string + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    write_modelfile(tmp_path, "model.gguf", _base_with_template(tmp_path, numbered))
    modelfile = read_modelfile(tmp_path / "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    assert modelfile["template"] is None and "# No TEMPLATE: " in text and "Ollama chooses a template" in text


# A ChatML template that takes tools, as Qwen's do: their definitions in the system turn, each written by tojson.
TOOLS_CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}{{- '# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- elif messages[0]['role'] == "
    "'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}{{- '<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@NEEDS_GO
def test_a_template_that_takes_tools_is_checked_with_tools_in_every_runtime(tmp_path):
    """Conversations with tools=[a function], rendered by each runtime with the tools, against apply_chat_template;
    Ollama's TEMPLATE writes no tools (Go's json cannot write them as tojson does): not run, saying so."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("llama_cpp")
    from model_export.demo.tiny import build_training_run

    base = _base_with_template(tmp_path, TOOLS_CHATML)
    training = build_training_run(base, tmp_path / "tools-finetuned", steps=10)
    settings = {"export_formats": ["safetensors", "onnx", "gguf"], "quantization_level": "int8"}
    out = tmp_path / "out"
    result = run(
        ExportConfiguration(checkpoint_path=str(training), base_model_name=str(base), output_dir=str(out), **settings)
    )
    verdicts = result.steps["verify"]["result"]["verdicts"]
    tools = {}
    for label, verdict in verdicts.items():
        assert verdict["status"] == "verified", (label, verdict["serving"])
        tools.update({c["runtime"]: c for c in verdict["serving"]["checks"] if c["runtime"].endswith(", with tools")})
    for runtime in ("llama.cpp's chat path (the GGUF's embedded template)", "onnxruntime-genai's chat template"):
        assert tools[f"{runtime}, with tools"]["status"] == "verified", tools[f"{runtime}, with tools"]
    assert tools["the folder's own tokenizer (transformers, vLLM), with tools"]["conversations"] == 2
    ollama = tools["Ollama's TEMPLATE (Go text/template), with tools"]
    assert ollama["status"] == "not_run" and "Go's json" in ollama["reason"]
