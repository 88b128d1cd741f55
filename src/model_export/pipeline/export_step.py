"""The export step: one step per format (export:<format>, graph.export_spec), and in a batch that asks for the adapters
themselves, what loads on the shared base (export/peft, export/gguf_lora).

Each format is written by its exporter (exporters.FORMATS) into a hidden partial folder renamed when complete; a format
whose key and files are unchanged is kept as it is. The step export holds what the report and the benchmark read:
each format's folder, sizes and details."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint.adapter_format import weights_file
from ..config import ExportConfiguration
from ..files import strict_json, write_atomic
from ..steps import STEP_FILE, ConfigView
from ..steps import files_in as _files
from ..steps import fingerprint as _fingerprint
from ..steps import key_hash as _hash
from .graph import StepSpec, export_spec
from .manifest import StepRecord
from .state import RunState


def base_gguf(c: ExportConfiguration, base_dir: Path, export: Path) -> dict[str, Any]:
    """The base model as a GGUF (the configured quantization, data-free: an importance matrix belongs to one merged
    model), read back against the base, in export/gguf with base.json naming the base folder."""
    from ..exporters.gguf_export import export_gguf
    from ..exporters.gguf_readback import read_back
    from ..quantize.gguf_types import gguf_type_for

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


def base_onnx(
    c: ConfigView, base_dir: Path, targets: dict[str, Any], checkpoints: list[Path], export: Path
) -> dict[str, Any]:
    """A batch's base as an ONNX graph that takes its adapters' LoRA inputs (``targets``), in export/onnx, with the
    tokenizer of the training run of ``checkpoints`` (the first adapter's) before the base's."""
    from ..exporters.onnx_export import base_graph, onnx_settings
    from ..exporters.onnx_lora import training_dirs

    settings = {**onnx_settings(c), "tokenizer_dirs": training_dirs(checkpoints[0]) if checkpoints else []}
    target = export / "onnx"
    return {
        **_into_folder(target, lambda partial: base_graph(base_dir, partial, targets, settings)),
        "folder": str(target),
    }


def export_step(
    state: RunState, checkpoint: Path, base: str, imatrix: Path | None, gptq: Path | None, *, merged: bool
) -> dict[str, Any]:
    """export: one step per format (``export:gguf``, graph.export_spec), each reading only the keys its exporter
    declares, written into a hidden partial folder renamed when complete; in a batch that asks for the adapters
    themselves, also (or only) what loads on the shared base: export/peft and, with the base's GGUF, export/gguf_lora.
    A format whose key and files are unchanged is kept as it is (a GGUF-only change rewrites the GGUF alone)."""
    from ..exporters import FORMATS, ExportContext

    c, export = state.config, state.out / "export"
    units: list[tuple[StepSpec, list[Any], Callable[[ConfigView, Path], dict[str, Any]]]] = []
    if merged:
        for fmt in c.formats:

            def write(view: ConfigView, partial: Path, fmt: str = fmt) -> dict[str, Any]:
                return FORMATS[fmt].export(
                    ExportContext(state.out / "merge", partial, view, checkpoint, base, imatrix, gptq)
                )

            units.append((export_spec(fmt), [], write))
    if state.shared.get("outputs") in ("adapters", "both"):
        units.append((StepSpec("export:peft", needs=("check",)), [], lambda view, p: _peft_folder(checkpoint, p)))
        if state.shared.get("base_gguf"):
            gguf = Path(state.shared["base_gguf"])
            spec = StepSpec("export:gguf_lora", needs=("check",))
            units.append((spec, [str(gguf), _fingerprint([gguf])], lambda view, p: _gguf_lora(checkpoint, gguf, p)))
    units += _onnx_adapter(state, checkpoint, base)
    names = [spec.name for spec, _, _ in units]
    state.drop(*[n for n in state.manifest.steps if n.startswith("export:") and n not in names])
    for spec, inputs, write in units:
        target = export / spec.name.split(":", 1)[1]
        state.step(
            spec,
            inputs,
            lambda view, target=target, write=write: {
                "path": str(target),
                **_into_folder(target, lambda partial: write(view, partial)),
            },
            outputs=lambda result, target=target: _files(str(target)),
        )
    state.content["export"] = _hash([state.content[n] for n in names])
    state.results["export"] = _export_result(state, names)
    return state.results["export"]


def _export_result(state: RunState, names: list[str]) -> dict[str, Any]:
    """What the export wrote, as the report and the benchmark read it: each format's folder, sizes and details; run.json
    records it as the step ``export`` (its formats are the steps ``export:<format>``)."""
    from ..exporters import FORMATS, WEIGHT_SUFFIXES

    details = {name.split(":", 1)[1]: state.results[name] for name in names}
    artifacts = {fmt: str(state.out / "export" / fmt) for fmt in details}
    # A folder's size is that of one deployable artifact: a second copy (ONNX's optimized graph) has its own row.
    skip = {fmt: FORMATS[fmt].second_copy if fmt in FORMATS else None for fmt in artifacts}
    sizes = {fmt: _size(Path(p), skip=skip[fmt]) for fmt, p in artifacts.items()}
    # The weights alone, to compare with the base's weights (tokenizer and config files are not worth a warning).
    weights = {fmt: _size(Path(p), skip=skip[fmt], only=WEIGHT_SUFFIXES) for fmt, p in artifacts.items()}
    result = {"artifacts": artifacts, "sizes": sizes, "weight_sizes": weights, "details": details}
    (state.out / "export").mkdir(exist_ok=True)
    write_atomic(state.out / "export" / STEP_FILE, strict_json(result))
    records = [state.manifest.steps[n] for n in names]
    state.manifest.steps["export"] = StepRecord(
        status="done",
        key=_hash([r.key for r in records]),
        skipped=all(r.skipped for r in records),
        result=result,
        seconds=round(sum(r.seconds or 0 for r in records if not r.skipped), 3),
        peak_rss=max((r.peak_rss for r in records if r.peak_rss and not r.skipped), default=None),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    state.save()
    return result


def onnx_adapter_spec(name: str = "export:onnx_adapter") -> StepSpec:
    """A base graph with LoRA inputs (the ONNX keys but the optimized copy's): ``export:onnx_adapter`` of a single
    run (the graph and its adapter in one folder), or a batch base's ``export:onnx``."""
    keys = tuple(k for k in export_spec("onnx").keys if k != "onnx_optimize_graph")
    return StepSpec(name, keys=keys, needs=("check",), writes=f"export/{name.split(':')[1]}")


def _onnx_adapter(state: RunState, checkpoint: Path, base: str) -> list[tuple[StepSpec, list[Any], Callable]]:
    """The adapter for onnxruntime-genai, unmerged (exporters/onnx_lora.py): in a batch that asks for the adapters
    with onnx, an .onnx_adapter for the batch's base graph; in a single run with onnx_adapter, the base graph that
    takes it and the adapter, in one folder."""
    from ..exporters.onnx_lora import adapter_files
    from ..runtimes.genai import LORA_FILE

    c = state.config
    if state.shared.get("base_onnx"):
        graph = Path(state.shared["base_onnx"])
        spec = StepSpec("export:onnx_adapter", needs=("check",))
        inputs = [str(graph), _fingerprint([graph / LORA_FILE])]
        return [(spec, inputs, lambda view, partial: adapter_files(checkpoint, graph, partial))]
    if state.shared or not (c.onnx_adapter and "onnx" in c.formats):
        return []

    def write(view: ConfigView, partial: Path) -> dict[str, Any]:
        from ..checkpoint.base_model import resolve_base_model
        from ..exporters.onnx_export import base_graph, onnx_settings
        from ..exporters.onnx_lora import lora_targets, training_dirs

        base_dir = Path(resolve_base_model(base))
        targets = lora_targets([checkpoint], base_dir, refuse=True)  # refused before its base graph is written
        settings = {**onnx_settings(view), "tokenizer_dirs": training_dirs(checkpoint)}
        details = base_graph(base_dir, partial, targets, settings)
        return {**details, **adapter_files(checkpoint, partial, partial)}

    return [(onnx_adapter_spec(), [], write)]


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
    from ..checkpoint.base_model import resolve_base_model
    from ..exporters.gguf_lora import export_gguf_lora
    from ..exporters.modelfile import write_modelfile

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
