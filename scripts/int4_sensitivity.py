"""How much a model loses when every weight matrix is rounded to 4-bit blocks (q4_0's scheme), per prompt.

    python scripts/int4_sensitivity.py BASE CHECKPOINT [--prompts "Hello" "简单测试" ...]

BASE + CHECKPOINT (a LoRA) are merged with PEFT; the merged model's logits are compared with the same model
after every 2-D weight is rounded to blocks of 32 with q4_0's scale (largest magnitude / -8), in torch. It
prints, per prompt (chat-formatted, as verification formats them) and for the bundled held-out text: top-1
agreement and mean KL. docs/benchmarks.md uses it to show why the demo model is 256 wide.
"""

from __future__ import annotations

import argparse

import torch


def q4_0(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    scale = peak / -8
    inverse = torch.where(scale == 0, 0, 1 / scale)
    return (((blocks * inverse + 8.5).floor().clamp(0, 15) - 8) * scale).reshape(rows, cols)


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_export.verify.reference import HELDOUT_TOKENS, encode_prompt, heldout_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", nargs="+", default=["Hello", "简单测试", "Write a haiku about autumn."])
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args.checkpoint).merge_and_unload().eval()
    inputs = {p: encode_prompt(tokenizer, p) for p in args.prompts}
    inputs["(held-out text)"] = torch.tensor(
        tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:HELDOUT_TOKENS]
    )
    with torch.no_grad():
        reference = {name: model(ids[None]).logits[0] for name, ids in inputs.items()}
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(q4_0(param))
        rounded = {name: model(ids[None]).logits[0] for name, ids in inputs.items()}
    for name in inputs:
        ref, got = reference[name], rounded[name]
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
        kl = (
            torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
        )
        print(f"{name:<32} tokens {len(ref):>4}  top-1 {top1:.3f}  KL {kl:.4f}")


if __name__ == "__main__":
    main()
