"""validate_checkpoint: every error path gives its own code and text, and nothing is written."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_export import BaseModelError, CheckpointValidationError, i18n, validate_checkpoint
from model_export.demo.tiny import build_adapter, build_base_model
from tests.conftest import tree_digest


def test_a_peft_adapter_passes_and_fits(adapter, tiny_base):
    report = validate_checkpoint(adapter, str(tiny_base))
    assert report.fit_checked and report.base_model_path == str(tiny_base)
    assert (report.rank, report.lora_alpha, report.num_modules) == (4, 8.0, 2 * 7)
    assert report.num_tensors == 2 * 2 * 7 and report.warnings == []


def test_the_base_recorded_in_adapter_config_is_used(adapter, tiny_base):
    assert validate_checkpoint(adapter).base_model == str(tiny_base)


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
        {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32}},
        {"target_modules": ["k_proj"], "use_dora": True},
        {"target_modules": ".*\\.(q|v)_proj", "use_rslora": True},
        {"target_modules": ["gate_proj"], "layers_to_transform": [1]},
    ],
)
def test_peft_variants_pass(tiny_base, tmp_path, lora):
    path = build_adapter(tiny_base, tmp_path / "variant", **lora)
    report = validate_checkpoint(path, str(tiny_base))
    assert report.fit_checked and report.num_modules >= 1


def test_missing_file_gives_the_guides_text(adapter_copy, tiny_base):
    (adapter_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert err.value.code == "ME202"
    i18n.set_language("zh")
    assert str(err.value) == "缺少必要文件: adapter_model.safetensors"
    assert "checkpoint-30" in err.value.hint()


def test_missing_directory_gives_the_guides_text():
    i18n.set_language("zh")
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint("./qwen3-finetuned")
    assert str(err.value) == "Checkpoint目录不存在: ./qwen3-finetuned"


def test_invalid_adapter_config_names_line_and_column(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text('{\n  "r": 8,\n  "lora_alpha": 16\n  "peft_type": "LORA"\n}')
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME204"
    assert (
        str(err.value)
        == f"adapter_config.json is not valid JSON: {adapter_copy / 'adapter_config.json'}, line 4, column 3: "
        "Expecting ',' delimiter"
    )


def test_a_peft_type_other_than_lora(tiny_base, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_base)),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(tmp_path / "ia3")
    assert err.value.code == "ME205"
    assert "Unsupported PEFT type 'IA3'" in str(err.value) and "supported: LORA (including rsLoRA and DoRA)" in str(
        err.value
    )


def _rewrite(path, change):
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def test_nan_or_inf_in_adapter_weights(adapter_copy):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[key][0, 0] = float("nan")

    _rewrite(adapter_copy, poison)
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME207" and f"(first: {key})" in str(err.value)


def test_rank_in_config_differs_from_tensors(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["r"] = 8
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME208" and "the tensors have rank 4 but adapter_config.json says r=8" in str(err.value)


def test_a_and_b_ranks_differ(adapter_copy):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite(adapter_copy, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0], 3)))
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME208"
    assert (
        str(err.value)
        == "LoRA rank mismatch in model.layers.0.self_attn.q_proj: lora_A has rank 4 but lora_B has rank 3"
    )


def test_lora_b_missing(adapter_copy):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    _rewrite(adapter_copy, lambda t: t.pop(key))
    with pytest.raises(CheckpointValidationError, match="lora_A is saved but lora_B is missing"):
        validate_checkpoint(adapter_copy)


def test_adapter_for_another_hidden_size(adapter, other_base):
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter, str(other_base))
    assert err.value.code == "ME209"
    assert "model.layers.0.mlp.down_proj is [64, 128] in the adapter but [96, 192] in the base model" in str(err.value)
    assert "; and 9 more" in str(err.value)


def test_adapter_with_more_layers_than_the_base(tiny_base, tmp_path):
    deeper = build_base_model(tmp_path / "deeper", num_hidden_layers=3, tokenizer=False, vocab_size=384)
    path = build_adapter(deeper, tmp_path / "deep-adapter", target_modules=["q_proj"])
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(path, str(tiny_base))
    assert str(err.value).endswith("model.layers.2.self_attn.q_proj is not in the base model")


def test_a_bin_adapter_is_read_weights_only(adapter_copy, tiny_base):
    tensors = load_file(str(adapter_copy / "adapter_model.safetensors"))
    (adapter_copy / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_copy / "adapter_model.bin")
    assert validate_checkpoint(adapter_copy, str(tiny_base)).weights_file == "adapter_model.bin"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused(adapter_copy, tmp_path):
    marker = tmp_path / "pwned"
    (adapter_copy / "adapter_model.safetensors").unlink()
    with open(adapter_copy / "adapter_model.bin", "wb") as fh:
        pickle.dump({"w": _Exploit(str(marker))}, fh)
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME210" and "weights_only=False" not in str(err.value)
    assert not marker.exists()
    torch.save({"w": _Exploit(str(marker))}, adapter_copy / "adapter_model.bin")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy)
    assert err.value.code == "ME210" and "it was not loaded" in str(err.value)
    assert not marker.exists()


def test_no_tokenizer_anywhere(adapter, tiny_base, tmp_path):
    bare = shutil.copytree(tiny_base, tmp_path / "bare-base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink()
    with pytest.raises(BaseModelError) as err:
        validate_checkpoint(adapter, str(bare))
    assert err.value.code == "ME302" and str(err.value).startswith(f"Can't load tokenizer for '{bare}'")


def test_without_a_base_the_fit_is_reported_unchecked(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    report = validate_checkpoint(adapter_copy)
    assert not report.fit_checked and "the fit to the base model was not checked" in report.warnings[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}garbage"),
        lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4})),
        lambda d: (d / "adapter_config.json").write_text("[1, 2"),
    ],
)
def test_bad_inputs_write_nothing(adapter_copy, tiny_base, damage):
    damage(adapter_copy)
    before = tree_digest(adapter_copy.parent), tree_digest(tiny_base)
    with pytest.raises(CheckpointValidationError):
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert (tree_digest(adapter_copy.parent), tree_digest(tiny_base)) == before


def test_a_symlink_out_of_the_checkpoint_is_refused_and_one_inside_is_not(adapter_copy, tmp_path, tiny_base):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (adapter_copy / "notes.txt").symlink_to(secret)
    before = tree_digest(adapter_copy)
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert err.value.code == "ME214" and "secret.txt" in str(err.value) and "outside the checkpoint" in str(err.value)
    assert tree_digest(adapter_copy) == before
    (adapter_copy / "notes.txt").unlink()
    (adapter_copy / "config-link.json").symlink_to(adapter_copy / "adapter_config.json")  # inside: fine
    assert validate_checkpoint(adapter_copy, str(tiny_base)).fit_checked


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(adapter_copy, tiny_base):
    data = json.loads((tiny_base / "tokenizer.json").read_text())
    rows = json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    data["added_tokens"].append(
        {
            "id": rows + 5,
            "content": "<|new|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (adapter_copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert (
        err.value.code == "ME215"
        and f"token ids up to {rows + 5}" in str(err.value)
        and f"only {rows} rows" in str(err.value)
    )
    assert "modules_to_save" in err.value.hint()


# ---- what `check` used to call valid and the run then crashed on (issue 13) ----


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_target_modules_that_match_nothing_in_the_base_are_refused(adapter_copy, tiny_base):
    _edit_config(adapter_copy, target_modules=["nonexistent_proj"])  # PEFT: NoMatchingPeftModuleError at load
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert err.value.code == "ME209" and "target_modules ['nonexistent_proj'] match no module of the base model" in str(
        err.value
    )
    _edit_config(adapter_copy, target_modules=".*\\.nothing_(q|v)")
    with pytest.raises(CheckpointValidationError):
        validate_checkpoint(adapter_copy, str(tiny_base))
    _edit_config(adapter_copy, target_modules=".*\\.(q|v)_proj")  # a regular expression that matches passes
    assert validate_checkpoint(adapter_copy, str(tiny_base)).fit_checked


def test_use_dora_without_magnitude_vectors_is_refused(adapter_copy, tiny_base):
    _edit_config(adapter_copy, use_dora=True)  # the run's verification disagreed by 0.28 instead
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(adapter_copy, str(tiny_base))
    assert err.value.code == "ME216" and "lora_magnitude_vector" in str(err.value)


def test_a_damaged_tokenizer_in_the_training_root_is_refused(make_run, tiny_base):
    root = make_run([10])
    (root / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(root / "checkpoint-10", str(tiny_base))
    assert err.value.code == "ME217" and str(root / "tokenizer.json") in str(err.value)
    shutil.copy(
        tiny_base / "tokenizer.json", root / "tokenizer.json"
    )  # a good tokenizer with a damaged config beside it
    (root / "tokenizer_config.json").write_text("[]")
    with pytest.raises(CheckpointValidationError) as err:
        validate_checkpoint(root / "checkpoint-10", str(tiny_base))
    assert err.value.code == "ME217" and "not an object" in str(err.value)


def test_a_base_config_with_layers_its_weights_lack_is_refused(tiny_base, adapter, tmp_path):
    base = shutil.copytree(tiny_base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 2}))
    with pytest.raises(BaseModelError) as err:
        validate_checkpoint(adapter, str(base))
    assert err.value.code == "ME303" and "num_hidden_layers 4, but the weights hold 2 layers" in str(err.value)
    (base / "config.json").write_text("[]")
    with pytest.raises(BaseModelError) as err:
        validate_checkpoint(adapter, str(base))
    assert err.value.code == "ME303" and "not a JSON object" in str(err.value)
