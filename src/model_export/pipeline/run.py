"""The run: detect -> check -> merge -> calibrate -> export:<format> -> verify:<unit> -> benchmark -> report, resumable
step by step.

This module alone knows the order of the steps; what each reads and needs is declared in graph.py. Each step writes
under ``output_dir/<step>/`` and records itself in ``output_dir/run.json`` (state.py): status, a key hashing its
declared values, its inputs and the content keys of the steps it needs, duration and peak memory. Rerunning the same
configuration skips every step whose key is unchanged and says so; a changed setting reruns the steps that declare it
and those that need them, and says which value changed (``export:gguf reruns: gguf_output_type q4_k_m -> q6_k``).

    from model_export import load_config, run
    result = run(load_config("export.yaml"))   # batch.run: this run, or one per adapter of a batch
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint.adapter_format import read_adapter_config, weights_file
from ..checkpoint.base_model import inspect_base_model, tokenizer_source
from ..checkpoint.detect import detect
from ..checkpoint.loading import resolve_device
from ..checkpoint.validate import base_quantization, validate_checkpoint
from ..config import OUTPUT_STEPS, ExportConfiguration
from ..errors import BaseModelError, ExportError, explain
from ..merging.merger import merge, merge_settings
from ..monitoring import logger, setup_logging
from ..quantize.calibration import calibration_unused, calibration_used, gptq_wanted
from ..steps import ConfigView
from ..steps import files_in as _files
from ..steps import fingerprint as _fingerprint
from ..tensor_io import file_sha256
from .export_step import export_step
from .graph import STEP_SPECS
from .manifest import MANIFEST, StepRecord
from .preflight import check_disk_space
from .state import RunResult, RunState, output_lock
from .validate import check_config

__all__ = ["run_adapter", "RunResult", "MANIFEST", "STEPS"]

STEPS = OUTPUT_STEPS


def run_adapter(config: ExportConfiguration, shared: dict[str, Any] | None = None) -> RunResult:
    """Take one checkpoint to verified artifacts, resuming where an earlier run of the same config stopped.
    ``shared`` is what a batch (batch.py) made once for all its adapters (prepare_base): the base alone on the
    held-out text, the base's GGUF, and which artifacts the batch asks for.

    Raises ConfigError, CheckpointValidationError, BaseModelError, MergeError, ValidationError.
    """
    check_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        setup_logging(config.log_level, config.log_file or out / "export.log")
        state = RunState(config)
        state.shared = shared or {}
        state.manifest.config = config.model_dump(mode="json")
        with state.monitor:
            try:
                _steps(state)
            except BaseException as exc:  # every way out leaves a report saying why, and no step "running"
                error = explain(exc, i18n.ui("where_run"), state.log_file)
                _report(state, failure=error)
                _cleanup(state)
                if error is exc:
                    raise
                raise error from exc
            _cleanup(state)
    verify = state.results.get("verify", {})
    return RunResult(
        str(out),
        state.manifest.steps_dict(),
        state.results.get("export", {}).get("artifacts", {}),
        state.results.get("report", {}).get("html"),
        verify.get("passed"),
        verify.get("counts", {}),
    )


def _steps(state: RunState) -> None:
    """The steps in order, each as graph.STEP_SPECS declares it."""
    c = state.config
    checkpoint, base, info = _detect_and_check(state)
    merged = state.shared.get("outputs", "merged") != "adapters"  # a batch may ask for the adapters alone
    resolve_device(c.device_map)  # device_map: cuda without a GPU stops here (ME405), before anything is written
    if "tensorrt" in c.formats:
        from ..exporters.tensorrt_export import check_tensorrt

        check_tensorrt()  # no tensorrt package or no GPU: ME810 naming what is missing, before anything is written
    if c.run_validation_tests:
        state.beside = _reference_beside(state, checkpoint, info)
    imatrix = gptq = None
    if merged:
        if "merge" not in state.manifest.steps or state.manifest.steps["merge"].status != "done":
            check_disk_space(c, info, state.out)
        imatrix, gptq = _merge_and_calibrate(state, checkpoint, base, info.path)
    else:
        state.drop("merge", "calibrate")
    export_step(state, checkpoint, base, imatrix, gptq, merged=merged)
    if c.run_validation_tests:
        _verify_step(state, checkpoint, info)
    else:
        state.drop("verify")
        state.results["verify"] = {"skipped": i18n.ui("reason_validation_off")}
    if c.run_benchmarks:
        _benchmark_step(state)
    else:
        state.drop("benchmark")
    _report(state)


def _merged_into(c: ExportConfiguration, base: str) -> str:
    """The base the run merges into (merge_into): a quantized base is read as its dequantized weights already
    (checkpoint/quantized_base.py); a 16-bit base with base_model_quantization is quantized and dequantized as the
    training did, unless merge_into is original. ME306 for merge_into original on a quantized base, ME307 for
    dequantized with nothing quantized."""
    from ..checkpoint.base_model import resolve_base_model
    from ..checkpoint.quantized_base import MARKER, quantized_as_trained

    path = resolve_base_model(base)
    if (path / MARKER).is_file():
        if c.merge_into == "original":
            raise BaseModelError("base_not_original", path=base)
        return base
    if c.base_model_quantization and c.merge_into != "original":
        return str(quantized_as_trained(path, c.base_model_quantization))
    if c.merge_into == "dequantized":  # asked for, with nothing quantized to merge into
        raise BaseModelError("base_not_quantized", path=base)
    return base


def _detect_and_check(state: RunState) -> tuple[Path, str, Any]:
    """detect (which checkpoint) and check (the adapter against its base): the checkpoint, the base, its inspection."""
    c = state.config
    root = Path(c.checkpoint_path)
    candidates = sorted(root.glob("checkpoint-*/adapter_*")) + sorted(root.glob("adapter_*"))
    detection = state.step(
        STEP_SPECS["detect"],
        [_fingerprint(candidates)],
        lambda view: detect(view.checkpoint_path, view.checkpoint_selection).to_dict(),
    )
    checkpoint = Path(detection["selected"])
    logger.info(i18n.ui("detected", path=checkpoint))
    base = c.base_model_name or read_adapter_config(checkpoint).get("base_model_name_or_path")
    if not base:
        raise BaseModelError("base_model_unknown", path=str(checkpoint / "adapter_config.json"))
    base = _merged_into(c, base)
    info = inspect_base_model(base)
    quantized = base_quantization(info.path)
    if quantized:  # a QLoRA base: the merge, the reference and every artifact use its dequantized weights
        logger.info(quantized)
    adapter = [file_sha256(weights_file(checkpoint)), _fingerprint([checkpoint / "adapter_config.json"])]
    state.step(
        STEP_SPECS["check"],
        [base, _fingerprint(info.shards), *adapter],
        lambda view: {
            **validate_checkpoint(checkpoint, base, progress=view.enable_progress_monitoring).to_dict(),
            "base_bytes": info.weight_bytes,
            "base_dtypes": sorted({t.dtype for t in info.tensors.values()}),
        },
    )
    return checkpoint, base, info


def _merge_and_calibrate(
    state: RunState, checkpoint: Path, base: str, base_dir: Path
) -> tuple[Path | None, Path | None]:
    """merge, then calibrate when an artifact uses calibration data: the importance matrix and GPTQ's folder."""
    c = state.config
    calibration = _calibration_set(c, checkpoint, base_dir)  # bad data stops before the merge
    state.step(
        STEP_SPECS["merge"],
        [],
        lambda view: merge(checkpoint, base, state.out / "merge", **merge_settings(view), validate=False).to_dict(),
        outputs=lambda result: _files(result.get("output_dir")),
    )
    unused = calibration_unused(c)
    if unused:
        logger.warning(i18n.ui("calibration_unused", path=c.calibration_data, formats=", ".join(unused)))
    if calibration is None:
        state.drop("calibrate")
        return None, None
    calibrated = state.step(
        STEP_SPECS["calibrate"],
        [file_sha256(Path(calibration.path)), calibration.samples],
        lambda view: _calibrate(state, view, calibration),
        outputs=lambda result: _files(str(state.out / "calibrate")) if result else [],
    )
    imatrix = Path(calibrated["imatrix"]) if calibrated.get("imatrix") else None
    return imatrix, Path(calibrated["gptq"]["folder"]) if calibrated.get("gptq") else None


def _reference_beside(state: RunState, checkpoint: Path, info: Any) -> Any:
    """verify:reference started in a process of its own beside the merge and export when the memory rule allows
    (pipeline/beside.py), unless run.json holds it unchanged; None when it waits for the verify step."""
    from ..verify.step import reference_cached, reference_unit
    from .beside import Beside, beside_rule

    unit = reference_unit(state.config, state.shared, state.content)
    earlier = state.manifest.steps.get(unit.name)
    if earlier and reference_cached(unit, earlier.unit_record(), state.out):
        return None
    side_by_side, rule = beside_rule(state.config, info, bool(state.shared))
    logger.info(i18n.ui("beside_start" if side_by_side else "beside_not", rule=rule))
    if not side_by_side:
        return None
    return Beside(state.config, state.out, checkpoint, info, dict(state.content))


def _benchmark_step(state: RunState) -> None:
    from dataclasses import asdict

    from .benchmark import benchmark

    def measure(view: ConfigView) -> dict[str, Any]:
        results = benchmark(
            state.out,
            prompt=(view.test_input_samples or ["Hello"])[0],
            new_tokens=view.benchmark_new_tokens,
            batch_size=view.batch_size,
            repeats=view.benchmark_repeats,
            device_map=view.device_map,
        )
        return {"results": [asdict(r) for r in results]}

    state.step(STEP_SPECS["benchmark"], [], measure)


def _calibration_set(c: ExportConfiguration, checkpoint: Path, base_dir: Path) -> Any:
    """The calibration samples when an artifact of this run uses them (the GGUF's importance matrix), else None;
    ConfigError when the data cannot be used."""
    if not calibration_used(c):
        return None
    from transformers import AutoTokenizer

    from ..quantize.calibration import calibration_samples

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source([checkpoint, checkpoint.parent, base_dir])))
    found = calibration_samples(c.calibration_data, tokenizer, c.calibration_samples, c.calibration_sequence_length)
    logger.info(
        i18n.ui(
            "calibration_read",
            path=found.path,
            kind=found.kind,
            samples=len(found.samples),
            length=c.calibration_sequence_length,
            asked=c.calibration_samples,
        )
    )
    return found


def _progress_to(meter: Any) -> Callable[[int, int], None]:
    """A callback taking (done, total) counts that advances ``meter`` to ``done``."""
    done = [0]

    def advance(finished: int, total: int) -> None:
        meter.advance(finished - done[0])
        done[0] = finished

    return advance


def _calibrate(state: RunState, view: ConfigView, calibration: Any) -> dict[str, Any]:
    """What the calibration samples give the export, in one layer-streamed pass of the merged model: GPTQ's levels
    (calibrate/gptq/) when int4 safetensors or ONNX use them, and the importance matrix as llama.cpp's imatrix.gguf
    when the GGUF does (GPTQ's pass collects it too, so the model runs once)."""
    from ..monitoring import Progress
    from ..quantize.gguf_types import uses_importance
    from ..quantize.imatrix import collect_imatrix, write_imatrix

    c, merged = view, state.out / "merge"
    folder = state.out / "calibrate"
    folder.mkdir(exist_ok=True)
    result: dict[str, Any] = {
        "data": calibration.path,
        "kind": calibration.kind,
        "samples": len(calibration.samples),
        "tokens": calibration.tokens,
    }
    imatrix = {} if "gguf" in c.formats and uses_importance(c) else None
    if gptq_wanted(c):
        from ..exporters.safetensors_quant import int4_group_size
        from ..quantize.gptq import calibrate_gptq

        layers = json.loads((merged / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
        meter = Progress(i18n.ui("progress_gptq"), layers)
        try:
            result["gptq"] = {
                "folder": str(folder / "gptq"),
                **calibrate_gptq(
                    merged,
                    calibration.samples,
                    folder / "gptq",
                    group_size=int4_group_size(merged, c.quantization_group_size, c.quantization_keep_modules),
                    act_order=c.gptq_act_order,
                    on_layer=_progress_to(meter),
                    imatrix=imatrix,
                ),
            }
        finally:
            meter.close()
    elif imatrix is not None:
        meter = Progress(i18n.ui("progress_calibrate"), len(calibration.samples))
        try:
            imatrix = collect_imatrix(merged, calibration.samples, on_pass=_progress_to(meter))
        finally:
            meter.close()
    if imatrix is not None:
        path = write_imatrix(
            folder / "imatrix.gguf", imatrix, datasets=[calibration.path], chunk_size=len(calibration.samples[0])
        )
        result.update(imatrix=str(path), matrices=len(imatrix))
    return result


def _verify_step(state: RunState, checkpoint: Path, info: Any) -> None:
    """verify: ``verify:reference`` and one ``verify:<artifact>`` per artifact (verify/step.py), each recorded in
    run.json as a step of its own and kept while unchanged; the step ``verify`` holds the verdicts. It always looks at
    its units (a bound change re-judges a kept verdict without running a model); it counts as skipped when every unit
    was kept."""
    from ..verify.step import VerifyInputs, verify_step
    from .preflight import resident_cap

    export = state.results["export"]
    earlier = state.manifest.steps.get("verify")
    records = {n: r.unit_record() for n, r in state.manifest.steps.items() if n.startswith("verify:")}
    state.drop(*records)
    ran: list[str] = []

    def record(name: str, unit: dict[str, Any]) -> None:
        state.manifest.steps[name] = StepRecord.of_unit(unit, time.strftime("%Y-%m-%d %H:%M:%S"))
        state.manifest.steps[name].skipped = unit == records.get(name)
        if not state.manifest.steps[name].skipped:
            ran.append(name)
        state.save()

    computed = {}
    if state.beside is not None:  # verify:reference, computed beside the merge and export
        beside, state.beside = state.beside, None
        ready = beside.result()
        if ready is not None:
            computed["verify:reference"] = ready
    inputs = VerifyInputs(
        state.config,
        state.out,
        checkpoint,
        info.path,
        export["artifacts"],
        export.get("details", {}),
        dict(state.content),
        state.shared,
        earlier.result if earlier else None,
        records,
        record,
        computed,
        resident_cap(state.config, info),
    )
    state.step(
        STEP_SPECS["verify"],
        [],
        lambda view: verify_step(inputs, lambda result: state.results.__setitem__("verify", result)),
        always=True,
    )
    state.manifest.steps["verify"].skipped = not ran
    state.save()


def _report(state: RunState, failure: ExportError | None = None) -> None:
    from .report import summary_rows, write_report

    paths = write_report(
        state.out, {"steps": state.manifest.steps_dict()}, state.results, state.monitor.samples, failure
    )
    for row in summary_rows(state.results):
        if row["warning"]:
            logger.warning("%s: %s", row["format"], row["warning"])
    state.results["report"] = paths
    logger.info(i18n.ui("run_done", report=paths["html"]))


def _cleanup(state: RunState) -> None:
    """cleanup_temp_files: true removes every *.partial (what a failed or killed step was writing) when the run ends,
    failed or not; false keeps them for debugging and says where they are. A reference still computing beside a run
    that failed is stopped."""
    if state.beside is not None:
        state.beside.stop()
        state.beside = None
    # Only inside the run's own step folders: nothing else under output_dir is the run's to delete.
    leftovers = sorted(
        p for step in STEPS if (state.out / step).is_dir() for p in (state.out / step).rglob("*.partial")
    )
    if not state.config.cleanup_temp_files:
        for leftover in leftovers:
            logger.info(i18n.ui("partial_kept", path=leftover))
        return
    for leftover in leftovers:
        logger.debug("removing %s", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
