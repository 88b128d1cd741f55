"""What a rerun costs after one setting changes (issue 25): a first run of the demo's Trainer run with safetensors, ONNX
and GGUF at int8, then the same run with a GGUF-only change (gguf_output_type=q6_k), then with a bound change
(validation_min_top1). Each run is its own `model-export run` process; printed: its wall time, the export and verify
steps' seconds from run.json, what each unit did, and the ratios against the first run.

    .venv/bin/python benchmarks/rerun.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(config: Path, *sets: str) -> tuple[float, dict, list[str]]:
    args = [sys.executable, "-m", "model_export.cli", "run", str(config)]
    for item in sets:
        args += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    steps = json.loads((config.parent / "out" / "run.json").read_text())["steps"]
    units = [line.split(" - INFO - ", 1)[1] for line in done.stderr.splitlines() if ":" in line and " reruns" in line]
    units += [line.split(" - INFO - ", 1)[1] for line in done.stderr.splitlines() if "judged again" in line]
    # a step skipped in this run keeps the seconds of the run that did it: it cost nothing here
    seconds = {name: 0.0 if steps[name].get("skipped") else steps[name]["seconds"] for name in ("export", "verify")}
    return wall, seconds, units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    work = args.workdir or Path(tempfile.mkdtemp(prefix="model-export-rerun-"))
    training = work / "qwen3-finetuned"
    if not (training / "checkpoint-30").is_dir():
        build_training_run(shipped_base(), training)
    config = work / "config.json"
    config.write_text(
        json.dumps(
            {
                "checkpoint_path": str(training),
                "base_model_name": str(shipped_base()),
                "output_dir": str(work / "out"),
                "export_formats": ["safetensors", "onnx", "gguf"],
                "quantization_level": "int8",
            }
        )
    )
    first = run(config)
    gguf = run(config, "gguf_output_type=q6_k")
    bound = run(config, "gguf_output_type=q6_k", "validation_min_top1=0.91")
    print("| run | wall (s) | export (s) | verify (s) | wall vs first | export+verify vs first |")
    print("|---|---:|---:|---:|---:|---:|")
    base = sum(first[1].values())
    for name, (wall, steps, _) in (("first", first), ("gguf_output_type=q6_k", gguf), ("+ validation_min_top1", bound)):
        both = sum(steps.values())
        print(
            f"| {name} | {wall:.2f} | {steps['export']:.2f} | {steps['verify']:.2f} | {wall / first[0]:.2f} | "
            f"{both / base:.2f} |"
        )
    for name, (_, _, units) in (("gguf_output_type=q6_k", gguf), ("+ validation_min_top1", bound)):
        print(f"\n{name}:")
        for unit in units:
            print(f"- {unit}")


if __name__ == "__main__":
    main()
