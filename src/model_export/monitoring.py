"""Logging as the guide shows it: progress lines, memory usage lines and step durations.

INFO - Memory usage: 4.2GB / 8.0GB (52.5%)
INFO - Processing checkpoint: 50% complete
INFO - Step check finished (duration 0.42 s)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from . import i18n

__all__ = [
    "setup_logging",
    "Progress",
    "MemoryMonitor",
    "timed_step",
    "heartbeat",
    "memory_line",
    "logger",
    "human_bytes",
]

logger = logging.getLogger("model_export")
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_OUR_HANDLER = "_model_export_handler"


LOG_CONTEXT_ENV = "MODEL_EXPORT_LOG_CONTEXT"


def setup_logging(
    level: str = "INFO", log_file: str | Path | None = None, console: bool = True, shared_file: bool = False
) -> None:
    """Configure the ``model_export`` logger: console (stderr) and, when given, a log file. Idempotent.

    In a batch's worker (MODEL_EXPORT_LOG_CONTEXT names its adapter) each console line says which adapter it is about,
    since several adapters' lines interleave on one terminal; its log file is the adapter's own and needs no name. A
    process writing into another's log (``shared_file``: the reference beside a run) names itself there too."""
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, _OUR_HANDLER, False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()] if console else []
    if console:  # on a terminal the live bar shows progress; elsewhere (a pipe, CI) a line every few seconds
        handlers[0].addFilter(_not_progress if sys.stderr.isatty() else _ProgressThrottle())
    context = os.environ.get(LOG_CONTEXT_ENV)
    console_format = LOG_FORMAT.replace("%(message)s", f"[{context}] %(message)s") if context else LOG_FORMAT
    for handler in handlers:
        handler.setFormatter(logging.Formatter(console_format))  # an adapter's name is plain (adapters._NAME): no %
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        handlers[-1].setFormatter(_EnglishFormatter(console_format if shared_file else LOG_FORMAT))
        handlers[-1].addFilter(_ProgressThrottle())
        handlers[-1].addFilter(_not_console_only)
    for handler in handlers:
        setattr(handler, _OUR_HANDLER, True)
        logger.addHandler(handler)
    logger.propagate = False
    quiet_third_party(level == "DEBUG")


class _EnglishFormatter(logging.Formatter):
    """The log file in English, whatever the console's language: the guide's log lines (``Memory usage: ...``,
    ``Processing checkpoint: 50% complete``, ``duration``) and its ``grep`` commands are English."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, i18n.Text):
            record = logging.makeLogRecord({**record.__dict__, "msg": record.msg.render("en")})
        return super().format(record)


class _ProgressThrottle(logging.Filter):
    """A progress line in a log file at most every PROGRESS_SECONDS per label (and always its last one)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        label = getattr(record, "progress", None)
        if not label:
            return True
        now = time.monotonic()
        if getattr(record, "final", False) or now - self.last.get(label, float("-inf")) >= PROGRESS_SECONDS:
            self.last[label] = now
            return True
        return False


PROGRESS_SECONDS = 5.0
_THIRD_PARTY = (
    "transformers",
    "peft",
    "accelerate",
    "huggingface_hub",
    "torch",
    "onnxruntime",
    "onnxscript",
    "torchvision",
    "compressed_tensors",
    "datasets",
    "urllib3",
    "filelock",
    "bitsandbytes",  # at import, on AVX512-BF16 CPUs: "Failed to load CPU gemm_4bit_forward from kernels-community"
    "kernels",
)


def quiet_third_party(debug: bool = False) -> None:
    """Third-party progress bars, warnings and info lines stay out of the console and the log unless ``debug``
    (``--debug`` or ``log_level: DEBUG``): transformers' "Loading weights" bars, FutureWarnings, torchvision notices."""
    import os
    import warnings

    if debug:
        for var in (
            "TRANSFORMERS_NO_ADVISORY_WARNINGS",
            "TRANSFORMERS_VERBOSITY",
            "HF_HUB_DISABLE_PROGRESS_BARS",
            "TQDM_DISABLE",
        ):
            os.environ.pop(var, None)
        warnings.resetwarnings()
    else:  # read by transformers, huggingface_hub and tqdm (compressed-tensors' "Decompressing model") when imported
        os.environ.update(
            TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TQDM_DISABLE="1",
        )
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    if "transformers" in sys.modules:  # already imported: its switches, not the environment, decide now
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if debug else hf_logging.disable_progress_bar)()
        (hf_logging.set_verbosity_debug if debug else hf_logging.set_verbosity_error)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if debug else disable_progress_bars)()


@contextlib.contextmanager
def third_party_output() -> Iterator[None]:
    """Around a third-party call that draws its own progress bars whatever the environment says (compressed-tensors'
    "Applying quantization config" and "Dispatching model" pass ``disable=False`` to tqdm explicitly): what it writes
    to stderr is dropped unless debugging. Our own log lines go through handlers that keep the real stream."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}GB"


def human_bytes(n: float) -> str:
    """2.35 GB, 512.00 MB, 4.10 KB, 12 B: a size people read at a glance (never 0.00 GB for a small one)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def memory_line() -> str:
    """``Memory usage: 4.2GB / 8.0GB (52.5%)``: this process's resident memory against the machine's total."""
    rss = psutil.Process().memory_info().rss
    total = psutil.virtual_memory().total
    return i18n.ui("memory_line", used=_gb(rss), total=_gb(total), percent=f"{100 * rss / total:.1f}%")


class MemoryMonitor:
    """Samples this process's RSS from a daemon thread (for the report's memory plot and the peak) and,
    when ``enabled``, logs memory_line() every ``interval`` seconds."""

    def __init__(self, interval: float = 5.0, enabled: bool = True, sample_every: float = 0.25) -> None:
        self.interval, self.enabled = interval, enabled
        self.sample_every = min(sample_every, interval)
        self.peak_rss = 0
        self.samples: list[tuple[float, int]] = []
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = psutil.Process().memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        self.samples.append((round(time.perf_counter() - self._start, 3), rss))
        return rss

    def _loop(self) -> None:
        last_line = time.perf_counter()
        while not self._stop.wait(self.sample_every):
            self.sample()
            if self.enabled and time.perf_counter() - last_line >= self.interval:
                last_line = time.perf_counter()
                logger.info(memory_line())

    def __enter__(self) -> MemoryMonitor:
        self.sample()
        if self.enabled:
            logger.info(memory_line())
        self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self.enabled:
            logger.info(memory_line())


class Progress:
    """Logs ``<label>: N% complete`` each time another ``step`` percent of ``total`` is done; on a terminal
    it also draws a progress bar, and the console then leaves those lines to the log file."""

    def __init__(self, label: str, total: float, enabled: bool = True, step: int = 10) -> None:
        self.label, self.total, self.enabled, self.step = label, max(total, 1), enabled, step
        self.done = 0.0
        self._last = 0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self._bar = Bar(transient=True)
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        percent = min(100, int(100 * self.done / self.total))
        bucket = percent // self.step * self.step
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            if self.done >= self.total:
                self.close()
        if self.enabled and bucket > self._last:
            self._last = bucket  # handlers let one line through every few seconds, and the last one
            logger.info(
                i18n.ui("progress_line", label=self.label, percent=bucket),
                extra={"progress": self.label, "final": bucket >= 100},
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _not_progress(record: logging.LogRecord) -> bool:
    return not getattr(record, "progress", False)


class _LastRecord(logging.Filter):
    """When the ``model_export`` logger last emitted a line for every handler (``at``) and for the console only
    (``console_at``): the heartbeat speaks only after a silence."""

    at = console_at = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        self.console_at = time.monotonic()
        if not getattr(record, "console_only", False):
            self.at = self.console_at
        return True


def _not_console_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "console_only", False)


_last_record = _LastRecord()
logger.addFilter(_last_record)
HEARTBEAT_SECONDS = 30.0  # the longest a log file goes without a line during a step
CONSOLE_HEARTBEAT_SECONDS = 5.0  # the same on a terminal


@contextlib.contextmanager
def heartbeat(step: str, every: float | None = None, console_every: float | None = None) -> Iterator[None]:
    """While the block runs, a line ``Step <step> still running (N s so far)`` whenever nothing was logged for most
    of ``every`` seconds (HEARTBEAT_SECONDS), and on a terminal after CONSOLE_HEARTBEAT_SECONDS (those lines stay out
    of the log file): no step goes silent, even where no progress can be counted (a runtime's single native call, a
    third-party load)."""
    every = HEARTBEAT_SECONDS if every is None else every
    console_every = CONSOLE_HEARTBEAT_SECONDS if console_every is None else console_every
    tty = sys.stderr.isatty()
    start, stop = time.perf_counter(), threading.Event()

    def beat() -> None:
        while not stop.wait(min(1.0, every / 10, console_every / 5)):
            line = i18n.ui("step_running", step=step, seconds=int(time.perf_counter() - start))
            if time.monotonic() - _last_record.at >= 0.9 * every:
                logger.info(line)
            elif tty and time.monotonic() - _last_record.console_at >= 0.9 * console_every:
                logger.info(line, extra={"console_only": True})

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def timed_step(step: str) -> Iterator[dict]:
    """Time a step and log its duration (with a heartbeat line after each silence of HEARTBEAT_SECONDS while it runs);
    the yielded dict receives ``seconds`` when the step ends."""
    record: dict = {"step": step}
    start = time.perf_counter()
    try:
        with heartbeat(step):
            yield record
    except BaseException as exc:
        record["seconds"] = time.perf_counter() - start
        logger.error(i18n.ui("step_failed", step=step, seconds=record["seconds"], error=exc))
        raise
    record["seconds"] = time.perf_counter() - start
    logger.info(i18n.ui("step_done", step=step, seconds=record["seconds"]))


THREADS_ENV = "MODEL_EXPORT_THREADS"
# A batch's share of memory for each adapter's streamed reference to keep resident (max_memory auto): set by the local
# pool for each task (its adapters side by side must not each take most of the machine), 0 on Ray.
RESIDENT_ENV = "MODEL_EXPORT_RESIDENT_MEMORY"


def threads() -> int:
    """Threads a runtime may use: the share of the cores a batch gave this process (MODEL_EXPORT_THREADS, set by the
    local pool and the Ray tasks), else every core. llama.cpp's and onnxruntime's threads spin while they wait, so two
    processes each taking every core run far slower than each taking its share."""
    given = os.environ.get(THREADS_ENV, "")
    return int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)


def exit_with_parent(parent: int | None = None) -> None:
    """In each pool worker and the reference's process beside a run: end this process when its parent is gone (kill -9
    leaves workers orphaned, and they would go on writing for minutes); what they had done is kept in their run.json,
    and the rerun resumes it. ``parent``: the process not to outlive (default: this one's parent now; a pool worker's
    is the pool's fork server, which ends when the batch's process does)."""
    import threading

    parent = parent or os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="model-export-parent-watch", daemon=True).start()
