"""Benchmark: what calibration costs (issue 17, cost (b) and (c)): the importance matrix and GPTQ, layer-streamed on the
CPU, on the random-weight Qwen3 shapes of benchmarks/merge_vs_peft.py (bf16, vocabulary 151936).

    python benchmarks/calibration_cost.py --size 0.6b
    python benchmarks/calibration_cost.py --size 4b --only imatrix

Each runs in its own process after the page cache is warm, on the default calibration (16 samples of 256 tokens,
random token ids: the cost does not depend on the text): wall time and peak RSS (wait4), tokens per second for the
importance matrix, seconds per decoder layer for GPTQ (and from it the 4B and 8B figures, per-layer time scaled by
the layer's multiply-adds). llama.cpp's ``llama-imatrix`` is a separate tool that the llamacpp extra does not build
(llama-cpp-python ships libllama, not llama.cpp's tools), so its throughput is not measured here.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import SHAPES, bench_parser, settle, timed, write_base  # noqa: E402

SAMPLES, LENGTH = 16, 256

IMATRIX = """
import json, random, sys, time
from model_export.quantize.imatrix import collect_imatrix
random.seed(0)
samples = [[random.randrange(1000, 100000) for _ in range({length})] for _ in range({samples})]
start = time.perf_counter()
found = collect_imatrix(sys.argv[1], samples)
open(sys.argv[-1], "w").write(json.dumps({{"seconds": time.perf_counter() - start, "matrices": len(found)}}))
"""

GPTQ = """
import json, random, sys, time
from model_export.exporters.safetensors_quant import int4_group_size
from model_export.quantize.gptq import calibrate_gptq
random.seed(0)
samples = [[random.randrange(1000, 100000) for _ in range({length})] for _ in range({samples})]
times = []
last = [time.perf_counter()]
def layer(done, total):
    now = time.perf_counter(); times.append(now - last[0]); last[0] = now
start = time.perf_counter()
stats = calibrate_gptq(sys.argv[1], samples, sys.argv[2], group_size=int4_group_size(sys.argv[1]), on_layer=layer)
open(sys.argv[-1], "w").write(json.dumps({{"seconds": time.perf_counter() - start, "per_layer": times, **stats}}))
"""


def macs_per_layer(size: str) -> int:
    shape = SHAPES[size]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    head_dim = shape.get("head_dim", 128)
    kv = shape.get("num_key_value_heads", 8)
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    return attention + 3 * hidden * inter


def main() -> None:
    parser = bench_parser(__doc__, str(Path(tempfile.gettempdir()) / "model-export-calibration"))
    parser.add_argument("--only", choices=["imatrix", "gptq"])
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.size}"
    if not base.is_dir():
        write_base(base, args.size)
    settle(base)
    results = {"size": args.size, "tokens": SAMPLES * LENGTH}

    def run(script: str, *extra: str) -> tuple[dict, dict]:
        inner = work / "inner.json"
        cost = timed(
            [sys.executable, "-c", script.format(samples=SAMPLES, length=LENGTH), str(base), *extra, str(inner)]
        )
        return cost, json.loads(inner.read_text())

    if args.only in (None, "imatrix"):
        cost, inner = run(IMATRIX)
        results["imatrix"] = {**cost, "tokens_per_s": round(SAMPLES * LENGTH / inner["seconds"], 1), **inner}
    if args.only in (None, "gptq"):
        cost, inner = run(GPTQ, str(work / "gptq"))
        per_layer = sum(inner["per_layer"]) / len(inner["per_layer"])
        scaled = {
            s: round(per_layer * macs_per_layer(s) / macs_per_layer(args.size) * SHAPES[s]["num_hidden_layers"])
            for s in ("4b", "8b")
            if s in SHAPES
        }
        results["gptq"] = {
            **cost,
            "seconds_per_layer": round(per_layer, 2),
            "extrapolated_s": scaled,
            **{k: v for k, v in inner.items() if k != "per_layer"},
        }
    print(json.dumps(results, indent=2))
    (work / f"calibration-{args.size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
