"""The streaming LoRA merge: base tensor in, adapter update added, merged tensor out, never the whole model.

Each base tensor is read from disk with explicit I/O (rows at a time for large ones), the LoRA
update is added in fp32 and the sum rounded once to the output dtype, and the result is written
into shards whose layout is fixed before any data is written. Tensors without an update are
copied byte for byte. A killed merge rerun with the same arguments keeps the shards already
complete (checked by hash) and finishes the rest; a complete output is not rewritten.

    from model_export import ModelMerger
    result = ModelMerger().merge("./qwen3-finetuned", "Qwen/Qwen3-4B-Thinking-2507", "./merged")
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .. import i18n
from ..checkpoint.adapter_format import ADAPTER_CONFIG, read_adapter_config
from ..checkpoint.base_model import (
    BaseModelInfo,
    inspect_base_model,
    local_base_dirs,
    refuse_quantized,
    resolve_base_model,
)
from ..checkpoint.detect import detect
from ..checkpoint.hf_layout import (
    copy_generation_config,
    copy_tokenizer,
    copy_training_artifacts,
    write_config,
    write_index,
    write_model_card,
)
from ..checkpoint.validate import validate_checkpoint
from ..config import parse_size
from ..errors import BaseModelError, MergeError
from ..faults import crash_point
from ..files import torch_save, write_atomic
from ..monitoring import MemoryMonitor, Progress, logger, threads
from ..tensor_io import (
    SafetensorsFormatError,
    ShardPlan,
    ShardWriter,
    file_checksum,
    file_sha256,
    plan_shards,
    readinto_full,
)
from .arithmetic import Workspace, merged_chunks
from .plan import MergePlan, OutputTensor, adapter_plan

__all__ = ["ModelMerger", "MergeResult", "merge", "merge_settings", "STATE_FILE"]

STATE_FILE = ".model-export-merge.json"
FORMATS = {
    "safetensors": ("model", "safetensors", "model.safetensors.index.json"),
    "pytorch": ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
}
_COPY_CHUNK = 64 << 20
_PLAN_VERSION = 2  # 2: shards checked by CRC-32 (was sha256)


@dataclass
class MergeResult:
    output_dir: str
    checkpoint: str
    base_model: str
    format: str
    shards: list[str]
    tensors: int
    bytes: int
    untied_embeddings: bool
    vocab_size: int | None
    resumed_shards: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    peak_rss: int = 0
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inputs(adapter: str | Path, base: str | None, selection: str) -> tuple[Path, dict[str, Any], str]:
    """The checkpoint under ``adapter``, its adapter_config.json, and the base (``base``, else the one it names)."""
    checkpoint = detect(adapter, selection).path
    adapter_config = read_adapter_config(checkpoint)
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise BaseModelError("base_model_unknown", path=str(checkpoint / ADAPTER_CONFIG))
    return checkpoint, adapter_config, base


def merge(
    adapter: str | Path,
    base: str | None = None,
    out: str | Path = "merged",
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    format: str = "safetensors",
    device: str = "cpu",
    compress_weights: bool = True,
    remove_training_artifacts: bool = True,
    selection: str = "latest",
    progress: bool = True,
    memory_monitoring: bool = False,
    validate: bool = True,
) -> MergeResult:
    """Merge the adapter found under ``adapter`` into ``base`` and write the merged model to ``out``.

    Raises CheckpointValidationError, BaseModelError, MergeError (ME701-ME705) and ResourceError.
    """
    start = time.perf_counter()
    if format not in FORMATS or dtype not in ("auto", "bf16", "fp16", "fp32"):
        option, value = ("format", format) if format not in FORMATS else ("dtype", dtype)
        raise MergeError("merge_bad_option", option=option, value=value)
    checkpoint, adapter_config, base = _inputs(adapter, base, selection)
    out = Path(out)
    _refuse_inputs_as_output(out, checkpoint, resolve_base_model(base), *local_base_dirs(base))
    with MemoryMonitor(enabled=memory_monitoring) as monitor:
        if validate:  # the pipeline's check step has done it already
            validate_checkpoint(checkpoint, base, progress=False)
        info = refuse_quantized(inspect_base_model(base))
        plan, adapter_file = adapter_plan(checkpoint, adapter_config, info, dtype, compress_weights)
        stem, suffix, index_name = FORMATS[format]
        shards = plan_shards([t.planned for t in plan.tensors], parse_size(max_shard_size), stem, suffix)
        key = _plan_key(
            adapter_file, adapter_config, info, shards, dtype, format, compress_weights, remove_training_artifacts
        )
        filenames, nbytes = [s.filename for s in shards], sum(s.nbytes for s in shards)
        result = MergeResult(
            str(out), str(checkpoint), base, format, filenames, len(plan.tensors), nbytes, plan.untied, plan.vocab_size
        )
        result.device = device
        state = _prepare_output(out, key)
        if state.get("complete") and all(_shard_verified(out, state, s) for s in shards):
            logger.info(i18n.ui("merge_already_complete", path=out))
            result.already_complete = True
        else:
            with _compute_threads():
                result.resumed_shards = _write_shards(out, plan, shards, state, key, format, device, progress)
            options = {"dtype": dtype, "format": format, "max_shard_size": str(max_shard_size)}
            layout = (index_name, checkpoint, info, adapter_config, options, remove_training_artifacts)
            _write_layout(out, plan, shards, *layout)
            crash_point("layout")
            state["complete"] = True
            write_atomic(out / STATE_FILE, json.dumps(state, indent=2))
    result.seconds, result.peak_rss = time.perf_counter() - start, monitor.peak_rss
    return result


def _compute_threads():
    """The merge is a pipeline: numpy computes on its cores (each chunk's rows split between the workspace's lanes)
    while the shard writer's two threads write and hash. BLAS threads of its own on top oversubscribe the cores
    (OpenBLAS's threads wait busily: on 2 cores a 0.6B merge took 4.3-5.3 s with two BLAS threads, 3.2-3.8 s with one),
    so BLAS keeps to one thread per lane."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _refuse_inputs_as_output(out: Path, *inputs: Path) -> None:
    """ME704 when ``out`` is an input, lies in one or holds one (the checkpoint, the base's folder, and a hub id's whole
    cache folder, whose snapshots link into its blobs)."""
    target = out.resolve()
    for path in (p.resolve() for p in inputs):
        if target == path or target.is_relative_to(path) or path.is_relative_to(target):
            raise MergeError("merge_output_is_input", out=str(out), input=str(path))


def _plan_key(
    adapter_file: Path, adapter_config: dict, info: BaseModelInfo, shards: list[ShardPlan], *options: Any
) -> str:
    """What the output depends on: adapter bytes and settings, base files and layout, and the merge options."""
    digest = hashlib.sha256(
        json.dumps([_PLAN_VERSION, adapter_config, [str(o) for o in options]], sort_keys=True, default=str).encode()
    )
    digest.update(file_sha256(adapter_file).encode())
    for shard in info.shards:
        stat = shard.stat()
        digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps([[s.filename, [(t.name, t.dtype, t.shape) for t in s.tensors]] for s in shards]).encode())
    return digest.hexdigest()


def _prepare_output(out: Path, key: str) -> dict[str, Any]:
    """Load the resume state if it belongs to this plan; clear our own stale files otherwise; never touch others'."""
    state_file = out / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("plan") == key:
            for partial in out.glob("*.partial"):  # a shard cut off by a crash
                partial.unlink()
            return state
        for name in state.get("files", []) + [index for _, _, index in FORMATS.values()]:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "training_artifacts", ignore_errors=True)
        state_file.unlink()
    elif out.exists() and any(out.iterdir()):
        raise MergeError("merge_output_not_empty", out=str(out))
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob("*.partial"):
        partial.unlink()
    state = {"plan": key, "shards": {}, "files": [], "complete": False}
    write_atomic(state_file, json.dumps(state, indent=2))  # before any data: the folder is ours from here on
    return state


def _shard_verified(out: Path, state: dict, shard: ShardPlan) -> bool:
    """The shard exists and its bytes still give the checksum recorded when it was written."""
    path = out / shard.filename
    return path.is_file() and state["shards"].get(shard.filename) == file_checksum(path)


def _write_shards(
    out: Path, plan: MergePlan, shards: list[ShardPlan], state: dict, key: str, format: str, device: str, progress: bool
) -> int:
    by_name = {t.name: t for t in plan.tensors}
    meter = Progress(i18n.ui("progress_merge"), sum(s.nbytes for s in shards), enabled=progress)
    resumed = 0
    with _Sources() as sources:
        for shard in shards:
            if _shard_verified(out, state, shard):
                resumed += 1
                logger.info(i18n.ui("merge_shard_kept", shard=shard.filename))
            else:
                tensors = [by_name[t.name] for t in shard.tensors]
                writer = _safetensors_shard if format == "safetensors" else _pytorch_shard
                state["shards"][shard.filename] = writer(out / shard.filename, tensors, sources, device)
                logger.debug(
                    "wrote %s: %d tensors, %d bytes, %d with a LoRA update, %s",
                    shard.filename,
                    len(tensors),
                    shard.nbytes,
                    sum(1 for t in tensors if t.lora is not None),
                    state["shards"][shard.filename],
                )
                state["files"] = sorted(set(state["files"]) | {shard.filename})
                write_atomic(out / STATE_FILE, json.dumps(state, indent=2))
                crash_point("shard")
            meter.advance(shard.nbytes)
    return resumed


class _Sources:
    """Open source files, kept open for the run so that each tensor costs a seek, not an open; and the
    workspace whose buffers every chunk reuses."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self.workspace = Workspace(lanes=threads())  # a batch's share of the cores, else every core

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._files.values():
            fh.close()
        self.workspace.close()  # its helper threads

    def get(self, path: Path) -> BinaryIO:
        if path not in self._files:
            self._files[path] = path.open("rb", buffering=0)
        return self._files[path]


def _safetensors_shard(path: Path, tensors: list[OutputTensor], sources: _Sources, device: str) -> str:
    writer = ShardWriter(path, [t.planned for t in tensors], {"format": "pt"})
    try:
        for tensor in tensors:
            for chunk, release in _tensor_bytes(tensor, sources, device):
                writer.write(chunk, release)
            crash_point("tensor")
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _pytorch_shard(path: Path, tensors: list[OutputTensor], sources: _Sources, device: str) -> str:
    """PyTorch .bin shards: torch.save needs a whole shard in memory, so peak memory is one shard here."""
    import torch

    from ..tensor_io import torch_dtype

    state = {}
    for tensor in tensors:
        data = bytearray()
        for chunk, release in _tensor_bytes(tensor, sources, device):
            data += chunk
            if release is not None:
                release()
        dtype = torch_dtype(tensor.dtype)
        state[tensor.name] = (
            torch.frombuffer(data, dtype=dtype).reshape(tensor.shape)
            if data
            else torch.empty(tensor.shape, dtype=dtype)
        )
        crash_point("tensor")
    partial = path.with_name(path.name + ".partial")
    torch_save(state, partial)
    partial.replace(path)
    return file_checksum(path)


def _tensor_bytes(tensor: OutputTensor, sources: _Sources, device: str):
    """(bytes, release) chunks of one output tensor: raw copies for untouched tensors, merged rows otherwise."""
    workspace = sources.workspace
    if tensor.is_copy and tensor.source_file is not None:
        fh = sources.get(tensor.source_file)
        fh.seek(tensor.source.start)
        remaining = tensor.source.nbytes
        while remaining:
            length = min(_COPY_CHUNK, remaining)
            buffer = workspace.out_buffer(length)
            view = memoryview(buffer)[:length]
            if readinto_full(fh, view) != length:
                workspace.release(buffer)
                raise MergeError("merge_source_truncated", file=str(tensor.source_file), tensor=tensor.name)
            remaining -= length
            yield view, lambda buffer=buffer: workspace.release(buffer)
        return
    fh = sources.get(tensor.source_file) if tensor.source_file is not None else None
    try:
        yield from merged_chunks(tensor, fh, workspace, device)
    except SafetensorsFormatError:
        raise MergeError("merge_source_truncated", file=str(tensor.source_file), tensor=tensor.name) from None


def _write_layout(
    out: Path,
    plan: MergePlan,
    shards: list[ShardPlan],
    index_name: str,
    checkpoint: Path,
    info: BaseModelInfo,
    adapter_config: dict,
    options: dict,
    remove_training_artifacts: bool,
) -> None:
    if len(shards) > 1:
        write_index(
            out, index_name, {t.name: s.filename for s in shards for t in s.tensors}, sum(s.nbytes for s in shards)
        )
    float_dtypes = [t.dtype for t in plan.tensors if t.dtype in ("BF16", "F16", "F32", "F64")]
    write_config(out, plan.config, max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else "F32")
    candidates = [checkpoint, checkpoint.parent, info.path]
    copy_generation_config(out, candidates)
    tokenizer = copy_tokenizer(out, candidates)
    if not remove_training_artifacts:
        copy_training_artifacts(out, checkpoint)
    write_model_card(
        out,
        {
            "base_model": info.name,
            "checkpoint": str(checkpoint),
            "tokenizer_from": str(tokenizer),
            "lora_r": adapter_config.get("r"),
            "lora_alpha": adapter_config.get("lora_alpha"),
            "use_rslora": bool(adapter_config.get("use_rslora")),
            "use_dora": bool(adapter_config.get("use_dora")),
            "tie_word_embeddings": plan.config.get("tie_word_embeddings"),
            "vocab_size": plan.vocab_size,
            **options,
        },
    )


# The merge keeps the base dtype for int8/int4: the exporters quantize from it.
MERGE_DTYPES = {"none": "auto", "bf16": "bf16", "fp16": "fp16", "int8": "auto", "int4": "auto"}


def merge_settings(config: Any) -> dict[str, Any]:
    """The merge's settings for an ExportConfiguration: the one translation both routes use (``run(config)`` and
    ``ModelMerger(config).merge()``), so the same configuration always gives the same merge."""
    return {
        "dtype": MERGE_DTYPES[config.quantization_level],
        "max_shard_size": config.max_shard_size,
        "compress_weights": config.compress_weights,
        "remove_training_artifacts": config.remove_training_artifacts,
        "device": "cpu" if config.device_map == "cpu" else "auto",
        "selection": config.checkpoint_selection,
        "progress": config.enable_progress_monitoring,
    }


class ModelMerger:
    """The guide's entry point. Settings come from an ExportConfiguration (through merge_settings, as the run takes
    them) or keyword options of ``merge``, which win."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        self.config = config
        self.options = options

    def merge(
        self, adapter: str | Path | None = None, base: str | None = None, out: str | Path | None = None
    ) -> MergeResult:
        """Merge with this merger's settings; see ``model_export.merge`` (the function)."""
        options = dict(self.options)
        if self.config is not None:
            c = self.config
            adapter = adapter or c.checkpoint_path
            base = base or c.base_model_name
            out = out or Path(c.output_dir) / "merge"
            options = {**merge_settings(c), "memory_monitoring": c.memory_monitoring, **options}
        return merge(adapter or "./qwen3-finetuned", base, out or "merged", **options)

    def load_base_model(self, name: str, **kwargs: Any):
        """The base model as a transformers object (the guide's API); see model_export.checkpoint.loading.load_model."""
        from ..checkpoint.loading import load_model

        return load_model(name, config=self.config, **kwargs)
