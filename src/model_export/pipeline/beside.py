"""Independent steps side by side: ``verify:reference`` needs only the check, so it can run while the merge, the
calibration and the export run, in a process of its own.

The memory rule, written once (``beside_rule``): side by side when the memory available at the start, less 1 GiB,
holds the reference's process (0.6 GiB for torch and transformers, plus what the reference holds: two of the base's
largest layer in fp32 for the layer-streamed pass, the whole model in fp32 twice over for transformers) beside what
the run is planned to hold until its verify step (preflight.memory_before_verify: the merge, calibration and export;
the verify step first waits for the reference's process to end, so its runtimes never run beside it); what is left
the reference may keep resident (max_memory auto). Also: two cores or more
(each side gets half), no GPU (the two would share its memory), not inside a batch (its adapters already run side by
side), and with ``steps_side_by_side: auto`` a base of 256 MiB of weights or more (below that its reference takes less
than the two seconds a process takes to start). The reference's process computes exactly what the verify step would
(verify.step.compute_cached, the same unit and key) into verify/.reference.cache and hands back its record; the verify
step then reads it back instead of computing it. A reference that did not finish is computed by the verify step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import i18n
from ..monitoring import human_bytes, logger
from .preflight import GIB

__all__ = ["Beside", "beside_rule", "SMALL_BASE"]

SMALL_BASE = 256 << 20  # base weights under this: a process costs more than the reference it would run
_RESULT = ".reference.beside.json"


def beside_rule(config: Any, info: Any, in_batch: bool) -> tuple[bool, str]:
    """(whether verify:reference runs beside the merge and export, the rule in words)."""
    import psutil

    from ..checkpoint.loading import resolve_device

    mode = config.steps_side_by_side
    if mode == "off":
        return False, i18n.ui("beside_rule_off")
    if in_batch:
        return False, i18n.ui("beside_rule_batch")
    if resolve_device(config.device_map) == "cuda":
        return False, i18n.ui("beside_rule_gpu")
    cores = os.cpu_count() or 1
    if cores < 2:
        return False, i18n.ui("beside_rule_cores", cores=cores)
    if mode == "auto" and info.weight_bytes < SMALL_BASE:
        size, threshold = human_bytes(info.weight_bytes), human_bytes(SMALL_BASE)
        return False, i18n.ui("beside_rule_small", size=size, threshold=threshold)
    reference, run = _needs(config, info)
    available = psutil.virtual_memory().available
    fits = available - GIB >= reference + run
    words = dict(available=human_bytes(available), reference=human_bytes(reference), run=human_bytes(run))
    verdict = i18n.ui("beside_covers" if fits else "beside_short")
    return fits, i18n.ui("beside_rule_memory", verdict=verdict, **words)


def _needs(config: Any, info: Any) -> tuple[int, int]:
    """(what the reference's process needs besides the layers it keeps resident: 0.6 GiB for torch and transformers
    plus a layer-streamed pass, or the whole model in fp32 twice over for transformers; what the run plans to hold
    until its verify step)."""
    from .preflight import memory_before_verify, streamed_peak

    whole = config.verification_runtime == "transformers" or config.base_model_load_in_4bit
    reference = 4 * info.weight_bytes if whole else streamed_peak(info)
    return int(0.6 * GIB + reference), memory_before_verify(config, info)


def resident_beside(config: Any, info: Any) -> int:
    """What the reference beside the run may keep resident (max_memory auto): the memory available less 1 GiB, what
    the run plans to hold until its verify step and the reference's own streaming needs (the side-by-side rule's
    figures), so that the two together stay within what the rule allowed; for a base too large to keep whole cheaply,
    no more than the run's plan leaves beside the export (preflight.resident_cap less what the export holds: at the 4B
    shape, nothing)."""
    import psutil

    from .preflight import resident_cap

    reference, run = _needs(config, info)
    available = int(psutil.virtual_memory().available - GIB - run - reference)
    cap = resident_cap(config, info)
    return max(available if cap is None else min(available, cap - run), 0)


class Beside:
    """verify:reference computing in a process of its own; ``result()`` waits for its record (None when it did not
    finish: the verify step computes it then), ``stop()`` ends it (a run that fails or is interrupted)."""

    def __init__(self, config: Any, out: Path, checkpoint: Path, info: Any, upstream: dict[str, str]) -> None:
        import subprocess

        from ..monitoring import RESIDENT_ENV

        folder = out / "verify"
        folder.mkdir(parents=True, exist_ok=True)
        self.result_file = folder / _RESULT
        self.result_file.unlink(missing_ok=True)
        job = {
            "config": config.model_dump(mode="json"),
            "out": str(out),
            "checkpoint": str(checkpoint),
            "base_dir": str(info.path),
            "upstream": upstream,
            "threads": max(1, (os.cpu_count() or 2) // 2),
            "parent": os.getpid(),
            "lang": i18n.current_language(),
        }
        env = {**os.environ, "MODEL_EXPORT_LOG_CONTEXT": "verify:reference"}
        env[RESIDENT_ENV] = str(resident_beside(config, info))  # max_memory auto, beside the run
        command = [sys.executable, "-m", "model_export.pipeline.beside", json.dumps(job)]
        self.process = subprocess.Popen(command, env=env)  # its log lines go to the console and the run's log

    def result(self) -> dict[str, Any] | None:
        code = self.process.wait()
        try:
            answer = json.loads(self.result_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            answer = {"error": f"exit code {code}"}
        finally:
            self.result_file.unlink(missing_ok=True)
        if "record" not in answer:
            logger.warning(i18n.ui("beside_failed", reason=answer.get("error", f"exit code {code}")))
            return None
        return answer["record"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """In the reference's process: compute it as the verify step would, and return its record."""
    import torch

    from ..config import ExportConfiguration
    from ..files import strict_json
    from ..monitoring import exit_with_parent
    from ..verify.step import compute_cached, reference_unit

    exit_with_parent(job["parent"])  # a run killed with -9 takes its reference's process with it
    torch.set_num_threads(job["threads"])
    os.environ["MODEL_EXPORT_THREADS"] = str(job["threads"])
    i18n.set_language(job["lang"])
    config = ExportConfiguration(**job["config"])
    from ..monitoring import setup_logging

    out = Path(job["out"])
    setup_logging(config.log_level, config.log_file or out / "export.log", shared_file=True)
    unit = reference_unit(config, {}, job["upstream"])
    try:
        _, record = compute_cached(config, out, Path(job["checkpoint"]), Path(job["base_dir"]), {}, unit)
        answer = {"record": record}
    except Exception as exc:  # noqa: BLE001 - reported to the run, which computes the reference itself
        answer = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    (out / "verify" / _RESULT).write_text(strict_json(answer), encoding="utf-8")
    return answer


if __name__ == "__main__":
    _job(json.loads(sys.argv[1]))
