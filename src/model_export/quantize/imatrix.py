"""The importance matrix of llama.cpp's K-quants, collected layer by layer and written as llama.cpp's imatrix.gguf.

For every matrix of every decoder layer, the sum over the calibration tokens of the squared input of each column
(what ``llama-imatrix`` accumulates: ``in_sum2``) and the number of tokens (``counts``). The model runs through the
layer-streamed pass (streamed.StreamedModel), so only one decoder layer is in memory at a time, and only the decoder
runs: the head (and its logits, tokens x vocabulary floats) is never computed, as llama-imatrix leaves ``output.weight``
out unless asked.

    imatrix = collect_imatrix(merged_dir, calibration_set)     # {gguf tensor name: (in_sum2, count)}
    write_imatrix(path, imatrix, datasets=[...], chunk_size=256)
    exporters.gguf_export.read_importance(path)                # {name: in_sum2 / count}, as llama-quantize reads it
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["collect_imatrix", "write_imatrix", "TOKENS_PER_PASS"]

TOKENS_PER_PASS = 4096  # calibration tokens run through the decoder in one streamed pass (activations ~ this x width)


def collect_imatrix(
    model_dir: str | Path, samples: list[list[int]], on_pass: Callable[[int, int], None] | None = None
) -> dict[str, tuple[np.ndarray, int]]:
    """Run ``samples`` (equal-length token lists) through the model in ``model_dir`` layer by layer and return, per
    GGUF tensor name of each linear layer of the decoder, (sum of squared inputs per column, tokens seen)."""
    import torch

    from ..merging.streamed import StreamedModel
    from .gguf_types import gguf_names

    model = StreamedModel(model_dir)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    linear = [
        (f"model.layers.{i}.{name}", module)
        for i, layer in enumerate(model.model.model.layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    names = gguf_names(model.config, [n for n, _ in linear])

    def hook(name: str):
        def record(module: Any, args: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            total = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = total if name not in sums else sums[name] + total

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linear]
    try:
        per_pass = max(1, TOKENS_PER_PASS // max(1, len(samples[0])))
        with torch.inference_mode():
            for start in range(0, len(samples), per_pass):
                batch = torch.tensor(samples[start : start + per_pass], dtype=torch.long)
                model.model.model(input_ids=batch, use_cache=False)  # the decoder only: no head, no logits
                count += batch.numel()
                if on_pass is not None:
                    on_pass(min(start + per_pass, len(samples)), len(samples))
    finally:
        for handle in handles:
            handle.remove()
        model.close()
    return {names[name]: (total.to(torch.float32).numpy(), count) for name, total in sums.items()}


def write_imatrix(
    path: str | Path, imatrix: dict[str, tuple[np.ndarray, int]], *, datasets: list[str], chunk_size: int
) -> Path:
    """llama.cpp's imatrix file (a GGUF of general.type 'imatrix'): ``<tensor>.in_sum2`` and ``<tensor>.counts``
    (float32) per matrix, the datasets, the chunk size and count; llama-quantize --imatrix reads it."""
    import gguf

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", datasets)
    chunks = max((count for _, count in imatrix.values()), default=0) // max(1, chunk_size)
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(imatrix):
        sums, count = imatrix[name]
        writer.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path
