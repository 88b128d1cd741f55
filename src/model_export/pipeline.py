"""The run: detect -> check -> merge -> export -> verify -> report, resumable step by step.

This module alone knows the order of the steps. Each step writes under ``output_dir/<step>/`` and
records itself in ``output_dir/run.json``: status, a key hashing its inputs and settings (and the
keys of the steps before it), duration and peak memory. Rerunning the same configuration skips
every step whose key is unchanged and says so; a changed setting changes that step's key and so
the keys of every step after it, which rerun.

    from model_export import load_config, run
    result = run(load_config("export.yaml"))   # batch.run: this run, or one per adapter of a batch
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import i18n
from .adapter_format import read_adapter_config, weights_file
from .base_model import inspect_base_model
from .calibration import calibration_unused, calibration_used, gptq_wanted
from .checkpoint_detector import detect
from .checkpoint_validator import validate_checkpoint
from .config import OUTPUT_STEPS, ExportConfiguration
from .config_validator import check_config
from .errors import BaseModelError, ExportError, ResourceError, explain
from .faults import crash_point
from .hf_layout import tokenizer_source, write_atomic
from .manifest import MANIFEST, RunManifest, StepRecord, strict_json
from .model_merger import merge, merge_settings
from .monitoring import MemoryMonitor, human_bytes, logger, setup_logging, timed_step
from .reference import resolve_device
from .steps import STEP_FILE
from .steps import files_in as _files
from .steps import fingerprint as _fingerprint
from .steps import key_hash as _hash
from .tensor_io import file_sha256

__all__ = ["run_adapter", "prepare_base", "RunResult", "MANIFEST", "STEPS"]

STEPS = OUTPUT_STEPS


@dataclass
class RunResult:
    output_dir: str
    steps: dict[str, dict[str, Any]]
    artifacts: dict[str, str] = field(default_factory=dict)
    report: str | None = None
    passed: bool | None = None  # True: every artifact run and verified; None: some not run (or no verification)
    counts: dict[str, int] = field(default_factory=dict)  # verified, failed, not_run

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "steps": self.steps,
            "artifacts": self.artifacts,
            "report": self.report,
            "passed": self.passed,
            "counts": self.counts,
        }


class _Run:
    def __init__(self, config: ExportConfiguration) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.manifest_path = self.out / MANIFEST
        self.manifest = RunManifest.load(self.manifest_path)
        self.keys: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.monitor = MemoryMonitor(config.memory_monitoring_interval, enabled=config.memory_monitoring)
        self.log_file = str(config.log_file or self.out / "export.log")
        self.shared: dict[str, Any] = {}

    def _save(self) -> None:
        try:
            self.manifest.save(self.manifest_path)
        except OSError as exc:  # the disk filled up (or went read-only) while run.json was written
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceError(
                    "disk_full", step="run.json", path=str(self.out), free=_free_space(self.out)
                ) from exc
            raise

    def step(
        self,
        name: str,
        inputs: Any,
        action: Callable[[], dict[str, Any]],
        outputs: Callable[[dict[str, Any]], list[Path]] = lambda result: [],
    ) -> dict[str, Any]:
        """Run ``action`` unless the manifest holds this step done with the same key and its output files
        unchanged (name, size, modification time, sampled content); record what happened."""
        previous = [self.keys[s] for s in STEPS[: STEPS.index(name)] if s in self.keys]
        key = _hash([name, previous, inputs])
        self.keys[name] = key
        record = self.manifest.steps.get(name) or StepRecord(status="none")
        unchanged = record.outputs == _fingerprint(outputs(record.result))
        logger.debug(
            "step %s: key %s (recorded: %s, status %s), outputs unchanged: %s",
            name,
            key[:12],
            record.key[:12] or "none",
            record.status,
            unchanged,
        )
        if record.status == "done" and record.key == key and unchanged:
            logger.info(i18n.ui("step_skipped", step=name, when=record.finished or "?"))
            record.skipped = True
            self.results[name] = record.result
            return self.results[name]
        first_sample = len(self.monitor.samples)
        self.monitor.sample()
        self.manifest.steps[name] = record = StepRecord(status="running", key=key)
        self._save()
        try:
            with timed_step(name) as timing:  # logs the step's duration, or its failure
                result = action()
        except BaseException as exc:  # recorded as failed with the reason, whatever it is (Ctrl-C included)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                error = ResourceError("disk_full", step=name, path=str(self.out), free=_free_space(self.out))
            else:
                error = explain(exc, i18n.ui("where_step", step=name), self.log_file)
            record.status, record.error, record.seconds = "failed", error.to_dict(), round(timing["seconds"], 3)
            record.result = self.results.get(name)  # what a failing step judged before it stopped (verify's verdicts)
            record.peak_rss = max((rss for _, rss in self.monitor.samples[first_sample:]), default=None)
            self._save()
            if error is exc:
                raise
            raise error from exc
        self.monitor.sample()
        (self.out / name).mkdir(exist_ok=True)
        write_atomic(self.out / name / STEP_FILE, strict_json(result))
        record.status, record.result, record.outputs = "done", result, _fingerprint(outputs(result))
        record.seconds = round(timing["seconds"], 3)
        record.peak_rss = max(rss for _, rss in self.monitor.samples[first_sample:])
        record.finished = time.strftime("%Y-%m-%d %H:%M:%S")
        self._save()
        crash_point("step")
        self.results[name] = result
        return result


def _free_space(path: Path) -> str:
    try:
        return human_bytes(shutil.disk_usage(path).free)
    except OSError:
        return "?"


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
        state = _Run(config)
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


def prepare_base(config: ExportConfiguration, base: str, folder: Path) -> dict[str, Any]:
    """What a batch makes once for all its adapters, under output_dir/base/ (its own run.json; resumed as a run's
    steps are): the base alone on the held-out text, which every adapter's layer-streamed reference reuses, and, when
    the batch asks for the adapters themselves (batch_outputs adapters or both) with gguf, the base's GGUF that each
    adapter's LoRA GGUF and Modelfile load on. Returns what each adapter's run is given (run_adapter's ``shared``)."""
    c = config
    info = inspect_base_model(base)
    folder.mkdir(parents=True, exist_ok=True)
    state = _Run(ExportConfiguration(**{**c.model_dump(mode="json"), "output_dir": str(folder), "adapters": []}))
    state.manifest.config = {"base": str(info.path), "batch_outputs": c.batch_outputs}
    shared: dict[str, Any] = {"outputs": c.batch_outputs, "base": str(info.path)}
    if c.batch_outputs != "merged" and "gguf" in c.formats:
        from .exporters import FORMATS

        result = state.step(
            "export",
            [str(info.path), _fingerprint(info.shards), c.quantization_level, FORMATS["gguf"].settings(c)],
            lambda: _base_gguf(c, info.path, folder / "export"),
            outputs=lambda result: _files(result.get("folder")),
        )
        shared["base_gguf"] = result["path"]
    if c.run_validation_tests and c.verification_runtime != "transformers":
        from .verify import base_heldout_logits, heldout_ids

        path = folder / "verify" / "base-heldout.pt"

        def heldout() -> dict[str, Any]:
            from transformers import AutoTokenizer

            from .verify import _max_positions

            tokenizer = AutoTokenizer.from_pretrained(str(info.path))
            ids = heldout_ids(tokenizer, min(c.max_sequence_length, _max_positions(info.path)))
            base_heldout_logits(info.path, ids, save_to=path)
            return {"path": str(path), "tokens": int(ids.numel())}

        state.step(
            "verify",
            [str(info.path), _fingerprint(info.shards), c.max_sequence_length],
            heldout,
            outputs=lambda result: [Path(result["path"])] if result.get("path") else [],
        )
        shared["base_heldout"] = str(path)
    return shared


def _base_gguf(c: ExportConfiguration, base_dir: Path, export: Path) -> dict[str, Any]:
    """The base model as a GGUF (the configured quantization, data-free: an importance matrix belongs to one merged
    model), read back against the base, in export/gguf with base.json naming the base folder."""
    from .exporters.gguf_export import export_gguf, gguf_type_for, read_back

    def write(partial: Path) -> dict[str, Any]:
        details = export_gguf(
            base_dir,
            partial,
            gguf_type=gguf_type_for(c.quantization_level, base_dir, c.gguf_type),
            name=base_dir.name,
            output_type=c.gguf_output_type,
            token_embedding_type=c.gguf_token_embedding_type,
            keep=c.quantization_keep_modules,
        )
        write_atomic(partial / "base.json", strict_json({"base_dir": str(base_dir)}))
        return {**details, "readback": read_back(details["path"], base_dir)}

    target = export / "gguf"
    return {**_into_folder(target, write), "folder": str(target)}


LOCK_FILE = ".model-export.lock"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on ``out`` for the run: a second run on the same directory fails at once (ME402), naming
    the process that holds it. flock is released by the kernel when its process dies, so a killed run's lock never
    blocks the next one (the stale file is simply taken over)."""
    import fcntl
    import socket

    handle = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = dict(line.split("=", 1) for line in handle.read().splitlines() if "=" in line)
            raise ResourceError(
                "output_dir_locked",
                path=str(out),
                pid=holder.get("pid", "?"),
                host=holder.get("host", "?"),
                started=holder.get("started", "?"),
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _steps(state: _Run) -> None:
    c = state.config
    root = Path(c.checkpoint_path)
    candidates = sorted(root.glob("checkpoint-*/adapter_*")) + sorted(root.glob("adapter_*"))
    detection = state.step(
        "detect",
        [c.checkpoint_path, c.checkpoint_selection, _fingerprint(candidates)],
        lambda: detect(c.checkpoint_path, c.checkpoint_selection).to_dict(),
    )
    checkpoint = Path(detection["selected"])
    logger.info(i18n.ui("detected", path=checkpoint))
    base = c.base_model_name or read_adapter_config(checkpoint).get("base_model_name_or_path")
    if not base:
        raise BaseModelError("base_model_unknown", path=str(checkpoint / "adapter_config.json"))
    info = inspect_base_model(base)
    state.step(
        "check",
        [
            base,
            _fingerprint(info.shards),
            file_sha256(weights_file(checkpoint)),
            _fingerprint([checkpoint / "adapter_config.json"]),
        ],
        lambda: {
            **validate_checkpoint(checkpoint, base, progress=c.enable_progress_monitoring).to_dict(),
            "base_bytes": info.weight_bytes,
            "base_dtypes": sorted({t.dtype for t in info.tensors.values()}),
        },
    )
    outputs = state.shared.get("outputs", "merged")  # a batch may ask for the adapters alone, on its shared base
    resolve_device(c.device_map)  # device_map: cuda without a GPU stops here (ME405), before anything is written
    if "tensorrt" in c.formats:
        from .exporters.tensorrt_export import check_tensorrt

        check_tensorrt()  # no tensorrt package or no GPU: ME810 naming what is missing, before anything is written
    merged = outputs != "adapters"
    if merged and ("merge" not in state.manifest.steps or state.manifest.steps["merge"].status != "done"):
        check_disk_space(c, info, state.out)
    calibration = _calibration_set(c, checkpoint, info.path) if merged else None  # bad data stops before the merge
    if merged:
        settings = merge_settings(c)  # the same translation ModelMerger(config).merge() uses
        key = [settings[k] for k in ("dtype", "max_shard_size", "compress_weights", "remove_training_artifacts")]
        state.step(
            "merge",
            key,
            lambda: merge(checkpoint, base, state.out / "merge", **settings, validate=False).to_dict(),
            outputs=lambda result: _files(result.get("output_dir")),
        )
    else:
        for name in ("merge", "calibrate"):
            state.manifest.steps.pop(name, None)
    imatrix = gptq = None
    if calibration is not None:
        calibrated = state.step(
            "calibrate",
            [file_sha256(Path(calibration.path)), calibration.samples, gptq_wanted(c), c.gptq_act_order],
            lambda: _calibrate(state, calibration),
            outputs=lambda result: _files(str(state.out / "calibrate")) if result else [],
        )
        imatrix = Path(calibrated["imatrix"]) if calibrated.get("imatrix") else None
        gptq = Path(calibrated["gptq"]["folder"]) if calibrated.get("gptq") else None
    unused = calibration_unused(c) if merged else []
    if unused:
        logger.warning(i18n.ui("calibration_unused", path=c.calibration_data, formats=", ".join(unused)))
    from .exporters import FORMATS

    export_settings = [
        c.formats,
        c.quantization_level,
        c.max_shard_size,
        c.compress_weights,
        c.remove_training_artifacts,
        c.quantization_group_size,
        c.quantization_keep_modules,
        c.quantization_method,
    ]
    export_settings += [[fmt, *FORMATS[fmt].settings(c)] for fmt in c.formats]
    export_settings += [outputs, state.shared.get("base_gguf")]
    earlier = state.manifest.steps.get("export")
    state.step(
        "export",
        export_settings,
        lambda: _export(state, checkpoint, base, imatrix, gptq, merged=merged, previous=earlier and earlier.result),
        outputs=lambda result: [f for path in result.get("artifacts", {}).values() for f in _files(path)],
    )
    if c.run_validation_tests:
        settings = [
            c.test_input_samples,
            c.validation_tolerance,
            c.validation_min_top1,
            c.validation_max_kl,
            c.validation_int4_min_top1,
            c.validation_int4_max_kl,
            c.validation_new_tokens,
            c.base_model_load_in_4bit,
            c.base_model_load_in_8bit,
            c.max_sequence_length,
            c.batch_size,
            c.save_intermediate_results,
            c.verification_runtime,
        ]
        earlier = state.manifest.steps.get("verify")
        state.step("verify", settings, lambda: _verify(state, checkpoint, info.path, earlier and earlier.result))
    else:
        state.manifest.steps.pop("verify", None)
        state.results["verify"] = {"skipped": i18n.ui("reason_validation_off")}
    if c.run_benchmarks:
        from dataclasses import asdict

        from .benchmark import benchmark

        settings = [c.test_input_samples[:1], c.benchmark_new_tokens, c.batch_size, c.benchmark_repeats]
        state.step(
            "benchmark",
            settings,
            lambda: {
                "results": [
                    asdict(r)
                    for r in benchmark(
                        state.out,
                        prompt=(c.test_input_samples or ["Hello"])[0],
                        new_tokens=c.benchmark_new_tokens,
                        batch_size=c.batch_size,
                        repeats=c.benchmark_repeats,
                        device_map=c.device_map,
                    )
                ]
            },
        )
    else:
        state.manifest.steps.pop("benchmark", None)
    _report(state)


def disk_needed(config: ExportConfiguration, info: Any) -> dict[str, int]:
    """The bytes each part of the run will write under output_dir, from the base model's parameter count and dtypes
    and each format's declared bytes per parameter."""
    from .exporters import FORMATS

    params = sum(math.prod(t.shape) for t in info.tensors.values())
    base_size = info.weight_bytes / max(params, 1)  # bytes per parameter of the base (2 for bf16)
    needs = {"merge": {"bf16": 2.0, "fp16": 2.0}.get(config.quantization_level, base_size)}
    for fmt in config.formats:
        needs[fmt] = FORMATS[fmt].bytes_per_param(config, base_size)
    return {part: int(per * params) for part, per in needs.items()}


def check_disk_space(config: ExportConfiguration, info: Any, out: Path, adapters: int = 1) -> None:
    """Stop before writing anything when output_dir's disk cannot hold what the run will write (ME404), with the
    numbers; a batch asks for its ``adapters`` still to run at once, as side by side they share the disk."""
    needs = disk_needed(config, info)
    free = shutil.disk_usage(out).free
    total = sum(needs.values()) * adapters
    if total > free:
        parts = ", ".join(f"{part} {human_bytes(size)}" for part, size in needs.items())
        if adapters > 1:
            parts = i18n.ui("batch_disk_parts", count=adapters, parts=parts)
        raise ResourceError(
            "disk_too_small", path=str(out), free=human_bytes(free), need=human_bytes(total), parts=parts
        )


def _calibration_set(c: ExportConfiguration, checkpoint: Path, base_dir: Path) -> Any:
    """The calibration samples when an artifact of this run uses them (the GGUF's importance matrix), else None;
    ConfigError when the data cannot be used."""
    if not calibration_used(c):
        return None
    from transformers import AutoTokenizer

    from .calibration import calibration_samples

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


def _calibrate(state: _Run, calibration: Any) -> dict[str, Any]:
    """What the calibration samples give the export, in one layer-streamed pass of the merged model: GPTQ's levels
    (calibrate/gptq/) when int4 safetensors or ONNX use them, and the importance matrix as llama.cpp's imatrix.gguf
    when the GGUF does (GPTQ's pass collects it too, so the model runs once)."""
    from .exporters.gguf_export import uses_importance
    from .imatrix import collect_imatrix, write_imatrix
    from .monitoring import Progress

    c, merged = state.config, state.out / "merge"
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
        from .exporters.safetensors_quant import int4_group_size
        from .gptq import calibrate_gptq

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


def _export(
    state: _Run,
    checkpoint: Path,
    base: str,
    imatrix: Path | None = None,
    gptq: Path | None = None,
    *,
    merged: bool = True,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One folder per format under export/, each written by its format's exporter (exporters.FORMATS) into a hidden
    partial folder that is renamed when complete; in a batch that asks for the adapters themselves, also (or only)
    what loads on the shared base: export/peft and, with the base's GGUF, export/gguf_lora.

    Each format is a unit of its own (steps.Unit: ``export:gguf``) that reads only the keys it declares: a folder the
    ``previous`` export wrote with the same key and untouched files is kept as it is (a GGUF-only change rewrites the
    GGUF alone), and one that is written again says why."""
    from .exporters import FORMATS, WEIGHT_SUFFIXES, ExportContext
    from .steps import ConfigView, Unit

    c, export = state.config, state.out / "export"
    artifacts, details = {}, {}
    calibrated = [state.keys.get("calibrate")] if imatrix or gptq else []
    writers: list[tuple[Unit, Callable[[Path], dict[str, Any]]]] = []
    if merged:
        for fmt in c.formats:
            view = ConfigView(c, FORMATS[fmt].keys, f"export:{fmt}")
            context = ExportContext(state.out / "merge", Path(), view, checkpoint, base, imatrix, gptq)
            unit = Unit(f"export:{fmt}", view.values(), [state.keys.get("merge"), *calibrated])
            writers.append((unit, lambda partial, ctx=context, fmt=fmt: FORMATS[fmt].export(replace(ctx, out=partial))))
    if state.shared.get("outputs") in ("adapters", "both"):
        adapter = [state.keys.get("check")]
        writers.append((Unit("export:peft", {}, adapter), lambda partial: _peft_folder(checkpoint, partial)))
        if state.shared.get("base_gguf"):
            gguf = Path(state.shared["base_gguf"])
            unit = Unit("export:gguf_lora", {}, [*adapter, str(gguf), _fingerprint([gguf])])
            writers.append((unit, lambda partial: _gguf_lora(checkpoint, gguf, partial)))
    earlier = (previous or {}).get("details", {})
    for unit, write in writers:
        fmt = unit.name.split(":", 1)[1]
        target = export / fmt
        artifacts[fmt] = str(target)
        if unit.kept(earlier.get(fmt), _fingerprint(_files(str(target)))):
            logger.info(i18n.ui("unit_kept", unit=unit.name))
            details[fmt] = earlier[fmt]
            continue
        logger.info(i18n.ui("unit_reruns", unit=unit.name, why=unit.why(earlier.get(fmt))))
        done = {"path": str(target), **_into_folder(target, write)}
        details[fmt] = {**done, **unit.record(_fingerprint(_files(str(target))))}
    # A folder's size is that of one deployable artifact: a second copy (ONNX's optimized graph) has its own row.
    skip = {fmt: FORMATS[fmt].second_copy if fmt in FORMATS else None for fmt in artifacts}
    sizes = {fmt: _size(Path(p), skip=skip[fmt]) for fmt, p in artifacts.items()}
    # The weights alone, to compare with the base's weights (tokenizer and config files are not worth a warning).
    weights = {fmt: _size(Path(p), skip=skip[fmt], only=WEIGHT_SUFFIXES) for fmt, p in artifacts.items()}
    return {"artifacts": artifacts, "sizes": sizes, "weight_sizes": weights, "details": details}


def _peft_folder(checkpoint: Path, out: Path) -> dict[str, Any]:
    """The adapter as PEFT saved it (adapter_config.json and its weights, nothing of the training state), for vLLM's
    --lora-modules NAME=PATH or PEFT's PeftModel.from_pretrained on the base."""
    files = [checkpoint / "adapter_config.json", weights_file(checkpoint)]
    out.mkdir(parents=True)
    for source in files:
        shutil.copyfile(source, out / source.name)  # copies the bytes: a symlinked input never becomes a link here
    return {"files": [str(out / f.name) for f in files]}


def _gguf_lora(checkpoint: Path, base_gguf: Path, out: Path) -> dict[str, Any]:
    """The adapter as a LoRA GGUF and an Ollama Modelfile whose FROM is the batch's base GGUF (relative, so the
    output folder can move as a whole) and whose ADAPTER is the LoRA."""
    from .base_model import resolve_base_model
    from .exporters.gguf_export import export_gguf_lora, write_modelfile

    base_dir = Path(json.loads((base_gguf.parent / "base.json").read_text(encoding="utf-8"))["base_dir"])
    lora = export_gguf_lora(checkpoint, resolve_base_model(str(base_dir)), out)
    # the folder's final place is export/gguf_lora, a sibling of this partial folder
    relative = os.path.relpath(base_gguf, out.parent / "gguf_lora")
    write_modelfile(out, relative, base_dir, adapter=Path(lora["path"]).name)
    return {**lora, "base_gguf": str(base_gguf), "modelfile": str(out / "Modelfile")}


def _into_folder(target: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``write(partial)`` into a hidden partial folder beside ``target``, renamed to ``target`` when complete (a killed
    write never leaves a folder that looks finished); the paths ``write`` returned are moved to ``target`` too."""
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    details = write(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return _relocate(details, str(partial), str(target))


def _relocate(data: Any, old: str, new: str) -> Any:
    """``data`` with every path under ``old`` moved under ``new``."""
    if isinstance(data, str):
        return new + data[len(old) :] if data == old or data.startswith(old + os.sep) else data
    if isinstance(data, dict):
        return {k: _relocate(v, old, new) for k, v in data.items()}
    if isinstance(data, list):
        return [_relocate(v, old, new) for v in data]
    return data


def _size(path: Path, skip: str | None = None, only: tuple[str, ...] | None = None) -> int:
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and not (skip and f.name.startswith(skip)) and (only is None or f.name.endswith(only))
    )


def _verify(state: _Run, checkpoint: Path, base_dir: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The verify step, unit by unit (verify_step.py): the reference and each artifact, kept while unchanged."""
    from .verify_step import VerifyInputs, verify_step

    export = state.results["export"]
    inputs = VerifyInputs(
        state.config,
        state.out,
        checkpoint,
        base_dir,
        export["artifacts"],
        export.get("details", {}),
        [state.keys.get("check")],
        state.shared,
        previous,
    )
    return verify_step(inputs, lambda result: state.results.__setitem__("verify", result))


def _report(state: _Run, failure: ExportError | None = None) -> None:
    from .report import summary_rows, write_report

    paths = write_report(
        state.out, {"steps": state.manifest.steps_dict()}, state.results, state.monitor.samples, failure
    )
    for row in summary_rows(state.results):
        if row["warning"]:
            logger.warning("%s: %s", row["format"], row["warning"])
    state.results["report"] = paths
    logger.info(i18n.ui("run_done", report=paths["html"]))


def _cleanup(state: _Run) -> None:
    """cleanup_temp_files: true removes every *.partial (what a failed or killed step was writing) when the run ends,
    failed or not; false keeps them for debugging and says where they are."""
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
