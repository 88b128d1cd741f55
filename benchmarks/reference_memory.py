"""Benchmark: verification's reference (base + adapter) computed layer by layer against PEFT's whole model.

    python benchmarks/reference_memory.py              # Qwen3-4B shape (8 GB of bf16 weights; ~10 GB of disk)
    python benchmarks/reference_memory.py --size 0.6b  # quick run

It writes the random-weight Qwen3-shaped base and r=16 LoRA of benchmarks/merge_vs_peft.py, warms the page cache,
then computes the reference of a run's verification (the three default test prompts, chat-templated, 16 greedy
tokens each, and the held-out text's logits) in two child processes: ``verification_runtime: transformers`` (PEFT's
unmerged model loaded whole in fp32, the anchor: what verification did before) and ``streamed`` (one decoder layer in
memory at a time). It prints wall time and peak RSS (wait4) of each, their ratios, and the largest logit difference
and greedy agreement between the two.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import (  # noqa: E402
    bench_parser,
    qwen3_config,
    settle,
    target_line,
    timed,
    write_adapter,
    write_base,
)

TARGET_PEAK_GIB = {"4b": 4.0}

CHILD = """
import json, sys, torch
from pathlib import Path
from model_export.verify.artifacts import RunOptions, compute_reference
base, adapter, runtime, out = sys.argv[1:5]
prompts = ["Hello", "简单测试", "Write a haiku about autumn."]
reference = compute_reference(Path(base), Path(adapter), Path(base), prompts, 16, options=RunOptions(runtime=runtime))
torch.save({"logits": reference.logits, "greedy": reference.greedy, "ppl": reference.heldout_perplexity}, out)
"""


def main() -> None:
    parser = bench_parser(__doc__, str(Path(tempfile.gettempdir()) / "model-export-reference-bench"))
    args = parser.parse_args()
    work = Path(args.workdir)
    base, adapter = work / f"base-{args.size}", work / f"adapter-{args.size}"
    if not base.is_dir():
        write_base(base, args.size)
    if not adapter.is_dir():
        write_adapter(adapter, base, qwen3_config(args.size))
    results = {}
    for runtime in ("transformers", "streamed"):
        settle(base)
        command = [sys.executable, "-c", CHILD, str(base), str(adapter), runtime, str(work / f"{runtime}.pt")]
        results[runtime] = timed(command)
        print(f"{runtime}: {results[runtime]}", flush=True)
    import torch

    whole, streamed = (torch.load(work / f"{r}.pt", weights_only=True) for r in ("transformers", "streamed"))
    diff = max(float((a - b).abs().max()) for a, b in zip(whole["logits"], streamed["logits"]))
    same = sum(a == b for a, b in zip(whole["greedy"], streamed["greedy"]))
    summary = {
        "size": args.size,
        "transformers": results["transformers"],
        "streamed": results["streamed"],
        "peak_ratio": round(results["streamed"]["peak_rss_gib"] / results["transformers"]["peak_rss_gib"], 3),
        "wall_ratio": round(results["streamed"]["wall_s"] / results["transformers"]["wall_s"], 3),
        "max_logit_diff": diff,
        "greedy_identical": f"{same}/{len(whole['greedy'])}",
        "perplexity": [whole["ppl"], streamed["ppl"]],
    }
    target = TARGET_PEAK_GIB.get(args.size)
    if target:
        summary["target_peak_gib"] = target_line(results["streamed"]["peak_rss_gib"], target)
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
