"""ExportConfiguration: every setting of a run, loaded from YAML or JSON.

Field checks (types, ranges, unknown keys) happen when a configuration is built and are reported
all at once as one ConfigError; rules that involve several fields live in
``pipeline.validate.validate_config``, which returns every problem instead of stopping at the first.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field, field_validator

from .config_problems import ReportedModel
from .files import parse_size

__all__ = ["ExportConfiguration", "parse_size", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("safetensors", "pytorch", "onnx", "gguf", "tensorrt")
# What a run writes under output_dir: one folder per step and these files; nothing else there is touched.
OUTPUT_STEPS = ("detect", "check", "merge", "calibrate", "export", "verify", "benchmark", "report")
OUTPUT_FILES = ("run.json", "report.json", "report.html", "export.log", ".model-export.lock")
QUANTIZATION_LEVELS = ("none", "bf16", "fp16", "int8", "int4")

ExportFormat = Literal["safetensors", "pytorch", "onnx", "gguf", "tensorrt"]
GGUFTensorType = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"
]
QuantizationLevel = Literal["none", "bf16", "fp16", "int8", "int4"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _invalid(kind: str, template: str, **context: Any) -> Exception:
    """A field's problem as pydantic reports it, with a type of ours that the catalogue translates (``pydantic``)."""
    from pydantic_core import PydanticCustomError

    return PydanticCustomError(kind, template, context)


def default_dynamic_axes() -> dict[str, dict[int, str]]:
    axes = {0: "batch_size", 1: "sequence_length"}
    # With a KV cache the mask covers past and new tokens, so its length axis is not the sequence's.
    return {
        "input_ids": dict(axes),
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": dict(axes),
    }


class ExportConfiguration(ReportedModel):
    """Every setting of an export run. Keys are the ones the troubleshooting guide uses."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- input -----------------------------------------------------------------------------
    checkpoint_path: str = Field(
        "./qwen3-finetuned",
        description="Training output directory (with checkpoint-N folders) or one adapter folder "
        "holding adapter_config.json and adapter_model.safetensors.",
    )
    checkpoint_selection: Literal["latest", "best"] = Field(
        "latest",
        description="Which checkpoint-N to use: the highest step ('latest') or the Trainer's "
        "best_model_checkpoint from trainer_state.json ('best').",
    )
    adapters: list[str] | dict[str, str] = Field(
        default_factory=list,
        description="Several adapters on one base in one run (a batch): each entry a training run or adapter folder, "
        "a glob (runs/lr-*) or a sweep folder whose sub-folders are training runs; a mapping {name: path} names "
        "them. Each run's checkpoint is picked by checkpoint_selection. Output: output_dir/<name>/ per adapter (its "
        "own run.json and report), batch.json and an aggregate report.html. Empty: checkpoint_path alone (a glob or a "
        "sweep folder there makes a batch too).",
    )
    batch_outputs: Literal["merged", "adapters", "both"] = Field(
        "merged",
        description="A batch's artifacts: 'merged' (each adapter merged into export_formats, as a single run), "
        "'adapters' (the base converted once under output_dir/base/, and per adapter only what loads on it: a PEFT "
        "folder for vLLM's --lora-modules, with gguf a LoRA GGUF and an Ollama Modelfile whose ADAPTER line "
        "points at the base GGUF, and with onnx an .onnx_adapter for onnxruntime-genai on the base graph, which takes "
        "LoRA inputs for every module the batch's adapters target), or 'both'.",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where a batch's adapters run: 'local' (a pool of processes on this machine) or 'ray' (one Ray "
        "task per adapter, on the cluster at RAY_ADDRESS or a local instance; needs the ray extra and an output_dir "
        "every node sees).",
    )
    max_parallel_adapters: int | None = Field(
        None,
        ge=1,
        description="Most adapters of a batch worked on at once by the local pool; empty: as many as the machine's "
        "memory and cores allow (the rule is in docs/design.md).",
    )
    base_model_name: str | None = Field(
        None,
        description="Base model: a local directory or a hub id such as Qwen/Qwen3-4B-Thinking-2507. "
        "Empty: the base_model_name_or_path recorded in adapter_config.json.",
    )
    base_model_load_in_4bit: bool = Field(
        False,
        description="Load the base model in 4-bit (bitsandbytes, needs a GPU) for reference and verification runs.",
    )
    base_model_load_in_8bit: bool = Field(
        False,
        description="Load the base model in 8-bit (bitsandbytes, needs a GPU) for reference and verification runs.",
    )
    base_model_quantization: dict[str, Any] | None = Field(
        None,
        description="How the adapter's training quantized a 16-bit base (QLoRA with load_in_4bit), in transformers' "
        "BitsAndBytesConfig field names, e.g. {load_in_4bit: true, bnb_4bit_quant_type: nf4, "
        "bnb_4bit_use_double_quant: true}: the base is quantized so by bitsandbytes and the adapter merged into its "
        "dequantized weights (merge_into). A bitsandbytes base needs none: its own quantization_config says.",
    )
    merge_into: Literal["auto", "dequantized", "original"] = Field(
        "auto",
        description="For a QLoRA adapter: dequantized merges into the weights it was trained against (a quantized "
        "base's, or the base quantized as base_model_quantization says); original into the 16-bit weights as they "
        "are. auto: dequantized when the base is quantized or base_model_quantization is set.",
    )
    device_map: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="Where models run: cpu, cuda, or auto (the GPU when there is one, else the CPU)."
    )
    batch_size: int = Field(
        1,
        gt=0,
        description="Sequences per forward pass when verification computes prompt logits with whole models "
        "(verification_runtime: transformers, or on a GPU; padded on the right, so results do not change), the batch "
        "of the benchmark's second decode measurement, and the TensorRT engine's largest batch. 1 uses the least "
        "memory. The layer-streamed pass puts every prompt in one pass whatever this says: its memory is one layer's "
        "weights, and each pass reads every layer again.",
    )
    max_sequence_length: int = Field(
        2048,
        gt=0,
        description="Longest sequence verification runs: each test prompt and the held-out text is cut so that it "
        "and its generated tokens fit in this many tokens (or in the model's max_position_embeddings when that is "
        "smaller), "
        "with a warning naming the sample. Lower it to save memory.",
    )
    use_memory_mapping: bool = Field(
        True,
        description="When verification loads a whole model with transformers (the reference and transformers "
        "artifacts): true memory-maps the weight files (pages shared with the file cache); false reads them into "
        "memory "
        "(for network file systems where mapping is slow). The streaming merge reads one tensor at a time either way.",
    )

    # --- output ----------------------------------------------------------------------------
    output_dir: str = Field("./export", description="Where artifacts, the run manifest, the log and the report go.")
    export_formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors"],
        description="Artifacts to produce: safetensors, pytorch (.bin), onnx, gguf, tensorrt (experimental).",
    )
    export_onnx: bool | None = Field(
        None,
        description="Shortcut: true adds onnx to export_formats, false removes it; "
        "empty leaves export_formats as written.",
    )
    max_shard_size: str = Field("5GB", description="Largest weight shard written (e.g. 5GB, 500MB, 2GiB).")
    quantization_level: QuantizationLevel = Field(
        "none",
        description="Weight precision of the artifacts: none, bf16, fp16, int8, int4. none keeps the base model's "
        "dtype: a bf16 base stays bf16 in safetensors, PyTorch and GGUF; its ONNX graph holds the same bf16 values "
        "widened "
        "to fp32 (onnxruntime has no bf16 CPU kernels, and fp16 activations can overflow), twice the size; fp16 or "
        "int4 "
        "make it smaller. Every artifact is judged on the bounds of the coarsest precision its weights went through.",
    )
    calibration_data: str | None = Field(
        None,
        description="Calibration text: a plain text file, JSON Lines with a 'text' field, or JSON Lines chat records "
        "('messages', rendered through the model's chat template). A GGUF in a K mixture (q4_k_m, the int4 default) "
        "or q4_0 ... q5_1 is then quantized with an importance matrix collected on it (written as "
        "calibrate/imatrix.gguf, llama.cpp's format), and int4 safetensors and ONNX by GPTQ on it (with "
        "quantization_method auto or gptq). int8 safetensors and ONNX, and int4 with quantization_method rtn, "
        "are round-to-nearest, which uses no data: a run says when it does not use the data for a format.",
    )
    quantization_method: Literal["auto", "rtn", "gptq"] = Field(
        "auto",
        description="int4 safetensors and ONNX: gptq (GPTQ on the calibration data, layer by layer: the layer "
        "outputs move less than with rounding to nearest; needs calibration_data), rtn (round-to-nearest, "
        "data-free) or auto (gptq when calibration_data is set, else rtn). The ONNX graph then has GPTQ's groups "
        "(128) as its decoder's blocks; its embedding and head stay rounded in onnx_block_size blocks.",
    )
    quantization_keep_modules: list[str] = Field(
        default_factory=list,
        description="Modules that stay in the merge's precision when quantizing (int8/int4 safetensors and ONNX, "
        "quantized GGUF types): regular expressions searched in module names such as model.layers.0.mlp.down_proj, "
        "model.embed_tokens or lm_head (a tied head is the embedding: either name keeps both). Example: "
        "[lm_head, 'layers\\.0\\.'] keeps the head and the first layer.",
    )
    quantization_symmetric: bool | None = Field(
        None,
        description="int8/int4 safetensors and ONNX round-to-nearest: symmetric blocks (no zero points) or "
        "asymmetric (a zero point per group). Unset: each format's usual choice (safetensors symmetric, as vLLM's "
        "W4A16/W8A16 kernels take; ONNX asymmetric, as onnxruntime-genai's builder writes). GPTQ is symmetric.",
    )
    quantization_group_size: int | None = Field(
        None,
        description="int4 safetensors (and GPTQ, whose groups the ONNX graph then takes): inputs per quantization "
        "group, a power of two from 16 that divides every decoder layer's input size; smaller groups are more "
        "accurate and larger. Unset: 128, else 64 or 32.",
    )
    gptq_act_order: bool = Field(
        False,
        description="GPTQ: round the columns in order of decreasing input energy (the Hessian's diagonal), with "
        "the groups' scales fixed beforehand (static groups: the checkpoint needs no column order).",
    )
    calibration_samples: int = Field(
        16,
        ge=1,
        description="Calibration samples (of calibration_sequence_length tokens) run through the merged model for the "
        "importance matrix. Each costs one forward pass of its tokens, layer by layer: 16 x 256 tokens take about "
        "as long as verification's reference at the 4B shape on 2 cores.",
    )
    calibration_sequence_length: int = Field(
        256,
        ge=8,
        description="Tokens per calibration sample (the texts are joined and cut into samples of this length, as "
        "llama.cpp's imatrix cuts chunks); data shorter than one sample is a configuration error.",
    )
    compress_weights: bool = Field(
        True,
        description="Never upcast, keep the base dtype unless quantization_level asks otherwise, and store "
        "shared (tied) tensors once.",
    )
    remove_training_artifacts: bool = Field(
        True, description="Keep optimizer, scheduler, RNG state, trainer state and training args out of every artifact."
    )

    # --- ONNX --------------------------------------------------------------------------------
    onnx_backend: Literal["auto", "builder", "torch"] = Field(
        "auto",
        description="ONNX exporter: builder (streams the graph from the weights; Qwen3, Qwen2, Llama, "
        "Mistral), torch (torch.onnx.export of the transformers model), or auto (builder when it supports the model).",
    )
    onnx_opset_version: int = Field(17, ge=7, description="ONNX opset of the exported graph.")
    onnx_optimize_graph: bool = Field(
        True, description="Also save onnxruntime's offline-optimized graph beside the plain one."
    )
    onnx_block_size: int = Field(
        32,
        ge=16,
        description="int8/int4 ONNX weights: values per quantization block along the input dimension "
        "(a power of two, at least 16; smaller blocks are more accurate and larger).",
    )
    onnx_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="int8/int4 ONNX weights: MatMulNBits compute precision, 0 (unset: fp32) to 4 (int8 activations, "
        "fastest on CPUs; what onnxruntime-genai's builder uses for CPU).",
    )
    gguf_type: Literal[
        "auto",
        "f32",
        "f16",
        "bf16",
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
    ] = Field(
        "auto",
        description="GGUF tensor type or llama.cpp K mixture; auto follows quantization_level (none: the merge's "
        "dtype, bf16, fp16: f16, int8: q8_0, int4: q4_k_m). In a K mixture (q2_k ... q6_k) each tensor gets the type "
        "llama.cpp's quantizer gives it (q4_k_m: Q4_K, with Q6_K for the output and for attn_v and ffn_down in chosen "
        "layers), the same bytes as llama-quantize, without compiling llama.cpp. Norms and biases stay f32.",
    )
    gguf_output_type: GGUFTensorType | None = Field(
        None,
        description="GGUF: the output (lm_head) tensor's type, as llama-quantize's --output-tensor-type (a tied "
        "embedding is the output); unset: the mixture's choice (q6_k in K mixtures, else gguf_type).",
    )
    gguf_token_embedding_type: GGUFTensorType | None = Field(
        None,
        description="GGUF: the token embedding's type, as llama-quantize's --token-embedding-type; unset: the "
        "mixture's choice.",
    )
    gguf_lora_adapter: bool = Field(
        False,
        description="Also write the adapter alone as a GGUF LoRA (adapter-lora-f32.gguf) for llama.cpp's --lora "
        "on a GGUF of the base model; PEFT's scaling (rsLoRA, rank and alpha patterns) is carried exactly.",
    )
    onnx_adapter: bool = Field(
        False,
        description="Also write the base model as an ONNX graph that takes LoRA inputs and the adapter as an "
        ".onnx_adapter (export/onnx_adapter), which onnxruntime-genai serves unmerged (og.Adapters, "
        "set_active_adapter); verified in onnxruntime-genai with the adapter active. Needs onnx in export_formats. "
        "In a batch the base graph is written once (output_dir/base/export/onnx) for every adapter's .onnx_adapter; "
        "batch_outputs adapters or both with onnx write them without this key.",
    )
    onnx_dynamic_axes: dict[str, dict[int, str]] | None = Field(
        default_factory=default_dynamic_axes,
        description="Dynamic axes per ONNX input/output name, e.g. {input_ids: {0: batch_size, 1: sequence_length}}; "
        "axes not named are fixed (batch and sequence to 1); the KV cache's length axes stay dynamic. Empty (null): "
        "batch 1, one token per call.",
    )

    # --- verification ------------------------------------------------------------------------
    run_validation_tests: bool = Field(True, description="Verify every artifact against the unmerged base + adapter.")
    validation_tolerance: float = Field(
        1e-3, gt=0, description="Largest absolute logit difference allowed for full-precision artifacts."
    )
    validation_min_top1: float = Field(
        0.9, gt=0, le=1, description="bf16, fp16 and 8-bit artifacts: least top-1 agreement with the reference."
    )
    validation_max_kl: float = Field(
        0.05,
        gt=0,
        description="bf16, fp16 and 8-bit artifacts: largest mean KL divergence from the reference's next-token "
        "distribution.",
    )
    validation_int4_min_top1: float = Field(
        0.85,
        gt=0,
        le=1,
        description="4- and 5-bit artifacts (int4; GGUF q4_*/q5_*): least top-1 agreement with the reference. "
        "Round-to-nearest 4-bit weights cost real models about 8-12% of top-1 (llama.cpp measures 91.9% same top token "
        "for Llama 3 8B q4_K_M), so the 8-bit bound would reject every int4 export.",
    )
    validation_int4_max_kl: float = Field(
        0.1,
        gt=0,
        description="4- and 5-bit artifacts: largest mean KL divergence from the reference (llama.cpp measures "
        "0.072 for Llama 3 8B q4_0, 0.031 for q4_K_M, 0.445 for the broken-quality q2_K).",
    )
    verification_runtime: Literal["auto", "streamed", "transformers"] = Field(
        "auto",
        description="How verification runs the reference (base + adapter) and safetensors artifacts. "
        "streamed: layer by layer on the CPU (one decoder layer in memory at a time, the LoRA unmerged in fp32, "
        "what PEFT computes; int8/int4 compressed-tensors layers unpacked as they run) for Qwen3, Qwen2, Llama and "
        "Mistral; transformers: the whole model loaded, as the "
        "libraries users deploy with load it; auto: streamed on the CPU, transformers on a GPU or with bitsandbytes "
        "loading. Where streaming does not cover a model, transformers runs and the log says why.",
    )
    validation_new_tokens: int = Field(
        16,
        ge=1,
        description="Tokens the reference generates greedily per sample. Every artifact is then judged in one pass "
        "over the prompt and these tokens (teacher-forced): KL and top-1 at every position, and its greedy agreement "
        "read along the reference's tokens up to its first different choice.",
    )
    max_memory: int | str = Field(
        "auto",
        description="Memory the layer-streamed reference may keep its widened (fp32) layers in between passes, so "
        "that its greedy decoding reads only the layers that do not fit: auto (the memory available when the "
        "reference starts, less a quarter and at least 2 GiB; in a batch on the local pool, each adapter's even "
        "share beyond its planned peak; beside the merge and export (steps_side_by_side), what they and the "
        "reference's own streaming leave; on Ray, 0; and never more than the run's memory plan leaves beside the "
        "reference's own process and streaming when the base's widened weights take more than a quarter of the "
        "available memory: at the 4B shape on 24 GiB, nothing beside the export), a size (e.g. 6GiB, 500MB), or 0 to "
        "read every layer on every pass. The results are the same either way; only time and memory change.",
    )
    verification_servers: list[Literal["vllm"]] = Field(
        [],
        description="Servers that also verify what they serve, started on 127.0.0.1 and stopped when the run ends. "
        "vllm: vLLM's OpenAI server serves the safetensors artifact (merged, or int8/int4 compressed-tensors) and the "
        "adapter as a LoRA on the base, each judged on vLLM's top-20 log-probabilities with its chat template and stop "
        "set. A server that cannot start is 'not run' with its reason.",
    )
    vllm_python: str | None = Field(
        None,
        description="The interpreter that has vLLM (make vllm builds .venv-vllm: vLLM pins its own torch and "
        "transformers). Unset: MODEL_EXPORT_VLLM_PYTHON, else this tool's own interpreter.",
    )
    test_input_samples: list[str] = Field(
        default_factory=lambda: ["Hello", "简单测试", "Write a haiku about autumn."],
        description="Prompts used to verify and benchmark the artifacts (formatted with the chat template).",
    )

    # --- benchmarks ----------------------------------------------------------------------------
    run_benchmarks: bool = Field(
        False,
        description="After verification, benchmark every artifact (load time, time to first token, decode tokens "
        "per second at batch 1 and at batch_size, peak memory); `model-export benchmark RUN_DIR` does the same later.",
    )
    benchmark_new_tokens: int = Field(32, ge=1, description="Tokens decoded per benchmark run.")
    benchmark_repeats: int = Field(
        3, ge=1, description="Timed benchmark runs per artifact (after one warm-up); medians are reported."
    )

    # --- logging and housekeeping -------------------------------------------------------------
    log_level: LogLevel = Field(
        "INFO",
        description="DEBUG, INFO, WARNING, ERROR or CRITICAL (--log-level wins). DEBUG also logs step keys, shards, "
        "forward passes and per-sample metrics, and lets third-party warnings and progress bars through, which are "
        "silent "
        "otherwise.",
    )
    log_file: str | None = Field(
        None,
        description="Log file (--log-file wins); empty: export.log in output_dir for runs, none for single commands. "
        "Written in English whatever the console's language, as the guide's log lines and grep commands are.",
    )
    enable_progress_monitoring: bool = Field(
        True,
        description="Progress of long steps: one live bar on a terminal; 'Processing ...: N% complete' lines, at most "
        "one every 5 seconds and the last, in a log file or a pipe.",
    )
    memory_monitoring: bool = Field(
        False, description="Log 'Memory usage: used / total (percent)' lines during long steps."
    )
    memory_monitoring_interval: float = Field(5.0, gt=0, description="Seconds between memory usage lines.")
    steps_side_by_side: Literal["auto", "on", "off"] = Field(
        "auto",
        description="verify:reference in a process of its own beside the merge and export (it needs only the check). "
        "auto: when memory holds both, there are two cores or more, no GPU is used and the base's weights are 256 MiB "
        "or more; on: whenever memory holds both; off: one step after another. A batch never does (its adapters run "
        "side by side).",
    )
    cleanup_temp_files: bool = Field(
        True,
        description="When a run ends, failed or not: true removes what an unfinished step was writing (*.partial "
        "under output_dir); false keeps it for debugging and logs where it is.",
    )
    save_intermediate_results: bool = Field(
        False,
        description="Also save the logits and greedy tokens of the reference and of every artifact run "
        "(verify/reference.pt, verify/<artifact>.pt), even when verification fails. Each step's result is in "
        "<step>/.step.json either way.",
    )
    lang: Literal["en", "zh"] | None = Field(
        None, description="Message language: en or zh; empty: from the locale (zh_* gives zh)."
    )

    @field_validator("max_shard_size", "max_memory")
    @classmethod
    def _check_size(cls, value: int | str, info: pydantic.ValidationInfo) -> int | str:
        if info.field_name == "max_memory" and str(value).strip().lower() == "auto":
            return "auto"
        try:
            size = parse_size(value)
        except ValueError:
            raise _invalid("me_size", "not a size (write e.g. 5GB, 500MB or 2GiB)") from None
        if info.field_name == "max_memory" and size < 0:
            raise _invalid("me_not_negative", "must be 0 or more")
        if info.field_name == "max_shard_size" and size <= 0:
            raise _invalid("me_positive", "must be larger than 0")
        return value

    @field_validator(
        "checkpoint_path", "base_model_name", "output_dir", "calibration_data", "log_file", "vllm_python", "adapters"
    )
    @classmethod
    def _check_path(cls, value: Any) -> Any:
        paths = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if any(path is not None and "\0" in path for path in paths):  # no file system takes it (os raises)
            raise _invalid("me_nul", "a path cannot contain a NUL character")
        return value

    @field_validator("quantization_keep_modules")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise _invalid(
                    "me_regex", "{pattern} is not a regular expression: {error}", pattern=repr(pattern), error=str(exc)
                ) from None
        return value

    @field_validator("quantization_group_size")
    @classmethod
    def _check_group(cls, value: int | None) -> int | None:
        if value is not None and (value < 16 or value & (value - 1)):
            raise _invalid("me_group", "must be a power of two from 16 (16, 32, 64, 128, ...)")
        return value

    @field_validator("export_formats", "verification_servers")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @property
    def max_shard_size_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def formats(self) -> list[str]:
        """export_formats after the export_onnx shortcut."""
        formats = list(self.export_formats)
        if self.export_onnx is True and "onnx" not in formats:
            formats.append("onnx")
        if self.export_onnx is False and "onnx" in formats:
            formats.remove("onnx")
        return formats
