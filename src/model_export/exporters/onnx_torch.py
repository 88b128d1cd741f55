"""The torch backend: torch.onnx.export (dynamo) of the transformers model, for any causal LM transformers runs.

It instantiates the model (its memory is the model's, in the export dtype, plus tracing), so it is the
fallback for architectures the streaming builder does not know. The exported decoder has the same
inputs and outputs as the builder's (input_ids, attention_mask, position_ids, past_key_values.{i}.*
-> logits, present.{i}.*), with the config's names on its dynamic axes. int8/int4 weights are made
afterwards by onnxruntime's MatMulNBitsQuantizer on the exported MatMuls.

Exporter failures are translated into the guide's errors: an operator the exporter cannot convert
becomes OnnxExportError "Unsupported operator: ..." (ME803), a dynamic-shape problem becomes
"The following model inputs have dynamic shapes that are not supported: ..." (ME804).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import OnnxExportError

__all__ = ["export_torch"]

_ATEN_OP = re.compile(r"aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?")
_DYNAMIC_HINTS = ("constraints violated", "dynamic shape", "specializ", "guard", "dim(")


def export_torch(
    merged: str | Path,
    out: str | Path,
    *,
    weight_type: str = "fp32",
    opset: int = 18,
    block_size: int = 32,
    accuracy_level: int = 4,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> dict[str, Any]:
    """Write ``out/model.onnx`` (+ ``model.onnx.data``) by torch.onnx.export of the model in ``merged``.

    Raises OnnxExportError (unsupported operator, dynamic shapes) when the exporter fails.
    """
    from .. import extras

    extras.require("onnxscript", "ONNX export with onnx_backend: torch")
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if weight_type == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    wrapper = _decoder(model).eval()
    named = dynamic_axes or {}
    args, shapes = _example_inputs(model.config, named, dtype)
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")
    ]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    path = out / "model.onnx"
    try:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            verbose=False,
        )
        program.save(str(path), external_data=True)
    except OnnxExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - every exporter failure is translated into the guide's errors
        raise translate_export_error(exc, opset, named) from exc
    del model, wrapper, program
    _name_axes(path, named)
    if weight_type in ("int8", "int4"):
        _quantize(path, 4 if weight_type == "int4" else 8, block_size, accuracy_level)
    return {"path": str(path), "weight_type": weight_type, "opset": opset}


def _example_inputs(config: Any, named: dict[str, dict[int, str]], dtype: Any) -> tuple[tuple, dict[str, Any]]:
    """Inputs to trace with (a cache of 4 past tokens; two rows and three tokens where those axes are dynamic), and
    the dynamic shapes torch.export takes for them."""
    import torch

    layers = config.num_hidden_layers
    batch = 2 if 0 in named.get("input_ids", {}) else 1
    seq = 3 if 1 in named.get("input_ids", {}) else 1
    past, kv_heads = 4, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    args = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq)[None].expand(batch, seq).contiguous(),
        [torch.zeros(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)],
    )
    dynamic = torch.export.Dim.DYNAMIC
    row = {0: dynamic} if batch > 1 else {}
    shapes = {
        "input_ids": {**row, **({1: dynamic} if seq > 1 else {})},
        "attention_mask": {**row, 1: dynamic},
        "position_ids": {**row, **({1: dynamic} if seq > 1 else {})},
        "past": [{**row, 2: dynamic}] * (2 * layers),
    }
    return args, shapes


def _decoder(model):
    """The model with flat tensors in and out around its cache object, so the graph's inputs have the builder's names
    (a function, so that importing this module needs no torch)."""
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.inner.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            result = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in result.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (result.logits, *present)

    return Decoder(model)


def translate_export_error(exc: BaseException, opset: int, named: dict[str, Any]) -> OnnxExportError:
    """The guide's error for an exporter failure: unsupported operator, dynamic shapes, or the exporter's own text."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    op = _ATEN_OP.search(text)
    if (
        "unsupported" in lowered
        or "no decomposition" in lowered
        or "not implemented" in lowered
        or "no symbolic" in lowered
    ) and op:
        return OnnxExportError("onnx_unsupported_operator", operator=op.group(0).replace(".", "::", 1), opset=opset)
    if any(hint in lowered for hint in _DYNAMIC_HINTS):
        names = ", ".join(named) or "(none)"
        return OnnxExportError("onnx_dynamic_shapes", inputs=names, detail=_first_line(text))
    return OnnxExportError("onnx_export_failed", detail=_first_line(text))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)[:300]


def _name_axes(path: Path, named: dict[str, dict[int, str]]) -> None:
    """Give the graph's inputs and outputs the config's axis names (torch.export calls them s0, s1, ...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ids = named.get("input_ids", {})
    batch, seq = ids.get(0, "batch_size"), ids.get(1, "sequence_length")
    total = named.get("attention_mask", {}).get(1, "total_sequence_length")
    total = "total_sequence_length" if total == seq else total
    wanted = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "logits": {0: batch, 1: seq},
    }
    for value in list(model.graph.input) + list(model.graph.output):
        axes = wanted.get(value.name) or (
            {0: batch, 2: "past_sequence_length"} if value.name.startswith("past_key_values.") else {0: batch, 2: total}
        )
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and axis in axes:
                dim.dim_param = axes[axis]
    del model.graph.value_info[:]  # intermediate shapes still use torch's symbols; onnxruntime infers them again
    onnx.save(model, str(path))


def _quantize(path: Path, bits: int, block_size: int, accuracy_level: int) -> None:
    """int8/int4 MatMulNBits blocks for every MatMul with a constant weight, by onnxruntime's quantizer."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(path)), bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level
    )
    quantizer.process()
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
