"""Benchmark: model-export's streaming ONNX builder against onnxruntime-genai's model builder (int4, CPU).

    python benchmarks/onnx_vs_genai_builder.py              # Qwen3-4B shape (8 GB of bf16 weights)
    python benchmarks/onnx_vs_genai_builder.py --size 0.6b  # quick run

It writes the random-weight Qwen3 base of the merge benchmark (bf16, tied embeddings), then runs in
one session, each in its own process with the base in the page cache:

- ``python -m onnxruntime_genai.models.builder -i BASE -o OUT -p int4 -e cpu``
- model-export's ``export_onnx(BASE, OUT, level="int4", optimize=False)`` (the same product: one
  int4 graph with MatMulNBits blocks of 32, fp32 activations, genai_config.json, tokenizer)
- the same with ``optimize=True`` (plus onnxruntime's offline-optimized graph), for information.

For each: wall time, peak RSS (wait4), output size, and agreement of the graph's logits with the
fp32 transformers reference on a fixed 128-token prompt (every position): top-1, mean |logit
difference| and mean KL. The weights are random, so logits are nearly flat (their spread is about
0.01) and top-1 is the noisiest of the three; mean |dlogit| and KL measure the same error steadily.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_peft import bench_parser, run_captured, settle, timed, warm, write_base  # noqa: E402

TARGETS = {"wall_vs_genai": 0.5, "peak_rss_gib": 3.0}
PROMPT_TOKENS = 128

OURS_SCRIPT = """
import sys
from model_export.exporters.onnx_export import export_onnx
export_onnx(sys.argv[1], sys.argv[2], backend="builder", level="int4", opset=17, block_size=32, accuracy_level=4,
            optimize=sys.argv[3] == "1")
"""

REFERENCE_SCRIPT = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
ids = np.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.from_numpy(ids)[None]).logits[0]
np.save(sys.argv[3], logits.numpy())
"""

AGREEMENT_SCRIPT = """
import json, sys, numpy as np, torch
from model_export.exporters.onnx_export import OnnxDecoder
ids, ref = np.load(sys.argv[2]), torch.from_numpy(np.load(sys.argv[3]))
got = torch.from_numpy(OnnxDecoder(sys.argv[1], optimized=True).prompt(ids.tolist())[0])
kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
kl = kl.sum(-1).mean()
print(json.dumps({"top1_vs_fp32": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                  "mean_abs_logit_diff": float((got - ref).abs().mean()), "mean_kl": float(kl)}))
"""


def prompt_ids(base: Path) -> Path:
    import numpy as np
    from transformers import AutoTokenizer

    from model_export.demo.tiny import corpus_lines

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    ids = tokenizer(" ".join(corpus_lines()))["input_ids"][:PROMPT_TOKENS]
    path = base.parent / "prompt.npy"
    np.save(path, np.array(ids, dtype=np.int64))
    return path


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_python(script: str, *args: str) -> str:
    return run_captured([sys.executable, "-c", script, *args])


def main() -> None:
    parser = bench_parser(__doc__, "/tmp/model-export-bench-onnx")
    parser.add_argument("--skip-genai", action="store_true", help="only model-export (no onnxruntime-genai run)")
    args = parser.parse_args()
    if args.internal:
        write_base(Path(args.internal[0]), args.size)
        return
    work = Path(args.workdir) / args.size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "base"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--size", args.size, "--internal", str(base)], check=True
    )  # a child: this parent stays small
    print(f"base written in {time.perf_counter() - t0:.1f} s: {size_of(base) / 1e9:.2f} GB")
    ids = prompt_ids(base)
    reference = work / "reference_logits.npy"
    t0 = time.perf_counter()
    run_python(REFERENCE_SCRIPT, str(base), str(ids), str(reference))
    print(f"fp32 transformers reference on {PROMPT_TOKENS} tokens in {time.perf_counter() - t0:.1f} s")

    results = {}
    runs = {
        "model-export": [sys.executable, "-c", OURS_SCRIPT, str(base), str(work / "ours"), "0"],
        "model-export+optimized": [sys.executable, "-c", OURS_SCRIPT, str(base), str(work / "ours-opt"), "1"],
    }
    if not args.skip_genai:
        runs = {
            "onnxruntime-genai": [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(base),
                "-o",
                str(work / "genai"),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(work / "genai-cache"),
            ],
            **runs,
        }
    folders = {
        "onnxruntime-genai": work / "genai",
        "model-export": work / "ours",
        "model-export+optimized": work / "ours-opt",
    }
    for name, command in runs.items():
        settle(base)
        warm(base)
        results[name] = timed(command)
        results[name]["output_gb"] = round(size_of(folders[name]) / 1e9, 3)
        graph = folders[name] / ("model.optimized.onnx" if name.endswith("optimized") else "model.onnx")
        results[name].update(json.loads(run_python(AGREEMENT_SCRIPT, str(graph), str(ids), str(reference))))
    report(results)
    (Path(args.workdir) / f"onnx-{args.size}.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    print(
        f"\n{'tool':<24}{'wall (s)':>10}{'peak RSS (GiB)':>16}{'output (GB)':>13}{'top-1 vs fp32':>15}"
        f"{'mean |dlogit|':>15}{'mean KL':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<24}{r['wall_s']:>10.2f}{r['peak_rss_gib']:>16.2f}{r['output_gb']:>13.3f}{r['top1_vs_fp32']:>15.4f}"
            f"{r['mean_abs_logit_diff']:>15.6f}{r['mean_kl']:>11.2e}"
        )
    ours = results["model-export"]
    rss_ok = ours["peak_rss_gib"] <= TARGETS["peak_rss_gib"]
    print(
        f"peak RSS: {ours['peak_rss_gib']} GiB (target <= {TARGETS['peak_rss_gib']}: {'met' if rss_ok else 'NOT met'})"
    )
    if "onnxruntime-genai" in results:
        theirs = results["onnxruntime-genai"]
        ratio = round(ours["wall_s"] / theirs["wall_s"], 2)
        print(
            f"wall_vs_genai: {ratio} (target <= {TARGETS['wall_vs_genai']}: "
            f"{'met' if ratio <= TARGETS['wall_vs_genai'] else 'NOT met'})"
        )
        print(f"rss_vs_genai: {round(ours['peak_rss_gib'] / theirs['peak_rss_gib'], 3)}")
        agree = ours["top1_vs_fp32"] >= theirs["top1_vs_fp32"]
        print(
            f"top-1 agreement: ours {ours['top1_vs_fp32']} vs theirs {theirs['top1_vs_fp32']} (target: at least "
            f"theirs: "
            f"{'met' if agree else 'NOT met'})"
        )
        results["ratios"] = {"wall_vs_genai": ratio}


if __name__ == "__main__":
    main()
