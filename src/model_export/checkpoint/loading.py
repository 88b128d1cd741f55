"""Loading whole models with transformers (and PEFT) for the reference and verification runs.

Only the stages that run a model load one; the merge never does. 4-bit and 8-bit loading go
through bitsandbytes (the ``gpu`` extra); a CUDA out-of-memory becomes ResourceError (ME401)
with the guide's fixes. ``device_map``: cpu, cuda (the GPU or an error, ME405), or auto (the GPU
when there is one; a CUDA out-of-memory there falls back to the CPU, logged).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .. import i18n
from ..errors import ResourceError
from ..extras import require
from ..monitoring import logger, third_party_output
from .base_model import resolve_base_model

__all__ = ["load_model", "cuda_oom_as_resource_error", "resolve_device", "on_device"]

T = TypeVar("T")


def resolve_device(device_map: str) -> str:
    """'cuda' or 'cpu' for a device_map setting; 'cuda' without a usable GPU raises
    ResourceError('cuda_unavailable')."""
    import torch

    if device_map == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device_map == "cuda":
        reason = (
            "this PyTorch build has no CUDA"
            if torch.version.cuda is None
            else f"PyTorch {torch.__version__} sees no CUDA device"
        )
        raise ResourceError("cuda_unavailable", reason=reason)
    return "cpu"


def on_device(device_map: str, work: Callable[[str], T], *, what: str) -> T:
    """``work(device)`` on the device ``device_map`` resolves to. A CUDA out-of-memory is ResourceError('cuda_oom'),
    except under device_map auto, where it is logged and ``work('cpu')`` runs instead."""
    device = resolve_device(device_map)
    if device == "cpu":
        return work("cpu")
    try:
        with cuda_oom_as_resource_error():
            return work(device)
    except ResourceError as exc:
        if exc.key != "cuda_oom" or device_map != "auto":
            raise
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        logger.warning(i18n.ui("cuda_oom_fallback", what=what, detail=exc.params.get("detail", "")))
        return work("cpu")


@contextlib.contextmanager
def cuda_oom_as_resource_error() -> Iterator[None]:
    """Turn torch's CUDA out-of-memory into ResourceError('cuda_oom') carrying torch's own first sentence."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        detail = str(exc).split("CUDA out of memory.")[-1].strip().split(". ")[0]
        raise ResourceError("cuda_oom", detail=detail) from exc


def load_model(
    name: str,
    config: Any = None,
    *,
    dtype: Any = "auto",
    device_map: str | None = None,
    load_in_4bit: bool | None = None,
    load_in_8bit: bool | None = None,
    **kwargs: Any,
):
    """AutoModelForCausalLM for ``name`` (a local directory or a hub id resolved through the cache).

    Settings default to ``config`` (device_map, base_model_load_in_4bit/8bit, use_memory_mapping).
    Raises BaseModelError, MissingDependencyError (bitsandbytes) and ResourceError (CUDA out of memory).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(name)
    device_map = device_map or (config.device_map if config is not None else "cpu")
    load_in_4bit = load_in_4bit if load_in_4bit is not None else bool(config and config.base_model_load_in_4bit)
    load_in_8bit = load_in_8bit if load_in_8bit is not None else bool(config and config.base_model_load_in_8bit)
    if load_in_4bit or load_in_8bit:
        require("bitsandbytes", "4-bit/8-bit loading")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit and not load_in_4bit
        )
    with cuda_oom_as_resource_error():
        with third_party_output():
            return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map, **kwargs)
