"""Tiny Qwen3-architecture models, tokenizers and LoRA training runs, built in code and seeded.

The demo and the tests use these instead of downloading anything. Shapes keep what matters for
Qwen3: head_dim differs from hidden_size / num_attention_heads, grouped KV heads, tied embeddings,
and a vocabulary padded beyond the tokenizer's token count.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "corpus_lines",
    "build_tokenizer",
    "build_base_model",
    "build_adapter",
    "save_as_trained",
    "build_training_run",
    "TASK_PROMPTS",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3 thinking-model style: the assistant turn opens with <think>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# What the demo's fine-tune teaches: answer these requests with lines of the corpus. The demo verifies
# on them, as a user verifies on prompts of their own task.
TASK_PROMPTS = ["Say something.", "说点什么。", "Tell me one line."]

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus_lines() -> list[str]:
    text = resources.files("model_export.demo").joinpath("corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(out: str | Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE tokenizer on the bundled corpus and save it in Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def build_base_model(
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    dtype: str = "float32",
    tokenizer: bool = True,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Save a seeded random Qwen3 model (and, by default, a tokenizer) to ``out``; return ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    tok = build_tokenizer(out) if tokenizer else None
    if vocab_size is None:
        vocab_size = ((len(tok) if tok is not None else 384) + 63) // 64 * 64  # padded, as Qwen's is
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>") if tok else None,
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>") if tok else None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():  # random init is near zero; spread weights so outputs differ across inputs
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    return out


def build_adapter(
    base: str | Path, out: str | Path, *, seed: int = 1, base_name: str | None = None, **lora: Any
) -> Path:
    """Save a LoRA adapter made by PEFT itself on ``base`` with nonzero B (as if trained); return ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "task_type": "CAUSAL_LM", **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    save_as_trained(peft_model, out, base_name or str(base), seed)
    return Path(out)


def save_as_trained(peft_model: Any, out: str | Path, base_name: str, seed: int = 1) -> None:
    """Give a fresh PEFT model's LoRA weights values, as training would (PEFT starts B, and an embedding's A,
    at zero, which would make every merge trivially exact), record the base's name, and save it."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                param.normal_(0, 0.05)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(out))


def build_training_run(
    base: str | Path,
    out: str | Path,
    *,
    steps: int = 30,
    save_steps: int = 10,
    seed: int = 0,
    base_name: str | None = None,
    learning_rate: float = 5e-3,
) -> Path:
    """Fine-tune a LoRA on the bundled corpus with transformers' Trainer and PEFT, leaving checkpoint-N folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = base_name or str(base)
    rows = _examples(tokenizer, corpus_lines())
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_steps,
        eval_strategy="steps",
        eval_steps=save_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=learning_rate,
        logging_steps=save_steps,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        use_cpu=True,
        seed=seed,
        save_total_limit=None,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], data_collator=_collate(tokenizer)
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; keep stdout for --json
        trainer.train()
    tokenizer.save_pretrained(str(out))
    return Path(out)


def _examples(tokenizer: Any, lines: Iterable[str]) -> list[dict]:
    rows = []
    for i, line in enumerate(lines):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": TASK_PROMPTS[i % len(TASK_PROMPTS)]}, {"role": "assistant", "content": line}],
            tokenize=False,
        )
        ids = tokenizer(text)["input_ids"][:64]
        rows.append({"input_ids": ids})
    return rows


def _collate(tokenizer: Any):
    import torch

    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, : len(b["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate
