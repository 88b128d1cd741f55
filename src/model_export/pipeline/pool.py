"""The local pool's processes: forked from a server that has imported what every adapter's run imports (torch,
transformers, the base's architecture, this package), so that an adapter's process starts without importing them again
(4.2 s of one core per adapter here, at the 0.6B shape: most of a process's start). It is multiprocessing's
forkserver: the server is a fresh interpreter that imports the modules and runs nothing, so no thread of torch's or
llama.cpp's is copied into a fork. Each adapter still gets a process of its own (its memory goes back when it ends),
which ends when the batch's process is gone (the server ends with the batch, monitoring.exit_with_parent).

Each batch on the local pool starts its own server before the base's work (server(): its imports, one core for about
4 s, overlap the base's pass instead of holding up the first processes) and ends it after the pool: the server, and so
every process forked from it, writes to the batch's console and has the batch's environment of that moment. Each task
also takes the batch's environment and working directory of the moment it was submitted (what is read from the
environment at call time sees it: threads, fault points; what a library read once at its import is the server's). A
process moves what it inherited to the collector's permanent generation (gc.freeze) before its task: otherwise each
gc.collect of the run walks every object of the modules the server imported (0.3 s on one core at that shape, four
times per adapter). Where forkserver is missing (Windows), processes are spawned and import everything themselves.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["pool_context", "server", "start_server", "stop_server", "task_in_batch_env"]

PRELOAD = ["model_export.pipeline.run", "model_export.merging.streamed", "torch", "transformers"]


def pool_context(model_type: str | None = None) -> Any:
    """The multiprocessing context the pool's processes come from: forkserver, preloading PRELOAD and the modelling
    module of ``model_type`` (the base's config.json model_type: transformers imports it when a model is built), else
    spawn. Modules that cannot be imported are skipped by the server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    modelling = [f"transformers.models.{model_type}.modeling_{model_type}"] if model_type else []
    context.set_forkserver_preload([*PRELOAD, "transformers.models.auto.tokenization_auto", *modelling])
    return context


def start_server(model_type: str | None = None) -> Any:
    """The pool's context (pool_context), its fork server started now."""
    context = pool_context(model_type)
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return context


def stop_server() -> None:
    """End the fork server a batch started (multiprocessing's own ``_stop``, where it has one: without it a later
    batch in this process reuses the server, with the console and environment it started with)."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


@contextmanager
def server(model_type: str | None = None) -> Iterator[Any]:
    """The pool's context, its fork server started on entering (start_server) and ended on leaving (stop_server)."""
    context = start_server(model_type)
    try:
        yield context
    finally:
        stop_server()


def task_in_batch_env(environ: dict[str, str], cwd: str, work: Callable[[Any], Any], task: Any) -> Any:
    """``work(task)`` (batch.adapter_task) in the batch's environment and working directory (those of the moment it
    was submitted), what the process inherited from the server frozen out of the collector's reach."""
    gc.freeze()
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    return work(task)
