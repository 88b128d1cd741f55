"""Judging an artifact against the reference: the bounds by precision, each sample's metrics, the verdict and its rule.

An artifact is judged on the bounds of the coarser of its precision and the reference's: byte-for-byte closeness for
full precision, KL and top-1 agreement for reduced precision and int4. A recorded verdict is judged again from its
metrics when only a bound changed (rejudge), without running a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ValidationError
from ..files import finite
from ..monitoring import logger
from ..runtimes import precision_of
from .reference import Reference

__all__ = [
    "Bounds",
    "SampleResult",
    "ArtifactVerdict",
    "judge",
    "rejudge",
    "not_run",
    "coarsest",
    "readback_words",
    "along",
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
    greedy_agreement: float | None  # None for the held-out text, which is scored, not generated


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
    serving: dict[str, Any] | None = None  # the serving check (verify/serving.py): chat template and stop set
    server: dict[str, Any] | None = None  # served by a server (verify/served.py): its command, start time, memory
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


def along(start: int, want: list[int], chosen: list[int]) -> list[int]:
    """An artifact's own greedy tokens along the reference's ``want`` (which follow position ``start``), from its
    choice at each position (``chosen``, teacher-forced): up to and including the first that differs from the
    reference's token - after it, the artifact would have gone its own way."""
    tokens = []
    for mine, theirs in zip(chosen[start : start + len(want)], want):
        tokens.append(int(mine))
        if mine != theirs:
            break
    return tokens


def agreement(want: list[int], tokens: list[int]) -> float:
    """Greedy agreement: the share of the reference's tokens ``want`` that ``tokens`` (an artifact's, along them)
    matches position by position."""
    return sum(a == b for a, b in zip(want, tokens)) / max(len(want), 1)


HELDOUT_SAMPLE = "(held-out text)"  # the held-out text's row among the samples (it has no greedy agreement)


def _pairs(reference: Reference, logits: list[Any], heldout: Any) -> list[tuple[str, Any, Any]]:
    """(sample, the reference's logits, the artifact's) for each prompt and, when both have it, the held-out text."""
    pairs = list(zip(reference.prompts, reference.logits, logits))
    if heldout is not None and reference.heldout_logits is not None:
        pairs.append((HELDOUT_SAMPLE, reference.heldout_logits, heldout))
    return pairs


def compare(
    reference: Reference, logits: list[Any], greedy: list[list[int]], heldout: Any = None
) -> list[SampleResult]:
    """Each sample's metrics at every position (measures.differences): each prompt with the reference's tokens (and
    its greedy agreement), then the held-out text (``heldout``: the artifact's logits on it)."""
    from .measures import differences

    samples = []
    wanted = [*zip(reference.greedy, greedy), (None, None)]
    for (prompt, ref, got), (ref_tokens, tokens) in zip(_pairs(reference, logits, heldout), wanted):
        largest, mean, kl, top1 = differences(ref, got)
        agree = None if ref_tokens is None else agreement(ref_tokens, tokens)  # the held-out text is not generated
        samples.append(SampleResult(prompt, largest, mean, max(kl, 0.0), top1, agree))
    return samples


def logit_histogram(
    reference: Reference, logits: list[Any], heldout: Any = None, bins: int = 24
) -> dict[str, list[float]]:
    """The report's histogram of |artifact - reference| over every position and token of every sample (measures.
    histogram: a NaN or inf difference is left out, the artifact failing on its metrics)."""
    from .measures import histogram

    top, counts = histogram([(ref, got) for _, ref, got in _pairs(reference, logits, heldout)], bins)
    return {"edges": [top * i / bins for i in range(bins + 1)], "counts": counts}


def precision_or_unknown(artifact: Path) -> str:
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
    verdict.failure = judge(verdict, bounds, reference_precision, floor) or serving_failure(verdict)
    verdict.rule = verdict.rule_prefix + verdict.rule
    verdict.status = "verified" if verdict.failure is None else "failed"
    return verdict


def serving_failure(verdict: ArtifactVerdict) -> ValidationError | None:
    """ME607 for the first check of the verdict's serving check that failed: the runtime, and both renderings or the
    missing stop token; None when none failed (a check that did not run is no failure)."""
    failed = [c for c in (verdict.serving or {}).get("checks", []) if c["status"] == "failed"]
    if not failed:
        return None
    check = failed[0]
    if "expected" in check:
        problem = i18n.ui(
            "serving_renders",
            number=check["conversation"],
            roles=check["roles"],
            expected=repr(check["expected"]),
            got=repr(check["got"]),
        )
    elif "stop" in check:
        problem = i18n.ui("serving_stop", stop=repr(check["stop"]), held=check.get("held"))
    else:
        problem = i18n.ui("serving_fails", reason=check.get("reason", ""))
    return ValidationError("serving_mismatch", artifact=verdict.artifact, runtime=check["runtime"], problem=problem)


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
        measure = "logprob" if verdict.server else "logit"  # a server gives top-k log-probabilities, not logits
        verdict.rule = f"max |{measure} diff| <= {i18n.format_number(bounds.tolerance)}"
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
