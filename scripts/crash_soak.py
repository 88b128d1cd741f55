"""Crash soak: kill pipeline runs at random points (SIGKILL), rerun them, and check every artifact is byte-identical
to an uninterrupted run's.

    python scripts/crash_soak.py --runs 50            # the recorded soak (docs/benchmarks.md)
    python scripts/crash_soak.py --runs 2             # what CI runs (tests/integration/test_crash_soak.py)

It trains the demo's LoRA once (tiny Qwen3, Trainer + PEFT), makes a clean run that also records how many
times each crash point is passed (MODEL_EXPORT_CRASH_COUNTS), then for each soak run: a fresh output
directory, one run killed at a random pass of a random point (it must die by SIGKILL), a second killed run
half of the time, then reruns until one completes; the artifacts (export/) must then hash as the clean
run's. Points: see model_export/faults.py. Exit code 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def digest(folder: Path) -> str:
    """Names and bytes of every file under ``folder`` (hidden step records excluded)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run(config: Path, env_extra: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_EXPORT_CRASH")}
    env.update(env_extra, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "model_export.cli", "--log-level", "WARNING", "run", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"run failed without being killed:\n{done.stderr[-3000:]}")
    return done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--formats", default="safetensors,pytorch,onnx,gguf")
    args = parser.parse_args()
    from model_export import ExportConfiguration
    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    work = args.workdir or Path(tempfile.mkdtemp(prefix="model-export-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    training = work / "qwen3-finetuned"
    if not (training / "checkpoint-30").is_dir():
        build_training_run(shipped_base(), training)

    def config_for(out: Path) -> Path:
        config = ExportConfiguration(
            checkpoint_path=str(training),
            base_model_name=str(shipped_base()),
            output_dir=str(out),
            export_formats=args.formats.split(","),
            max_shard_size="200KB",
        )
        path = work / f"{out.name}.json"
        path.write_text(config.model_dump_json(), encoding="utf-8")
        return path

    counts_file = work / "counts.json"
    started = time.perf_counter()
    if run(config_for(work / "clean"), {"MODEL_EXPORT_CRASH_COUNTS": str(counts_file)}) != 0:
        raise SystemExit("the clean run did not complete")
    expected = digest(work / "clean" / "export")
    counts = {k: v for k, v in json.loads(counts_file.read_text()).items() if v > 0}
    print(f"clean run: {counts} passes per point", flush=True)
    rng = random.Random(args.seed)
    failures, kills = [], 0
    for i in range(args.runs):
        out = work / f"soak-{i:03d}"
        points = []
        for _ in range(1 if rng.random() < 0.5 else 2):
            point = rng.choice(sorted(counts))
            points.append(f"{point}:{rng.randint(1, counts[point])}")
        for point in points:
            code = run(config_for(out), {"MODEL_EXPORT_CRASH_AT": point})
            kills += code == -signal.SIGKILL
        for _ in range(3):
            if run(config_for(out), {}) == 0:
                break
        same = digest(out / "export") == expected
        print(
            f"run {i + 1}/{args.runs}: killed at {', '.join(points)} -> {'identical' if same else 'DIFFERENT'}",
            flush=True,
        )
        if not same:
            failures.append((i, points))
    minutes = (time.perf_counter() - started) / 60
    print(f"{args.runs} runs, {kills} kills, {len(failures)} mismatches, {minutes:.1f} min; work in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
