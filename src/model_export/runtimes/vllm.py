"""vLLM's OpenAI-compatible server as a runtime: started on 127.0.0.1 from the interpreter that has vLLM (vllm_python,
MODEL_EXPORT_VLLM_PYTHON, else this tool's own), waited for, asked over HTTP, and stopped on every way out.

vLLM pins its own torch and transformers, so it usually lives in an interpreter of its own (``make vllm`` builds
.venv-vllm); nothing of vLLM is imported here. The server is started through a small guard process that leads its own
process group: when the run ends in any way - an exception, Ctrl-C, SIGTERM, or ``kill -9`` of the run (the guard
sees its parent go) - the whole group, vLLM's engine and worker processes included, is stopped. Without the guard a
killed API server leaves its EngineCore and Worker processes running, holding their memory.

``--enforce-eager`` skips the CUDA-graph and torch.compile warm-up: 30 s to start instead of 131 s for the demo model
on two cores, and the same outputs (the kernels are the same; compilation fuses them)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .. import i18n
from ..monitoring import logger, threads

__all__ = ["VllmServer", "ServerFailed", "vllm_python", "vllm_problem", "unsupported", "root_cause", "VLLM_PYTHON_ENV"]

VLLM_PYTHON_ENV = "MODEL_EXPORT_VLLM_PYTHON"
START_TIMEOUT = 900  # seconds; the demo model starts in 30 s here, a 4B model in a few minutes
KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: verification's few short sequences need far less than vLLM's default

# Leads the server's process group; runs the server and stops the whole group when told to, or when its parent (the
# run) is gone. argv: the run's pid, then the server's command.
_GUARD = r"""
import os, signal, subprocess, sys, time
parent, command = int(sys.argv[1]), sys.argv[2:]
child = subprocess.Popen(command)
def others():
    mine = os.getpgrp()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if pid != os.getpid() and os.getpgid(pid) == mine:
                yield pid
        except OSError:
            pass
def stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for pid in others():
        try: os.kill(pid, signal.SIGTERM)
        except OSError: pass
    deadline = time.time() + 15
    while list(others()) and time.time() < deadline:
        child.poll(); time.sleep(0.2)
    for pid in others():
        try: os.kill(pid, signal.SIGKILL)
        except OSError: pass
    sys.exit(child.poll() or 0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
while child.poll() is None:
    if os.getppid() != parent:
        stop()
    time.sleep(0.3)
code = child.returncode
stop()
"""


class ServerFailed(Exception):
    """The server did not start or died: ``reason`` quotes vLLM's own last error; ``lora`` is true when vLLM started
    but refused a LoRA adapter (the adapter's failure, not the runtime's)."""

    def __init__(self, reason: str, lora: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.lora = reason, lora


def vllm_python(configured: str | None) -> str:
    """The interpreter vLLM runs in: vllm_python, else MODEL_EXPORT_VLLM_PYTHON, else this tool's own."""
    return configured or os.environ.get(VLLM_PYTHON_ENV) or sys.executable


@functools.cache
def vllm_problem(python: str) -> str | None:
    """Why vLLM's server cannot start from ``python`` (no such interpreter, or vLLM not installed in it), or None; asked
    once per interpreter and process (each unit's key and each unit's run ask it)."""
    if not Path(python).exists():
        return i18n.ui("vllm_no_python", python=python)
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return i18n.ui("vllm_no_python", python=f"{python} ({exc})")
    if done.returncode:
        return i18n.ui("vllm_not_installed", python=python)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PREFIX = re.compile(r"^\((?:\w+) pid=\d+\) (?:ERROR|INFO|WARNING) \S+ \S+ \[[^\]]*\] ?")
_RAISED = re.compile(r"^([A-Za-z_.]*(?:Error|Exception)): (.*)")


def root_cause(log: Path) -> str:
    """vLLM's own reason from its log: the first exception it raised (the root cause; what follows it is the engine
    shutting down), with the lines of reasons under it, else the log's last line."""
    if not log.is_file():
        return "(no log)"
    lines = [_PREFIX.sub("", line).rstrip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    for number, line in enumerate(lines):
        if _RAISED.match(line):
            reasons = []  # the lines of reasons under it: indented once (a traceback's lines are indented twice)
            for more in lines[number + 1 : number + 8]:
                if not (more.startswith(" ") and more[1:2].strip()):
                    break
                reasons.append(more.strip())
            return " ".join([line, *reasons])[:800]
    shown = [line for line in lines if line.strip()]
    return (shown or ["(no output)"])[-1][-600:]


def unsupported(log: Path) -> str | None:
    """vLLM's root cause when it has no kernel for what it was asked (its CPU build: ``NotImplementedError:
    "cpu_gemm_wna16" not implemented for 'Float'``, ``ValueError: Failed to find a kernel that can implement the
    WNA16 linear layer ...``); None for any other failure."""
    cause = root_cause(log)
    return cause if cause.startswith("NotImplementedError") or "find a kernel" in cause else None


class VllmServer:
    """One vLLM server: ``model`` (a model folder) served as ``name``, with ``loras`` (name -> PEFT folder) served on
    it when given. ``start()`` blocks until /health answers (or raises ServerFailed with vLLM's reason); ``post()``
    asks it; ``stop()`` stops it and its processes. ``start_seconds``, ``peak_rss`` (the server's processes, summed,
    sampled every 0.5 s) and ``version`` describe it for the report; ``command`` is what a user would type."""

    def __init__(
        self,
        model: Path,
        *,
        python: str,
        dtype: str,
        max_len: int,
        log: Path,
        tokenizer: Path | None = None,
        loras: dict[str, Path] | None = None,
        max_lora_rank: int = 16,
        logprobs: int = 20,
    ) -> None:
        self.python, self.log, self.loras = python, log, dict(loras or {})
        self.port = _free_port()
        self.name = "model"
        args = ["--model", str(model), "--served-model-name", self.name, "--dtype", dtype]
        args += ["--max-model-len", str(max_len), "--max-logprobs", str(logprobs), "--enforce-eager"]
        if tokenizer is not None:
            args += ["--tokenizer", str(tokenizer)]
        if self.loras:
            args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(self.loras))]
            args += ["--lora-modules", *(f"{name}={path}" for name, path in self.loras.items())]
        self.command = ["vllm", "serve", *args[1:2], *args[2:]]
        self.argv = [python, "-m", "vllm.entrypoints.openai.api_server", *args, "--host", "127.0.0.1"]
        self.argv += ["--port", str(self.port)]
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self.peak_rss = 0
        self.version: str | None = None
        self._sampling = threading.Event()

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB))
        env.update(OMP_NUM_THREADS=str(threads()), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)  # vLLM's interpreter has its own packages; this tool's would shadow them
        return env

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        logger.info(i18n.ui("vllm_starting", command=" ".join(self.command), log=self.log))
        with open(self.log, "w", encoding="utf-8") as out:
            self.process = subprocess.Popen(
                [self.python, "-c", _GUARD, str(os.getpid()), *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # the guard leads the group that holds every process of the server
            )
        threading.Thread(target=self._sample, name="vllm-memory", daemon=True).start()
        try:
            while time.monotonic() - started < timeout:
                if self.process.poll() is not None:
                    reason = root_cause(self.log)
                    refused = "init_static_loras" in self.log.read_text(encoding="utf-8", errors="replace")
                    raise ServerFailed(reason, lora=refused)
                if self._healthy():
                    self.start_seconds = round(time.monotonic() - started, 1)
                    self.version = self.get("/version").get("version")
                    logger.info(i18n.ui("vllm_started", seconds=self.start_seconds, version=self.version))
                    return
                time.sleep(1)
            raise ServerFailed(i18n.ui("vllm_start_timeout", seconds=timeout, log=self.log))
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _sample(self) -> None:
        import psutil

        while not self._sampling.wait(0.5):
            process = self.process
            if process is None or process.poll() is not None:
                return
            try:
                group = psutil.Process(process.pid)
                members = [group, *group.children(recursive=True)]
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in members if p.is_running()))
            except psutil.Error:
                continue

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """POST ``body`` as JSON; an HTTP error raises ServerFailed with vLLM's message."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise ServerFailed(f"HTTP {exc.code} from {path}: {detail}"[:600]) from exc

    def stop(self) -> None:
        """Stop the guard, which stops every process of the server (SIGKILL to the group after 20 s)."""
        self._sampling.set()
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
