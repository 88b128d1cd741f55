"""Benchmark: the whole `model-export run` of the guide's case, per step, with verification as it was and as it is.

    python benchmarks/full_run.py                       # Qwen3-4B shape: both verification runtimes (~25 min here)
    python benchmarks/full_run.py --size 8b --runtimes auto
    python benchmarks/full_run.py --size 0.6b           # quick run
    python benchmarks/full_run.py --size 0.6b --runtimes auto --side-by-side off,on   # the reference beside or not
    python benchmarks/full_run.py --size 4b --runtimes auto --before before.json   # against a run of another commit

It writes the random-weight Qwen3-shaped base (bf16, vocabulary 151936, with a tokenizer) and r=16 LoRA on all seven
projections of benchmarks/merge_vs_peft.py as a Trainer checkpoint, then runs, each in its own process after warming
the page cache, the issue's configuration:

    export_formats: [safetensors, onnx, gguf]
    quantization_level: int4
    run_validation_tests: true

once per ``verification_runtime`` asked for: ``transformers`` (PEFT's unmerged model whole in fp32 for the reference,
the int4 safetensors decompressed whole by transformers: verification as it was before issue 16) and ``auto`` (on the
CPU, the reference and the safetensors artifacts layer-streamed). It prints the run's wall time and peak RSS (wait4),
each step's seconds and peak RSS (sampled by the run itself, from run.json), each artifact's verdict, the runtime that
ran it and its metrics, and the targets of issue 16.

Random weights give nearly flat logits (their spread is about 0.01), so int4 artifacts pick other top tokens than the
reference on about half the positions and fail the int4 bounds (top-1 >= 0.85): the run then ends with exit code 1
after judging every artifact and writing the report, as a user's would. The figures measure the work, which is the
same whatever the verdicts; the verdicts of the two runs are printed side by side (same reference, same metrics).
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
ISSUE28_PEAK_GIB = {"4b": 5.0}  # issue 28: the whole run's peak at 4B (onnxruntime alone holds ~3.9 GiB for int4)
VERIFY_BEFORE_S = {"4b": 261.0}  # the issue's measurement of verify with the whole-model runtimes, this machine
GIB = 2**30


def write_run(work: Path, size: str) -> tuple[Path, Path]:
    """The base and a Trainer-like run folder holding the adapter as checkpoint-30 (written once, kept in ``work``)."""
    base, checkpoint = work / f"base-{size}", work / f"run-{size}" / "checkpoint-30"
    if not base.is_dir():
        write_base(base, size)
    if not checkpoint.is_dir():
        write_adapter(checkpoint, base, qwen3_config(size))
    return base, checkpoint


def configuration(
    base: Path, checkpoint: Path, out: Path, runtime: str, side: str = "auto", extra: list[str] = ()
) -> str:
    import yaml

    settings = {
        "checkpoint_path": str(checkpoint),
        "base_model_name": str(base),
        "output_dir": str(out),
        "export_formats": ["safetensors", "onnx", "gguf"],
        "quantization_level": "int4",
        "run_validation_tests": True,
        "verification_runtime": runtime,
        "steps_side_by_side": side,
    }
    for item in extra:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    return json.dumps(settings, indent=2)


def issue28_targets(after: dict, before: dict, size: str) -> dict:
    """Issue 28's targets: verify at most merge + export in the same run; the whole run at most half of the run before
    (another commit, same machine and day); peak RSS at most 5 GiB at 4B. Verify's time counts the reference computed
    beside the export (verify:reference), as the run spent it."""

    def seconds(result: dict, step: str) -> float:
        return (result["steps"].get(step) or {}).get("seconds") or 0.0

    merge_export = seconds(after, "merge") + seconds(after, "export")
    verify = seconds(after, "verify") + seconds(after, "verify:reference")
    targets = {
        "verify_s": round(verify, 1),
        "merge_plus_export_s": round(merge_export, 1),
        "verify_vs_merge_export": target_line(verify, merge_export, " s"),
        "wall_vs_before": target_line(after["wall_s"], 0.5 * before["wall_s"], " s"),
        "wall_ratio": round(after["wall_s"] / before["wall_s"], 3),
        "verify_before_s": round(seconds(before, "verify") + seconds(before, "verify:reference"), 1),
    }
    peak = ISSUE28_PEAK_GIB.get(size)
    if peak:
        targets["peak"] = target_line(after["peak_tree_rss_gib"], peak, " GiB")
    return targets


def summarize(out: Path) -> dict:
    """Per step seconds and peak RSS, and per artifact verdict, from what the run wrote."""
    manifest = json.loads((out / "run.json").read_text())
    steps = {
        name: {
            "seconds": step.get("seconds"),
            "peak_rss_gib": round(step["peak_rss"] / GIB, 2) if step.get("peak_rss") else None,
        }
        for name, step in manifest["steps"].items()
    }
    report = json.loads((out / "report.json").read_text())
    verdicts = {
        row["format"]: {
            "status": row["status"],
            "runtime": row.get("runtime"),
            "gb": round((row.get("bytes") or 0) / 1e9, 2),
            "top1": row.get("top1"),
            "kl": row.get("mean_kl"),
            "perplexity": row.get("perplexity"),
            "reference_perplexity": row.get("reference_perplexity"),
        }
        for row in report.get("artifacts", [])
    }
    samples = report.get("memory_samples") or []
    peak = max(samples, key=lambda sample: sample[1], default=None)
    if peak:
        steps["peak_at_s"] = peak[0]  # seconds into the run when the sampled RSS peaked (find the step in the log)
    return {"status": report.get("status"), "steps": steps, "verdicts": verdicts}


def main() -> None:
    parser = bench_parser(__doc__, str(Path(tempfile.gettempdir()) / "model-export-full-run"))
    parser.add_argument("--runtimes", default="transformers,auto", help="verification_runtime values, in order")
    parser.add_argument("--side-by-side", default="auto", help="steps_side_by_side values, in order (auto, on, off)")
    parser.add_argument(
        "--before",
        help="a JSON file of one run's printed result (the object after 'auto:') made by another commit on this "
        "machine the same day: the issue 28 targets are printed against it",
    )
    parser.add_argument("--set", action="append", default=[], help="KEY=YAML value added to the run's configuration")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, checkpoint = write_run(work, args.size)
    exe = Path(sys.executable).with_name("model-export")
    results = {}
    sides = args.side_by_side.split(",")
    for runtime in args.runtimes.split(","):
        for side in sides:
            name = runtime if len(sides) == 1 else f"{runtime}/{side}"
            out = work / f"out-{args.size}-{runtime}-{side}"
            shutil.rmtree(out, ignore_errors=True)
            config = work / f"{runtime}-{side}.yaml"
            config.write_text(configuration(base, checkpoint, out, runtime, side, args.set))
            settle(base)
            run = timed([str(exe), "run", str(config)], exit_codes=(0, 1), tree=True)  # 1: an artifact failed
            results[name] = {**run, **summarize(out)}
            print(f"{name}: {json.dumps(results[name], indent=2)}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    shown = ("wall_s", "peak_rss_gib", "peak_tree_rss_gib")
    summary = {"size": args.size, **{r: {k: v[k] for k in shown} for r, v in results.items()}}
    if {"transformers", "auto"} <= set(results):
        before, after = results["transformers"], results["auto"]
        summary["peak_ratio"] = round(after["peak_rss_gib"] / before["peak_rss_gib"], 3)
        summary["wall_ratio"] = round(after["wall_s"] / before["wall_s"], 3)
        summary["verify_s"] = {r: results[r]["steps"].get("verify", {}).get("seconds") for r in results}
    if "auto" in results:
        after = results["auto"]
        target = TARGET_PEAK_GIB.get(args.size)
        if target:
            summary["target_peak"] = target_line(after["peak_rss_gib"], target, " GiB")
        before_verify = VERIFY_BEFORE_S.get(args.size)
        verify = after["steps"].get("verify", {}).get("seconds")
        if before_verify and verify:
            summary["target_verify"] = target_line(verify, before_verify, " s")
    if args.before and "auto" in results:
        before = json.loads(Path(args.before).read_text())
        summary["issue28"] = issue28_targets(results["auto"], before, args.size)
        summary["verdicts_before"] = {f: (v["status"], v["top1"], v["kl"]) for f, v in before["verdicts"].items()}
        summary["verdicts_after"] = {
            f: (v["status"], v["top1"], v["kl"]) for f, v in results["auto"]["verdicts"].items()
        }
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
