"""Verification: every artifact against the unmerged reference (base + adapter through PEFT, in fp32).

For each test input (formatted with the model's chat template) the reference's logits and greedy
continuation are computed first and kept; the reference model is then released before any
artifact is loaded, so two full models are never in memory at once. Per artifact and sample:
max and mean absolute logit difference, KL divergence from the reference, top-1 agreement, and
agreement of greedy generation.

Pass rules fit the precision. A full-precision (fp32) artifact must stay within
``validation_tolerance`` of the reference's logits. A reduced-precision artifact (bf16, fp16,
8-bit), whose rounding alone moves logits by far more than 1e-3, is judged on top-1 agreement
(at least ``validation_min_top1``) and mean KL (at most ``validation_max_kl``); a 4- or 5-bit
artifact on ``validation_int4_min_top1`` and ``validation_int4_max_kl``, because round-to-nearest
4-bit weights lose several times more than 8-bit ones on any model (docs/configuration.md cites
llama.cpp's measurements).
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import i18n
from .errors import MergeError, ResourceError, ValidationError
from .manifest import finite
from .monitoring import MemoryMonitor, logger
from .runtimes import precision_of

__all__ = [
    "Reference",
    "ArtifactVerdict",
    "Bounds",
    "compute_reference",
    "verify_artifact",
    "verify_gguf",
    "precision_of",
    "reference_line",
    "not_run",
    "finite",
    "coarsest",
    "RunOptions",
    "fit_length",
    "verifiable",
]


@dataclass(frozen=True)
class Bounds:
    """The pass rules: ``tolerance`` for full precision; top-1 and KL bounds for reduced precision, looser for 4-bit."""

    tolerance: float = 1e-3
    min_top1: float = 0.9
    max_kl: float = 0.05
    int4_min_top1: float = 0.85
    int4_max_kl: float = 0.1

    @classmethod
    def from_config(cls, config: Any) -> Bounds:
        return cls(
            config.validation_tolerance,
            config.validation_min_top1,
            config.validation_max_kl,
            config.validation_int4_min_top1,
            config.validation_int4_max_kl,
        )


@dataclass
class SampleResult:
    prompt: str
    max_abs_diff: float
    mean_abs_diff: float
    kl: float
    top1_agreement: float
    greedy_agreement: float


@dataclass
class ArtifactVerdict:
    artifact: str
    precision: str  # full | reduced | int4 (4- or 5-bit weights)
    status: str  # verified | failed | not_run: a check that did not run is never a pass
    rule: str
    samples: list[SampleResult] = field(default_factory=list)
    diff_histogram: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    perplexity: float | None = None  # on the bundled held-out text
    reference_perplexity: float | None = None
    readback: dict[str, Any] | None = None  # GGUF: what reading the file back against the merge found
    reason: str | None = None  # not_run: why it was not run
    runtime: str | None = None  # what ran it, and where: "onnxruntime on cpu", "transformers (layer-streamed) on cpu"
    peak_rss: int | None = None  # this process's resident memory at its peak while the artifact was loaded and run
    rule_prefix: str = ""  # what the rule says before the bounds (a GGUF's read back): kept when judged again
    failure: ValidationError | None = field(default=None, repr=False)
    outputs: dict[str, Any] | None = field(default=None, repr=False)  # the artifact's logits and greedy tokens

    @property
    def passed(self) -> bool:
        return self.status == "verified"

    @property
    def max_abs_diff(self) -> float | None:
        return max((s.max_abs_diff for s in self.samples), default=None)

    @property
    def mean_kl(self) -> float | None:
        return sum(s.kl for s in self.samples) / len(self.samples) if self.samples else None

    @property
    def top1_agreement(self) -> float | None:
        return sum(s.top1_agreement for s in self.samples) / len(self.samples) if self.samples else None

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: a metric that was not measured is null, never NaN."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("failure", "samples", "outputs")}
        data["samples"] = [asdict(sample) for sample in self.samples]
        data.update(max_abs_diff=self.max_abs_diff, mean_kl=self.mean_kl, top1_agreement=self.top1_agreement)
        return finite(data)


@dataclass
class Reference:
    prompts: list[str]
    input_ids: list[Any]  # one 1-D LongTensor per prompt
    logits: list[Any]  # fp32 logits per prompt, [seq, vocab]
    greedy: list[list[int]]
    heldout_ids: Any = None  # the bundled held-out text, tokenized (1-D LongTensor)
    heldout_perplexity: float | None = None
    device: str = "cpu"  # where the reference ran
    precision: str = "full"  # full; reduced (base loaded in 8-bit) or int4 (in 4-bit) through bitsandbytes
    base_perplexity: float | None = None  # the base alone (adapter disabled) on the held-out text
    heldout_entropy: float | None = None  # mean entropy (nats) of the next-token distributions on the held-out text
    base_entropy: float | None = None


HELDOUT_TOKENS = 256


def heldout_text() -> str:
    """A short English and Chinese text that no demo or test model was trained on, for perplexity."""
    from importlib import resources

    return resources.files("model_export").joinpath("data", "heldout.txt").read_text(encoding="utf-8")


def perplexity(logits: Any, ids: Any) -> float:
    """exp of the mean negative log-likelihood of each next token."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:].long())
    return float(torch.exp(nll))


def entropy(logits: Any) -> float:
    """Mean entropy, in nats, of the next-token distributions: log(vocabulary size) for a uniform guess."""

    logp = logits.float().log_softmax(-1)
    return float(-(logp.exp() * logp).nan_to_num().sum(-1).mean())


def _encode(tokenizer: Any, prompt: str):
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def fit_length(ids: Any, new_tokens: int, max_length: int, label: str) -> Any:
    """``ids`` cut so that it and ``new_tokens`` generated tokens fit in ``max_length`` (max_sequence_length, or the
    model's own max_position_embeddings when smaller), with a warning naming the sample."""
    keep = max(max_length - new_tokens, 1)
    if ids.numel() <= keep:
        return ids
    logger.warning(i18n.ui("sample_truncated", sample=label, tokens=ids.numel(), kept=keep, limit=max_length))
    return ids[:keep]


@dataclass(frozen=True)
class RunOptions:
    """How models run in verification: ``batch_size`` sequences per forward pass (batch_size), sequences cut to
    ``max_length`` tokens with the generated ones (max_sequence_length), weight files memory-mapped or read whole
    (use_memory_mapping), on ``device_map``."""

    batch_size: int = 1
    max_length: int = 2048
    mmap: bool = True
    device_map: str = "cpu"
    runtime: str = "auto"  # verification_runtime: auto, streamed, transformers

    @classmethod
    def from_config(cls, config: Any) -> RunOptions:
        return cls(
            config.batch_size,
            config.max_sequence_length,
            config.use_memory_mapping,
            config.device_map,
            config.verification_runtime,
        )

    def placed(self, device_map: str | None) -> RunOptions:
        return self if device_map is None else replace(self, device_map=device_map)


def reference_line(device: str, precision: str) -> str:
    """Where the reference ran, and in what precision, in words (the log and report.html)."""
    bits = {"int4": " (bitsandbytes 4-bit)", "reduced": " (bitsandbytes 8-bit)"}.get(precision, "")
    return i18n.ui("reference_device", device=device, quantized=bits)


def _release(device: str) -> None:
    """After a model or runtime is closed: collect it, and give the freed heap back to the system (a runtime's arena
    freed at close stayed resident under the next artifact's runtime)."""
    from .streamed import trim_heap

    gc.collect()
    trim_heap()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def compute_reference(
    base_dir: Path,
    checkpoint: Path,
    tokenizer_dir: Path,
    prompts: list[str],
    new_tokens: int,
    *,
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    options: RunOptions = RunOptions(),
    base_heldout: Path | None = None,
) -> Reference:
    """Logits and greedy tokens of base + adapter through PEFT, unmerged, in fp32; the model is released after.

    ``base_heldout`` is a file of base_heldout_logits (a batch makes it once for all its adapters): the base alone on
    the held-out text, reused by the layer-streamed reference when its token ids are this tokenizer's.

    ``options.device_map`` places it (cpu, cuda, auto: the GPU when there is one, the CPU after a CUDA out-of-memory);
    ``load_in_4bit`` / ``load_in_8bit`` load the base through bitsandbytes on the GPU (then the reference itself is
    approximate, and the artifacts are judged on the bounds of that precision). Every sequence is cut to
    ``options.max_length`` (or the model's max_position_embeddings) with its generated tokens.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .reference import load_model, on_device, resolve_device
    from .runtimes.hf import prompt_logits, run_model

    options = options.placed(device_map)
    if (load_in_4bit or load_in_8bit) and resolve_device(options.device_map) != "cuda":
        # bitsandbytes needs CUDA: said once, and the reference is then computed as without the setting (streamed)
        logger.warning(i18n.ui("bits_without_cuda", bits=4 if load_in_4bit else 8))
        load_in_4bit = load_in_8bit = False
    limit = min(options.max_length, _max_positions(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = [fit_length(_encode(tokenizer, p), new_tokens, limit, repr(p[:40])) for p in prompts]
    heldout = heldout_ids(tokenizer, limit)

    def work(device: str) -> Reference:
        bits = 4 if load_in_4bit else 8 if load_in_8bit else None
        if bits and device != "cuda":  # fell back to the CPU after a CUDA out-of-memory
            logger.warning(i18n.ui("bits_without_cuda", bits=bits))
            bits = None
        precision = {4: "int4", 8: "reduced", None: "full"}[bits]
        logger.info(reference_line(device, precision))
        model = load_model(
            str(base_dir),
            dtype=torch.float32,
            device_map=device,
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            disable_mmap=not options.mmap,
        )
        try:
            model = PeftModel.from_pretrained(model, str(checkpoint)).eval()
            results = run_model(model, [(ids, new_tokens) for ids in encoded] + [(heldout, 0)], options.batch_size)
            with model.disable_adapter():  # the base alone on the held-out text: what the adapter changed
                base_logits = prompt_logits(model, [heldout])[0]
        finally:
            del model
            _release(device)
        return _reference(prompts, encoded, results, heldout, base_logits, device, precision)

    refused, reference = _not_streamed(options, base_dir, checkpoint, load_in_4bit or load_in_8bit), None
    if refused is None:
        try:
            reference = _streamed_reference(
                base_dir, checkpoint, prompts, encoded, heldout, new_tokens, options, base_heldout
            )
        except MergeError as exc:  # an adapter feature the plan (the merge's, and so the streamed pass's) refuses
            refused = str(exc)
    if reference is None:
        if options.runtime != "transformers":
            logger.info(i18n.ui("streamed_fallback", reason=refused))
        reference = on_device(options.device_map, work, what=i18n.ui("doing_reference"))
    check_reference(reference, checkpoint)
    return reference


def _not_streamed(options: RunOptions, base_dir: Path, checkpoint: Path, bitsandbytes: bool) -> str | None:
    """Why the reference is not computed layer by layer (verification_runtime), or None when it is."""
    from .adapter_format import read_adapter_config
    from .reference import resolve_device
    from .streamed import streamable

    if options.runtime == "transformers":
        return i18n.ui("streamed_off")
    if bitsandbytes:
        return i18n.ui("streamed_bitsandbytes")
    if options.runtime == "auto" and resolve_device(options.device_map) == "cuda":
        return i18n.ui("streamed_gpu")
    return streamable(base_dir, read_adapter_config(checkpoint))


def _streamed_reference(
    base_dir: Path,
    checkpoint: Path,
    prompts: list[str],
    encoded: list[Any],
    heldout: Any,
    new_tokens: int,
    options: RunOptions,
    base_heldout: Path | None = None,
) -> Reference:
    """The reference through the layer-streamed pass on the CPU (streamed.py), which agrees with PEFT's unmerged model
    to fp32 rounding, one decoder layer in memory at a time."""
    from .runtimes.streamed import run_streamed
    from .streamed import StreamedModel

    model = StreamedModel(base_dir, checkpoint)
    logger.info(i18n.ui("streamed_reference", layers=model.config.num_hidden_layers))
    logger.info(reference_line("cpu", "full"))
    inputs = [(ids, new_tokens) for ids in encoded] + [(heldout, 0)]
    try:
        results = run_streamed(model, inputs, options.batch_size, label=i18n.ui("label_reference"))
    finally:
        model.close()
    base_logits = _shared_base_logits(base_heldout, heldout)
    if base_logits is None:
        base_logits = base_heldout_logits(base_dir, heldout)
    return _reference(prompts, encoded, results, heldout, base_logits, "cpu", "full")


def heldout_ids(tokenizer: Any, limit: int) -> Any:
    """The bundled held-out text as the reference tokenizes it, cut to ``limit`` positions."""
    import torch

    ids = torch.tensor(
        tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:HELDOUT_TOKENS], dtype=torch.long
    )
    return fit_length(ids, 0, limit, "held-out text")


def base_heldout_logits(base_dir: Path, heldout: Any, save_to: Path | None = None) -> Any:
    """The base alone on the held-out text (what an adapter changed is measured against it), layer-streamed; saved
    with its token ids to ``save_to`` when given (a batch's base/, for every adapter's reference)."""
    from .runtimes.streamed import run_streamed
    from .streamed import StreamedModel

    base = StreamedModel(base_dir)
    try:
        logits = run_streamed(base, [(heldout, 0)], label=i18n.ui("label_base"))[0][0]
    finally:
        base.close()
    if save_to is not None:
        import torch

        save_to.parent.mkdir(parents=True, exist_ok=True)
        partial = save_to.with_name(save_to.name + ".partial")
        torch.save({"ids": heldout, "logits": logits}, partial)
        os.replace(partial, save_to)
    return logits


def _shared_base_logits(path: Path | None, heldout: Any) -> Any:
    """The batch's base logits on the held-out text when they were made from these very token ids, else None."""
    if path is None or not Path(path).is_file():
        return None
    import torch

    saved = torch.load(path, weights_only=True)
    if saved["ids"].shape != heldout.shape or not torch.equal(saved["ids"], heldout):
        return None
    logger.info(i18n.ui("base_logits_shared", path=path))
    return saved["logits"]


def _reference(
    prompts: list[str],
    encoded: list[Any],
    results: list[Any],
    heldout: Any,
    base_logits: Any,
    device: str,
    precision: str,
) -> Reference:
    """The Reference from the runs of every prompt and, last, of the held-out text (logits only), and the base's
    held-out logits."""
    heldout_logits = results[-1][0]
    runs = results[:-1]
    return Reference(
        prompts,
        encoded,
        [r[0] for r in runs],
        [r[1] for r in runs],
        heldout,
        perplexity(heldout_logits, heldout),
        device,
        precision,
        perplexity(base_logits, heldout),
        entropy(heldout_logits),
        entropy(base_logits),
    )


def check_reference(reference: Reference, checkpoint: Path) -> None:
    """A reference that is itself garbage cannot vouch for anything (ME604): logits that are not finite (the adapter's
    update overflows), or an adapter that makes a base's predictions uniform: on the held-out text, a mean entropy
    within
    2% of log(vocabulary size), or a perplexity at or above the vocabulary size, where the base alone is clearly better
    (entropy below 90% of that bound, perplexity below the vocabulary size). A base that is itself no better than chance
    (a randomly initialized test model) is not judged this way."""
    import torch

    vocab = reference.logits[0].shape[-1] if reference.logits else 0
    if not all(bool(torch.isfinite(logits).all()) for logits in reference.logits):
        raise ValidationError("reference_broken", checkpoint=str(checkpoint), problem=i18n.ui("reference_nonfinite"))
    if not vocab or reference.base_entropy is None or reference.heldout_entropy is None:
        return
    uniform = math.log(vocab)
    flat = reference.heldout_entropy >= 0.98 * uniform and reference.base_entropy < 0.9 * uniform
    worse = (reference.heldout_perplexity or 0) >= vocab and (reference.base_perplexity or math.inf) < vocab
    if flat or worse:
        raise ValidationError(
            "reference_broken",
            checkpoint=str(checkpoint),
            problem=i18n.ui(
                "reference_uniform",
                perplexity=reference.heldout_perplexity,
                vocab=vocab,
                base=reference.base_perplexity,
                entropy=reference.heldout_entropy,
                base_entropy=reference.base_entropy,
                uniform=uniform,
            ),
        )


def _max_positions(model_dir: Path) -> int:
    """The model's max_position_embeddings (no limit when its config.json does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return int(config.get("max_position_embeddings") or 2**31)
    except (OSError, ValueError, TypeError, AttributeError):
        return 2**31


def _run_artifact(
    artifact: Path,
    reference: Reference,
    new_tokens: int,
    options: RunOptions = RunOptions(),
    ran_in: list | None = None,
) -> list[tuple[Any, list[int]]]:
    """Prompt logits and greedy tokens of the artifact for every reference input, in its runtime (runtime_for:
    transformers placed by ``options.device_map``, onnxruntime, llama.cpp, TensorRT), then the held-out text's logits
    (no generation). The runtime that ran it is appended to ``ran_in``."""
    from .reference import on_device
    from .runtimes import runtime_for, runtime_name

    inputs = [(ids, new_tokens) for ids in reference.input_ids]
    if reference.heldout_ids is not None:
        inputs.append((reference.heldout_ids, 0))

    def work(device: str) -> list[tuple[Any, list[int]]]:
        runtime = runtime_for(artifact, device, mmap=options.mmap, streamed=options.runtime != "transformers")
        if ran_in is not None:
            ran_in.append(f"{runtime.name} on {runtime.device}")
        logger.info(
            i18n.ui(
                "verify_running",
                artifact=artifact,
                runtime=runtime.name,
                samples=len(inputs),
                tokens=sum(int(ids.numel()) for ids, _ in inputs),
                new=new_tokens,
            )
        )
        try:
            return runtime.run(inputs, options.batch_size, reference.greedy)  # no draft for the held-out text
        finally:
            runtime.close()
            _release(device)

    if runtime_name(artifact) != "transformers":
        return work("cpu")
    return on_device(options.device_map, work, what=i18n.ui("doing_artifact", artifact=artifact))


def verify_gguf(
    artifact: Path,
    merged: Path,
    reference: Reference,
    bounds: Bounds = Bounds(),
    *,
    new_tokens: int,
    floor: str = "full",
    options: RunOptions = RunOptions(),
    imatrix: Path | None = None,
) -> ArtifactVerdict:
    """Read the GGUF back against the merge (always; quantized blocks re-encoded with the importance matrix the
    export used, ``imatrix``), then run it in llama.cpp and judge it like any artifact (where llama-cpp-python is
    installed). A read-back failure is the guide's 'inference failed'."""
    from .exporters.gguf_export import read_back

    def read() -> tuple[dict[str, Any], str]:
        importance = None
        if imatrix is not None:
            from .exporters.gguf_export import read_importance

            importance = read_importance(imatrix)
        return read_back(artifact, merged, importance), precision_of(artifact)

    return _read_back_then_run(
        artifact,
        read,
        lambda: precision_of(artifact),
        reference,
        bounds,
        new_tokens=new_tokens,
        floor=lambda precision: floor,
        options=options,
        ran="{read}, llama.cpp: ",
        unrun="{read}",
    )


def _read_back_then_run(
    artifact: Path,
    read: Callable[[], tuple[dict[str, Any], str]],
    failed_precision: Callable[[], str],
    reference: Reference,
    bounds: Bounds,
    *,
    new_tokens: int,
    floor: Callable[[str], str],
    options: RunOptions,
    ran: str,
    unrun: str,
) -> ArtifactVerdict:
    """A GGUF's verdict: ``read()`` reads it back (returning what it found and the artifact's precision; an
    ExportError fails the artifact as the guide's 'inference failed', at ``failed_precision()``), then llama.cpp runs
    it and judges it like any artifact on ``floor(precision)``, or, without llama-cpp-python, it is not run (never a
    pass). ``ran`` prefixes the rule of a run, ``unrun`` is the rule of one not run (both take {tensors}, and {read}:
    what the read back found, readback_words)."""
    from . import extras
    from .errors import ExportError
    from .runtimes import runtime_problem

    try:
        readback, precision = read()
    except ExportError as exc:
        verdict = ArtifactVerdict(str(artifact), failed_precision(), "failed", "read back", error=str(exc))
        verdict.failure = ValidationError("inference_failed", artifact=str(artifact), error=str(exc))
        return verdict
    problem = runtime_problem(artifact)
    if problem is None:
        verdict = verify_artifact(
            artifact,
            reference,
            bounds,
            new_tokens=new_tokens,
            raise_on_failure=False,
            floor=floor(precision),
            options=options,
        )
        verdict.rule_prefix = ran.format(tensors=readback["tensors"], read=readback_words(readback))
        verdict.rule = verdict.rule_prefix + verdict.rule
    else:
        reason = i18n.ui("reason_no_llama_cpp") if not extras.is_available("llama_cpp") else None
        reason = reason or i18n.ui("reason_read_back_only", problem=problem)
        rule = unrun.format(tensors=readback["tensors"], read=readback_words(readback))
        verdict = not_run(artifact, precision, reason, rule=rule)
    verdict.readback = readback
    return verdict


def readback_words(readback: dict[str, Any]) -> str:
    """What a GGUF's read back established, in words: tensors equal to the merge where every type stores it exactly
    (f32, or the merge's own half type); else the merge encoded again in each type, and how far the dequantized file
    lies from the merge (so a q4_k_m's rule never claims equality its verdict file contradicts)."""
    worst = readback.get("max_abs_diff_by_type") or {}
    tensors = readback["tensors"]
    if not any(worst.values()):
        return f"read back ({tensors} tensors equal to the merge)"
    types = ", ".join(sorted(worst))
    largest = max(worst, key=worst.get)
    return (
        f"read back ({tensors} tensors byte-equal to the merge encoded again as {types}; dequantized, at most "
        f"{i18n.format_number(round(worst[largest], 4))} from the merge ({largest}))"
    )


def not_run(artifact: str | Path, precision: str, reason: str, rule: str = "") -> ArtifactVerdict:
    """The verdict of an artifact that was not run, saying why; logged as a warning, never counted as verified."""
    logger.warning(i18n.ui("verify_not_run", artifact=artifact, reason=reason))
    return ArtifactVerdict(str(artifact), precision, "not_run", rule, reason=reason)


def _compare(reference: Reference, logits: list[Any], greedy: list[list[int]]) -> list[SampleResult]:
    import torch

    samples = []
    for prompt, ref, got, ref_tokens, tokens in zip(
        reference.prompts, reference.logits, logits, reference.greedy, greedy
    ):
        diff = (got - ref).abs()
        kl = (
            torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
        )
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        agree = sum(a == b for a, b in zip(ref_tokens, tokens)) / max(len(ref_tokens), 1)
        samples.append(
            SampleResult(prompt, float(diff.max()), float(diff.mean()), max(float(kl), 0.0), float(top1), agree)
        )
    return samples


def _histogram(reference: Reference, logits: list[Any], bins: int = 24) -> dict[str, list[float]]:
    import torch

    diffs = torch.cat([(got - ref).abs().flatten() for ref, got in zip(reference.logits, logits)])
    diffs = diffs[
        torch.isfinite(diffs)
    ]  # an artifact with inf/NaN logits fails on its metrics; the plot shows the rest
    top = (float(diffs.max()) if diffs.numel() else 0.0) or 1e-12
    counts = torch.histc(diffs, bins=bins, min=0.0, max=top)
    return {"edges": [top * i / bins for i in range(bins + 1)], "counts": counts.tolist()}


def verify_artifact(
    artifact: Path,
    reference: Reference,
    bounds: Bounds = Bounds(),
    *,
    new_tokens: int,
    raise_on_failure: bool = True,
    device_map: str | None = None,
    floor: str = "full",
    options: RunOptions = RunOptions(),
) -> ArtifactVerdict:
    """Run ``artifact`` (a transformers folder, or an ONNX graph file) on the reference's inputs and judge it.

    ``floor`` is the coarsest precision the artifact's weights went through before it was written (the merge's
    dtype: an fp32 graph written from a bf16 merge holds bf16 values), so it is judged on that precision's bounds.

    Raises ValidationError: 'output_mismatch' / 'top1_mismatch' when it disagrees with the reference,
    'inference_failed' when it cannot be loaded or run (unless ``raise_on_failure`` is false).
    """
    import torch

    from .runtimes import runtime_problem

    problem = runtime_problem(artifact)
    if problem is not None:  # the runtime could not start: nothing is known of the artifact
        return not_run(artifact, _precision_or_unknown(artifact), problem)
    precision = "unknown"
    try:
        precision = precision_of(artifact)
        options = options.placed(device_map)
        ran_in: list[str] = []
        with MemoryMonitor(enabled=False, sample_every=0.1) as memory:
            runs = _run_artifact(artifact, reference, new_tokens, options, ran_in)
        gc.collect()
    except (ResourceError, MemoryError, KeyboardInterrupt):  # the machine's fault or the user's, not the artifact's
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure to load or run is the guide's "inference failed"
        verdict = ArtifactVerdict(
            str(artifact), precision, "failed", "inference", error=f"{type(exc).__name__}: {exc}"[:500]
        )
        verdict.failure = ValidationError("inference_failed", artifact=str(artifact), error=verdict.error)
        if raise_on_failure:
            raise verdict.failure from exc
        return verdict
    if reference.heldout_ids is not None:
        heldout_logits, runs = runs[-1][0], runs[:-1]
    logits = [r[0].to(torch.float32) for r in runs]
    samples = _compare(reference, logits, [r[1] for r in runs])
    for sample in samples:
        logger.debug(
            "%s, sample %r: max |logit diff| %.3g, KL %.3g, top-1 %.3f, greedy %.3f",
            artifact.name,
            sample.prompt[:40],
            sample.max_abs_diff,
            sample.kl,
            sample.top1_agreement,
            sample.greedy_agreement,
        )
    verdict = ArtifactVerdict(str(artifact), precision, "verified", "", samples, _histogram(reference, logits))
    verdict.outputs = {"logits": logits, "greedy": [r[1] for r in runs]}
    verdict.runtime = ran_in[-1] if ran_in else None
    verdict.peak_rss = memory.peak_rss
    if reference.heldout_ids is not None:
        verdict.perplexity = perplexity(heldout_logits, reference.heldout_ids)
        verdict.reference_perplexity = reference.heldout_perplexity
    verdict.failure = failure = judge(verdict, bounds, reference.precision, floor)
    verdict.status = "verified" if failure is None else "failed"
    logger.info(
        i18n.ui(
            "verify_line",
            artifact=artifact,
            rule=verdict.rule,
            diff=verdict.max_abs_diff,
            kl=verdict.mean_kl,
            top1=verdict.top1_agreement,
            result="passed" if verdict.passed else "FAILED",
        )
    )
    if failure is not None and raise_on_failure:
        raise failure
    return verdict


def _precision_or_unknown(artifact: Path) -> str:
    try:
        return precision_of(artifact)
    except Exception:  # noqa: BLE001 - reading the precision needs the format's package too (onnx, gguf)
        return "unknown"


def rejudge(recorded: dict[str, Any], bounds: Bounds, reference_precision: str, floor: str) -> ArtifactVerdict:
    """A recorded verdict (ArtifactVerdict.to_dict) judged again on ``bounds`` from its metrics, without running the
    artifact: what a change of validation_* alone needs."""
    names = {f.name for f in fields(ArtifactVerdict)} - {"samples", "failure", "outputs"}
    verdict = ArtifactVerdict(**{k: v for k, v in recorded.items() if k in names})
    verdict.samples = [SampleResult(**sample) for sample in recorded.get("samples", [])]
    verdict.failure = judge(verdict, bounds, reference_precision, floor)
    verdict.rule = verdict.rule_prefix + verdict.rule
    verdict.status = "verified" if verdict.failure is None else "failed"
    return verdict


_COARSENESS = {"full": 0, "reduced": 1, "int4": 2}


def coarsest(*precisions: str) -> str:
    """The coarsest of precisions (full < reduced < int4)."""
    return max(precisions, key=lambda p: _COARSENESS.get(p, 1))


def judge(
    verdict: ArtifactVerdict, bounds: Bounds, reference_precision: str = "full", floor: str = "full"
) -> ValidationError | None:
    """Judge on the bounds of the coarsest of the artifact's precision, the precision its weights went through before
    (``floor``: an fp32 graph of a bf16 merge holds bf16 values) and the reference's (a reference loaded in 4-bit
    through
    bitsandbytes is itself approximate, so even an fp32 artifact is held to the 4-bit bounds)."""
    precision = coarsest(verdict.precision, reference_precision, floor)
    suffix = {"reduced": " (reference in 8-bit)", "int4": " (reference in 4-bit)"}.get(reference_precision, "")
    if not suffix and _COARSENESS.get(floor, 1) > _COARSENESS.get(verdict.precision, 1):
        suffix = " (weights rounded in the merge)"
    if precision == "full":
        verdict.rule = f"max |logit diff| <= {i18n.format_number(bounds.tolerance)}"
        if verdict.max_abs_diff > bounds.tolerance:
            return ValidationError(
                "output_mismatch",
                value=round(verdict.max_abs_diff, 6),
                limit=bounds.tolerance,
                artifact=verdict.artifact,
            )
        return None
    min_top1, max_kl = (
        (bounds.int4_min_top1, bounds.int4_max_kl) if precision == "int4" else (bounds.min_top1, bounds.max_kl)
    )
    verdict.rule = f"top-1 >= {min_top1}, KL <= {i18n.format_number(max_kl)}{suffix}"
    if verdict.top1_agreement < min_top1:
        return ValidationError(
            "top1_mismatch", value=round(verdict.top1_agreement, 4), limit=min_top1, artifact=verdict.artifact
        )
    if verdict.mean_kl > max_kl:
        return ValidationError(
            "output_mismatch", value=round(verdict.mean_kl, 6), limit=max_kl, artifact=verdict.artifact
        )
    return None


def verifiable(artifacts: dict[str, str]) -> list[tuple[str, Path]]:
    """(label, path) of everything to verify, as each format declares it (exporters.FORMATS): an artifact folder, each
    graph of an ONNX folder, a GGUF file, an engine."""
    from .exporters import FORMATS

    return [item for fmt, path in artifacts.items() for item in FORMATS[fmt].runnables(Path(path))]


def verify_peft_folder(folder: Path, checkpoint: Path) -> ArtifactVerdict:
    """A batch's PEFT folder (for vLLM's --lora-modules): PEFT reads its config, and its files are byte for byte the
    adapter the reference ran (sha256), so loaded on the base it gives the reference's outputs."""
    from peft import PeftConfig

    from .adapter_format import weights_file
    from .tensor_io import file_sha256

    pairs = [(folder / "adapter_config.json", checkpoint / "adapter_config.json")]
    pairs.append((folder / weights_file(checkpoint).name, weights_file(checkpoint)))
    rule = i18n.ui("peft_rule", files=len(pairs))
    try:
        PeftConfig.from_pretrained(str(folder))
        differ = [str(ours) for ours, theirs in pairs if file_sha256(ours) != file_sha256(theirs)]
    except Exception as exc:  # noqa: BLE001 - any reason PEFT cannot read it fails the artifact
        differ, error = [str(folder)], f"{type(exc).__name__}: {exc}"
    else:
        error = None
    if differ:
        error = error or i18n.ui("peft_differs", files=", ".join(differ))
        verdict = ArtifactVerdict(str(folder), "full", "failed", rule, error=str(error), runtime="PEFT (files)")
        verdict.failure = ValidationError("inference_failed", artifact=str(folder), error=str(error))
        return verdict
    return ArtifactVerdict(str(folder), "full", "verified", str(rule), runtime="PEFT (files)")


def verify_gguf_lora(
    artifact: Path,
    checkpoint: Path,
    base_dir: Path,
    reference: Reference,
    bounds: Bounds = Bounds(),
    *,
    new_tokens: int,
    options: RunOptions = RunOptions(),
) -> ArtifactVerdict:
    """A LoRA GGUF with its Modelfile: read back against the adapter (every A and scaled B), then run in llama.cpp on
    the base GGUF the Modelfile names, as Ollama would load the pair, and judged like any artifact against the
    reference (where llama-cpp-python is installed; else not run, never a pass)."""
    from .exporters.gguf_export import read_back_lora

    return _read_back_then_run(
        artifact,
        # the base GGUF's precision (the Modelfile is checked here too)
        lambda: (read_back_lora(artifact, checkpoint, base_dir), precision_of(artifact)),
        lambda: "full",
        reference,
        bounds,
        new_tokens=new_tokens,
        floor=lambda precision: precision,
        options=options,
        ran="read back ({tensors} LoRA tensors), llama.cpp on the base GGUF: ",
        unrun="read back ({tensors} LoRA tensors equal to the adapter's)",
    )
