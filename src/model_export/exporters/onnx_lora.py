"""Adapters served unmerged in onnxruntime-genai: the base graph's LoRA inputs and one ``.onnx_adapter`` per adapter.

The base graph (onnx_builder.build_onnx with ``lora``) takes, for every module an adapter targets, two more inputs:
``<module>.lora_A`` [in, r] and ``<module>.lora_B`` [r, out], and adds x·A·B to that module's output (an embedding's
A is [vocab, r], gathered by token id). The rank r is a named axis, so adapters of any rank load on one graph without
padding: a smaller rank is not padded with zeros, it is a shorter axis. Each input also has an initializer of the same
name with r = 0 (an overridable initializer), so the base runs alone with no adapter active, and an adapter that
targets fewer modules than the batch leaves the others at rank 0.

An adapter is onnxruntime's AdapterFormat file (what ``og.Adapters.load`` reads): its A transposed, and its B
transposed and multiplied by PEFT's scaling for that module (alpha/r, alpha/sqrt(r) for rsLoRA, the rank and alpha
patterns), in the graph's float type. What is not a low-rank update of the base's matrices cannot be one: DoRA
(a magnitude per output), modules_to_save and added tokens (whole tensors of the adapter's own), lora_bias.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportFormatError
from ..runtimes.genai import ADAPTER_FILE, LORA_FILE, PAIR_FILE

__all__ = [
    "ADAPTER_FILE",
    "PAIR_FILE",
    "LoraTarget",
    "adapter_problems",
    "lora_targets",
    "write_onnx_adapter",
    "adapter_files",
    "write_targets",
    "onnx_adapters",
    "LORA_FILE",
]

RANK_AXIS = "lora_r"


def onnx_adapters(config: Any) -> bool:
    """Whether a run writes adapters for onnxruntime-genai (a base graph with LoRA inputs, an .onnx_adapter per
    adapter): with onnx, when it asks for onnx_adapter or, in a batch, for the adapters themselves (batch_outputs
    adapters or both)."""
    return "onnx" in config.formats and (config.batch_outputs != "merged" or config.onnx_adapter)


@dataclass(frozen=True)
class LoraTarget:
    """One module with LoRA inputs in the base graph: ``kind`` linear or embedding, the base weight's [out, in]
    (an embedding's [vocab, hidden])."""

    kind: str
    rows: int
    cols: int

    def shapes(self) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """The graph's A and B input shapes, the rank axis named."""
        if self.kind == "embedding":
            return (self.rows, RANK_AXIS), (RANK_AXIS, self.cols)
        return (self.cols, RANK_AXIS), (RANK_AXIS, self.rows)


def input_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_inputs(graph: Any, module: str, target: LoraTarget, dtype: Any) -> tuple[str, str]:
    """The module's A and B as graph inputs (the rank axis named), each with an initializer of rank 0 by its name:
    what runs when no adapter sets it."""
    from onnx import helper, numpy_helper

    names = input_names(module)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for name, shape in zip(names, target.shapes()):
        empty = [0 if axis == RANK_AXIS else axis for axis in shape]
        graph.initializers.append(numpy_helper.from_array(np.zeros(empty, dtype=dtype), name))
        graph.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
    return names


def _modules(checkpoint: Path, base_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The adapter's LoRA updates by module (merging.plan.lora_modules) and why it cannot be served this way."""
    from ..checkpoint.adapter_format import load_adapter_state, read_adapter_config
    from ..errors import MergeError
    from ..merging.plan import check_supported, lora_modules

    config = read_adapter_config(checkpoint)
    lora, full, _ = load_adapter_state(checkpoint)
    problems = []
    try:
        check_supported(config, list(lora) + list(full))
    except MergeError as exc:
        problems.append(exc.params.get("features", str(exc)))
    modules = lora_modules(config, lora) if not problems else {}
    if any(m.magnitude is not None for m in modules.values()):
        problems.append("DoRA (a magnitude per output column)")
    if any(m.bias is not None for m in modules.values()):
        problems.append("lora_bias")
    own = _own_tensors(full, base_dir)
    if own:
        problems.append(f"whole tensors of its own (modules_to_save or added tokens: {', '.join(own[:3])})")
    return modules, problems


def _own_tensors(full: dict[str, Any], base_dir: Path) -> list[str]:
    """The adapter's whole tensors that are not the base's: PEFT saves the embedding layers it targets
    (save_embedding_layers) even when training left them as they were; those equal to the base's add nothing."""
    import torch

    from ..checkpoint.adapter_format import parse_adapter_key
    from ..checkpoint.base_model import inspect_base_model
    from ..tensor_io import torch_row_chunks

    if not full:
        return []
    base = inspect_base_model(str(base_dir))
    own = []
    for key, (entry, file) in sorted(full.items()):
        name = parse_adapter_key(key)[0]
        if name == "lm_head.weight" and name not in base.tensors:  # a tied head: the embedding's matrix
            name = "model.embed_tokens.weight"
        theirs = base.tensors.get(name)
        if theirs is None or tuple(theirs.shape) != tuple(entry.shape):
            own.append(key)
            continue
        with io.BytesIO(bytes(entry.raw)) if file is None else open(file, "rb") as a, open(base.files[name], "rb") as b:
            chunks = zip(torch_row_chunks(a, entry, 64 << 20), torch_row_chunks(b, theirs, 64 << 20))
            if not all(torch.equal(x.float(), y.float()) for x, y in chunks):
                own.append(key)
    return own


def adapter_problems(checkpoint: Path, base_dir: Path) -> list[str]:
    """What in the adapter is not a low-rank update of the base's matrices (empty when it can be an .onnx_adapter)."""
    return _modules(Path(checkpoint), Path(base_dir))[1]


def lora_targets(checkpoints: list[Path], base_dir: Path, refuse: bool = False) -> dict[str, LoraTarget]:
    """The union of the modules the adapters target, by base tensor name (``model.layers.0.self_attn.q_proj.weight``;
    a tied head's is ``lm_head.weight`` although the base stores it as the embedding) with their kind and shape;
    adapters that cannot be served this way are left out (their runs say why), or, with ``refuse`` (one adapter's
    own base graph, before it is written), refused: ExportFormatError ME813 naming why."""
    from ..checkpoint.base_model import inspect_base_model

    tensors = inspect_base_model(str(base_dir)).tensors
    targets: dict[str, LoraTarget] = {}
    for checkpoint in checkpoints:
        modules, problems = _modules(Path(checkpoint), Path(base_dir))
        if problems and refuse:
            raise ExportFormatError("onnx_adapter_unsupported", what="; ".join(problems))
        if problems:
            continue
        for module, update in modules.items():
            name = f"{module}.weight"
            stored = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in tensors else name
            if stored not in tensors:
                raise ExportFormatError("onnx_adapter_not_in_base", module=module)
            rows, cols = tensors[stored].shape
            targets[name] = LoraTarget(update.kind, rows, cols)
    return dict(sorted(targets.items()))


def write_onnx_adapter(
    checkpoint: Path, targets: dict[str, LoraTarget], out: Path, dtype: str, base_dir: Path
) -> dict[str, Any]:
    """The adapter as ``out`` (an .onnx_adapter file) for a base graph with LoRA inputs for ``targets``, in the
    graph's float type (``float32`` or ``float16``). Raises ExportFormatError when the adapter is not a plain LoRA on
    the base's matrices, or targets a module the base graph has no input for."""
    import onnxruntime as ort

    modules, problems = _modules(Path(checkpoint), Path(base_dir))
    if problems:
        raise ExportFormatError("onnx_adapter_unsupported", what="; ".join(problems))
    parameters, ranks = {}, {}
    for module, update in sorted(modules.items()):
        if f"{module}.weight" not in targets:
            raise ExportFormatError("onnx_adapter_not_in_base", module=module)
        a, b = _parameters(update, dtype)
        name_a, name_b = input_names(module)
        parameters[name_a] = ort.OrtValue.ortvalue_from_numpy(a)
        parameters[name_b] = ort.OrtValue.ortvalue_from_numpy(b)
        ranks[module] = int(a.shape[1])
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(parameters)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    adapter.export_adapter(str(partial))
    partial.replace(out)
    return {"path": str(out), "modules": len(modules), "ranks": sorted(set(ranks.values())), "dtype": dtype}


def _parameters(update: Any, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(A as the graph multiplies it, B scaled and transposed): x·A·B is PEFT's lora_B(lora_A(x)) * scaling."""
    a = np.asarray(update.A, dtype=np.float64)
    b = np.asarray(update.B, dtype=np.float64) * update.scaling
    # linear: A [r, in], B [out, r]; embedding: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
    return np.ascontiguousarray(a.T, dtype=dtype), np.ascontiguousarray(b.T, dtype=dtype)


def write_pair(folder: Path, base_graph: Path, targets: dict[str, LoraTarget]) -> None:
    """onnx_adapter.json beside the adapter: the base graph's folder (relative, so the output folder can move as a
    whole) and the modules the base graph takes LoRA inputs for."""
    import os

    from ..files import write_atomic

    data = {
        "base": os.path.relpath(Path(base_graph).resolve(), Path(folder).resolve()),
        "adapter": ADAPTER_FILE,
        "targets": sorted(targets),
    }
    write_atomic(folder / PAIR_FILE, json.dumps(data, indent=2) + "\n")


def training_dirs(checkpoint: Path) -> list[Path]:
    """Where a base graph takes its tokenizer and generation config from before the base's: the training run's, as
    the merge does."""
    return [Path(checkpoint), Path(checkpoint).parent]


def write_targets(folder: Path, targets: dict[str, LoraTarget], dtype: str, base_dir: Path) -> None:
    """lora.json in a base graph's folder: the modules that take LoRA inputs, their float type and the base model's
    folder (an adapter's whole tensors are compared with it)."""
    from ..files import write_atomic

    data = {"dtype": dtype, "base_model": str(Path(base_dir).resolve())}
    data["targets"] = {name: [t.kind, t.rows, t.cols] for name, t in targets.items()}
    write_atomic(Path(folder) / LORA_FILE, json.dumps(data, indent=2) + "\n")


def read_targets(folder: Path) -> tuple[dict[str, LoraTarget], str, Path]:
    """(the LoRA targets, the float type, the base model's folder) of a base graph's folder."""
    data = json.loads((Path(folder) / LORA_FILE).read_text(encoding="utf-8"))
    targets = {name: LoraTarget(*entry) for name, entry in data["targets"].items()}
    return targets, data["dtype"], Path(data["base_model"])


def adapter_files(checkpoint: Path, base_folder: Path, out: Path) -> dict[str, Any]:
    """The adapter as ``out/adapter.onnx_adapter`` for the base graph in ``base_folder``, and onnx_adapter.json
    naming that base (relative to ``out``'s final place: ``out`` may be a partial folder beside it)."""
    targets, dtype, base_dir = read_targets(base_folder)
    details = write_onnx_adapter(checkpoint, targets, out / ADAPTER_FILE, dtype, base_dir)
    write_pair(out, base_folder, targets)
    return {**details, "base": str(base_folder)}
