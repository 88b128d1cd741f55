"""Verification: every artifact against the unmerged reference (base + adapter through PEFT, in fp32).

For each test input (formatted with the model's chat template) the reference's greedy continuation
and its logits over the prompt and those tokens are computed first and kept; the reference model is
then released before any artifact is loaded, so two full models are never in memory at once. Each
artifact is run once over the reference's own tokens (teacher-forced, all samples in one pass where
its runtime batches): per sample, max and mean absolute logit difference, KL divergence from the
reference and top-1 agreement at every position, and greedy agreement read off the same logits
(the artifact's own choice along the reference's tokens, up to its first different one), as
llama.cpp's perplexity --kl-divergence judges a quantized file in one pass over the same text.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ResourceError, ValidationError
from ..monitoring import MemoryMonitor, logger
from ..runtimes import precision_of
from .judge import (
    ArtifactVerdict,
    Bounds,
    along,
    compare,
    judge,
    logit_histogram,
    not_run,
    precision_or_unknown,
    readback_words,
)
from .measures import top1
from .reference import Reference, RunOptions, perplexity, release

__all__ = [
    "verify_artifact",
    "verify_gguf",
    "verify_gguf_lora",
    "verify_peft_folder",
    "verifiable",
]


def _run_artifact(
    artifact: Path,
    reference: Reference,
    options: RunOptions = RunOptions(),
    ran_in: list | None = None,
) -> list[Any]:
    """The artifact's logits at every position of what the reference scored (each prompt with the reference's tokens,
    then the held-out text), in its runtime (runtime_for: transformers placed by ``options.device_map``, onnxruntime,
    llama.cpp, TensorRT). The runtime that ran it is appended to ``ran_in``."""
    from ..checkpoint.loading import on_device
    from ..runtimes import runtime_for, runtime_name

    sequences = reference.sequences()

    def work(device: str) -> list[Any]:
        runtime = runtime_for(artifact, device, mmap=options.mmap, streamed=options.runtime != "transformers")
        if ran_in is not None:
            ran_in.append(f"{runtime.name} on {runtime.device}")
        logger.info(
            i18n.ui(
                "verify_running",
                artifact=artifact,
                runtime=runtime.name,
                samples=len(sequences),
                tokens=sum(int(ids.numel()) for ids in sequences),
            )
        )
        try:
            return runtime.score(sequences, options.batch_size)
        finally:
            runtime.close()
            release(device)

    if runtime_name(artifact) != "transformers":
        return work("cpu")
    return on_device(options.device_map, work, what=i18n.ui("doing_artifact", artifact=artifact))


def verify_gguf(
    artifact: Path,
    merged: Path,
    reference: Reference,
    bounds: Bounds = Bounds(),
    *,
    floor: str = "full",
    options: RunOptions = RunOptions(),
    imatrix: Path | None = None,
) -> ArtifactVerdict:
    """Read the GGUF back against the merge (always; quantized blocks re-encoded with the importance matrix the
    export used, ``imatrix``), then run it in llama.cpp and judge it like any artifact (where llama-cpp-python is
    installed). A read-back failure is the guide's 'inference failed'."""
    from ..exporters.gguf_readback import read_back

    def read() -> tuple[dict[str, Any], str]:
        importance = None
        if imatrix is not None:
            from ..quantize.gguf_types import read_importance

            importance = read_importance(imatrix)
        return read_back(artifact, merged, importance), precision_of(artifact)

    return _read_back_then_run(
        artifact,
        read,
        lambda: precision_of(artifact),
        reference,
        bounds,
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
    from .. import extras
    from ..errors import ExportError
    from ..runtimes import runtime_problem

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


def _measured(artifact: Path, reference: Reference, runs: list, precision: str) -> ArtifactVerdict:
    """The artifact's logits compared with the reference's, sample by sample, and its perplexity on the held-out text
    (the last, when the reference has one); not judged yet."""
    import torch

    heldout_logits = None
    if reference.heldout_ids is not None:
        heldout_logits, runs = runs[-1].to(torch.float32), runs[:-1]
    logits = [r.to(torch.float32) for r in runs]
    greedy = [
        along(ids.numel() - 1, want, top1(got).tolist())
        for ids, want, got in zip(reference.input_ids, reference.greedy, logits)
    ]
    samples = compare(reference, logits, greedy, heldout_logits)
    for sample in samples:
        logger.debug(
            "%s, sample %r: max |logit diff| %.3g, KL %.3g, top-1 %.3f, greedy %s",
            artifact.name,
            sample.prompt[:40],
            sample.max_abs_diff,
            sample.kl,
            sample.top1_agreement,
            sample.greedy_agreement,
        )
    histogram = logit_histogram(reference, logits, heldout_logits)
    verdict = ArtifactVerdict(str(artifact), precision, "verified", "", samples, histogram)
    verdict.outputs = {"logits": logits, "greedy": greedy}
    if heldout_logits is not None:
        verdict.perplexity = perplexity(heldout_logits, reference.heldout_ids)
        verdict.reference_perplexity = reference.heldout_perplexity
    return verdict


def verify_artifact(
    artifact: Path,
    reference: Reference,
    bounds: Bounds = Bounds(),
    *,
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
    from ..runtimes import runtime_problem

    problem = runtime_problem(artifact)
    if problem is not None:  # the runtime could not start: nothing is known of the artifact
        return not_run(artifact, precision_or_unknown(artifact), problem)
    precision = "unknown"
    try:
        precision = precision_of(artifact)
        options = options.placed(device_map)
        ran_in: list[str] = []
        with MemoryMonitor(enabled=False, sample_every=0.1) as memory:
            runs = _run_artifact(artifact, reference, options, ran_in)
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
    verdict = _measured(artifact, reference, runs, precision)
    verdict.runtime = ran_in[-1] if ran_in else None
    verdict.peak_rss = memory.peak_rss
    verdict.failure = failure = judge(verdict, bounds, reference.precision, floor)
    verdict.status = "verified" if failure is None else "failed"
    _log_verdict(artifact, verdict)
    if failure is not None and raise_on_failure:
        raise failure
    return verdict


def _log_verdict(artifact: Path, verdict: ArtifactVerdict) -> None:
    result = "passed" if verdict.passed else "FAILED"
    top1, diff, kl = verdict.top1_agreement, verdict.max_abs_diff, verdict.mean_kl
    logger.info(
        i18n.ui("verify_line", artifact=artifact, rule=verdict.rule, diff=diff, kl=kl, top1=top1, result=result)
    )


def verifiable(artifacts: dict[str, str]) -> list[tuple[str, Path]]:
    """(label, path) of everything to verify, as each format declares it (exporters.FORMATS): an artifact folder, each
    graph of an ONNX folder, a GGUF file, an engine."""
    from ..exporters import FORMATS

    return [item for fmt, path in artifacts.items() for item in FORMATS[fmt].runnables(Path(path))]


def verify_peft_folder(folder: Path, checkpoint: Path) -> ArtifactVerdict:
    """A batch's PEFT folder (for vLLM's --lora-modules): PEFT reads its config, and its files are byte for byte the
    adapter the reference ran (sha256), so loaded on the base it gives the reference's outputs."""
    from peft import PeftConfig

    from ..checkpoint.adapter_format import weights_file
    from ..tensor_io import file_sha256

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
    options: RunOptions = RunOptions(),
) -> ArtifactVerdict:
    """A LoRA GGUF with its Modelfile: read back against the adapter (every A and scaled B), then run in llama.cpp on
    the base GGUF the Modelfile names, as Ollama would load the pair, and judged like any artifact against the
    reference (where llama-cpp-python is installed; else not run, never a pass)."""
    from ..exporters.gguf_readback import read_back_lora

    return _read_back_then_run(
        artifact,
        # the base GGUF's precision (the Modelfile is checked here too)
        lambda: (read_back_lora(artifact, checkpoint, base_dir), precision_of(artifact)),
        lambda: "full",
        reference,
        bounds,
        floor=lambda precision: precision,
        options=options,
        ran="read back ({tensors} LoRA tensors), llama.cpp on the base GGUF: ",
        unrun="read back ({tensors} LoRA tensors equal to the adapter's)",
    )
