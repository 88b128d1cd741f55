"""The run's steps, declared once (steps.StepSpec; the verify units' in verify/step.py): the configuration keys each
reads, the steps it needs, the folder it writes.

    detect -> check -> merge -> calibrate -> export:<format> ... -> verify:reference, verify:<artifact> ...
           -> benchmark -> report

A step's key (steps.Unit) hashes the values of its ``keys`` and ``layout`` keys, fingerprints of its input files and
the *content keys* of the steps it ``needs``. A ``layout`` key changes how a step's files are laid out, not what they
hold (``max_shard_size`` splits the merge into other shards of the same tensors): it reruns that step and nothing
after it. ``reads`` are keys a step reads that change nothing it writes (a progress bar): in no key. ``bounds`` judge
a verdict from its recorded metrics: a change re-judges without running a model. Every step runs against a
``ConfigView`` of exactly these keys, so a key read without being declared fails at once (in tests) instead of
leaving a stale artifact; ``RUN_KEYS`` are the keys the run itself reads (which steps exist, where, how it logs).

``tests/unit/test_graph.py`` derives the key tests from these declarations: every configuration key is declared by a
step or here, and changing a declared key changes that step's key and no other's but those that need it.
"""

from __future__ import annotations

from ..steps import StepSpec
from ..verify.step import reference_spec, verify_spec

__all__ = ["StepSpec", "STEP_SPECS", "RUN_KEYS", "export_spec", "verify_spec", "reference_spec", "step_order"]


_CALIBRATION = ("calibration_data", "calibration_samples", "calibration_sequence_length")
_QUANTIZATION = ("quantization_level", "quantization_method", "quantization_group_size", "quantization_keep_modules")

STEP_SPECS: dict[str, StepSpec] = {
    spec.name: spec
    for spec in (
        StepSpec("detect", keys=("checkpoint_path", "checkpoint_selection"), writes="detect"),
        StepSpec(
            "check",
            keys=("base_model_name", "base_model_quantization", "merge_into"),  # which weights the merge reads
            needs=("detect",),
            reads=("enable_progress_monitoring",),
        ),
        StepSpec(
            "merge",
            keys=("quantization_level", "compress_weights", "remove_training_artifacts", "device_map"),
            layout=("max_shard_size",),
            reads=("enable_progress_monitoring", "checkpoint_selection"),
            needs=("check",),
            writes="merge",
        ),
        StepSpec(
            "calibrate",
            keys=(
                *_CALIBRATION,
                *_QUANTIZATION,
                "gptq_act_order",
                "gguf_type",
                "onnx_backend",
                "export_formats",
                "export_onnx",
            ),
            reads=("enable_progress_monitoring",),
            needs=("merge",),
            writes="calibrate",
        ),
        # the steps of units: export:<format> (export_spec), verify:reference and verify:<artifact> (verify_spec)
        StepSpec("export", needs=("merge", "calibrate"), writes="export"),
        StepSpec("verify", reads=("save_intermediate_results",), needs=("check", "export"), writes="verify"),
        StepSpec(
            "benchmark",
            keys=("test_input_samples", "benchmark_new_tokens", "batch_size", "benchmark_repeats", "device_map"),
            needs=("export",),
            writes="benchmark",
        ),
        StepSpec("report", needs=("detect", "check", "merge", "calibrate", "export", "verify", "benchmark")),
    )
}

# Read by the run itself, in no step's key: where it writes and logs, which steps and formats exist, a batch's
# scheduling. Each with what it decides (tests/unit/test_graph.py checks every configuration key is declared).
RUN_KEYS = {
    "output_dir": "where every step writes",
    "export_formats": "which export:<format> steps exist",
    "export_onnx": "adds or removes export:onnx",
    "onnx_adapter": "adds export:onnx_adapter (the base graph that takes LoRA inputs, and the .onnx_adapter) and its "
    "verify unit",
    "run_validation_tests": "whether the verify steps exist",
    "verification_servers": "which verify:<artifact>@<server> units exist (the artifacts a server verifies)",
    "run_benchmarks": "whether the benchmark step exists",
    "adapters": "a batch: one run per adapter",
    "batch_outputs": "a batch: merged copies, the adapters on a shared base, or both",
    "executor": "a batch: local processes or a Ray cluster",
    "max_parallel_adapters": "a batch: how many adapters run at once",
    "log_level": "what the log shows",
    "log_file": "where the log goes",
    "lang": "the messages' language",
    "memory_monitoring": "whether memory is sampled",
    "memory_monitoring_interval": "how often memory is logged",
    "cleanup_temp_files": "whether a failed step's partial files are removed",
    "steps_side_by_side": "whether verify:reference runs in a process of its own beside the merge and export",
}


def export_spec(fmt: str) -> StepSpec:
    """``export:<format>``: the keys its exporter declares (exporters.FORMATS), on the merge and the calibration."""
    from ..exporters import FORMATS

    keys = FORMATS[fmt].keys if fmt in FORMATS else ()
    return StepSpec(f"export:{fmt}", keys=tuple(keys), needs=("merge", "calibrate"), writes=f"export/{fmt}")


def step_order(names: list[str]) -> list[str]:
    """``names`` in the run's order, each step of units (export, verify) followed by its units in the order they ran."""
    order = ["detect", "check", "merge", "calibrate", "export", "verify", "benchmark", "report"]

    def rank(name: str) -> tuple[int, int]:
        stage, _, unit = name.partition(":")
        return (order.index(stage) if stage in order else len(order), 1 if unit else 0)

    return sorted(names, key=rank)
