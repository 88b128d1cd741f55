"""Benchmark: one decoding pass of the layer-streamed reference (merging/streamed.py), with nothing resident and with
every layer resident, in a process of its own each.

    python benchmarks/streamed_pass.py --size 4b --workdir /tmp/bench/fr     # the base and adapter full_run.py wrote
    PYTHONPATH=<worktree>/src python benchmarks/streamed_pass.py ...           # the same with another commit's code

A pass of 8 single tokens, as the reference's greedy decoding makes 16 of them: its cost is reading and widening
every layer (and the head), not arithmetic. It writes the random-weight Qwen3-shaped base and r=16 LoRA of
benchmarks/merge_vs_peft.py when the work folder lacks them (full_run.py's base-<size> and run-<size>/checkpoint-30
are reused), warms the page cache, then runs ``--passes`` passes for each ``--max-memory`` and prints each pass's wall
and CPU seconds (all threads: the reader thread widens the next layer while one computes) and the process's peak RSS
(VmHWM). The first pass also pays for the memory it keeps resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import bench_parser, qwen3_config, settle, write_adapter, write_base  # noqa: E402

PASS = """
import json, resource, sys, time
import torch
from model_export.merging.streamed import StreamedModel
base, adapter, budget, passes, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = StreamedModel(base, adapter, max_memory=budget)
ids = torch.randint(0, 1000, (8, 1), generator=torch.Generator().manual_seed(0))
rows = []
for _ in range(passes):
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(ids, use_cache=False)
    rows.append([round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)])
kept = len(model.resident)
model.close()
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"passes": rows, "kept_layers": kept, "peak_rss_gib": round(hwm / 2**30, 2)}))
"""


def main() -> None:
    parser = bench_parser(__doc__, "/tmp/model-export-streamed-pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the pass (the reader thread aside)")
    parser.add_argument("--max-memory", default="0,all", help="budgets in bytes, in order; all: every layer")
    parser.add_argument("--base", help="a base folder to use instead of <workdir>/base-<size>")
    parser.add_argument("--adapter", help="an adapter folder to use instead of <workdir>/run-<size>/checkpoint-30")
    args = parser.parse_args()
    work = Path(args.workdir)
    base = Path(args.base or work / f"base-{args.size}")
    adapter = Path(args.adapter or work / f"run-{args.size}" / "checkpoint-30")
    if not base.is_dir():
        write_base(base, args.size)
    if not adapter.is_dir():
        write_adapter(adapter, base, qwen3_config(args.size))
    results = {}
    for budget in args.max_memory.split(","):
        size = 1 << 50 if budget == "all" else int(budget)
        settle(base)
        command = [sys.executable, "-c", PASS, str(base), str(adapter), str(size), str(args.passes), str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[budget] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"max_memory {budget}: {json.dumps(results[budget])}", flush=True)
    print(json.dumps({"size": args.size, "threads": args.threads, **results}, indent=2))


if __name__ == "__main__":
    main()
