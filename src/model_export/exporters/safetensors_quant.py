"""int8/int4 safetensors in the compressed-tensors format, which transformers and vLLM load.

Why compressed-tensors: it is the format transformers reads without a GPU (with the
compressed-tensors package installed, the layers stay packed and are unpacked in their forward on
the CPU) and vLLM serves natively (W8A16 /
W4A16 kernels); GPTQ and AWQ checkpoints need their own CUDA kernels to load at all, and
bitsandbytes cannot be saved as int4 for CPU use. The packing and the config are the
compressed-tensors library's own (``PackedQuantizationCompressor``, ``QuantizationConfig``); we only
choose the parameters and stream.

Every linear layer of the decoder (the ``*_proj`` weights) is quantized, symmetric round-to-nearest (data-free) or,
for int4 with calibration data, by GPTQ (gptq.py; same grid, same packing): int8 per output channel, int4 per group
of 128 inputs (64 or 32 when an input size is not a multiple of 128; one size for the whole model, as the config holds
one). The embedding, the head and the norms stay as merged. The merged shards are read one tensor at a time and the
output shards are laid out before any data is written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from .. import extras, i18n
from ..checkpoint.hf_layout import write_index
from ..files import write_atomic
from ..monitoring import Progress
from ..tensor_io import PlannedTensor, ShardWriter, plan_shards, read_bytes, read_header, torch_dtype

__all__ = ["export_quantized_safetensors", "group_size_for", "int4_group_size", "QUANT_FORMAT"]

QUANT_FORMAT = "pack-quantized"
_SAFETENSORS_DTYPES = {
    "torch.float32": "F32",
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.int32": "I32",
    "torch.int64": "I64",
}


def group_size_for(in_features: int) -> int:
    """128 (the usual W4A16 group), else the largest of 64, 32 that divides the input size."""
    return next((g for g in (128, 64, 32) if in_features % g == 0), 0)


def _quantized(name: str, shape: tuple[int, ...], keep: list[str] | None = None) -> bool:
    from ..quantize.keep import kept_module

    if keep and kept_module(keep, name):
        return False
    return name.endswith("_proj.weight") and len(shape) == 2 and ".layers." in name


def _scheme(bits: int, group: int, symmetric: bool = True):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if bits == 8:
        args = QuantizationArgs(num_bits=8, type="int", symmetric=symmetric, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _compress(weight, bits: int, group: int, symmetric: bool = True) -> dict[str, Any]:
    """compressed-tensors' own quantization and packing of one [out, in] weight (asymmetric: with zero points)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = _scheme(bits, group, symmetric)
    values = weight.float()
    if bits == 4:
        blocks = values.reshape(values.shape[0], -1, group)
        low, high = blocks.amin(-1), blocks.amax(-1)
    else:
        low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    scale, zero_point = calculate_qparams(low, high, scheme.weights)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
    return PackedQuantizationCompressor.compress(state, scheme)


def _group(sources: list[tuple[str, Any]], requested: int | None, keep: list[str] | None = None) -> int:
    """One int4 group size for the whole model (the config has one scheme): ``requested``, which must divide every
    quantized layer's input size (ExportFormatError ME812 otherwise), or 128, else 64 or 32."""
    from ..errors import ExportFormatError

    sizes = [(name, info.shape[1]) for name, info in sources if _quantized(name, tuple(info.shape), keep)]
    if requested:
        for name, size in sizes:
            if size % requested:
                raise ExportFormatError("quant_group_mismatch", group=requested, size=size, tensor=name)
        return requested
    return group_size_for(math.gcd(*[size for _, size in sizes] or [0]))


def _plan(
    sources: list[tuple[str, Any, Path]],
    bits: int,
    group_size: int | None = None,
    keep: list[str] | None = None,
    symmetric: bool = True,
) -> tuple[list[PlannedTensor], dict[str, int]]:
    """The output tensors, known from the headers alone: quantized layers become packed, scale and shape."""
    planned, groups = [], {}
    group_all = _group([(name, info) for name, info, _ in sources], group_size, keep) if bits == 4 else 0
    for name, info, _ in sources:
        shape = tuple(info.shape)
        if not _quantized(name, shape, keep):
            planned.append(PlannedTensor(name, info.dtype, shape))
            continue
        group = groups[name] = group_all
        stem = name.removesuffix(".weight")
        columns = shape[1] // group if bits == 4 else 1
        planned += [
            PlannedTensor(f"{stem}.weight_packed", "I32", (shape[0], math.ceil(shape[1] * bits / 32))),
            PlannedTensor(f"{stem}.weight_scale", info.dtype, (shape[0], columns)),
            PlannedTensor(f"{stem}.weight_shape", "I64", (2,)),
        ]
        if not symmetric:  # zero points, packed along the output dimension as compressed-tensors packs them
            planned.append(
                PlannedTensor(f"{stem}.weight_zero_point", "I32", (math.ceil(shape[0] * bits / 32), columns))
            )
    return planned, groups


def int4_group_size(merged: str | Path, requested: int | None = None, keep: list[str] | None = None) -> int:
    """The int4 group size the export uses for this merged model (one for all layers; 0 when none fits)."""
    sources = [
        (name, info)
        for shard in sorted(Path(merged).glob("*.safetensors"))
        for name, info in read_header(shard).tensors.items()
    ]
    return _group(sources, requested, keep)


def export_quantized_safetensors(
    merged: str | Path,
    out: str | Path,
    *,
    bits: int,
    max_shard_size: int = 5_000_000_000,
    gptq: str | Path | None = None,
    group_size: int | None = None,
    keep: list[str] | None = None,
    symmetric: bool = True,
) -> dict[str, Any]:
    """Write an int8 (``bits=8``) or int4 (``bits=4``) compressed-tensors checkpoint of the merged model: each layer
    rounded to nearest, or, for int4 with ``gptq`` (the folder calibrate_gptq wrote), GPTQ's levels and scales.

    Raises MissingDependencyError without compressed-tensors (the quant extra).
    """
    extras.require("compressed_tensors", f"int{bits} safetensors")
    import torch

    merged, out = Path(merged), Path(out)
    sources = [
        (name, info, shard)
        for shard in sorted(merged.glob("*.safetensors"))
        for name, info in read_header(shard).tensors.items()
    ]
    planned, groups = _checked_plan(sources, bits, group_size, keep, symmetric, gptq is not None)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {name: (info, shard) for name, info, shard in sources}
    from_gptq = None
    if gptq is not None and bits == 4:
        from ..quantize.gptq import GptqLayers

        from_gptq = GptqLayers(gptq).packed
    shards = plan_shards(planned, max_shard_size)

    def compress(stem: str, source: str, raw: Any, info: Any) -> dict[str, Any]:
        if from_gptq is not None:
            return from_gptq(stem)
        weight = torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).view(tuple(info.shape))
        return _compress(weight, bits, groups[source], symmetric)

    meter = Progress(i18n.ui("progress_export", format=f"int{bits} safetensors"), sum(i.nbytes for _, i, _ in sources))
    try:
        weight_map = _write_shards(out, shards, by_name, compress, meter)
    finally:
        meter.close()
    if len(shards) > 1:
        write_index(out, "model.safetensors.index.json", weight_map, sum(s.nbytes for s in shards))
    group = next(iter(groups.values()), 0)
    _write_config(merged, out, _scheme(bits, group, symmetric), ["lm_head", *_kept_layers(sources, keep)])
    return {
        "path": str(out),
        "bits": bits,
        "format": QUANT_FORMAT,
        "layers": len(groups),
        "group_size": group if bits == 4 else None,
        "method": "gptq" if from_gptq is not None else "round-to-nearest",
    }


def _checked_plan(
    sources: list[Any], bits: int, group_size: int | None, keep: list[str] | None, symmetric: bool, gptq: bool
) -> tuple[list[Any], dict[str, int]]:
    """_plan's tensors and groups, refusing what cannot be written (validate_config refuses both first)."""
    if gptq and not symmetric:
        raise ValueError("GPTQ levels are symmetric")
    planned, groups = _plan(sources, bits, group_size, keep, symmetric)
    if any(g == 0 for g in groups.values()) and bits == 4:
        bad = next(n for n, g in groups.items() if g == 0)
        raise ValueError(f"{bad}: the input size is not a multiple of 32")
    return planned, groups


def _write_shards(out: Path, shards: list[Any], by_name: dict[str, Any], compress: Any, meter: Any) -> dict[str, str]:
    """Each planned shard, its tensors in order: a tensor kept as it is copied, a quantized layer's packed, scale and
    shape tensors made together by ``compress`` (they may straddle shards). Returns the weight map."""
    import torch

    weight_map, handles = {}, {}
    pending: dict[str, Any] = {}
    try:
        for shard in shards:
            writer = ShardWriter(out / shard.filename, shard.tensors, {"format": "pt"}, hashed=False)
            for tensor in shard.tensors:
                weight_map[tensor.name] = shard.filename
                data = pending.pop(tensor.name, None)
                if data is None:
                    source = tensor.name if tensor.name in by_name else tensor.name.rsplit(".", 1)[0] + ".weight"
                    info, path = by_name[source]
                    fh = handles.get(path) or handles.setdefault(path, open(path, "rb"))  # noqa: SIM115
                    raw = read_bytes(fh, info)
                    meter.advance(info.nbytes)
                    if source == tensor.name:
                        writer.write(raw)
                        continue
                    stem = source.removesuffix(".weight")
                    pending.update({f"{stem}.{k}": v for k, v in compress(stem, source, raw, info).items()})
                    data = pending.pop(tensor.name)
                _check(tensor, data)
                writer.write(data.contiguous().view(-1).view(torch.uint8).numpy())
            writer.close()
    finally:
        for fh in handles.values():
            fh.close()
    return weight_map


def _write_config(merged: Path, out: Path, scheme: Any, ignore: list[str]) -> None:
    """The merge's other files (tokenizer, generation config, ...) copied, and config.json with compressed-tensors'
    quantization_config."""
    from compressed_tensors.quantization import QuantizationConfig

    for extra in merged.iterdir():
        if (
            extra.is_file()
            and not extra.name.startswith(".")
            and extra.suffix != ".safetensors"
            and extra.name != "model.safetensors.index.json"
        ):
            shutil.copyfile(extra, out / extra.name)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    quant = QuantizationConfig(
        config_groups={"group_0": scheme}, format=QUANT_FORMAT, quantization_status="compressed", ignore=ignore
    ).model_dump(mode="json")
    config["quantization_config"] = {**quant, "quant_method": "compressed-tensors"}
    write_atomic(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _kept_layers(sources: list[tuple[str, Any, Path]], keep: list[str] | None) -> list[str]:
    """The decoder's linear layers quantization_keep_modules kept as merged (the config's ignore list names them)."""
    return [
        name.removesuffix(".weight")
        for name, info, _ in sources
        if _quantized(name, tuple(info.shape)) and not _quantized(name, tuple(info.shape), keep)
    ]


def _check(tensor: PlannedTensor, data: Any) -> None:
    """What compressed-tensors produced must be what the header declared (a bug otherwise, never a user error)."""
    if tuple(data.shape) != tuple(tensor.shape) or _SAFETENSORS_DTYPES.get(str(data.dtype)) != tensor.dtype:
        raise AssertionError(
            f"{tensor.name}: got {tuple(data.shape)} {data.dtype}, planned {tensor.shape} {tensor.dtype}"
        )
