"""Benchmark the artifacts: load time, time to first token, decode speed, peak memory.

Each artifact runs in a child process of its own (so its peak RSS, which the child reports from
getrusage, is its own and one artifact's memory never inflates another's), in the runtime a user would deploy it with:
transformers for safetensors and PyTorch folders (on the GPU when ``device_map`` allows, with its
peak GPU memory), onnxruntime for ONNX graphs, llama.cpp (llama-cpp-python) for GGUF files. Per
artifact: one warm-up, then ``repeats`` timed runs, medians reported. Decode speed is measured at
batch 1 and, where the runtime batches, at ``batch_size``.

    from model_export.pipeline.benchmark import benchmark
    results = benchmark("./export-demo")        # a run directory, or one artifact
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ValidationError
from ..monitoring import logger
from ..runtimes import runtime_name

__all__ = ["benchmark", "ArtifactBenchmark", "artifacts_of", "BENCHMARK_FILE"]

BENCHMARK_FILE = "benchmark/benchmark.json"
DEFAULT_PROMPT = "Write a haiku about autumn."


@dataclass
class ArtifactBenchmark:
    label: str
    artifact: str
    runtime: str
    prompt_tokens: int
    new_tokens: int
    load_s: float | None = None
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    batch_size: int = 1
    decode_tokens_per_s_batch: float | None = None
    peak_rss_gib: float | None = None
    device: str = "cpu"  # where it ran: cpu, or the GPU's name
    peak_gpu_gib: float | None = None  # torch's peak allocation on the GPU
    repeats: int = 0
    note: str | None = None
    error: str | None = None  # failed: the runtime started but could not load or run the artifact
    runs: list[dict[str, float]] = field(default_factory=list)
    status: str = "measured"  # measured | failed | not_run, as the run's verdicts: a runtime that could not start
    reason: str | None = None  # not_run: why (the runtime's package missing, or installed but failing to import)


def artifacts_of(target: str | Path) -> list[tuple[str, Path]]:
    """(label, path) of what to benchmark: every artifact of a run directory (its run.json), of every adapter of a
    batch's output_dir (batch.json), or ``target`` itself."""
    target = Path(target)
    if not target.exists():
        raise ValidationError("benchmark_target_missing", path=str(target))
    manifest = target / "run.json"
    if manifest.is_file():
        from ..exporters import FORMATS
        from ..verify.artifacts import verifiable
        from .manifest import RunManifest

        artifacts = RunManifest.load(manifest).export().artifacts
        found = verifiable({f: p for f, p in artifacts.items() if f in FORMATS})
        if "gguf_lora" in artifacts:  # a batch adapter's LoRA GGUF, run on the base GGUF its Modelfile names
            found.append(("gguf_lora", Path(artifacts["gguf_lora"]) / "adapter-lora-f32.gguf"))
        if "onnx_adapter" in artifacts:  # an .onnx_adapter, active on its base graph in onnxruntime-genai
            from ..runtimes.genai import ADAPTER_FILE

            found.append(("onnx_adapter", Path(artifacts["onnx_adapter"]) / ADAPTER_FILE))
        return found  # a PEFT folder is files for vLLM, not a model to time alone
    if (target / "batch.json").is_file():  # a batch: every adapter's run, labelled with its name
        runs = sorted(p.parent for p in target.glob("*/run.json") if p.parent.name != "base")
        found = [(f"{run.name}/{label}", path) for run in runs for label, path in artifacts_of(run)]
        if found:
            return found
    from ..runtimes import runnables_in

    found = runnables_in(target)
    if found:
        return found
    raise ValidationError("benchmark_target_empty", path=str(target))


def benchmark(
    target: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    out: str | Path | None = None,
    device_map: str = "auto",
) -> list[ArtifactBenchmark]:
    """Benchmark every artifact of a run directory (or one artifact); write benchmark/benchmark.json into a run
    directory.

    ``device_map`` places the transformers runs (cpu, cuda, auto: the GPU when there is one).
    An artifact whose runtime cannot start here (its package missing, or installed but failing to import) is
    ``not_run`` with the reason, as in the run's verification; one that its runtime cannot load or run is ``failed``.
    Raises ValidationError: ME605 when ``target`` does not exist, ME606 when it holds nothing to benchmark;
    ResourceError (ME405) for device_map cuda without a GPU.
    """
    from ..checkpoint.loading import resolve_device
    from ..runtimes import runtime_problem

    target = Path(target)
    found = artifacts_of(target)
    device = resolve_device(device_map)
    results = []
    for label, path in found:
        problem = runtime_problem(path)
        if problem is not None:
            logger.warning(i18n.ui("benchmark_not_run", artifact=path, reason=problem))
            results.append(
                ArtifactBenchmark(label, str(path), runtime_name(path), 0, new_tokens, status="not_run", reason=problem)
            )
            continue
        logger.info(i18n.ui("benchmark_running", label=label, artifact=path))
        results.append(_child(label, path, prompt, new_tokens, batch_size, repeats, device))
    destination = Path(out) if out else (target / BENCHMARK_FILE if (target / "run.json").is_file() else None)
    if destination:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    return results


def _child(
    label: str, path: Path, prompt: str, new_tokens: int, batch_size: int, repeats: int, device: str = "cpu"
) -> ArtifactBenchmark:
    """Run one artifact's benchmark in its own process, which reports its own peak RSS (getrusage)."""
    command = [
        sys.executable,
        "-m",
        "model_export.pipeline.benchmark",
        str(path),
        prompt,
        str(new_tokens),
        str(batch_size),
        str(repeats),
        device,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    stdout, stderr = process.communicate()
    data = json.loads(stdout.decode().strip().splitlines()[-1]) if process.returncode == 0 and stdout.strip() else None
    if data is None:
        error = (stderr.decode(errors="replace").strip().splitlines() or ["the benchmark process failed"])[-1]
        return ArtifactBenchmark(
            label, str(path), runtime_name(path), 0, new_tokens, error=error[:400], status="failed"
        )
    peak = data.pop("peak_rss_kib")
    return ArtifactBenchmark(label=label, peak_rss_gib=round(peak / 2**20, 3), **data)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 5)


def _prompt_ids(path: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    from ..runtimes import tokenizer_folder
    from ..verify.reference import encode_prompt

    return encode_prompt(AutoTokenizer.from_pretrained(str(tokenizer_folder(path))), prompt).tolist()


def _measure(
    path: Path, prompt: str, new_tokens: int, batch_size: int, repeats: int, device: str = "cpu"
) -> dict[str, Any]:
    """In the child: load, warm up, time ``repeats`` runs at batch 1 and at ``batch_size``."""
    from ..runtimes import runtime_for

    runtime = runtime_name(path)
    # The onnxruntime and llama-cpp-python builds installed are CPU ones; a TensorRT engine runs on the GPU.
    device = device if runtime == "transformers" else "cuda" if runtime == "tensorrt" else "cpu"
    start = time.perf_counter()
    runner = runtime_for(path, device, optimized=True)
    load = time.perf_counter() - start
    ids = runner.tokenize(prompt) or _prompt_ids(path, prompt)
    runner.timed(ids, 2, 1)  # warm-up
    runs = [runner.timed(ids, new_tokens, 1) for _ in range(repeats)]
    data = {
        "artifact": str(path),
        "runtime": runtime,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "load_s": round(load, 5),
        "ttft_s": _median([r[0] for r in runs]),
        "decode_tokens_per_s": round(new_tokens / _median([r[1] for r in runs]), 3),
        "batch_size": batch_size,
        "runs": [{"ttft_s": round(t, 5), "decode_s": round(d, 5)} for t, d in runs],
    }
    if batch_size > 1 and runner.batches:
        batch_runs = [runner.timed(ids, new_tokens, batch_size)[1] for _ in range(repeats)]
        data["decode_tokens_per_s_batch"] = round(batch_size * new_tokens / _median(batch_runs), 3)
    elif batch_size > 1:
        data["note"] = f"{runtime} through its Python binding decodes one sequence: batch {batch_size} not measured"
    import resource

    data["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data["device"] = "cpu"
    if device == "cuda":
        import torch

        data["device"] = torch.cuda.get_device_name()
        data["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return data


if __name__ == "__main__":  # the child process of _child
    path_arg, prompt_arg, tokens_arg, batch_arg, repeats_arg, device_arg = sys.argv[1:7]
    print(
        json.dumps(_measure(Path(path_arg), prompt_arg, int(tokens_arg), int(batch_arg), int(repeats_arg), device_arg))
    )
