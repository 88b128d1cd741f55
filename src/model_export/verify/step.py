"""The verify step, unit by unit: ``verify:reference`` (base + adapter, unmerged), then ``verify:<artifact>`` for each
artifact the export wrote, each declaring the configuration keys it reads (steps.Unit).

A rerun keeps what did not change. The reference is kept on disk (verify/.reference.cache) and reused while its key
holds; an artifact whose file and run settings are unchanged keeps its verdict and its verdict file untouched; when
only a bound changed (validation_*), it is judged again from its recorded metrics, without running a model. An
artifact that runs again says why (``verify:gguf reruns: its inputs changed``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint.base_model import tokenizer_source
from ..files import link_or_copy, strict_json, torch_save, write_atomic
from ..monitoring import logger
from ..steps import ConfigView, StepSpec, Unit, changed_values, files_in, fingerprint

__all__ = [
    "verify_step",
    "reference_unit",
    "compute_cached",
    "reference_cached",
    "reference_spec",
    "verify_spec",
    "verdict_counts",
    "REFERENCE_KEYS",
    "RUN_KEYS",
    "SERVED_KEYS",
    "BOUND_KEYS",
    "ADAPTER_ARTIFACTS",
]

ADAPTER_ARTIFACTS = ("peft", "gguf_lora", "onnx_adapter")  # per-adapter files, loaded on a base (a batch's shared one)
# What the reference reads; what running an artifact on the reference's inputs reads; the bounds that judge it.
REFERENCE_KEYS = (
    "test_input_samples",
    "validation_new_tokens",
    "max_sequence_length",
    "batch_size",
    "use_memory_mapping",
    "device_map",
    "verification_runtime",
    "base_model_load_in_4bit",
    "base_model_load_in_8bit",
)
# An artifact runs on the reference's own tokens: what they are (validation_new_tokens, max_sequence_length) reaches it
# through the reference's content key.
RUN_KEYS = ("batch_size", "use_memory_mapping", "device_map", "verification_runtime", "save_intermediate_results")
SERVED_KEYS = ("max_sequence_length", "vllm_python")  # what a served unit reads (the server's longest sequence)
METHOD = "teacher-forced"  # how the reference's logits are made and artifacts are run (an older cache is not reused)
BOUND_KEYS = (
    "validation_tolerance",
    "validation_min_top1",
    "validation_max_kl",
    "validation_int4_min_top1",
    "validation_int4_max_kl",
)
REFERENCE_CACHE = ".reference.cache"  # torch.save of the Reference (not a .pt: those are save_intermediate_results')


def reference_spec() -> StepSpec:
    """``verify:reference``: the base with the adapter, unmerged, on the prompts and the held-out text."""
    return StepSpec(
        "verify:reference",
        keys=REFERENCE_KEYS,
        reads=("save_intermediate_results", "max_memory"),  # max_memory changes time and memory, not the results
        needs=("check",),
        writes="verify",
    )


def verify_spec(label: str) -> StepSpec:
    """``verify:<artifact>``: one artifact run on the reference's inputs and judged on the bounds;
    ``verify:<artifact>@<server>`` (verify/served.py): an artifact served by a server (``adapter@vllm``: the run's
    adapter as a LoRA on the base, which needs only the check)."""
    artifact, served, _ = label.partition("@")
    export = f"export:{artifact.split('/')[0]}" if artifact != "adapter" else "check"
    return StepSpec(
        f"verify:{label}",
        keys=SERVED_KEYS if served else RUN_KEYS,
        bounds=BOUND_KEYS,
        needs=("verify:reference", export),
        writes="verify",
    )


@dataclass
class VerifyInputs:
    """What the verify step is given by the run: its configuration and folders, the checkpoint and base, the export's
    artifacts, the content keys of the steps before it, what a batch shares, the previous verify step's result and
    its units' records (run.json's ``verify:<unit>`` steps), and where to record each unit."""

    config: Any
    out: Path
    checkpoint: Path
    base_dir: Path
    artifacts: dict[str, str]
    details: dict[str, Any]
    upstream: dict[str, str]
    shared: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    record: Callable[[str, dict[str, Any]], None] = lambda name, record: None
    computed: dict[str, dict[str, Any]] = field(default_factory=dict)  # units computed in this run beside the export
    resident_cap: int | None = None  # max_memory auto at most this (preflight.resident_cap; None: no limit)


def verify_step(inputs: VerifyInputs, failed: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Verify every artifact; return the step's result (verdicts, counts, reference, units). ``failed(result)`` is
    called with the result before the first failure is raised (the report shows every verdict)."""
    from ..runtimes import runtime_problem
    from ..runtimes.vllm import vllm_problem, vllm_python
    from .artifacts import precision_of, verifiable
    from .judge import Bounds
    from .served import served_targets
    from .serving import serving_inputs

    c, verify_dir = inputs.config, inputs.out / "verify"
    verify_dir.mkdir(exist_ok=True)
    for stale in verify_dir.glob("*.pt"):  # an earlier run's intermediate results are never mistaken for this one's
        stale.unlink()
    previous = inputs.previous or {}
    reference = _LazyReference(inputs)
    # Every artifact was written from the merge: its weights went through the merge's dtype (bf16 for a bf16 base).
    merge = inputs.out / "merge"
    floor = precision_of(merge) if merge.is_dir() else precision_of(inputs.base_dir)
    bounds = ConfigView(c, BOUND_KEYS, "verify:bounds")
    upstream = {**inputs.upstream, "verify:reference": reference.unit.content_key}
    runnable = verifiable({f: p for f, p in inputs.artifacts.items() if f not in ADAPTER_ARTIFACTS})
    runnable += [(f, Path(inputs.artifacts[f])) for f in ADAPTER_ARTIFACTS if f in inputs.artifacts]
    runnable += served_targets(inputs.artifacts, inputs.checkpoint, list(c.verification_servers), bool(inputs.shared))
    verdicts, failures = {}, []
    for label, path in runnable:
        # whether its runtime can start here is an input too: a GGUF not run for want of llama.cpp runs once it is there
        ran = [_artifact_files(path, inputs), floor, runtime_problem(path), serving_inputs(path), METHOD]
        if "@" in label:  # whether the server can start here is an input: a unit not run reruns once it can
            ran[2] = vllm_problem(vllm_python(c.vllm_python))
        unit = verify_spec(label).unit(c, ran, upstream)
        earlier = previous.get("verdicts", {}).get(label)
        record = inputs.records.get(unit.name)
        verdict_file = verify_dir / f"{label}.json"  # kept only while its verdict file is as it was left
        if earlier and unit.kept(record, fingerprint([verdict_file])) and not c.save_intermediate_results:
            verdict, failure = _kept(unit, earlier, record, bounds, reference, floor, verdict_file)
        else:
            if record:  # a first run says nothing: every unit runs
                logger.info(i18n.ui("unit_reruns", unit=unit.name, why=unit.why(record)))
            verdict, failure, record = _verify_now(label, path, inputs, reference, Bounds.from_config(bounds), floor)
            verdict = verdict_record(verdict, verdict_file, c.save_intermediate_results)
        seconds = {"seconds": record["seconds"]} if record and "seconds" in record else {}
        unit_record = {**unit.record(fingerprint([verdict_file])), "bounds": bounds.values(), **seconds}
        inputs.record(unit.name, unit_record)
        verdicts[label] = verdict
        failures.append(failure)
    counts = verdict_counts(verdicts)
    # passed: true when every artifact was run and verified; null when none failed but some were not run.
    result = {
        "passed": None if counts["not_run"] else True,
        "counts": counts,
        "verdicts": verdicts,
        "reference": reference.summary(floor, previous.get("reference")),
    }
    failed_now = [f for f in failures if f is not None]
    if failed_now:  # every artifact was judged first, so the report shows them all; the first failure is raised
        failed({**result, "passed": False})
        raise failed_now[0]
    return result


def verdict_counts(verdicts: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many artifacts were verified, failed, and not run."""
    statuses = [v["status"] for v in verdicts.values()]
    return {status: statuses.count(status) for status in ("verified", "failed", "not_run")}


def verdict_record(verdict: Any, path: Path, intermediate: bool) -> dict[str, Any]:
    """The verdict as run.json and verify/<label>.json hold it (and its logits beside it with
    save_intermediate_results)."""
    data = verdict.to_dict()
    write_atomic(path, strict_json(data))
    if intermediate and verdict.outputs is not None:
        torch_save(verdict.outputs, path.with_suffix(".pt"))
    return data


def _kept(
    unit: Unit, earlier: dict, record: dict, bounds: ConfigView, reference: Any, floor: str, path: Path
) -> tuple[dict[str, Any], Any]:
    """An artifact unchanged since it was verified: its verdict as it was (its file untouched), or, when a bound
    changed, judged again on the new bounds from its recorded metrics (no model runs)."""
    from .judge import Bounds, rejudge

    changed = changed_values(record.get("bounds") or {}, bounds.values())
    if not changed or earlier.get("status") == "not_run" or earlier.get("error"):
        logger.info(i18n.ui("unit_kept", unit=unit.name))
        return earlier, _recorded_failure(earlier, Bounds.from_config(bounds), reference.precision, floor)
    logger.info(i18n.ui("unit_rejudged", unit=unit.name, why=changed))
    verdict = rejudge(earlier, Bounds.from_config(bounds), reference.precision, floor)
    return verdict_record(verdict, path, False), verdict.failure


def _recorded_failure(earlier: dict, bounds: Any, precision: str, floor: str) -> Any:
    """The failure a kept verdict stands for (the run still fails on it), judged again on the same bounds."""
    if earlier.get("status") != "failed":
        return None
    from ..errors import ValidationError
    from .judge import rejudge

    if earlier.get("error"):
        return ValidationError("inference_failed", artifact=earlier["artifact"], error=earlier["error"])
    return rejudge(earlier, bounds, precision, floor).failure


def _artifact_files(path: Path, inputs: VerifyInputs) -> list[Any]:
    """Fingerprints of what running an artifact reads: a folder's files, or a graph or GGUF file with what lies beside
    it (external data, genai_config.json, the tokenizer, a Modelfile), and a LoRA GGUF's base GGUF."""
    if path.is_dir():
        return fingerprint(files_in(str(path)) + _base_graph_files(path))
    others = tuple(p.name for p in path.parent.iterdir() if p.suffix in (".onnx", ".gguf") and p != path)
    files = [p for p in files_in(str(path.parent)) if p.name.startswith(path.name) or not p.name.startswith(others)]
    if inputs.shared.get("base_gguf") and path.suffix == ".gguf":
        files.append(Path(inputs.shared["base_gguf"]))
    return fingerprint(sorted(set(files)))


def _base_graph_files(folder: Path) -> list[Path]:
    """An .onnx_adapter's base graph when it lies elsewhere (a batch's base/export/onnx): what running it reads."""
    from ..errors import ExportError
    from ..runtimes.genai import PAIR_FILE, adapter_base

    if not (folder / PAIR_FILE).is_file():
        return []
    try:
        base = adapter_base(folder / PAIR_FILE)
    except ExportError:  # the adapter cannot run: its verdict says why
        return []
    return [] if base == folder.resolve() else files_in(str(base))


def _verify_now(
    label: str, path: Path, inputs: VerifyInputs, reference: Any, bounds: Any, floor: str
) -> tuple[Any, Any, dict[str, float]]:
    """Run one artifact and its serving check now: (its verdict, its failure, its own seconds - the reference's time
    is the reference's unit's)."""
    if label != "peft":
        reference.get()
    started = time.monotonic()
    verdict = _run_one(label, path, inputs, verify_spec(label).view(inputs.config), reference, bounds, floor)
    _serve(verdict, path, inputs)
    return verdict, verdict.failure, {"seconds": round(time.monotonic() - started, 3)}


def _serve(verdict: Any, path: Path, inputs: VerifyInputs) -> None:
    """The serving check of an artifact (a GGUF, an ONNX graph, a transformers folder), against the training run's
    tokenizer, also when its own runtime could not run it (a GGUF without llama-cpp-python: its Modelfile still renders
    in Go); a failure fails the artifact like a logit failure (its own failure first when it has one)."""
    from .judge import serving_failure
    from .serving import serving_check

    if verdict.error or path.name == "peft" or verdict.server is not None:
        return  # one that failed to load; a PEFT folder has no chat path of its own; a server's was checked in it
    tokenizer = training_tokenizer(inputs.checkpoint, inputs.base_dir)
    verdict.serving = serving_check(path, tokenizer)
    failure = serving_failure(verdict)
    if failure is not None:
        verdict.status, verdict.failure = "failed", verdict.failure or failure


def _run_one(
    label: str, path: Path, inputs: VerifyInputs, c: ConfigView, reference: Any, bounds: Any, floor: str
) -> Any:
    """Load and run one artifact in its runtime (reading the keys its unit declares) against the reference, and judge
    it."""
    from .artifacts import verify_artifact, verify_gguf, verify_gguf_lora, verify_peft_folder
    from .reference import RunOptions

    if "@" in label:
        return _served(label, path, inputs, c, reference.get(), bounds, floor)
    options = RunOptions.from_config(c)
    if label == "peft":
        return verify_peft_folder(path, inputs.checkpoint)
    if label == "gguf_lora":
        artifact = path / "adapter-lora-f32.gguf"
        run = reference.get()
        return verify_gguf_lora(artifact, inputs.checkpoint, inputs.base_dir, run, bounds, options=options)
    if label == "onnx_adapter":  # in onnxruntime-genai, active on its base graph: as precise as that graph
        from ..runtimes import precision_of
        from ..runtimes.genai import ADAPTER_FILE

        artifact, run = path / ADAPTER_FILE, reference.get()
        adapter_floor = precision_of(artifact) if artifact.is_file() else floor
        return verify_artifact(artifact, run, bounds, raise_on_failure=False, floor=adapter_floor, options=options)
    if label == "gguf":
        imatrix = inputs.details.get("gguf", {}).get("imatrix")
        return verify_gguf(
            path,
            inputs.out / "merge",
            reference.get(),
            bounds,
            floor=floor,
            options=options,
            imatrix=Path(imatrix) if imatrix else None,
        )
    run = reference.get()
    return verify_artifact(path, run, bounds, raise_on_failure=False, floor=floor, options=options)


def _served(label: str, path: Path, inputs: VerifyInputs, c: ConfigView, run: Any, bounds: Any, floor: str) -> Any:
    """An artifact served by vLLM (verify/served.py), with the training run's tokenizer; the server's log in
    verify/<label>.log."""
    from ..runtimes.vllm import vllm_python
    from .served import verify_served

    tokenizer = training_tokenizer(inputs.checkpoint, inputs.base_dir)
    return verify_served(
        label,
        path,
        run,
        bounds,
        base_dir=inputs.base_dir,
        tokenizer_dir=Path(tokenizer),
        python=vllm_python(c.vllm_python),
        max_len=c.max_sequence_length,
        floor=floor,
        log=inputs.out / "verify" / f"{label}.log",
    )


def training_tokenizer(checkpoint: Path, base_dir: Path) -> Path:
    """The tokenizer the training run used: the checkpoint's, the Trainer output's, else the base's."""
    return tokenizer_source([checkpoint, checkpoint.parent, base_dir]) or base_dir


def reference_unit(config: Any, shared: dict[str, Any], upstream: dict[str, str]) -> Unit:
    """``verify:reference``'s unit: its declared values, a batch's shared base logits (if any), check's content key."""
    held = shared.get("base_heldout")
    return reference_spec().unit(config, [held and fingerprint([Path(held)]), METHOD], upstream)


def reference_cached(unit: Unit, record: dict[str, Any] | None, out: Path) -> bool:
    """Whether verify/.reference.cache holds this reference: ``record`` (its unit's, from run.json or from the process
    beside the export) has the unit's key and the cache file as it left it."""
    cache = out / "verify" / REFERENCE_CACHE
    return cache.is_file() and unit.kept(record, fingerprint([cache]))


def compute_cached(
    config: Any, out: Path, checkpoint: Path, base_dir: Path, shared: dict[str, Any], unit: Unit, cap: int | None = None
) -> Any:
    """Compute the reference on the keys ``verify:reference`` declares and keep it in verify/.reference.cache; returns
    (the reference, the unit's record). Run by the verify step, or in a process of its own beside the export. ``cap``:
    what max_memory auto may keep resident at most (RunOptions.resident_cap)."""
    import dataclasses

    from .reference import RunOptions, compute_reference, other_road

    c, started = reference_spec().view(config), time.monotonic()
    held = shared.get("base_heldout")
    tokenizer = training_tokenizer(checkpoint, base_dir)
    reference = compute_reference(
        base_dir,
        checkpoint,
        tokenizer,
        c.test_input_samples,
        c.validation_new_tokens,
        load_in_4bit=c.base_model_load_in_4bit,
        load_in_8bit=c.base_model_load_in_8bit,
        options=dataclasses.replace(RunOptions.from_config(c, reference=True), resident_cap=cap),
        base_heldout=Path(held) if held else None,
        shared=_shared(shared.get("references"), checkpoint, base_dir),
    )
    reference.other_road = other_road(base_dir, checkpoint, tokenizer, reference, RunOptions.from_config(c, True))
    if reference.other_road:
        logger.info(i18n.ui("other_road_line", **reference.other_road))
    cache = out / "verify" / REFERENCE_CACHE
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial")
    _keep(reference, partial)
    os.replace(partial, cache)  # a process killed while writing leaves no cache that looks finished
    record = {**unit.record(fingerprint([cache])), "seconds": round(time.monotonic() - started, 3)}
    return reference, {**record, "precision": reference.precision}


def _keep(reference: Any, path: Path) -> None:
    """The reference saved to ``path``; one taken whole from a batch's file is that file, hard-linked (390 MB not
    written again at the 0.6B shape) or copied where the link cannot be made (load_reference reads either form)."""
    if reference.kept_in is None or reference.other_road is not None:
        torch_save(reference.to_dict(), path, crc=False)
        return
    path.unlink(missing_ok=True)  # a partial file a killed run left
    link_or_copy(reference.kept_in, path)


def _shared(folder: str | None, checkpoint: Path, base_dir: Path) -> Any:
    """compute_reference's ``shared``: the reference a batch made in its one pass for all adapters, when it was made
    from what this run asks (None without a batch's folder)."""
    if not folder:
        return None
    from .references import take_shared

    return lambda asked: take_shared(folder, checkpoint, base_dir, asked)


class _LazyReference:
    """``verify:reference``, computed (or read back from verify/.reference.cache while its key holds, or when it was
    computed beside the export: ``inputs.computed``) only when an artifact runs."""

    def __init__(self, inputs: VerifyInputs) -> None:
        self.inputs = inputs
        self.unit = reference_unit(inputs.config, inputs.shared, inputs.upstream)
        self.earlier = inputs.records.get(self.unit.name)
        ready = inputs.computed.get(self.unit.name)
        self.ready = ready if ready and ready.get("key") == self.unit.key else None
        self.reference: Any = None
        self.cache = inputs.out / "verify" / REFERENCE_CACHE
        if self.ready is not None:
            inputs.record(self.unit.name, self.ready)  # computed in this run, beside the export
        elif self.earlier is not None:
            inputs.record(self.unit.name, self.earlier)  # kept unless it runs again
        self.precision = (self.ready or self.earlier or {}).get("precision", "full")

    def get(self) -> Any:
        if self.reference is None:
            self.reference = self._load() or self._compute()
            self.precision = self.reference.precision
            if reference_spec().view(self.inputs.config).save_intermediate_results:  # kept to debug a failure
                data = {k: getattr(self.reference, k) for k in ("prompts", "input_ids", "logits", "greedy")}
                torch_save(data, self.cache.parent / "reference.pt")
        return self.reference

    def _load(self) -> Any:
        from .references import load_reference

        if not reference_cached(self.unit, self.ready or self.earlier, self.inputs.out):
            return None
        if self.ready is not None:
            logger.info(i18n.ui("unit_beside", unit=self.unit.name, seconds=self.ready.get("seconds", 0)))
        else:
            logger.info(i18n.ui("unit_kept", unit=self.unit.name))
        return load_reference(self.cache)

    def _compute(self) -> Any:
        if self.earlier:
            logger.info(i18n.ui("unit_reruns", unit=self.unit.name, why=self.unit.why(self.earlier)))
        i = self.inputs
        reference, record = compute_cached(
            i.config, i.out, i.checkpoint, i.base_dir, i.shared, self.unit, i.resident_cap
        )
        self.inputs.record(self.unit.name, record)
        return reference

    def summary(self, floor: str, earlier: dict[str, Any] | None) -> dict[str, Any]:
        """Where the reference ran, its precision, the merge's, and perplexities on the held-out text (recorded from
        the run that computed it when no artifact needed it this time)."""
        if self.reference is None and earlier:
            return {**earlier, "merge": floor}
        r = self.get()
        return {
            "device": r.device,
            "precision": r.precision,
            "merge": floor,
            # on the held-out text: what the adapter changed, beside which each artifact's perplexity reads
            "perplexity": r.heldout_perplexity,
            "base_perplexity": r.base_perplexity,
            "other_road": r.other_road,  # a QLoRA adapter: merged into the 16-bit weights instead
            "judged": {  # how every artifact was run: once over these tokens (teacher-forced)
                "prompts": len(r.input_ids),
                "greedy_tokens": [len(tokens) for tokens in r.greedy],
                "heldout_tokens": int(r.heldout_ids.numel()) if r.heldout_ids is not None else 0,
            },
        }
