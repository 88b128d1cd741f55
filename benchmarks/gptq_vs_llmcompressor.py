"""Benchmark: our GPTQ against llm-compressor's on the same layers and calibration inputs (issue 17, item 4).

    python benchmarks/gptq_vs_llmcompressor.py
    python benchmarks/gptq_vs_llmcompressor.py --model /tmp/model-export-quality/model   # a trained model's layers
    python benchmarks/gptq_vs_llmcompressor.py --size 0.6b      # every matrix of two layers of the 0.6B shape

llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19, so it cannot be installed beside this project;
its GPTQ kernel (``llmcompressor/modifiers/gptq/gptq_quantize.py`` and ``helpers.py``) only needs torch and
compressed-tensors, so this script downloads its wheel from PyPI (``pip download --no-deps``) into the work folder and
imports those two files alone. For each layer: the relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 on the
calibration inputs of ours, llm-compressor's, onnxruntime's GPTQ mode and round-to-nearest, group 128, without and
with activation order (llm-compressor's ``actorder: weight``), and each one's time.

Layers: three random ones with correlated inputs (the unit tests' shape, 96 x 256), and with ``--model`` every
matrix of the first decoder layer of a saved model, with inputs from 16 x 256 tokens of text (the stdlib source the
quality benchmark trains on). With ``--size``, every matrix of decoder layers 0 and 14 of the random-weight Qwen3 shape
of benchmarks/merge_vs_peft.py (written once into the work folder), on the default calibration's 16 x 256 tokens
(random ids, as benchmarks/calibration_cost.py): both implementations timed on the same matrices, one after the
other in this process (each inverts its own Hessian, as llm-compressor does per module), and the per-layer totals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llmcompressor_gptq(work: Path):
    """llm-compressor's quantize_weight, from its wheel, without importing the rest of llm-compressor."""
    wheel = next(work.glob("llmcompressor-*.whl"), None)
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llmcompressor", "-d", str(work)],
            check=True,
            capture_output=True,
        )
        wheel = next(work.glob("llmcompressor-*.whl"))
    root = work / "llmcompressor-src"
    with zipfile.ZipFile(wheel) as archive:
        for name in ("helpers.py", "gptq_quantize.py"):
            archive.extract(f"llmcompressor/modifiers/gptq/{name}", root)
    for package in ("llmcompressor", "llmcompressor.modifiers", "llmcompressor.modifiers.gptq"):
        sys.modules.setdefault(package, types.ModuleType(package))
    modules = {}
    for name in ("helpers", "gptq_quantize"):
        full = f"llmcompressor.modifiers.gptq.{name}"
        spec = importlib.util.spec_from_file_location(full, root / "llmcompressor/modifiers/gptq" / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[full] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules["gptq_quantize"].quantize_weight, wheel.name


def error(weight, approx, hessian) -> float:
    delta = weight - approx
    return float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())


def random_layers() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    layers = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(96, 256, generator=g) * 0.05
        mixing = torch.randn(256, 256, generator=g) / 16
        x = (torch.randn(768, 256, generator=g) @ mixing) * torch.exp(torch.randn(256, generator=g))
        layers.append((f"random {seed}", weight, x.T @ x))
    return layers


def model_layers(model_dir: Path, samples: list[list[int]] | None = None, layers: tuple[int, ...] = (0,)) -> list:
    """Every matrix of the given decoder layers of a saved model, with the Hessian sum of its inputs on ``samples``
    (by default 16 x 256 tokens of the quality benchmark's text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if samples is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quant_quality import SEQ, calibration_file

        from model_export.quantize.calibration import calibration_samples

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        text = calibration_file(model_dir, Path(tempfile.mkdtemp()))
        samples = calibration_samples(text, tokenizer, 16, SEQ).samples
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hessians, found = {}, []
    for index in layers:
        for name, module in model.model.layers[index].named_modules():
            if isinstance(module, torch.nn.Linear):

                def record(module, args, key=f"layer {index} {name}"):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    hessians[key] = hessians.get(key, 0) + x.T @ x

                module.register_forward_pre_hook(record)
                found.append((f"layer {index} {name}", module))
    with torch.no_grad():
        model.model(torch.tensor(samples))  # the decoder only: the head is not quantized
    return [(key, module.weight.detach().clone(), hessians[key]) for key, module in found]


def shape_layers(size: str, work: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Layers 0 and the middle one of the random-weight shape, on the default calibration's token count."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from merge_vs_peft import SHAPES, write_base

    base = work / f"base-{size}"
    if not base.is_dir():
        write_base(base, size)
    random.seed(0)
    samples = [[random.randrange(1000, 100000) for _ in range(256)] for _ in range(16)]
    return model_layers(base, samples, (0, SHAPES[size]["num_hidden_layers"] // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "model-export-gptq"))
    parser.add_argument("--model", help="a saved model folder: also its first decoder layer's matrices")
    parser.add_argument("--size", help="a shape of benchmarks/merge_vs_peft.py (0.6b): two of its layers, timed")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    quantize_weight, wheel = llmcompressor_gptq(work)
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from onnxruntime.quantization.neural_compressor.weight_only import gptq as onnxruntime_gptq

    from model_export.quantize.gptq import gptq, rtn

    layers = random_layers() + (model_layers(Path(args.model)) if args.model else [])
    shaped = shape_layers(args.size, work) if args.size else []
    layers += shaped
    timed_only = {label for label, _, _ in shaped}  # onnxruntime's float64 numpy loop is left out at these widths
    rows = []
    for label, weight, hessian in layers:
        for act_order in (False, True):
            quant_args = QuantizationArgs(
                num_bits=4,
                type="int",
                symmetric=True,
                strategy="group",
                group_size=128,
                actorder="weight" if act_order else None,
            )
            blocks = weight.reshape(weight.shape[0], -1, 128)
            scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), quant_args)
            start = time.perf_counter()
            theirs = quantize_weight(
                weight[None].clone(), hessian[None].clone(), scale[None], zero[None], None, quant_args
            )[0][0]
            theirs_s = time.perf_counter() - start
            start = time.perf_counter()
            levels, scales = gptq(weight, hessian, group_size=128, act_order=act_order)
            ours_s = time.perf_counter() - start
            ours = levels.float() * scales.repeat_interleave(128, dim=1)
            row = {
                "layer": label,
                "shape": list(weight.shape),
                "act_order": act_order,
                "ours": error(weight, ours, hessian),
                "llm_compressor": error(weight, theirs, hessian),
                "round_to_nearest": error(
                    weight, (lambda q, s: q.float() * s.repeat_interleave(128, 1))(*rtn(weight, 128)), hessian
                ),
                "ours_s": round(ours_s, 3),
                "llm_compressor_s": round(theirs_s, 3),
            }
            if not act_order and label not in timed_only:
                q = onnxruntime_gptq(
                    weight.T.double().numpy().copy(),
                    hessian.double().numpy().copy(),
                    num_bits=4,
                    group_size=128,
                    scheme="sym",
                    blocksize=128,
                    percdamp=0.01,
                )
                row["onnxruntime"] = error(weight, torch.from_numpy(np.asarray(q)).T.float(), hessian)
            row["ours_vs_llm_compressor"] = row["ours"] / row["llm_compressor"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = [r["ours_vs_llm_compressor"] for r in rows]
    summary = {"llm_compressor": wheel, "worst_ratio": max(ratios), "best_ratio": min(ratios)}
    for act_order in (False, True):  # per decoder layer of the shape: the sum over its seven matrices
        for index in sorted({r["layer"].split()[1] for r in rows if r["layer"].startswith("layer ")}):
            mine = [r for r in rows if r["layer"].startswith(f"layer {index} ") and r["act_order"] == act_order]
            ours, theirs = sum(r["ours_s"] for r in mine), sum(r["llm_compressor_s"] for r in mine)
            key = f"layer {index}{', act order' if act_order else ''}"
            summary[key] = {"ours_s": round(ours, 2), "llm_compressor_s": round(theirs, 2), "ratio": ours / theirs}
    print(json.dumps(summary))
    (work / "gptq.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
