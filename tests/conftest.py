"""Tiny models built in code once per session: a Qwen3 base, adapters made by PEFT, Trainer-style trees."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from model_export import i18n
from model_export.demo.tiny import build_adapter, build_base_model


@pytest.fixture(autouse=True)
def _offline_english(monkeypatch, tmp_path_factory):
    """Tests never touch the network, read English unless they ask for Chinese, and run in an empty directory of
    their own: no test depends on what the current directory holds (`make demo` leaves qwen3-finetuned/ there)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    i18n.set_language(None)
    yield
    i18n.set_language(None)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "tiny-qwen3")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A Qwen3 base with another hidden size, for adapters that do not fit."""
    return build_base_model(
        tmp_path_factory.mktemp("other") / "tiny-qwen3-wide", hidden_size=96, tokenizer=False, vocab_size=384
    )


@pytest.fixture(scope="session")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return build_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def adapter_copy(adapter, tmp_path) -> Path:
    """A private copy of the adapter that a test may damage."""
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


@pytest.fixture
def make_run(adapter, tmp_path):
    """Build a Trainer-style output tree: make_run([10, 20, 30], best=20) -> root."""

    def make(steps, best=None, root=None):
        root = Path(root or tmp_path / "qwen3-finetuned")
        root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            ckpt = root / f"checkpoint-{step}"
            shutil.copytree(adapter, ckpt)
            state = {
                "global_step": step,
                "best_model_checkpoint": f"./somewhere/else/checkpoint-{best}" if best else None,
            }
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
        return root

    return make


def tree_digest(path: Path) -> str:
    """A hash of every file's name and bytes under ``path``: equal before and after means nothing was written."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def bf16_base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("bf16") / "tiny-qwen3-bf16", dtype="bfloat16")


@pytest.fixture(scope="session")
def untied_base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("untied") / "tiny-qwen3-untied", tie_word_embeddings=False)


def spread_model(out, config):
    """A seeded model of any transformers config with weights spread enough that greedy tokens differ."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
            elif param.dim() == 1:
                param.uniform_(0.5, 1.5) if param.shape[0] in (
                    config.hidden_size,
                    getattr(config, "head_dim", 0),
                ) else param.normal_(0, 0.1)
    model.save_pretrained(str(out))
    return out
