"""Benchmark: what each quantization method costs in quality, on a model with real structure (issue 17, item 6).

    python benchmarks/quant_quality.py                  # trains the model once (about 5 minutes here), then measures
    python benchmarks/quant_quality.py --train-seconds 600

Random weights cannot show quantization quality (their logits are flat), and the demo's 1 M-parameter model learned a
few dozen sentences. This trains a ~3.7 M-parameter Qwen3 (width 256, 4 layers, head_dim 64, tied, a 2048-token BPE)
for a few minutes on real text that ships with every Python install: the standard library's own source (code,
comments, docstrings). Every tenth file (sorted by path) is held out; calibration text comes from the training files.
Width 256 makes every matrix whole 256-value blocks, so the K-quants apply everywhere.

Each artifact is made from the same fp32 model and run in its own runtime (GGUF in llama.cpp, ONNX in onnxruntime,
compressed-tensors in transformers), on 8 held-out sequences of 256 tokens, against the fp32 model in transformers:
mean KL, top-1 agreement, perplexity on the held-out tokens, size, and the weighted reconstruction error of the
decoder's matrices (sum_j E[x_j^2] ||W_j - Q(W)_j||^2 / sum_j E[x_j^2] ||W_j||^2, with E[x_j^2] the importance
matrix of the held-out text: how much of each matrix's output the rounding changes, to second order).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

VOCAB, WIDTH, LAYERS, SEQ = 2048, 256, 4, 256


def corpus(stdlib: Path) -> tuple[list[str], list[str]]:
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "idlelib" not in p.parts)
    texts = [(i, p.read_text(encoding="utf-8", errors="ignore")) for i, p in enumerate(files)]
    return [t for i, t in texts if i % 10], [t for i, t in texts if i % 10 == 0]


def build_tokenizer(train: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train[:400], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return fast


def token_stream(tokenizer, texts: list[str], limit: int) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= limit:
            break
    return np.array(ids[:limit], dtype=np.int64)


def train(model_dir: Path, seconds: float) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    train_texts, _ = corpus(Path(sysconfig.get_paths()["stdlib"]))
    tokenizer = build_tokenizer(train_texts, model_dir)
    stream = torch.from_numpy(token_stream(tokenizer, train_texts, 4_000_000))
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=3 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start, step, losses = time.time(), 0, []
    while time.time() - start < seconds:
        lr = 3e-3 * min(1.0, (step + 1) / 50) * max(0.1, 1 - (time.time() - start) / seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - SEQ - 1, (16,), generator=generator)
        batch = torch.stack([stream[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
    model.save_pretrained(str(model_dir))
    params = sum(p.numel() for p in model.parameters())
    return {"steps": step, "seconds": round(time.time() - start, 1), "params": params, "final_loss": losses[-1]}


def heldout(model_dir: Path, count: int = 8) -> list[list[int]]:
    from transformers import AutoTokenizer

    _, held = corpus(Path(sysconfig.get_paths()["stdlib"]))
    ids = token_stream(AutoTokenizer.from_pretrained(str(model_dir)), held, count * SEQ)
    return [ids[i * SEQ : (i + 1) * SEQ].tolist() for i in range(count)]


def calibration_file(model_dir: Path, work: Path) -> Path:
    train_texts, _ = corpus(Path(sysconfig.get_paths()["stdlib"]))
    path = work / "calibration.txt"
    path.write_text("\n".join(train_texts[1::37])[:400_000], encoding="utf-8")
    return path


def metrics(reference: list[np.ndarray], got: list[np.ndarray], samples: list[list[int]]) -> dict:
    import torch

    kls, top1, nll, count = [], [], 0.0, 0
    for ref, out, ids in zip(reference, got, samples):
        r = torch.from_numpy(ref).log_softmax(-1)
        o = torch.from_numpy(np.asarray(out, dtype=np.float32)).log_softmax(-1)
        kls.append(float((r.exp() * (r - o)).sum(-1).mean()))
        top1.append(float((r.argmax(-1) == o.argmax(-1)).float().mean()))
        targets = torch.tensor(ids[1:])
        nll += float(-o[:-1].gather(1, targets[:, None]).sum())
        count += len(targets)
    return {"kl": float(np.mean(kls)), "top1": float(np.mean(top1)), "perplexity": float(np.exp(nll / count))}


def reconstruction(model_dir: Path, gguf_path: Path, importance: dict) -> float:
    """sum_j E[x_j^2] ||W_j - Q(W)_j||^2 / sum_j E[x_j^2] ||W_j||^2 over the decoder's matrices."""
    import gguf
    from safetensors.numpy import load_file

    from model_export.quantize.gguf_types import gguf_names

    weights = load_file(str(model_dir / "model.safetensors"))
    names = gguf_names(
        SimpleNamespace(architectures=["Qwen3ForCausalLM"], num_hidden_layers=LAYERS),
        [n.removesuffix(".weight") for n in weights if ".layers." in n and n.endswith("proj.weight")],
    )
    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    error = total = 0.0
    for hf, name in names.items():
        w = weights[hf + ".weight"].astype(np.float64)
        t = stored[name]
        q = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape).astype(np.float64)
        e = importance[name].astype(np.float64)
        error += float((((w - q) ** 2) * e[None]).sum())
        total += float(((w**2) * e[None]).sum())
    return error / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "model-export-quality"))
    parser.add_argument("--train-seconds", type=float, default=300)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from model_export.exporters.gguf_export import export_gguf
    from model_export.quantize.calibration import calibration_samples
    from model_export.quantize.imatrix import collect_imatrix
    from model_export.runtimes.llamacpp import _generate, _verifier

    work = Path(args.workdir)
    model_dir = work / "model"
    if not (model_dir / "model.safetensors").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info = train(model_dir, args.train_seconds)
        (work / "training.json").write_text(json.dumps(info))
    training = json.loads((work / "training.json").read_text())
    samples = heldout(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = [model(torch.tensor([s])).logits[0].numpy() for s in samples]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    calibration = calibration_samples(calibration_file(model_dir, work), tokenizer, 16, SEQ)
    t0 = time.time()
    imatrix = {n: s / np.float32(c) for n, (s, c) in collect_imatrix(model_dir, calibration.samples).items()}
    imatrix_s = time.time() - t0
    held_importance = {n: s / np.float32(c) for n, (s, c) in collect_imatrix(model_dir, samples).items()}
    rows: list[dict] = []

    def row(artifact: str, method: str, measured: tuple[list, int], recon: float | None = None) -> None:
        """A table row from (logits per held-out sequence, artifact bytes)."""
        got, size = measured
        rows.append(
            {
                "artifact": artifact,
                "method": method,
                "bytes": size,
                **metrics(reference, got, samples),
                "reconstruction": recon,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    def in_transformers(folder: Path) -> tuple[list, int]:
        quantized = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            got = [quantized(torch.tensor([s])).logits[0].numpy() for s in samples]
        return got, sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def in_onnxruntime(folder: Path) -> tuple[list, int]:
        from model_export.runtimes.ort import OnnxDecoder

        decoder = OnnxDecoder(folder / "model.onnx")
        return [decoder.prompt(s)[0] for s in samples], sum(p.stat().st_size for p in folder.glob("model.onnx*"))

    row("fp32 (transformers)", "-", (reference, (model_dir / "model.safetensors").stat().st_size), 0.0)
    variants = [
        ("q8_0", None),
        ("q4_0", None),
        ("q4_k_m", None),
        ("q4_k_m", imatrix),
        ("q3_k_m", None),
        ("q3_k_m", imatrix),
        ("q2_k", None),
        ("q2_k", imatrix),
    ]
    for gguf_type, importance in variants:
        out = work / f"gguf-{gguf_type}-{'imatrix' if importance else 'plain'}"
        path = Path(export_gguf(model_dir, out, gguf_type=gguf_type, imatrix=importance)["path"])
        llm = _verifier(path, SEQ)
        try:
            got = [_generate(llm, s, 0)[0] for s in samples]
        finally:
            llm.close()
        method = (
            "imatrix" if importance else ("round-to-nearest" if gguf_type in ("q8_0", "q4_0") else "K-quant search")
        )
        row(f"GGUF {gguf_type}", method, (got, path.stat().st_size), reconstruction(model_dir, path, held_importance))
    try:
        from model_export.exporters.onnx_builder import build_onnx

        build_onnx(model_dir, work / "onnx-int4", weight_type="int4")
        row("ONNX int4 (MatMulNBits, block 32)", "round-to-nearest", in_onnxruntime(work / "onnx-int4"))
    except ImportError as exc:
        print(f"ONNX row not run: {exc}")
    try:
        from model_export.exporters.onnx_builder import build_onnx
        from model_export.exporters.safetensors_quant import export_quantized_safetensors, int4_group_size
        from model_export.quantize.gptq import calibrate_gptq

        export_quantized_safetensors(model_dir, work / "safetensors-int4", bits=4)
        label = "safetensors int4 (compressed-tensors, group 128)"
        row(label, "round-to-nearest", in_transformers(work / "safetensors-int4"))
        t0 = time.time()
        gptq_stats = calibrate_gptq(
            model_dir, calibration.samples, work / "gptq", group_size=int4_group_size(model_dir)
        )
        gptq_s = time.time() - t0
        print(json.dumps({"gptq": gptq_stats, "gptq_seconds": round(gptq_s, 2)}), flush=True)
        export_quantized_safetensors(model_dir, work / "safetensors-int4-gptq", bits=4, gptq=work / "gptq")
        row(label, "GPTQ", in_transformers(work / "safetensors-int4-gptq"))
        build_onnx(model_dir, work / "onnx-int4-gptq", weight_type="int4", gptq=work / "gptq")
        row("ONNX int4 (MatMulNBits, GPTQ groups of 128)", "GPTQ", in_onnxruntime(work / "onnx-int4-gptq"))
        kept = work / "onnx-int4-gptq-head"
        build_onnx(model_dir, kept, weight_type="int4", gptq=work / "gptq", keep=["lm_head"])
        label = "ONNX int4, GPTQ, tied embedding/head kept fp32 (keep_modules: [lm_head])"
        row(label, "GPTQ", in_onnxruntime(kept))
    except ImportError as exc:
        print(f"safetensors row not run: {exc}")
    result = {
        "training": training,
        "imatrix_seconds": round(imatrix_s, 2),
        "calibration_tokens": calibration.tokens,
        "heldout_tokens": len(samples) * SEQ,
        "rows": rows,
    }
    (work / "quality.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print("| artifact | method | size | mean KL | top-1 | perplexity | weighted reconstruction error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        recon = "-" if r["reconstruction"] is None else f"{r['reconstruction']:.2e}"
        print(
            f"| {r['artifact']} | {r['method']} | {r['bytes'] / 1e6:.2f} MB | {r['kl']:.4f} | {r['top1']:.3f} | "
            f"{r['perplexity']:.3f} | {recon} |"
        )


if __name__ == "__main__":
    main()
