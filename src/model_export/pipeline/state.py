"""A run's state on disk: run.json's step records, the lock on output_dir, and each step run or skipped by its key.

RunState.step runs a declared step (steps.StepSpec) against the view of the configuration it declares, unless
run.json holds it done with the same key and its files untouched; it records what happened (status, key, declared
values, result, fingerprints of its files, time and peak memory) and says why a step done before runs again."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import i18n
from ..config import ExportConfiguration
from ..errors import ResourceError, explain
from ..faults import crash_point
from ..files import strict_json, write_atomic
from ..monitoring import MemoryMonitor, human_bytes, logger, timed_step
from ..steps import STEP_FILE, ConfigView
from ..steps import fingerprint as _fingerprint
from .graph import StepSpec
from .manifest import MANIFEST, RunManifest, StepRecord


@dataclass
class RunResult:
    output_dir: str
    steps: dict[str, dict[str, Any]]
    artifacts: dict[str, str] = field(default_factory=dict)
    report: str | None = None
    passed: bool | None = None  # True: every artifact run and verified; None: some not run (or no verification)
    counts: dict[str, int] = field(default_factory=dict)  # verified, failed, not_run

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "steps": self.steps,
            "artifacts": self.artifacts,
            "report": self.report,
            "passed": self.passed,
            "counts": self.counts,
        }


class RunState:
    def __init__(self, config: ExportConfiguration) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.manifest_path = self.out / MANIFEST
        self.manifest = RunManifest.load(self.manifest_path)
        self.keys: dict[str, str] = {}
        self.content: dict[str, str] = {}  # each step's content key, which the steps that need it take in
        self.results: dict[str, Any] = {}
        self.monitor = MemoryMonitor(config.memory_monitoring_interval, enabled=config.memory_monitoring)
        self.log_file = str(config.log_file or self.out / "export.log")
        self.shared: dict[str, Any] = {}
        self.beside: Any = None  # verify:reference computing in a process of its own (pipeline/beside.py)

    def save(self) -> None:
        """run.json as it stands, atomically; a full disk is ME403 naming what is free."""
        try:
            self.manifest.save(self.manifest_path)
        except OSError as exc:  # the disk filled up (or went read-only) while run.json was written
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceError(
                    "disk_full", step="run.json", path=str(self.out), free=_free_space(self.out)
                ) from exc
            raise

    def step(
        self,
        spec: StepSpec,
        inputs: list[Any],
        action: Callable[[ConfigView], dict[str, Any]],
        outputs: Callable[[dict[str, Any]], list[Path]] = lambda result: [],
        always: bool = False,
    ) -> dict[str, Any]:
        """Run ``action`` on the view of the configuration ``spec`` declares, unless run.json holds this step done with
        the same key and its output files unchanged (name, size, modification time, sampled content); record what
        happened, with the declared values, and say why a step that was done before runs again. A step of units
        (``always``) runs each time: its units decide what is kept."""
        name, unit = spec.name, spec.unit(self.config, inputs, self.content)
        self.keys[name], self.content[name] = unit.key, unit.content_key
        record = self.manifest.steps.get(name) or StepRecord(status="none")
        unchanged = record.outputs == _fingerprint(outputs(record.result))
        logger.debug("step %s: key %s (recorded: %s, status %s)", name, unit.key[:12], record.key[:12], record.status)
        if record.status == "done" and record.key == unit.key and unchanged and not always:
            kept = i18n.ui("unit_kept", unit=name) if ":" in name else None  # a unit's line, as verify's units say it
            logger.info(kept or i18n.ui("step_skipped", step=name, when=record.finished or "?"))
            record.skipped = True
            self.results[name] = record.result
            return self.results[name]
        if record.status in ("done", "failed") and not always:
            logger.info(i18n.ui("unit_reruns", unit=name, why=unit.why(record.unit_record())))
        first_sample = len(self.monitor.samples)
        self.monitor.sample()
        self.manifest.steps[name] = record = StepRecord(status="running", key=unit.key, values=unit.declared)
        self.save()
        try:
            with timed_step(name) as timing:  # logs the step's duration, or its failure
                result = action(spec.view(self.config))
        except BaseException as exc:  # recorded as failed with the reason, whatever it is (Ctrl-C included)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                error = ResourceError("disk_full", step=name, path=str(self.out), free=_free_space(self.out))
            else:
                error = explain(exc, i18n.ui("where_step", step=name), self.log_file)
            record.status, record.error, record.seconds = "failed", error.to_dict(), round(timing["seconds"], 3)
            record.result = self.results.get(name)  # what a failing step judged before it stopped (verify's verdicts)
            record.peak_rss = max((rss for _, rss in self.monitor.samples[first_sample:]), default=None)
            self.save()
            if error is exc:
                raise
            raise error from exc
        self.monitor.sample()
        if ":" not in name:  # a unit's folder is its artifact: nothing of ours is written into it
            (self.out / name).mkdir(exist_ok=True)
            write_atomic(self.out / name / STEP_FILE, strict_json(result))
        record.status, record.result, record.outputs = "done", result, _fingerprint(outputs(result))
        record.seconds = round(timing["seconds"], 3)
        record.peak_rss = max(rss for _, rss in self.monitor.samples[first_sample:])
        record.finished = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        crash_point("step")
        self.results[name] = result
        return result

    def drop(self, *names: str) -> None:
        """Forget the records of steps this run does not take (and of their units)."""
        for name in list(self.manifest.steps):
            if name in names or name.split(":", 1)[0] in names:
                del self.manifest.steps[name]


def _free_space(path: Path) -> str:
    try:
        return human_bytes(shutil.disk_usage(path).free)
    except OSError:
        return "?"


LOCK_FILE = ".model-export.lock"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on ``out`` for the run: a second run on the same directory fails at once (ME402), naming
    the process that holds it. flock is released by the kernel when its process dies, so a killed run's lock never
    blocks the next one (the stale file is simply taken over)."""
    import fcntl
    import socket

    handle = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = dict(line.split("=", 1) for line in handle.read().splitlines() if "=" in line)
            raise ResourceError(
                "output_dir_locked",
                path=str(out),
                pid=holder.get("pid", "?"),
                host=holder.get("host", "?"),
                started=holder.get("started", "?"),
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()
