"""The streaming merge against PEFT: within one ulp per element for every variant, and the same model."""

import json

import pytest
import torch

from model_export import MergeError, ModelMerger, merge
from model_export.demo.tiny import build_adapter, build_base_model, save_as_trained
from tests.conftest import tree_digest
from tests.reference import load_dir, max_ulp, model_logits, peft_merge, unmerged_logits

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])

VARIANTS = {
    "all-linear": {},
    "rslora-patterns": {"use_rslora": True, "r": 8, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32}},
    "regex-target": {"target_modules": r".*\.(q|v|up)_proj"},
    "layers-to-transform": {"target_modules": ["gate_proj", "o_proj"], "layers_to_transform": [1]},
    "dora": {"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_within_one_ulp_of_peft(tiny_base, bf16_base, tmp_path, variant, dtype):
    base = tiny_base if dtype == "float32" else bf16_base
    adapter = build_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    ours = merge(adapter, str(base), tmp_path / "ours", progress=False)
    reference = load_dir(peft_merge(base, adapter, tmp_path / "peft", getattr(torch, dtype)))
    merged = load_dir(tmp_path / "ours")
    assert set(merged) == set(reference) and ours.tensors == len(reference)
    for name, tensor in reference.items():
        assert max_ulp(merged[name], tensor) <= 1, name


def test_lora_bias_on_a_base_with_biases(tmp_path):
    base = build_base_model(tmp_path / "biased", attention_bias=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], lora_bias=True)
    with torch.no_grad():  # PEFT starts lora_B.bias at zero: give it values, as training would
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for key in [k for k in tensors if k.endswith("lora_B.bias")]:
            tensors[key] = 0.1 * torch.randn_like(tensors[key])
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    merge(adapter, str(base), tmp_path / "ours")
    reference = load_dir(peft_merge(base, adapter, tmp_path / "peft"))
    merged = load_dir(tmp_path / "ours")
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.bias"], load_dir(base)["model.layers.0.self_attn.q_proj.bias"]
    )
    for name, tensor in reference.items():
        assert max_ulp(merged[name], tensor) <= 1, name


def test_lora_bias_without_a_base_bias_is_refused(tiny_base, tmp_path):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(MergeError, match="lora_bias on modules without a bias: model.layers.0.self_attn.q_proj"):
        merge(adapter, str(tiny_base), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_merged_model_gives_peft_unmerged_logits(tiny_base, adapter, tmp_path):
    merge(adapter, str(tiny_base), tmp_path / "ours")
    torch.testing.assert_close(
        model_logits(tmp_path / "ours", IDS), unmerged_logits(tiny_base, adapter, IDS), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
        {"target_modules": ["v_proj", "embed_tokens"], "use_dora": True},
        {"target_modules": ["o_proj"], "modules_to_save": ["lm_head", "model.norm"]},
    ],
)
def test_untied_base_with_embedding_and_head_adapters(untied_base, tmp_path, lora):
    adapter = build_adapter(untied_base, tmp_path / "adapter", **lora)
    if "modules_to_save" in lora:  # trained copies differ from the base's
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for key in ("base_model.model.lm_head.weight", "base_model.model.model.norm.weight"):
            tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    merge(adapter, str(untied_base), tmp_path / "ours")
    reference = load_dir(peft_merge(untied_base, adapter, tmp_path / "peft"))
    merged = load_dir(tmp_path / "ours")
    for name, tensor in reference.items():
        assert max_ulp(merged[name], tensor) <= 1, name
    torch.testing.assert_close(
        model_logits(tmp_path / "ours", IDS), unmerged_logits(untied_base, adapter, IDS), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "embed_tokens"]},
        {"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
        {"target_modules": ["k_proj", "lm_head"]},
    ],
)
def test_tied_embeddings_are_untied_when_the_adapter_changes_one(tiny_base, tmp_path, lora):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", **lora)
    if "modules_to_save" in lora:  # make the saved lm_head differ from the embedding, as training would
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        tensors["base_model.model.lm_head.weight"] += 0.05 * torch.randn_like(
            tensors["base_model.model.lm_head.weight"]
        )
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    result = merge(adapter, str(tiny_base), tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert result.untied_embeddings and config["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_dir(tmp_path / "ours")
    expected = unmerged_logits(tiny_base, adapter, IDS)
    torch.testing.assert_close(model_logits(tmp_path / "ours", IDS), expected, rtol=1e-4, atol=1e-4)


def test_peft_merge_of_a_tied_embedding_adapter_is_what_we_fix(tiny_base, tmp_path):
    """PEFT writes the embedding's update into the shared lm_head too (its issues 2018 and 2777); we do not."""
    adapter = build_adapter(tiny_base, tmp_path / "adapter", target_modules=["embed_tokens"])
    expected = unmerged_logits(tiny_base, adapter, IDS)
    peft_logits = model_logits(peft_merge(tiny_base, adapter, tmp_path / "peft"), IDS)
    merge(adapter, str(tiny_base), tmp_path / "ours")
    assert (peft_logits - expected).abs().max() > 1e-3
    torch.testing.assert_close(model_logits(tmp_path / "ours", IDS), expected, rtol=1e-4, atol=1e-4)


def test_added_tokens_grow_the_vocabulary(untied_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_base))
    model.resize_token_embeddings(400)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    save_as_trained(peft_model, tmp_path / "adapter", str(untied_base))
    result = merge(tmp_path / "adapter", str(untied_base), tmp_path / "ours")
    assert result.vocab_size == 400 and json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 400
    resized = AutoModelForCausalLM.from_pretrained(str(untied_base))
    resized.resize_token_embeddings(400)
    reference = PeftModel.from_pretrained(resized, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[1, 2, 390, 399, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model_logits(tmp_path / "ours", ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_fan_in_fan_out_on_gpt2_conv1d(tiny_base, tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        str(base)
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, base / name)
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(str(base)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    save_as_trained(model, tmp_path / "adapter", str(base))
    merge(tmp_path / "adapter", str(base), tmp_path / "ours")
    reference = load_dir(peft_merge(base, tmp_path / "adapter", tmp_path / "peft"))
    merged = load_dir(tmp_path / "ours")
    for name, tensor in reference.items():
        assert max_ulp(merged[name], tensor) <= 1, name


def test_layout_of_the_output(tiny_base, adapter, tmp_path):
    result = merge(adapter, str(tiny_base), tmp_path / "out", max_shard_size="60KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result.shards) > 2 and sorted(set(index["weight_map"].values())) == result.shards
    assert index["metadata"]["total_size"] == result.bytes == sum(t.numel() * 4 for t in load_dir(out).values())
    config = json.loads((out / "config.json").read_text())
    assert (
        config["dtype"] == "float32" and "quantization_config" not in config and config["tie_word_embeddings"] is True
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_base}" in card and str(adapter) in card and "| lora_r | `4` |" in card
    assert not list(out.glob("*.partial"))


def test_training_artifacts_stay_out_unless_asked(tiny_base, make_run, tmp_path):
    root = make_run([10])
    (root / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 100)
    merge(root, str(tiny_base), tmp_path / "a")
    assert not any("optimizer" in p.name or "trainer_state" in p.name for p in (tmp_path / "a").rglob("*"))
    merge(root, str(tiny_base), tmp_path / "b", remove_training_artifacts=False)
    assert (tmp_path / "b" / "training_artifacts" / "optimizer.pt").read_bytes() == b"x" * 100
    merge(root, str(tiny_base), tmp_path / "b")  # the setting changed: the same folder loses them again
    assert not (tmp_path / "b" / "training_artifacts").exists()


def test_tokenizer_from_the_checkpoint_wins(tiny_base, make_run, tmp_path):
    root = make_run([10])
    (root / "checkpoint-10" / "tokenizer.json").write_text((tiny_base / "tokenizer.json").read_text())
    (root / "checkpoint-10" / "chat_template.jinja").write_text("{{ 'fine-tuned template' }}")
    merge(root, str(tiny_base), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ 'fine-tuned template' }}"
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()  # one source, never mixed


def test_dtype_options_and_compress_weights(bf16_base, tmp_path):
    adapter = build_adapter(bf16_base, tmp_path / "adapter")
    merge(adapter, str(bf16_base), tmp_path / "auto")
    merge(adapter, str(bf16_base), tmp_path / "fp16", dtype="fp16")
    merge(adapter, str(bf16_base), tmp_path / "wide", compress_weights=False)
    assert {t.dtype for t in load_dir(tmp_path / "auto").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_dir(tmp_path / "fp16").values()} == {torch.float16}
    assert {t.dtype for t in load_dir(tmp_path / "wide").values()} == {torch.float32}
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "auto") <= sum(f.stat().st_size for f in bf16_base.glob("*.safetensors")) + 4096


def test_pytorch_bin_format(tiny_base, adapter, tmp_path):
    result = merge(adapter, str(tiny_base), tmp_path / "bin", format="pytorch", max_shard_size="100KB")
    merge(adapter, str(tiny_base), tmp_path / "st")
    assert (
        all(name.endswith(".bin") for name in result.shards)
        and (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    )
    state = {}
    for name in result.shards:
        state.update(torch.load(tmp_path / "bin" / name, weights_only=True))
    reference = load_dir(tmp_path / "st")
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    torch.testing.assert_close(model_logits(tmp_path / "bin", IDS), model_logits(tmp_path / "st", IDS))


def test_a_complete_output_is_not_rewritten(tiny_base, adapter, tmp_path):
    merge(adapter, str(tiny_base), tmp_path / "out")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = merge(adapter, str(tiny_base), tmp_path / "out")
    assert again.already_complete and stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    changed = merge(adapter, str(tiny_base), tmp_path / "out", dtype="bf16")
    assert not changed.already_complete and {t.dtype for t in load_dir(tmp_path / "out").values()} == {torch.bfloat16}


def test_a_damaged_shard_is_rewritten(tiny_base, adapter, tmp_path):
    merge(adapter, str(tiny_base), tmp_path / "out", max_shard_size="100KB")
    reference = tree_digest(tmp_path / "out")
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10] + b"\0" * 10)
    result = merge(adapter, str(tiny_base), tmp_path / "out", max_shard_size="100KB")
    assert not result.already_complete and result.resumed_shards == len(result.shards) - 1
    assert tree_digest(tmp_path / "out") == reference


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], ["v_proj", "embed_tokens"]])
def test_rows_shared_between_threads_give_the_same_bytes(tiny_base, tmp_path, monkeypatch, targets):
    """Each chunk's rows split between three threads, a row at a time (every chunk, however small), write the file
    one thread writes in blocks of the usual size."""
    from model_export.merging import arithmetic, merger

    adapter = build_adapter(tiny_base, tmp_path / "adapter", target_modules=targets)
    monkeypatch.setattr(merger, "threads", lambda: 1)
    merge(adapter, str(tiny_base), tmp_path / "one")
    monkeypatch.setattr(merger, "threads", lambda: 3)
    monkeypatch.setattr(arithmetic, "SPLIT_ELEMS", 1)
    monkeypatch.setattr(arithmetic, "BLOCK_ELEMS", 1)
    split = []
    original = arithmetic.Workspace.run
    monkeypatch.setattr(arithmetic.Workspace, "run", lambda self, jobs: split.append(len(jobs)) or original(self, jobs))
    merge(adapter, str(tiny_base), tmp_path / "three")
    assert max(split) == 3
    import threading

    assert not [t.name for t in threading.enumerate() if t.name.startswith("merge")]  # the helpers are shut down
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "three")
    reference = load_dir(peft_merge(tiny_base, adapter, tmp_path / "peft"))
    merged = load_dir(tmp_path / "three")
    assert all(max_ulp(merged[name], tensor) <= 1 for name, tensor in reference.items())


def test_merging_imports_neither_torch_nor_transformers(tiny_base, adapter, tmp_path):
    """A LoRA merge on the CPU runs in numpy: torch's import alone was 1.4 s of a 5 s merge at the 0.6B shape."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom model_export import merge\nmerge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(adapter), str(tiny_base), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unsupported_adapters_are_refused_before_writing(tiny_base, tmp_path):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(init_lora_weights="pissa", use_qalora=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError) as err:
        merge(adapter, str(tiny_base), tmp_path / "out")
    assert (
        err.value.code == "ME701"
        and "QALoRA (use_qalora)" in str(err.value)
        and "init_lora_weights=pissa" in str(err.value)
    )
    assert not (tmp_path / "out").exists()


def test_trainable_tokens_are_refused(tiny_base, tmp_path):
    adapter = build_adapter(tiny_base, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=[1, 2])
    with pytest.raises(MergeError, match="trainable_token_indices"):
        merge(adapter, str(tiny_base), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_must_not_be_an_input_or_a_foreign_directory(tiny_base, adapter, tmp_path):
    before = tree_digest(adapter), tree_digest(tiny_base)
    for out in (adapter / "merged", tiny_base, adapter):
        with pytest.raises(MergeError) as err:
            merge(adapter, str(tiny_base), out)
        assert err.value.code == "ME704"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(MergeError) as err:
        merge(adapter, str(tiny_base), tmp_path / "foreign")
    assert err.value.code == "ME703" and (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert (tree_digest(adapter), tree_digest(tiny_base)) == before


def test_model_merger_takes_the_configuration(tiny_base, make_run, tmp_path):
    from model_export import ExportConfiguration

    config = ExportConfiguration(
        checkpoint_path=str(make_run([10, 20])),
        base_model_name=str(tiny_base),
        output_dir=str(tmp_path / "export"),
        max_shard_size="100KB",
    )
    result = ModelMerger(config).merge()
    assert result.output_dir == str(tmp_path / "export" / "merge") and result.checkpoint.endswith("checkpoint-20")
    assert len(result.shards) > 1


def test_load_base_model_gives_the_transformers_model(tiny_base):
    model = ModelMerger().load_base_model(str(tiny_base))
    assert type(model).__name__ == "Qwen3ForCausalLM"


def test_cuda_out_of_memory_falls_back_to_the_cpu(tiny_base, adapter, tmp_path, monkeypatch, caplog):
    """Without a GPU here, a GPU whose every transfer runs out of memory stands in for a full one."""
    from model_export.merging import arithmetic as merge_math

    class FullGpu(merge_math._Backend):
        def take(self, weight):
            if self.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().take(weight)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(merge_math, "_Backend", FullGpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING", logger="model_export"):
        merge(adapter, str(tiny_base), tmp_path / "gpu", device="cuda")
    monkeypatch.undo()
    merge(adapter, str(tiny_base), tmp_path / "cpu")
    assert any("falling back to the CPU" in r.message for r in caplog.records)
    cpu, gpu = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "gpu")
    assert all(torch.equal(cpu[k], gpu[k]) for k in cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_the_cpu_merge(bf16_base, tmp_path):
    adapter = build_adapter(bf16_base, tmp_path / "adapter", use_dora=True, target_modules=["q_proj", "up_proj"])
    merge(adapter, str(bf16_base), tmp_path / "cpu")
    merge(adapter, str(bf16_base), tmp_path / "cuda", device="cuda")
    cpu, cuda = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert all(max_ulp(cpu[k], cuda[k]) <= 1 for k in cpu)


@pytest.mark.parametrize("level", ["none", "fp16", "bf16"])
def test_model_merger_and_run_give_byte_identical_merges_for_one_configuration(adapter, tiny_base, tmp_path, level):
    """Issue 15: both documented routes translate the configuration with merge_settings (ModelMerger used to ignore
    quantization_level, so fp16 gave an fp32 merge through one route and an fp16 one through the other)."""
    from model_export import ExportConfiguration, ModelMerger, run

    config = ExportConfiguration(
        checkpoint_path=str(adapter),
        base_model_name=str(tiny_base),
        output_dir=str(tmp_path / "run"),
        quantization_level=level,
        run_validation_tests=False,
        max_shard_size="100KB",
    )
    run(config)
    direct = ModelMerger(config).merge(out=tmp_path / "direct")
    merged = sorted(p.name for p in (tmp_path / "run" / "merge").glob("*.safetensors"))
    assert merged == sorted(direct.shards) and len(merged) > 1
    for name in merged:
        assert (tmp_path / "run" / "merge" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
