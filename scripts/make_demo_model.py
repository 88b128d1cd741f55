"""Make the tiny pretrained Qwen3-architecture model that ships in model_export/demo/base/.

    python scripts/make_demo_model.py [--steps 400] [--hidden 256]

A byte-level BPE tokenizer is trained on the bundled corpus (model_export/demo/corpus.txt), then a
2-layer Qwen3 (head_dim 32, not hidden/heads; grouped KV heads; tied embeddings; vocabulary padded
beyond the tokenizer) is trained on the corpus with transformers' Trainer, seeded, until its
outputs are no longer random. The result is about 4 MB in fp32.

Width 256, not the tests' 64: at width 64 the demo loses so much to round-to-nearest 4-bit weights
(top-1 0.59-0.64 with each of the three quantizers; KL 0.15-0.18 even on its task prompts, by
scripts/int4_sensitivity.py) that no int4 artifact could pass; at 256 the int4 artifacts of the demo's
fine-tune stay near what llama.cpp measures on real models (top-1 0.92-0.94, KL 0.063-0.067;
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from model_export.demo.tiny import _collate, build_base_model, corpus_lines

TARGET = Path(__file__).resolve().parents[1] / "src" / "model_export" / "demo" / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    build_base_model(args.out, seed=0, hidden_size=args.hidden)
    tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    model = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    rows = [{"input_ids": tokenizer(line)["input_ids"][:64]} for line in corpus_lines()]
    work = args.out.parent / ".pretrain-work"
    training = TrainingArguments(
        output_dir=str(work),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=rows, data_collator=_collate(tokenizer))
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    model.save_pretrained(str(args.out))
    shutil.rmtree(work, ignore_errors=True)
    prompt = tokenizer("The export tool", return_tensors="pt")
    sample = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print("sample:", tokenizer.decode(sample[0]))
    print(f"wrote {args.out}: {sum(f.stat().st_size for f in args.out.iterdir()) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
