"""Benchmark: merging a QLoRA adapter into a bitsandbytes nf4 base against the 16-bit merge (issue 27).

    python benchmarks/qlora_merge.py              # Qwen3-4B shape (needs ~30 GB of disk)
    python benchmarks/qlora_merge.py --size 0.6b  # quick run

It writes a random-weight bf16 base of the Qwen3 shape and an r=16 LoRA on the seven projections (the same as
merge_vs_peft.py), quantizes the base to nf4 with double quantization through transformers and bitsandbytes (what a
*-bnb-4bit checkpoint holds), then runs, each in its own process: `model-export merge` on the bf16 base, on the nf4
base with an empty cache (the plain base of its dequantized weights is made first), and on the nf4 base again (the
plain base kept). It prints wall time and peak RSS (the process and its children, sampled) and the ratios against the
targets: at most 1.5x the 16-bit merge's time at at most 1 GiB peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import (
    bench_parser,
    qwen3_config,
    run_captured,
    settle,
    target_line,
    timed,
    write_adapter,
    write_base,
)

TARGETS = {"wall_vs_16bit": 1.5, "peak_rss_gib": 1.0}

QUANTIZE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
source, out = sys.argv[1:3]
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
model.save_pretrained(out)
"""


def child(*args: str) -> str:
    """A step of this script in a child process, so that this parent stays small (see merge_vs_peft.child)."""
    return run_captured([sys.executable, __file__, *args])


def main() -> None:
    args = bench_parser(__doc__, "/tmp/model-export-qlora-bench").parse_args()
    if args.internal:
        kind, *rest = args.internal
        if kind == "base":
            write_base(Path(rest[0]), args.size)
        elif kind == "adapter":
            write_adapter(Path(rest[0]), Path(rest[1]), qwen3_config(args.size))
        return
    work = Path(args.workdir) / args.size
    base, bnb, adapter, cache = work / "base", work / "base-bnb4", work / "adapter", work / "cache"
    if not base.is_dir():
        child("--size", args.size, "--internal", "base", str(base))
    if not adapter.is_dir():
        child("--size", args.size, "--internal", "adapter", str(adapter), str(base))
    if not bnb.is_dir():
        import subprocess

        subprocess.run([sys.executable, "-c", QUANTIZE, str(base), str(bnb)], check=True, capture_output=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, bnb / name)
    merge = [str(Path(sys.executable).parent / "model-export"), "merge", "--adapter", str(adapter), "--out"]
    results = {}
    for label, source, fresh in (("16-bit", base, False), ("nf4, first", bnb, True), ("nf4, again", bnb, False)):
        out = work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        settle(source)
        os.environ["MODEL_EXPORT_CACHE"] = str(cache)
        results[label] = timed([*merge, str(out), "--base", str(source), "--dtype", "bf16"], tree=True)
    shutil.rmtree(work / "merged", ignore_errors=True)
    report(results, bnb)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, bnb: Path) -> None:
    size = sum(p.stat().st_size for p in bnb.glob("*.safetensors")) / 2**30
    print(f"nf4 base: {size:.2f} GiB of weights")
    print(f"{'merge':<12} {'wall s':>8} {'peak RSS GiB':>13} {'vs 16-bit':>10}")
    base_wall = results["16-bit"]["wall_s"]
    for label, r in results.items():
        peak = max(r["peak_rss_gib"], r.get("peak_tree_rss_gib", 0))
        print(f"{label:<12} {r['wall_s']:>8.1f} {peak:>13.2f} {r['wall_s'] / base_wall:>9.2f}x")
    for label in ("nf4, first", "nf4, again"):
        r = results[label]
        peak = max(r["peak_rss_gib"], r.get("peak_tree_rss_gib", 0))
        print(
            f"{label}: time {target_line(round(r['wall_s'] / base_wall, 2), TARGETS['wall_vs_16bit'], 'x')}; "
            f"peak RSS {target_line(peak, TARGETS['peak_rss_gib'], ' GiB')}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
