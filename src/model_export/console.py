"""What the CLI prints: the run's summary (artifacts, verdicts, steps), a batch's table and a benchmark's, in rich
tables whose paths and reasons are plain text (never read as markup), in the user's language."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import i18n

__all__ = ["print_run", "print_batch", "print_benchmark", "STATUS_STYLE"]

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def print_batch(console: Console, result: Any) -> None:
    """A batch's summary: one row per adapter (its status, artifacts verified / failed / not run, time), then the
    banner and where the aggregate report is."""
    from .pipeline.batch_report import batch_banner

    table = Table(title="model-export batch")
    for column in i18n.ui("cols_batch").split(";"):
        table.add_column(column, overflow="fold")
    for line in result.adapters:
        counts = line.get("counts") or {}
        table.add_row(
            Text(line["name"]),
            Text(
                i18n.ui(_BATCH_STATUS[line["status"]])
                + (i18n.ui("batch_status_skipped") if line.get("skipped") else ""),
                style=_BATCH_STYLE[line["status"]],
            ),
            Text(str(counts.get("verified", 0))),
            Text(str(counts.get("failed", 0))),
            Text(str(counts.get("not_run", 0))),
            Text(f"{line.get('seconds', 0):.1f}"),
            Text(_batch_detail(line)),
        )
    console.print(table)
    kind, text = batch_banner({"counts": result.counts, "passed": result.passed})
    console.print(Text(text, style={"pass": "green", "partial": "yellow"}.get(kind, "red")))
    console.print(Text(i18n.ui("run_done", report=result.report)))


def _batch_detail(line: dict[str, Any]) -> str:
    """A failed adapter's code, message and fix, as batch.json has them; else the checkpoint it used and its report."""
    error = line.get("error")
    if error:
        return f"{error.get('code', '')} {error.get('message', '')} ({i18n.ui('error_hint')}: {error.get('hint', '')})"
    return "\n".join(str(part) for part in (line.get("checkpoint"), line.get("report")) if part)


_BATCH_STYLE = {"done": "green", "failed": "red", "pending": "yellow"}


_BATCH_STATUS = {"done": "batch_status_done", "failed": "batch_status_failed", "pending": "batch_status_pending"}


_VERDICT_STYLE = {"verified": "green", "failed": "red", "not_run": "yellow"}


def print_run(console: Console, title: str, steps: dict, report: str | None) -> None:
    """The summary at the end of a run: one row per artifact, how many were verified, failed and not run (and why),
    then the steps and where the report is. Plain text throughout: paths and reasons are never read as markup."""
    from .pipeline.report import STATUS_TEXT, banner, summary_rows

    table = Table(title=title)
    for column in i18n.ui("cols_run").split(";"):
        table.add_column(column, overflow="fold")
    results = {name: steps.get(name, {}).get("result", {}) for name in ("check", "export", "verify")}
    if "verify" not in steps:
        results["verify"] = {"skipped": i18n.ui("reason_validation_off")}
    rows = summary_rows(results)
    for r in rows:
        table.add_row(
            Text(r["format"]),
            Text(r["path"]),
            Text(f"{r['bytes'] / 1e6:.2f} MB"),
            Text(i18n.ui(STATUS_TEXT[r["status"]]), style=_VERDICT_STYLE[r["status"]]),
        )
    console.print(table)
    kind, text = banner(rows, None)
    console.print(Text(text, style={"pass": "green", "partial": "yellow"}.get(kind, "red")))
    console.print(Text(steps_line(steps)))
    console.print(Text(i18n.ui("run_done", report=report)))


def steps_line(steps: dict[str, dict]) -> str:
    """Each step with its time or ``skipped``, a step of units followed by its units in brackets:
    ``merge skipped, export 1.2s [safetensors skipped, gguf 1.2s], verify 0.4s [reference skipped, gguf 0.4s]``."""
    parts: dict[str, list[str]] = {}
    for name, step in steps.items():
        stage, _, unit = name.partition(":")
        if unit and stage in parts:
            parts[stage].append(_step_text(unit, step))
        else:
            parts[name] = [_step_text(name, step)]
    return ", ".join(texts[0] + (f" [{', '.join(texts[1:])}]" if texts[1:] else "") for texts in parts.values())


def _step_text(name: str, step: dict) -> str:
    if step.get("skipped"):
        return i18n.ui("step_text_skipped", name=name)
    return f"{name} {step.get('seconds', 0):.1f}s"


def print_benchmark(console: Console, results: list[Any], batch_size: int) -> None:
    """One row per artifact in 80 columns (short headers; the batch, GPU and device columns only when they say
    something); an artifact not run or failed says so in its row, and why in a line under the table."""
    from .pipeline.report import STATUS_TEXT

    gpu = any(r.peak_gpu_gib is not None for r in results)
    device = any(r.device != "cpu" for r in results)
    names = i18n.ui("cols_benchmark", batch=batch_size).split(";")  # artifact .. tok/s, batch, RSS, GPU, device
    columns = names[:5] + (names[5:6] if batch_size > 1 else []) + names[6:7]
    columns += (names[7:8] if gpu else []) + (names[8:9] if device else [])
    table = Table(title="model-export benchmark")
    for column in columns:
        table.add_column(column, overflow="fold")
    notes = []
    for r in results:
        if r.status != "measured":
            text = i18n.ui(STATUS_TEXT["not_run" if r.status == "not_run" else "failed"])
            cells = [Text(text, style=_VERDICT_STYLE[r.status])] + [Text("")] * (len(columns) - 3)
            notes.append(Text(f"{r.label}: {text}: {r.reason or r.error}", style=_VERDICT_STYLE[r.status]))
        else:
            cells = [Text(f"{r.load_s:.2f}"), Text(f"{r.ttft_s * 1000:.1f}"), Text(f"{r.decode_tokens_per_s:.1f}")]
            if batch_size > 1:
                cells.append(Text(f"{r.decode_tokens_per_s_batch:.1f}" if r.decode_tokens_per_s_batch else "-"))
            cells.append(Text(f"{r.peak_rss_gib:.2f}"))
            cells += [Text(f"{r.peak_gpu_gib:.2f}" if r.peak_gpu_gib is not None else "-")] if gpu else []
            cells += [Text(r.device)] if device else []
            if r.note:
                notes.append(Text(f"{r.label}: {r.note}"))
        table.add_row(Text(r.label), Text(r.runtime), *cells)
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=False)  # wrapped at words to the terminal's width, as the table is
