"""Benchmark: model-export's streaming merge against PEFT merge_and_unload + save_pretrained and a plain copy.

    python benchmarks/merge_vs_peft.py              # Qwen3-4B shape (8 GB of bf16 weights; needs ~35 GB of disk)
    python benchmarks/merge_vs_peft.py --size 0.6b  # quick run

It writes a random-weight base of the Qwen3 shape (bf16, tied embeddings, sharded like the hub's)
and an r=16 LoRA on all seven linear projections, warms the page cache, then runs in one session,
each in its own process: `cp` of the weight files, PEFT, and `model-export merge`. It prints wall
time, peak RSS (from wait4) and the ratios against the targets, and checks that our output agrees
with PEFT's within one ulp on a sample of tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"wall_vs_peft": 0.25, "wall_vs_copy": 2.0, "peak_rss_gib": 1.5}

PEFT_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
if device == "cuda":
    open(os.environ["BENCH_GPU_PEAK"], "w").write(str(torch.cuda.max_memory_allocated()))
"""

OURS_GPU_SCRIPT = """
import os, sys, torch
from model_export import merge
merge(sys.argv[1], sys.argv[2], sys.argv[3], device="cuda", progress=False)
open(os.environ["BENCH_GPU_PEAK"], "w").write(str(torch.cuda.max_memory_allocated()))
"""


def qwen3_config(size: str) -> dict:
    from transformers import Qwen3Config

    config = Qwen3Config(
        **{
            "vocab_size": 151936,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": True,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            **SHAPES[size],
        }
    )
    data = config.to_dict()
    data["architectures"] = ["Qwen3ForCausalLM"]
    data["dtype"] = "bfloat16"
    return data


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, heads, kv, d = (
        config[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * d, h)),
            (p + "self_attn.k_proj.weight", (kv * d, h)),
            (p + "self_attn.v_proj.weight", (kv * d, h)),
            (p + "self_attn.o_proj.weight", (h, heads * d)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", True):  # Qwen3-8B and larger have their own head
        shapes.append(("lm_head.weight", (config["vocab_size"], h)))
    return shapes


def write_base(path: Path, size: str) -> None:
    import torch

    from model_export.checkpoint.hf_layout import write_index
    from model_export.demo.tiny import build_tokenizer
    from model_export.tensor_io import PlannedTensor, ShardWriter, plan_shards

    path.mkdir(parents=True)
    config = qwen3_config(size)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(path)
    # as every Qwen3 base ships it: generation stops on the chat's end-of-turn token (<|im_end|>, id 2 here)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}, indent=2))
    generator = torch.Generator().manual_seed(0)
    shapes = dict(tensor_shapes(config))
    shards = plan_shards([PlannedTensor(n, "BF16", s) for n, s in shapes.items()], 3_000_000_000)
    for shard in shards:
        writer = ShardWriter(path / shard.filename, shard.tensors, {"format": "pt"})
        for t in shard.tensors:
            value = torch.empty(t.shape, dtype=torch.float32).normal_(0, 0.02, generator=generator).to(torch.bfloat16)
            writer.write(value.view(-1).view(torch.uint8).numpy())
        writer.close()
    if len(shards) > 1:
        write_index(
            path,
            "model.safetensors.index.json",
            {t.name: s.filename for s in shards for t in s.tensors},
            sum(s.nbytes for s in shards),
        )


def write_adapter(path: Path, base: Path, config: dict, r: int = 16, seed: int = 1) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = dict(tensor_shapes(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in PROJECTIONS):
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = torch.randn(r, in_features, generator=generator) / in_features**0.5
        tensors[module + ".lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(str(path))


# Starts the measured command and reports its wait4 peak RSS (KiB) on stderr's last line. The measured process is
# forked from this small launcher, never from the benchmark: on Linux a child's ru_maxrss includes the high-water RSS
# its parent had at fork (a parent that once held 1 GB made `python3 -c pass` report 1038 MB), so a benchmark that
# wrote a base itself would inflate every figure it measured directly.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
sys.stderr.write("\\nLAUNCHER-MAXRSS-KIB %d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(command: list[str], gpu: bool = False, exit_codes: tuple[int, ...] = (0,), tree: bool = False) -> dict:
    """Run ``command`` in its own process; wall time and its own peak RSS (wait4, read by a small launcher process
    that starts it, so the benchmark's own memory never counts);
    with ``gpu``, also the peak GPU memory the process reports through BENCH_GPU_PEAK; with ``tree``, also the peak of
    the summed RSS of the process and all its children at once (sampled every 0.1 s: a process beside the run counts).
    An exit code outside ``exit_codes`` stops the benchmark; another accepted one is recorded as ``exit``."""
    import tempfile
    import threading

    peak_file = Path(tempfile.mkstemp()[1])
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "BENCH_GPU_PEAK": str(peak_file)},
    )
    tree_peak = [0]

    def sample() -> None:
        import psutil

        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                rss = 0
            tree_peak[0] = max(tree_peak[0], rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True) if tree else None
    if sampler:
        sampler.start()
    stderr = process.stderr.read().decode(errors="replace")
    _, status, _ = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in exit_codes:
        raise SystemExit(f"{command[0]} failed:\n{stderr[-3000:]}")
    maxrss = int(stderr.rsplit("LAUNCHER-MAXRSS-KIB ", 1)[1].split()[0])
    result = {"wall_s": round(wall, 2), "peak_rss_gib": round(maxrss * 1024 / 2**30, 2)}
    if sampler:
        sampler.join()
        result["peak_tree_rss_gib"] = round(tree_peak[0] / 2**30, 2)
    if code:
        result["exit"] = code
    if gpu:
        result["peak_gpu_gib"] = round(int(peak_file.read_text() or 0) / 2**30, 2)
    peak_file.unlink()
    return result


def target_line(value: float, limit: float, unit: str = "") -> str:
    """``<= 4.0 GiB: met`` (or ``NOT met``): a figure against its target, for a benchmark's summary."""
    return f"<= {limit}{unit}: {'met' if value <= limit else 'NOT met'}"


def warm(path: Path) -> None:
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            while fh.read(1 << 26):
                pass


def settle(base: Path, recycle: int = 0) -> None:
    """Flush dirty pages and warm the base; with ``recycle``, also touch and free that many bytes of memory (in a
    process of its own) just before the next tool starts. On this VM the first touch of a guest page the host has not
    backed costs far more than reusing a freed one: writing 1.2 GB into new page cache took 3.7 s of CPU with
    never-touched memory and 0.3 s right after numpy had touched and freed 3 GB (1.5-2.0 s when 5 s passed between the
    two: the VM hands freed memory back). Without it, each tool's writes cost what the VM's state at that moment makes
    them cost."""
    subprocess.run(["sync"], check=True)
    warm(base)
    if recycle:
        # numpy's large arrays ask for transparent huge pages; memory touched by b"1" * n did not help (3.6 s again)
        subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({int(recycle)}, numpy.uint8)"], check=True)


def recycle_bytes(base: Path) -> int:
    """What settle recycles before each tool: three times the base's bytes (its output, PEFT's model and margin), at
    most the available memory less 2 GiB."""
    import psutil

    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    return max(0, min(3 * size, psutil.virtual_memory().available - (2 << 30)))


def agreement(ours: Path, peft: Path, sample: int = 12) -> int:
    """Largest ulp distance between our output and PEFT's over a sample of merged tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from safetensors import safe_open

    from tests.reference import max_ulp

    def locate(root: Path) -> dict[str, Path]:
        index = root / "model.safetensors.index.json"
        if index.is_file():
            return {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(root / "model.safetensors"), "pt") as f:
            return {k: root / "model.safetensors" for k in f.keys()}

    mine, theirs = locate(ours), locate(peft)
    names = [n for n in sorted(theirs) if "proj" in n][:: max(1, len(theirs) // sample)][:sample]
    worst = 0
    for name in names:
        with safe_open(str(mine[name]), "pt") as a, safe_open(str(theirs[name]), "pt") as b:
            worst = max(worst, max_ulp(a.get_tensor(name), b.get_tensor(name)))
    return worst


def child(*args: str) -> str:
    """Run a step of this script in a child process, so that this parent stays small: a forked child
    inherits the parent's peak RSS in its own ru_maxrss, which would inflate every measurement."""
    return run_captured([sys.executable, __file__, *args])


def run_captured(command: list[str]) -> str:
    """Run ``command``; its stdout, or exit with the end of its stderr when it fails."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip()


def bench_parser(description: str, workdir: str) -> argparse.ArgumentParser:
    """The options every benchmark over the generated Qwen3-shaped base shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="4b")
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--internal", nargs="+", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = bench_parser(__doc__, "/tmp/model-export-bench")
    parser.add_argument("--skip-peft", action="store_true", help="only copy and model-export (no PEFT run)")
    parser.add_argument(
        "--no-recycle", action="store_true", help="do not touch and free memory before each tool (see settle)"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: PEFT merges on the GPU, and model-export runs both --device cpu and --device cuda",
    )
    args = parser.parse_args()
    if args.internal:
        step, *rest = args.internal
        if step == "prepare":
            work = Path(rest[0])
            write_base(work / "base", args.size)
            write_adapter(work / "adapter", work / "base", json.loads((work / "base" / "config.json").read_text()))
        else:
            print(agreement(Path(rest[0]), Path(rest[1])))
        return

    work = Path(args.workdir) / args.size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, adapter = work / "base", work / "adapter"
    t0 = time.perf_counter()
    child("--size", args.size, "--internal", "prepare", str(work))
    print(
        f"inputs written in {time.perf_counter() - t0:.1f} s: base "
        f"{sum(f.stat().st_size for f in base.glob('*.safetensors')) / 1e9:.2f} GB"
    )
    results = {}
    # Each tool starts with the base in the page cache, no dirty pages waiting (sync, untimed) and, unless --no-recycle,
    # memory freed just before (settle); none of them syncs its own output, as cp and save_pretrained do not.
    recycle = 0 if args.no_recycle else recycle_bytes(base)
    results["recycled_gb"] = round(recycle / 1e9, 2)
    settle(base, recycle)
    (work / "copy").mkdir()
    results["copy"] = timed(["sh", "-c", f"cp {base}/*.safetensors {work / 'copy'}/"])
    settle(base, recycle)
    merge_cli = [
        sys.executable,
        "-m",
        "model_export.cli",
        "merge",
        "--adapter",
        str(adapter),
        "--base",
        str(base),
        "--log-level",
        "WARNING",
    ]
    results["model-export"] = timed(merge_cli + ["--out", str(work / "ours"), "--device", "cpu"])
    gpu = args.device == "cuda"
    if gpu:
        settle(base, recycle)
        results["model-export-cuda"] = timed(
            [sys.executable, "-c", OURS_GPU_SCRIPT, str(adapter), str(base), str(work / "ours-cuda")], gpu=True
        )
    if not args.skip_peft:
        settle(base, recycle)
        results["peft"] = timed(
            [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "peft"), args.device], gpu=gpu
        )
        results["max_ulp_vs_peft"] = int(child("--internal", "compare", str(work / "ours"), str(work / "peft")))
        if gpu:
            results["max_ulp_cuda_vs_peft"] = int(
                child("--internal", "compare", str(work / "ours-cuda"), str(work / "peft"))
            )
    report(results)
    (Path(args.workdir) / f"merge-{args.size}.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    ours, copy = results["model-export"], results["copy"]
    print(f"\nmemory touched and freed before each tool: {results.get('recycled_gb', 0)} GB")
    print(f"{'tool':<20}{'wall (s)':>10}{'peak RSS (GiB)':>16}{'peak GPU (GiB)':>16}")
    for name in ("peft", "model-export", "model-export-cuda", "copy"):
        if name in results:
            r = results[name]
            gpu = f"{r['peak_gpu_gib']:>16.2f}" if "peak_gpu_gib" in r else f"{'-':>16}"
            print(f"{name:<20}{r['wall_s']:>10.2f}{r['peak_rss_gib']:>16.2f}{gpu}")
    ratios = {"wall_vs_copy": round(ours["wall_s"] / copy["wall_s"], 2)}
    if "peft" in results:
        ratios["wall_vs_peft"] = round(ours["wall_s"] / results["peft"]["wall_s"], 2)
        ratios["rss_vs_peft"] = round(ours["peak_rss_gib"] / results["peft"]["peak_rss_gib"], 3)
        print(
            f"max ulp difference from PEFT on sampled tensors: {results['max_ulp_vs_peft']}"
            + (f" (cuda merge: {results['max_ulp_cuda_vs_peft']})" if "max_ulp_cuda_vs_peft" in results else "")
        )
    for key, value in ratios.items():
        target = TARGETS.get(key)
        print(
            f"{key}: {value}" + (f" (target <= {target}: {'met' if value <= target else 'NOT met'})" if target else "")
        )
    rss_ok = ours["peak_rss_gib"] <= TARGETS["peak_rss_gib"]
    print(
        f"peak RSS: {ours['peak_rss_gib']} GiB (target <= {TARGETS['peak_rss_gib']}: {'met' if rss_ok else 'NOT met'})"
    )
    results["ratios"] = ratios


if __name__ == "__main__":
    main()
