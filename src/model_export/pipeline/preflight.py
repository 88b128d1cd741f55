"""What a run plans before it writes anything: the disk space its artifacts need, from the base model's parameters and
each format's bytes per parameter, and the memory one adapter's run holds at its peak (which a batch's pool and the
reference beside a run are planned with), and how many adapters a batch runs side by side."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from .. import i18n
from ..config import ExportConfiguration
from ..errors import ResourceError
from ..monitoring import human_bytes


def disk_needed(config: ExportConfiguration, info: Any) -> dict[str, int]:
    """The bytes each part of the run will write under output_dir, from the base model's parameter count and dtypes
    and each format's declared bytes per parameter."""
    from ..exporters import FORMATS

    params = sum(math.prod(t.shape) for t in info.tensors.values())
    base_size = info.weight_bytes / max(params, 1)  # bytes per parameter of the base (2 for bf16)
    needs = {"merge": {"bf16": 2.0, "fp16": 2.0}.get(config.quantization_level, base_size)}
    for fmt in config.formats:
        needs[fmt] = FORMATS[fmt].bytes_per_param(config, base_size)
    return {part: int(per * params) for part, per in needs.items()}


def check_disk_space(config: ExportConfiguration, info: Any, out: Path, adapters: int = 1) -> None:
    """Stop before writing anything when output_dir's disk cannot hold what the run will write (ME404), with the
    numbers; a batch asks for its ``adapters`` still to run at once, as side by side they share the disk."""
    needs = disk_needed(config, info)
    free = shutil.disk_usage(out).free
    total = sum(needs.values()) * adapters
    if total > free:
        parts = ", ".join(f"{part} {human_bytes(size)}" for part, size in needs.items())
        if adapters > 1:
            parts = i18n.ui("batch_disk_parts", count=adapters, parts=parts)
        raise ResourceError(
            "disk_too_small", path=str(out), free=human_bytes(free), need=human_bytes(total), parts=parts
        )


GIB = 2**30


def memory_per_adapter(config: ExportConfiguration, base_bytes: int) -> int:
    """The memory one adapter's run is planned to hold at its peak, from the base's weight bytes: a process with torch
    and transformers (about 0.6 GiB), plus the largest of what its steps hold: the streamed merge and reference (a
    decoder layer or the embedding, at most a quarter of the weights here, in fp32: base_bytes x 2 for a bf16 base,
    taken as base_bytes), a runtime holding a whole artifact (onnxruntime prepacks int4 graphs to 1.4x; llama.cpp and
    transformers hold about the file), or the whole model in fp32 when verification_runtime is transformers."""
    from ..exporters import FORMATS

    params = base_bytes / 2  # bf16/fp16 bases; an fp32 base only overestimates
    artifacts = [FORMATS[f].bytes_per_param(config, 2.0) * params * 1.4 for f in config.formats]
    whole = 4 * params * 2 if config.verification_runtime == "transformers" else 0
    return int(0.6 * GIB + max([base_bytes, whole, *artifacts]))


def streamed_peak(info: Any) -> int:
    """What a layer-streamed pass over the base holds beside its process: two of its largest decoder layer or other
    tensor in fp32 (one computed or widened while the next is read; the embedding is read by rows and the head in
    blocks, below this). At the 4B shape 3.1 GB; measured there: merge 0.78 GiB, export 1.42 GiB."""
    import re

    sizes: dict[str, int] = {}  # a decoder layer's parameters together, any other tensor alone
    for name, tensor in info.tensors.items():
        found = re.search(r"\.layers\.(\d+)\.", name)
        key = f"layer {found.group(1)}" if found else name
        sizes[key] = sizes.get(key, 0) + tensor.numel
    return 2 * 4 * max(sizes.values(), default=0)


SMALL_SHARE = 4  # a base whose widened weights take at most 1/SMALL_SHARE of the available memory is kept whole


def widened_bytes(info: Any) -> int:
    """The base's weights widened to fp32: what a streamed reference holds with every layer and the head kept."""
    return 4 * sum(tensor.numel for tensor in info.tensors.values())


def resident_cap(config: ExportConfiguration, info: Any) -> int | None:
    """The most the streamed reference keeps resident under ``max_memory: auto``, or None for no limit but the memory
    available. A base whose weights widened to fp32 take at most a quarter of the memory available is kept whole (its
    reference is short and on the run's critical path: at the 0.6B shape, 2.4 GB resident made a run 44-46 s against
    50-52 s; a tenth of this machine's 19-24 GB available was too close to those 2.4 GB to decide the same way twice).
    A larger one keeps what the run's plan already counts on holding at its peak (memory_per_adapter, its largest step)
    beyond the reference's own process and streaming, so that such a run holds no more than it plans for; beside the
    export, what the export holds is taken off too (pipeline/beside.py). Resident layers save the widening on later
    passes but cost the first touch of new memory, and the reader thread widens the next layer while one computes: at
    the 4B shape 14.5 GB kept made the run 17 s faster (464.0 s against 480.9 s) and its peak three times higher
    (docs/benchmarks.md)."""
    import psutil

    if widened_bytes(info) <= psutil.virtual_memory().available // SMALL_SHARE:
        return None
    return max(memory_per_adapter(config, info.weight_bytes) - int(0.6 * GIB) - streamed_peak(info), 0)


def memory_before_verify(config: ExportConfiguration, info: Any) -> int:
    """The memory a run is planned to hold before its verify step: the merge, the calibration and the export, beside
    which verify:reference may compute (the verify step starts after the reference's process has ended, so its
    runtimes never hold memory beside it). A process with torch and transformers (about 0.6 GiB) plus the largest of:
    a layer-streamed pass (streamed_peak: the merge, the calibration and the exporters widen one tensor or layer at a
    time), the ONNX graph that onnxruntime optimizes offline, or the whole model in fp32 when the ONNX export takes
    the torch backend (it instantiates the model)."""
    from ..exporters import FORMATS

    params = sum(tensor.numel for tensor in info.tensors.values())
    holds = [streamed_peak(info)]
    if "onnx" in config.formats:
        from ..exporters.onnx_export import choose_backend

        if config.onnx_optimize_graph:
            holds.append(int(FORMATS["onnx"].bytes_per_param(config, 2.0) * params))
        if choose_backend(config.onnx_backend, info.path) == "torch":
            holds.append(4 * params)
    return int(0.6 * GIB + max(holds))


def resident_share(width: int, per_adapter: int, cap: int | None = None) -> int:
    """What each of ``width`` adapters side by side may keep resident in its streamed reference (max_memory auto):
    its even share of the available memory less 1 GiB, beyond the ``per_adapter`` its run is planned to hold, and at
    most ``cap`` (preflight.resident_cap: what that plan leaves beside the reference's own needs). On Ray
    the tasks land on machines this process cannot see: 0 (every layer read on every pass)."""
    import psutil

    available = psutil.virtual_memory().available
    share = max(int((available - GIB) // max(width, 1)) - per_adapter, 0)
    return share if cap is None else min(share, max(cap, 0))


def pool_width(adapters: int, per_adapter: int, limit: int | None = None) -> tuple[int, int, str]:
    """(processes, threads per process, the rule in words): as many processes as the available memory holds at
    ``per_adapter`` each with 1 GiB kept free, at most one per core, at most ``limit`` and the number of adapters;
    the cores are shared out evenly as threads."""
    import psutil

    cores = os.cpu_count() or 1
    available = psutil.virtual_memory().available
    by_memory = max(1, int((available - GIB) // max(per_adapter, 1)))
    width = max(1, min(by_memory, cores, adapters, limit or adapters))
    rule = (
        f"{width} = min(memory {human_bytes(available)} - 1 GiB over {human_bytes(per_adapter)} per adapter "
        f"= {by_memory}, cores {cores}, adapters {adapters}"
        + (f", max_parallel_adapters {limit}" if limit else "")
        + f"); {max(1, cores // width)} thread(s) each"
    )
    return width, max(1, cores // width), rule
