"""Benchmark: 8 adapters on one base, as 8 separate `model-export run` invocations against one batch run (issue 18).

    python benchmarks/batch.py                      # Qwen3-0.6B shape, 8 adapters (~40 min here)
    python benchmarks/batch.py --adapters 2 --size 0.6b --modes separate,local
    python benchmarks/batch.py --adapters 2 --size 4b --modes local --formats safetensors

It writes the random-weight Qwen3-shaped base (bf16, benchmarks/merge_vs_peft.py) once and N r=16 LoRA adapters on all
seven projections (different seeds), each as a Trainer run folder (run-K/checkpoint-30), then runs, each timed from
the outside with the page cache warm:

    separate   one `model-export run` per adapter, one after the other (what a user scripts today)
    local      one `model-export run` of the sweep folder: the batch, local pool, batch_outputs merged
    ray        the same with executor: ray (a local Ray instance started by the run)
    adapters   the batch with batch_outputs: adapters (the base converted once: with gguf its GGUF, with onnx its graph
               that takes LoRA inputs; per adapter a PEFT folder, a LoRA GGUF and Modelfile, an .onnx_adapter)

Every mode uses export_formats [safetensors, gguf] (or --formats) at the base's precision and verifies every artifact;
ONNX without the optimized copy (onnx_optimize_graph false: eight merged copies of both graphs would not fit the disk,
and a base graph for adapters is written as one graph). It prints the wall time, the peak of the summed resident
memory of the whole process tree (sampled every 0.2 s: a pool's two workers and Ray's processes count together), the
disk the mode wrote (everything, and the artifacts alone: export/ folders and, for adapters, the base's), the artifacts
verified, and each batch's ratio to the separate runs' total (target: <= 0.5) with the machine's memory as the RSS
limit.

    python benchmarks/batch.py --size 0.6b --modes local,adapters --formats onnx   # issue 29: adapters vs merged
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_peft import bench_parser, qwen3_config, settle, write_adapter, write_base  # noqa: E402

TARGET_RATIO = 0.5
MODES = ("separate", "local", "ray", "adapters")
CLI = str(Path(sys.executable).with_name("model-export"))


def write_sweep(work: Path, size: str, adapters: int) -> tuple[Path, Path]:
    """The base and a sweep folder of ``adapters`` Trainer-like runs (written once, kept in ``work``)."""
    base, sweep = work / f"base-{size}", work / f"sweep-{size}"
    if not base.is_dir():
        write_base(base, size)
    for k in range(adapters):
        checkpoint = sweep / f"run-{k}" / "checkpoint-30"
        if not checkpoint.is_dir():
            write_adapter(checkpoint, base, qwen3_config(size), seed=1000 + k)
    return base, sweep


class TreePeak:
    """The peak of the summed RSS of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed_tree(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall time, exit code and the peak summed RSS of its process tree."""
    start = time.perf_counter()
    with log.open("w") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreePeak(process.pid)
        code = process.wait()
    peak = sampler.stop()
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_gib": round(peak / 2**30, 2), "exit": code}


FORMATS = ["safetensors", "gguf"]


def write_config(path: Path, **settings) -> Path:
    base = {
        "export_formats": FORMATS,
        "run_validation_tests": True,
        "onnx_optimize_graph": False,
        **settings,
    }
    path.write_text(json.dumps(base, indent=1))
    return path


def verdicts(out: Path) -> dict[str, int]:
    """Artifacts verified / failed / not run, over every run folder under ``out`` (itself, or its adapters)."""
    counts = {"verified": 0, "failed": 0, "not_run": 0}
    for report in [out / "report.json", *out.glob("*/report.json")]:
        if report.is_file():
            for row in json.loads(report.read_text()).get("artifacts", []):
                counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def run_mode(mode: str, base: Path, sweep: Path, work: Path, adapters: int) -> dict:
    out = work / f"out-{mode}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    settle(base)
    common = {"base_model_name": str(base)}
    if mode == "separate":
        results = []
        for k in range(adapters):
            config = write_config(
                work / f"separate-{k}.json",
                checkpoint_path=str(sweep / f"run-{k}"),
                output_dir=str(out / f"run-{k}"),
                **common,
            )
            results.append(timed_tree([CLI, "run", str(config)], work / f"separate-{k}.log"))
        counts: dict[str, int] = {}
        for k in range(adapters):
            for status, n in verdicts(out / f"run-{k}").items():
                counts[status] = counts.get(status, 0) + n
        return {
            **disk(out),
            "wall_s": round(sum(r["wall_s"] for r in results), 2),
            "peak_gib": max(r["peak_gib"] for r in results),
            "exit": max(r["exit"] for r in results),
            "per_run_s": [r["wall_s"] for r in results],
            "artifacts": counts,
        }
    settings = {"checkpoint_path": str(sweep), "output_dir": str(out), **common}
    if mode == "ray":
        settings["executor"] = "ray"
    if mode == "adapters":
        settings["batch_outputs"] = "adapters"
    config = write_config(work / f"{mode}.json", **settings)
    result = timed_tree([CLI, "run", str(config)], work / f"{mode}.log")
    batch = json.loads((out / "batch.json").read_text())
    result.update(artifacts=verdicts(out), executor=batch["executor"], base_s=_base_seconds(out), **disk(out))
    return result


def disk(out: Path) -> dict[str, float]:
    """GB the mode wrote under ``out``: every file, and the artifacts alone (every export/ folder, the base's too)."""

    def size(files) -> float:
        return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e9, 3)

    return {
        "disk_gb": size(out.rglob("*")),
        "artifacts_gb": size(f for e in out.glob("**/export") for f in e.rglob("*")),
    }


def _base_seconds(out: Path) -> float:
    """Seconds the batch spent on its shared base work (base/run.json)."""
    try:
        steps = json.loads((out / "base" / "run.json").read_text())["steps"]
    except OSError:
        return 0.0
    return round(sum(s.get("seconds") or 0 for s in steps.values()), 2)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], "model-export-bench-batch")
    parser.set_defaults(size="0.6b")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="export_formats (4B: safetensors alone fits the disk)"
    )
    args = parser.parse_args()
    FORMATS[:] = args.formats.split(",")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, sweep = write_sweep(work, args.size, args.adapters)
    saved = work / f"results-{args.size}-{args.adapters}.json"  # modes run earlier (another invocation) are kept
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for mode in args.modes.split(","):
        print(f"running {mode} ...", flush=True)
        results[mode] = run_mode(mode, base, sweep, work, args.adapters)
        print(json.dumps({mode: results[mode]}), flush=True)
        saved.write_text(json.dumps(results, indent=1))
        if not args.keep:  # 8 merged adapters write ~19 GB at this shape: one mode's outputs at a time
            subprocess.run(["rm", "-rf", str(work / f"out-{mode}")], check=True)
    results = {mode: results[mode] for mode in MODES if mode in results}
    limit = psutil.virtual_memory().total / 2**30
    print(f"\n{args.adapters} adapters, Qwen3-{args.size} shape, export_formats {FORMATS}, verified")
    print(
        f"{'mode':<10} {'wall s':>9} {'peak GiB':>9} {'ratio':>7} {'disk GB':>8} {'artifacts GB':>12}  "
        "verified/failed/not run"
    )
    separate = results.get("separate", {}).get("wall_s")
    for mode, r in results.items():
        ratio = f"{r['wall_s'] / separate:.2f}" if separate else "-"
        a = r["artifacts"]
        print(
            f"{mode:<10} {r['wall_s']:>9.1f} {r['peak_gib']:>9.2f} {ratio:>7} {r.get('disk_gb', 0):>8.2f} "
            f"{r.get('artifacts_gb', 0):>12.2f}  {a['verified']}/{a['failed']}/{a['not_run']}"
        )
    for mode, r in results.items():
        if mode != "separate" and separate:
            met = r["wall_s"] / separate <= TARGET_RATIO and r["peak_gib"] <= limit
            print(
                f"target {mode}: wall {r['wall_s'] / separate:.2f}x the separate runs (<= {TARGET_RATIO}), peak "
                f"{r['peak_gib']:.2f} GiB (<= {limit:.1f}): {'met' if met else 'NOT met'}"
            )

    merged, alone = results.get("local"), results.get("adapters")
    if merged and alone and merged.get("artifacts_gb"):  # issue 29: the adapters on one base against merged copies
        print(
            f"adapters vs merged copies (local): wall {alone['wall_s'] / merged['wall_s']:.2f}x, artifacts on disk "
            f"{alone['artifacts_gb'] / merged['artifacts_gb']:.3f}x, everything written "
            f"{alone['disk_gb'] / merged['disk_gb']:.3f}x"
        )


if __name__ == "__main__":
    main()
