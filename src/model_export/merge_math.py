"""The update math of the merge, as PEFT does it, accumulated in fp32 and rounded once.

PEFT's merge_and_unload computes ``delta = (B @ A) * scaling`` in fp32 (transposed for
fan_in_fan_out and embeddings) and adds it to the base weight; DoRA then scales each output row
(each embedding column) by ``magnitude / ||W + delta||``. We do the same operations in the same
order, on rows at a time where the operation allows it, so that per element the result is within
one unit in the last place of PEFT's (the only difference being that we round once, at the end).
"""

from __future__ import annotations

import math
from typing import Any, BinaryIO, Iterator

from . import i18n
from .monitoring import logger
from .tensor_io import read_rows, read_tensor, torch_dtype

__all__ = ["merged_chunks", "MemoryTensor", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20  # fp32 working set of one chunk


class MemoryTensor:
    """A source tensor already in memory (from a .bin adapter), shaped like tensor_io.TensorInfo."""

    def __init__(self, name: str, tensor: Any) -> None:
        from .merge_plan import torch_to_safetensors

        self.name, self.tensor = name, tensor
        self.dtype, self.shape = torch_to_safetensors(tensor.dtype), tuple(tensor.shape)
        self.start, self.end = 0, tensor.numel() * tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _rows(tensor: Any, fh: BinaryIO | None, start: int, stop: int):
    """Rows of the source as a private fp32 tensor that may be changed in place."""
    import torch

    source = tensor.source
    if isinstance(source, MemoryTensor):
        rows = source.tensor.reshape(-1) if not source.shape else source.tensor[start:stop]
        return rows.to(torch.float32, copy=True)
    rows = read_tensor(fh, source).reshape(-1) if not source.shape else read_rows(fh, source, start, stop)
    return rows.to(torch.float32)


def _whole_tensor(lora: Any) -> bool:
    # fan_in_fan_out and DoRA on embeddings normalise across rows: they need the whole tensor at once.
    return lora is not None and (lora.fan_in_fan_out or (lora.kind == "embedding" and lora.magnitude is not None))


def merged_chunks(tensor: Any, fh: BinaryIO | None, device: str = "cpu") -> Iterator[Any]:
    """Yield the merged output tensor of ``tensor`` (an OutputTensor) in row chunks of the output dtype."""
    out_dtype = torch_dtype(tensor.dtype)
    total = tensor.shape[0] if tensor.shape else 1
    row_elems = math.prod(tensor.shape[1:]) if tensor.shape else 1
    step = total if _whole_tensor(tensor.lora) or not tensor.shape else max(1, CHUNK_BYTES // (4 * max(row_elems, 1)))
    for start in range(0, total, step):
        stop = min(total, start + step)
        weight = _rows(tensor, fh, start, stop)
        if tensor.lora is not None:
            weight = _on_device(_apply, tensor.lora, weight, start, stop, device)
        if tensor.bias_of is not None:
            weight += tensor.bias_of.bias.float()[start:stop] * tensor.bias_of.scaling
        yield weight.to(out_dtype)


def _on_device(fn, lora: Any, weight: Any, start: int, stop: int, device: str):
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return fn(lora, weight, start, stop, torch.device("cpu"))
    try:
        return fn(lora, weight.to("cuda"), start, stop, torch.device("cuda")).cpu()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        logger.warning(i18n.ui("merge_gpu_fallback", module=lora.module))
        return fn(lora, weight, start, stop, torch.device("cpu"))


def _apply(lora: Any, weight: Any, start: int, stop: int, device: Any):
    """weight (fp32 rows start:stop of the base) -> merged fp32 rows, following PEFT's order of operations."""
    import torch

    A = lora.A.to(device=device, dtype=weight.dtype)
    B = lora.B.to(device=device, dtype=weight.dtype)
    if lora.kind == "embedding":
        if lora.magnitude is not None:  # whole tensor
            delta = (B @ A).T * lora.scaling
            norm = torch.linalg.norm(weight.T + delta.T, dim=1)
            factor = (lora.magnitude.to(device=device, dtype=weight.dtype) / norm).view(1, -1)
            return factor * (weight + delta)
        return weight.add_((B @ A[:, start:stop]).T * lora.scaling)
    if lora.fan_in_fan_out:  # whole tensor, stored (in, out)
        delta = (B @ A).T * lora.scaling
    else:
        delta = (B[start:stop] @ A) * lora.scaling
    if lora.magnitude is None:
        return weight.add_(delta)
    rows = (weight + delta).T if lora.fan_in_fan_out else weight + delta
    norm = torch.linalg.norm(rows, dim=1)
    magnitude = lora.magnitude.to(device=device, dtype=weight.dtype)
    factor = (magnitude if lora.fan_in_fan_out else magnitude[start:stop]) / norm
    factor = factor.view(1, -1) if lora.fan_in_fan_out else factor.view(-1, 1)
    return factor * (weight + delta)
