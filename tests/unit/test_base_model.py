"""Base model resolution: local directories, the Hugging Face cache offline, and the guide's fixes on failure."""

import shutil

import huggingface_hub
import pytest

from model_export import BaseModelError, inspect_base_model, resolve_base_model


@pytest.fixture
def hub_cache(tiny_base, tmp_path, monkeypatch):
    """The layout huggingface_hub leaves behind: models--org--name/{refs/main, snapshots/<rev>/...}."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--Qwen--Qwen3-Tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_base, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return repo / "snapshots" / revision


def test_local_directory(tiny_base):
    info = inspect_base_model(str(tiny_base))
    assert info.path == tiny_base and info.config["model_type"] == "qwen3" and info.has_tokenizer
    assert "model.embed_tokens.weight" in info.tensors and "lm_head.weight" not in info.tensors  # tied
    assert info.weight_bytes == sum(t.nbytes for t in info.tensors.values()) > 0


def test_hub_id_from_the_cache_offline(hub_cache):
    assert resolve_base_model("Qwen/Qwen3-Tiny") == hub_cache
    assert inspect_base_model("Qwen/Qwen3-Tiny").config["hidden_size"] == 64


def test_not_cached_and_offline_gives_the_guides_fixes(hub_cache):
    with pytest.raises(BaseModelError) as err:
        resolve_base_model("Qwen/Qwen3-4B-Thinking-2507")
    assert err.value.code == "ME301" and isinstance(err.value, OSError)
    assert str(err.value).startswith(
        "Can't load base model 'Qwen/Qwen3-4B-Thinking-2507': it is not in the local Hugging Face cache"
    )
    hint = err.value.hint()
    for fix in (
        "unset HF_HUB_OFFLINE",  # what stopped it, first
        "base_model_name: /path/to/local/model",
        "export HF_ENDPOINT=https://hf-mirror.com",
        "hf download Qwen/Qwen3-4B-Thinking-2507",  # the command huggingface_hub installs today
        "huggingface-cli download Qwen/Qwen3-4B-Thinking-2507",  # the guide's, named for older installs
    ):
        assert fix in hint


def test_online_download_honours_hf_endpoint(hub_cache, monkeypatch):
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise OSError("connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(BaseModelError) as err:
        resolve_base_model("Qwen/Qwen3-4B-Thinking-2507")
    assert calls[1]["endpoint"] == "https://hf-mirror.example" and "*.safetensors" in calls[1]["allow_patterns"]
    assert "download failed: OSError: connection refused" in str(err.value)
    assert "1) check the network" in err.value.hint() and "hf download Qwen/Qwen3-4B-Thinking-2507" in err.value.hint()


def test_a_missing_local_path(tmp_path):
    with pytest.raises(BaseModelError) as err:
        resolve_base_model(str(tmp_path / "model"))
    assert err.value.code == "ME301" and "no such local directory" in str(err.value)
    assert "nothing is there" in err.value.hint() and "download" not in err.value.hint()


def test_unusable_directories(tiny_base, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BaseModelError) as err:
        resolve_base_model(str(tmp_path / "file"))
    assert err.value.code == "ME303"
    broken = shutil.copytree(tiny_base, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(BaseModelError, match=r"no \*\.safetensors weights"):
        inspect_base_model(str(broken))
    (broken / "config.json").unlink()
    with pytest.raises(BaseModelError, match="config.json is missing"):
        inspect_base_model(str(broken))


def test_sharded_base_with_a_missing_shard(tmp_path):
    from model_export.demo.tiny import build_base_model

    base = build_base_model(tmp_path / "sharded", tokenizer=False, vocab_size=384, max_shard_size="40KB")
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.json").is_file()
    assert len(inspect_base_model(str(base)).shards) == len(shards)
    shards[0].unlink()
    with pytest.raises(BaseModelError, match="lists shards that are missing"):
        inspect_base_model(str(base))
