"""Many adapters on one base in one run (a batch): find and name them, do the base's work once, run each adapter's own
pipeline in a pool of processes or as Ray tasks, and collect one manifest and one report.

    output_dir/
      batch.json     the batch: executor and its width, the shared base work, and per adapter its path, status, key,
                     seconds, verdict counts or error
      report.html    one row per adapter (verdicts, sizes, quality, time), each linking to the adapter's own report
      base/          what does not depend on an adapter, made once: the base alone on the held-out text (every
                     adapter's reference reuses it) and, with batch_outputs adapters/both and gguf, the base's GGUF
      <name>/        each adapter's own run, exactly as a single run writes it (run.json, export/, verify/, report.html)

A batch is what ``run(config)`` does when ``adapters`` is set, or ``checkpoint_path`` is a glob or a sweep folder (a
folder whose sub-folders are training runs). Each adapter's run resumes step by step as a single run does; an adapter
recorded done with the same key is not started again; one adapter's failure is recorded and the others go on.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint.adapters import BASE_DIR, BATCH_MANIFEST, TOKEN_FILE, Adapter, find_adapters, is_batch, shared_base
from ..config import ExportConfiguration
from ..errors import ExportError, ResourceError, explain
from ..files import strict_json, write_atomic
from ..monitoring import exit_with_parent, human_bytes, logger
from .preflight import memory_per_adapter, pool_width, resident_cap, resident_share

__all__ = ["Adapter", "BatchResult", "find_adapters", "is_batch", "pool_width", "run", "run_batch", "BATCH_MANIFEST"]


@dataclass
class BatchResult:
    output_dir: str
    adapters: list[dict[str, Any]]
    report: str | None = None
    passed: bool | None = None  # True: every adapter's every artifact verified; False: one failed; None: some not run
    counts: dict[str, int] = field(default_factory=dict)  # adapters done, failed; artifacts verified, failed, not_run

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "batch": True,
            "adapters": self.adapters,
            "report": self.report,
            "passed": self.passed,
            "counts": self.counts,
        }


def run(config: ExportConfiguration) -> Any:
    """What ``model-export run CONFIG`` does: a batch (run_batch, a BatchResult) when the configuration names several
    adapters, else the one checkpoint's run (pipeline.run_adapter, a RunResult)."""
    from .run import run_adapter

    return run_batch(config) if is_batch(config) else run_adapter(config)


# --- one adapter, wherever it runs -----------------------------------------------------------------------------------


def adapter_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one adapter's pipeline (in a pool process or a Ray worker) and return its line of batch.json; never raises
    for the adapter's own failures, which are recorded."""
    start = time.time()
    line = {"name": task["name"], "path": task["path"], "host": socket.gethostname(), "pid": os.getpid()}
    if task.get("ray"):  # which node ran it
        import ray

        line["node"] = ray.get_runtime_context().get_node_id()
    try:
        threads = task.get("threads")
        if threads:  # this process's share of the cores, for torch and every runtime it starts
            import torch

            from ..runtimes.base import THREADS_ENV

            os.environ[THREADS_ENV] = str(threads)
            torch.set_num_threads(threads)
        if "resident" in task:  # this process's share of memory for its reference to keep resident (max_memory auto)
            from ..monitoring import RESIDENT_ENV

            os.environ[RESIDENT_ENV] = str(task["resident"])
        if task.get("lang"):
            i18n.set_language(task["lang"])
        from ..monitoring import LOG_CONTEXT_ENV

        os.environ[LOG_CONTEXT_ENV] = task["name"]  # console lines of adapters side by side say whose they are
        out = Path(task["config"]["output_dir"])
        token = Path(task["token_file"])
        if not token.is_file() or token.read_text(encoding="utf-8") != task["token"]:
            raise ResourceError("batch_not_shared", path=str(out.parent), host=socket.gethostname())
        from .run import run_adapter

        result = run_adapter(ExportConfiguration(**task["config"]), task["shared"])
        line.update(status="done", passed=result.passed)
    except BaseException as exc:  # the adapter failed: say why in the manifest, let the others finish
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = explain(exc, task["name"], str(Path(task["config"]["output_dir"]) / "export.log"))
        line.update(status="failed", error=error.to_dict())
    line.update(_artifacts(Path(task["config"]["output_dir"])))
    line["checkpoint"] = _checkpoint(Path(task["config"]["output_dir"]))
    line["seconds"] = round(time.time() - start, 3)
    return line


def _checkpoint(run_dir: Path) -> str | None:
    """The checkpoint the adapter's run selected (checkpoint_selection: latest or best), from its detect step."""
    try:
        steps = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["steps"]
        return steps["detect"]["result"]["selected"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


ROW_KEYS = ("format", "path", "bytes", "status", "reason", "runtime", "max_abs_diff", "mean_kl", "top1", "perplexity")


def _artifacts(run_dir: Path) -> dict[str, Any]:
    """An adapter's artifacts as its own report.json lists them (format, size, verdict, quality), their verdict
    counts, and its report's path; nothing when the run stopped before writing a report."""
    try:
        rows = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["artifacts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"artifacts": [], "counts": {}}
    statuses = [r.get("status") for r in rows]
    return {
        "artifacts": [{k: r.get(k) for k in ROW_KEYS} for r in rows],
        "counts": {status: statuses.count(status) for status in ("verified", "failed", "not_run")},
        "report": str(run_dir / "report.html"),
    }


def _local(tasks: list[dict[str, Any]], width: int, record: Callable[[dict, dict], None], context: Any) -> None:
    """Each task in a process of its own (pool.py: forked from a server that imported torch and transformers once,
    ``context``; one per task, so each adapter's memory goes back when it ends), ``record(task, line)`` as each
    finishes."""
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # 3.10: processes are reused
    _attempts(tasks, width, record, {"mp_context": context, "initializer": exit_with_parent, **fresh})


def _attempts(tasks: list[dict[str, Any]], width: int, record: Callable[[dict, dict], None], options: dict) -> None:
    """_local's pool; a process killed mid-task (out of memory, kill -9) breaks it, and the tasks it had not finished
    run again once in a new pool, resuming their steps from their run.json."""
    from .pool import task_in_batch_env

    finished: set[str] = set()
    for attempt in range(2):
        pending = [t for t in tasks if t["name"] not in finished]
        if not pending:
            break
        with ProcessPoolExecutor(min(width, len(pending)), **options) as pool:
            batch_env = (dict(os.environ), os.getcwd())
            futures = {pool.submit(task_in_batch_env, *batch_env, adapter_task, t): t for t in pending}
            for future in as_completed(futures):
                task = futures[future]
                try:
                    line = future.result()
                except BrokenProcessPool:
                    if not attempt:
                        logger.warning(i18n.ui("batch_retry", name=task["name"]))
                        continue
                    line = _lost(task, i18n.ui("batch_worker_died"))
                finished.add(task["name"])
                _announce(line)
                record(task, line)


def _lost(task: dict[str, Any], why: str) -> dict[str, Any]:
    error = ResourceError("batch_task_lost", name=task["name"], reason=why)
    return {"name": task["name"], "path": task["path"], "status": "failed", "error": error.to_dict()}


def _ray(tasks: list[dict[str, Any]], per_adapter: int, record: Callable[[dict, dict], None]) -> dict[str, Any]:
    """One Ray task per adapter, declaring the cores and memory it needs, on the cluster at RAY_ADDRESS or on a local
    instance started here, ``record(task, line)`` as each finishes; returns what batch.json says of the executor. A
    task whose worker dies is retried by Ray (twice), resuming its steps from run.json."""
    from .. import extras

    ray = extras.require("ray", "executor: ray")
    address = os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        env = {k: v for k, v in os.environ.items() if k.startswith(("MODEL_EXPORT_", "HF_"))}
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "runtime_env": {"env_vars": env},
        }
        if not address:
            options["num_cpus"] = os.cpu_count() or 1
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError) as exc:  # RAY_ADDRESS names no cluster we can reach (or may join)
            raise ResourceError(
                "ray_unreachable", address=address or "local instance", error=str(exc).splitlines()[0][:300]
            ) from exc
    try:
        resources = ray.cluster_resources()
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        declared = per_adapter
        if largest and per_adapter > largest:  # no node could take the task: Ray would wait for ever
            logger.warning(i18n.ui("batch_ray_memory", need=human_bytes(per_adapter), largest=human_bytes(largest)))
            declared = int(largest)
        remote = ray.remote(adapter_task).options(
            num_cpus=1, memory=declared, max_retries=2, retry_exceptions=False, name="model-export-adapter"
        )
        refs = {remote.remote({**t, "threads": 1, "ray": True}): t for t in tasks}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            task = refs[done[0]]
            try:
                line = ray.get(done[0])
            except Exception as exc:  # the worker died more times than Ray retries, or the node went away
                line = _lost(task, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            _announce(line)
            record(task, line)
        return {
            "address": address or "local instance",
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": int(resources.get("CPU", 0)),
            "task": {"num_cpus": 1, "memory": declared, "max_retries": 2},
        }
    finally:
        if started:
            ray.shutdown()


def _announce(line: dict[str, Any] | None) -> None:
    if not line:
        return
    if line["status"] == "failed":
        error = line["error"]
        logger.error(
            i18n.ui(
                "batch_adapter_failed",
                name=line["name"],
                code=error["code"],
                error=error["message"],
                hint=error["hint"],
            )
        )
    else:
        logger.info(i18n.ui("batch_adapter_done", name=line["name"], seconds=line.get("seconds", 0)))


# --- the batch -------------------------------------------------------------------------------------------------------


def _adapter_config(config: ExportConfiguration, adapter: Adapter, out: Path) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    # Absolute paths: a Ray task may run in another working directory, or on another node that mounts the same paths.
    data.update(
        checkpoint_path=str(Path(adapter.path).resolve()),
        output_dir=str(out.resolve() / adapter.name),
        adapters=[],
        log_file=None,
    )
    return data


def _done(out: Path, line: dict[str, Any] | None, key: str) -> bool:
    """Recorded done with this key, its run.json still says every step is done, and every file its steps wrote is
    as they left it (name, size, time, sampled bytes: the check a run makes before skipping a step)."""
    from ..steps import fingerprint as _fingerprint
    from .manifest import RunManifest

    if not line or line.get("status") != "done" or line.get("key") != key:
        return False
    try:
        steps = RunManifest.load(out / line["name"]).steps
    except ExportError:
        return False
    for record in steps.values():
        if record.status != "done":
            return False
        if record.outputs != _fingerprint([Path(item[0]) for item in record.outputs or []]):
            return False
    return bool(steps)


def run_batch(config: ExportConfiguration) -> BatchResult:
    """Export every adapter of the batch; see the module's docstring. Raises ConfigError before writing anything when
    names collide or the adapters are not on one base; one adapter's failure is recorded in batch.json and its row."""
    from contextlib import nullcontext

    from ..checkpoint.base_model import inspect_base_model
    from ..monitoring import setup_logging
    from .pool import server
    from .state import output_lock
    from .validate import check_config

    check_config(config)
    adapters = find_adapters(config)  # names checked before anything is written
    base = shared_base(config, adapters)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        setup_logging(config.log_level, config.log_file or out / "export.log")
        manifest_path = out / BATCH_MANIFEST
        logger.info(i18n.ui("batch_start", count=len(adapters), base=base, executor=config.executor))
        start = time.time()
        if Path(os.path.expanduser(base)).is_dir():
            base = str(Path(os.path.expanduser(base)).resolve())
        info = inspect_base_model(base)
        # the local pool's fork server starts now: its imports overlap the base's work, not the first adapters'
        local = config.executor != "ray"
        with server(info.config.get("model_type")) if local else nullcontext() as context:
            lines, data = _base_and_adapters(config, adapters, base, info, start, context)
        served = _serve(config, base, out, lines, manifest_path)
        return _finish(out, {**data(), **({"served": served} if served else {})})


def _base_and_adapters(
    config: ExportConfiguration, adapters: list[Adapter], base: str, info: Any, start: float, context: Any
) -> tuple[dict[str, dict[str, Any]], Callable[[], dict[str, Any]]]:
    """run_batch's work: the base's (prepare_base), then each adapter's run not already done, in the local pool
    (``context``: its processes' multiprocessing context) or on Ray, its line recorded in batch.json as it finishes.
    Returns every adapter's line so far and what makes batch.json of them."""
    from ..exporters.onnx_lora import onnx_adapters
    from .batch_base import adapter_checkpoints, prepare_base, share_references
    from .preflight import check_disk_space

    out, manifest_path = Path(config.output_dir), Path(config.output_dir) / BATCH_MANIFEST
    previous = _previous_lines(manifest_path)
    per_adapter = memory_per_adapter(config, info.weight_bytes)
    width, threads, rule = pool_width(len(adapters), per_adapter, config.max_parallel_adapters)
    resident = 0 if config.executor == "ray" else resident_share(width, per_adapter, resident_cap(config, info))
    together = share_references(config, info, len(adapters))
    graph = onnx_adapters(config)  # a base graph for every adapter's LoRA inputs
    checkpoints = adapter_checkpoints(config, adapters) if together or graph else []
    shared = prepare_base(config, base, out.resolve() / BASE_DIR, checkpoints, together)
    token = secrets.token_hex(8)
    write_atomic(out / TOKEN_FILE, token)
    lines: dict[str, dict[str, Any]] = {}
    common = {"shared": shared, "token": token, "token_file": str((out / TOKEN_FILE).resolve()), "threads": threads}
    common["resident"] = resident
    tasks = _tasks(config, adapters, out, base, previous, lines, common)
    if tasks and config.batch_outputs != "adapters":  # all of them must fit, before any starts (adapter files: MBs)
        check_disk_space(config, info, out, adapters=len(tasks))
    executor: dict[str, Any] = {"name": config.executor, "memory_per_adapter": per_adapter}

    def manifest() -> dict[str, Any]:
        return _batch_manifest(base, shared, executor, start, adapters, lines)

    def record(task: dict[str, Any], line: dict[str, Any]) -> None:
        """Each adapter's line as it finishes: a run killed now keeps what was done (its rerun skips it)."""
        lines[task["name"]] = {**line, "key": task["key"], "path": task["path"]}
        write_atomic(manifest_path, strict_json(manifest()))

    if tasks and config.executor == "ray":
        executor.update(_ray(tasks, per_adapter, record))
    elif tasks:
        logger.info(i18n.ui("batch_pool", rule=rule))
        executor.update(width=width, threads=threads, rule=rule)
        _local(tasks, width, record, context)
    return lines, manifest


def _finish(out: Path, data: dict[str, Any]) -> BatchResult:
    """batch.json and the aggregate report written; the batch's result."""
    from .batch_report import write_batch_report

    write_atomic(out / BATCH_MANIFEST, strict_json(data))
    report = write_batch_report(out, data)
    counts = data["counts"]
    logger.info(i18n.ui("batch_done", done=counts["done"], failed=counts["failed"], report=report))
    return BatchResult(str(out), data["adapters"], report, data["passed"], counts)


def _serve(
    config: ExportConfiguration, base: str, out: Path, lines: dict[str, dict[str, Any]], manifest_path: Path
) -> dict[str, Any] | None:
    """Every done adapter in one server (verification_servers; batch_served.py), its verdict added to its line; the
    record batch.json keeps (the earlier one while its key holds)."""
    from .batch_served import serve_batch, with_served

    try:
        previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("served")
    except (OSError, ValueError, AttributeError):
        previous = None
    served = serve_batch(config, base, out, lines, previous)
    for name, verdict in (served or {}).get("verdicts", {}).items():
        lines[name] = with_served(lines[name], verdict)
    return served


def _previous_lines(path: Path) -> dict[str, dict[str, Any]]:
    """Each adapter's line in an earlier batch.json (none when there is none, or it cannot be read)."""
    try:
        return {a["name"]: a for a in json.loads(path.read_text(encoding="utf-8"))["adapters"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _tasks(
    config: ExportConfiguration,
    adapters: list[Adapter],
    out: Path,
    base: str,
    previous: dict[str, dict[str, Any]],
    lines: dict[str, dict[str, Any]],
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """One task per adapter still to run; an adapter done with the same key (its configuration and what the batch
    shares) and its files untouched is skipped, its line kept in ``lines``."""
    from ..steps import key_hash

    tasks = []
    for adapter in adapters:
        data = _adapter_config(config, adapter, out)
        data["base_model_name"] = base
        key = key_hash([data, common["shared"]])
        if _done(out, previous.get(adapter.name), key):
            lines[adapter.name] = {**previous[adapter.name], "skipped": True}
            logger.info(i18n.ui("batch_adapter_skipped", name=adapter.name))
            continue
        task = {"name": adapter.name, "path": adapter.path, "key": key, "config": data}
        tasks.append({**task, **common, "lang": i18n.current_language()})
    return tasks


def _batch_manifest(
    base: str,
    shared: dict[str, Any],
    executor: dict[str, Any],
    start: float,
    adapters: list[Adapter],
    lines: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """batch.json: every adapter's line in the batch's order (pending until it finishes), counts and the verdict."""
    ordered = [lines.get(a.name) or {"name": a.name, "path": a.path, "status": "pending"} for a in adapters]
    counts = _counts(ordered)
    verdict = shared.get("base_onnx_verdict")  # the base graph judged alone counts as one of the batch's artifacts
    if verdict:
        counts[{"failed": "artifacts_failed"}.get(verdict["status"], verdict["status"])] += 1
    passed = False if counts["failed"] or counts["artifacts_failed"] else True
    if passed and (counts["not_run"] or counts["done"] < len(adapters)):
        passed = None
    return {
        "version": 1,
        "base": base,
        "shared": shared,
        "executor": executor,
        "seconds": round(time.time() - start, 3),
        "counts": counts,
        "passed": passed,
        "adapters": ordered,
    }


def _counts(lines: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"adapters": len(lines), "done": 0, "failed": 0, "verified": 0, "artifacts_failed": 0, "not_run": 0}
    for line in lines:
        if line["status"] in ("done", "failed"):
            counts[line["status"]] += 1
        found = line.get("counts") or {}
        counts["verified"] += found.get("verified", 0)
        counts["artifacts_failed"] += found.get("failed", 0)
        counts["not_run"] += found.get("not_run", 0)
    return counts
