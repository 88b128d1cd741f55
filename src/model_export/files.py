"""Files written so that a killed run never leaves one half-written, and JSON that every parser reads.

write_atomic(out / "config.json", text)   # written as config.json.partial, then renamed
strict_json({"kl": float("nan")})          # '{"kl": null}': NaN is not JSON
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "strict_json", "finite", "parse_size", "link_or_copy", "torch_save"]


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` as a hard link to ``src`` (no bytes written), or a copy of it where the link cannot be made."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


WRITE_BYTES = 1 << 20


def write_sliced(fh: Any, data: Any) -> int:
    """``fh.write(data)`` one WRITE_BYTES slice at a time. The kernel took 0.74-6.7 s (typically 1.5-4 s) of system
    time to take the 0.6B shape's 1.19 GB into the page cache in 64 MB writes from one reused buffer, 0.52-0.96 s in
    1 MB writes (4 MB: 0.54-1.4 s), alternated over six rounds here (docs/benchmarks.md): the merge's chunks and a
    GGUF's are tens of MB each, a reference's logits one record of 390 MB. Returns the bytes written."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_BYTES):
        fh.write(view[start : start + WRITE_BYTES])
    return len(view)


def copy_range(src: Any, dst: Any, start: int, nbytes: int) -> bool:
    """``nbytes`` of the open file ``src`` from offset ``start`` written at the open file ``dst``'s position, which
    then moves past them, by the kernel (os.copy_file_range): page to page, never through this process's memory. The
    0.6B shape's bf16 GGUF export took 5.2-6.1 s (system 2.9-3.6 s) reading and writing 64 MB at a time here, 3.1 s
    (0.7-0.8 s) this way; the copy of its 1.19 GB alone 0.4 s. False, with ``dst`` where it was, where the kernel or the
    filesystems cannot (no copy_file_range, another filesystem, a file that ends early): the caller then writes the
    bytes itself. A full disk is raised as the OSError it is."""
    import errno

    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return False
    dst.flush()
    at, done = dst.tell(), 0
    try:
        while done < nbytes:
            step = copy(src.fileno(), dst.fileno(), nbytes - done, start + done, at + done)
            if step <= 0:  # the source ends before its header said: let the caller's read say so
                raise OSError(errno.EIO, "copy_file_range copied nothing")
            done += step
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        dst.seek(at)
        return False
    dst.seek(at + nbytes)
    return True


def write_atomic(path: Path, data: str | bytes) -> None:
    """``data`` into ``path`` under a temporary name, renamed when complete."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(partial, path)


def finite(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None, so json.dumps(allow_nan=False) accepts it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def strict_json(data: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null (json.dumps would write NaN, which is not
    JSON)."""
    return json.dumps(finite(data), indent=2, default=str, allow_nan=False)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, **{f"{p}b": 10 ** (3 * i) for i, p in enumerate("kmgt", 1)}}
_UNITS.update({f"{p}ib": 2 ** (10 * i) for i, p in enumerate("kmgt", 1)})


def parse_size(value: int | str) -> int:
    """Bytes from an int or a text such as ``5GB``, ``500MB`` or ``2GiB`` (as transformers' max_shard_size)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (write e.g. 5GB, 500MB or 2GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").lower()])


class _Sliced:
    """A file torch.save writes its records to through write_sliced."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: Any) -> int:
        return write_sliced(self.fh, data)

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: Path, crc: bool = True) -> None:
    """``torch.save(obj, path)``, with a write the disk could not hold raised as the OSError it is (ENOSPC), so the run
    says the disk is full (ME403) instead of calling it its own fault: torch reports a short write as a RuntimeError
    ("unexpected pos"). What was written of the file is removed. ``crc=False`` leaves out the zip's CRC32 of each record
    (torch's ``compute_crc32``, where this torch has it), for the run's own caches that only torch.load reads (it reads
    them either way; zipfile would not): a reference's 390 MB of logits took 1.35 s to save with it, 0.35 s without."""
    import errno

    import torch

    try:
        from torch.utils.serialization import config
    except ImportError:
        config = None
    was = None if crc else getattr(getattr(config, "save", None), "compute_crc32", None)
    try:
        if was is not None:
            config.save.compute_crc32 = False
        with open(path, "wb") as fh:  # written in slices (write_sliced): torch hands each record over whole
            torch.save(obj, _Sliced(fh))
    except (RuntimeError, OSError) as exc:
        short = errno.ENOSPC, errno.EFBIG, errno.EDQUOT
        if "unexpected pos" not in str(exc) and getattr(exc, "errno", None) not in short:
            raise
        Path(path).unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: writing {path} stopped short") from exc
    finally:
        if was is not None:
            config.save.compute_crc32 = was
