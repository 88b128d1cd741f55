"""A batch's report.html (batch.py writes it with batch.json): one row per adapter (its verdicts, sizes, quality
figures and time, a link to its own report, or why it failed), the base's work done once and its own verdict, the
executor, and the commands and code that serve the adapters on one base (vLLM, Ollama, onnxruntime-genai)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .. import i18n
from ..files import write_atomic
from ..monitoring import human_bytes
from .report import _CSS, _STATUS_CLASS, STATUS_TEXT, _number

__all__ = ["write_batch_report", "batch_banner", "executor_sentence"]


def batch_banner(data: dict[str, Any]) -> tuple[str, str]:
    counts = data["counts"]
    if counts["failed"] or counts["artifacts_failed"]:
        return "fail", i18n.ui("batch_report_fail", **counts)
    if data["passed"]:
        return "pass", i18n.ui("batch_report_pass", **counts)
    return "partial", i18n.ui("batch_report_partial", **counts)


def _adapter_cell(row: dict[str, Any]) -> str:
    """One adapter's artifacts: format, size, verdict and its quality figures, one line each."""
    lines = []
    for a in row.get("artifacts", []):
        status = a.get("status") or "not_run"
        figures = [
            f"max|Δ| {_number(a.get('max_abs_diff'), '.3g')}" if a.get("max_abs_diff") is not None else "",
            f"KL {_number(a.get('mean_kl'), '.3g')}" if a.get("mean_kl") is not None else "",
            f"top-1 {_number(a.get('top1'), '.3f')}" if a.get("top1") is not None else "",
            f"ppl {_number(a.get('perplexity'), '.3f')}" if a.get("perplexity") is not None else "",
        ]
        note = a.get("reason") or ""
        verdict = html.escape(i18n.ui(STATUS_TEXT.get(status, "status_not_run")))
        lines.append(
            f"<b>{html.escape(str(a.get('format')))}</b> {human_bytes(a.get('bytes') or 0)} "
            f'<b class="{_STATUS_CLASS.get(status, "warn")}">{verdict}</b> '
            f'<span class="muted">{html.escape(" · ".join(f for f in figures if f) or note)}</span>'
        )
    return "<br>".join(lines)


def write_batch_report(out: Path, data: dict[str, Any]) -> str:
    """output_dir/report.html of a batch: one row per adapter (its verdicts, sizes, quality figures and time, a link to
    its own report, or why it failed), the base work done once, the executor and how to serve the adapters."""
    kind, text = batch_banner(data)
    rows = []
    for row in data["adapters"]:
        link = html.escape(row["name"])
        if row.get("report"):
            link = f'<a href="{html.escape(row["name"])}/report.html">{link}</a>'
        status = row["status"]
        error = row.get("error") or {}
        cell = _adapter_cell(row)
        if error:
            cell += f'<br><b class="bad">{html.escape(error.get("code", ""))}</b> '
            cell += html.escape(error.get("message", ""))
            cell += f'<br><span class="muted">{html.escape(error.get("hint", ""))}</span>'
        skipped = ""
        if row.get("skipped"):
            skipped = f' <span class="muted">({html.escape(i18n.ui("batch_report_skipped"))})</span>'
        used = ""
        if row.get("checkpoint"):
            used = f'<br><span class="muted">{html.escape(i18n.ui("batch_report_checkpoint", path=row["checkpoint"]))}'
            used += "</span>"
        rows.append(
            f"<tr><td><b>{link}</b><br><code>{html.escape(row['path'])}</code>{used}</td>"
            f'<td><b class="{"ok" if status == "done" else "bad"}">{html.escape(status)}</b>{skipped}</td>'
            f'<td>{cell}</td><td>{_number(row.get("seconds"), ".1f")} s<br><span class="muted">'
            f"{html.escape(str(row.get('host') or ''))}</span></td></tr>"
        )
    shared = data.get("shared", {})
    base_items = [f"<li>{html.escape(i18n.ui('batch_report_base', base=data['base']))}</li>"]
    if shared.get("base_heldout"):
        base_items.append(f"<li><code>{html.escape(shared['base_heldout'])}</code></li>")
    if shared.get("base_gguf"):
        base_items.append(f"<li><code>{html.escape(shared['base_gguf'])}</code></li>")
    if shared.get("base_onnx"):
        base_items.append(f"<li><code>{html.escape(shared['base_onnx'])}</code>{_base_verdict(shared)}</li>")
    serve = _serving(data)
    executor = data.get("executor", {})
    page = f"""<!doctype html><html lang="{i18n.current_language()}"><head><meta charset="utf-8">
<title>model-export batch report</title>
<style>{_CSS}</style></head><body><h1>model-export batch report</h1>
<p class="banner {kind}">{html.escape(text)}</p>
<table><tr><th>{html.escape(i18n.ui("batch_report_adapter"))}</th><th>{html.escape(i18n.ui("batch_report_status"))}</th>
<th>{html.escape(i18n.ui("batch_report_artifacts"))}</th><th>{html.escape(i18n.ui("batch_report_time"))}</th></tr>
{"".join(rows)}</table>
<h2>{html.escape(i18n.ui("batch_report_shared"))}</h2><ul>{"".join(base_items)}</ul>
<h2>{html.escape(i18n.ui("batch_report_executor"))}</h2><p>{html.escape(executor_sentence(executor))}
<br>{html.escape(i18n.ui("batch_report_seconds", seconds=data.get("seconds", 0)))}</p>
{serve}</body></html>"""
    write_atomic(out / "report.html", page)
    return str(out / "report.html")


def executor_sentence(executor: dict[str, Any]) -> str:
    """What ran the batch's adapters, in a sentence (batch.json keeps the figures)."""
    memory = human_bytes(executor.get("memory_per_adapter") or 0)
    if executor.get("name") == "ray" and "address" in executor:
        task = executor.get("task", {})
        return i18n.ui(
            "batch_executor_ray",
            address=executor["address"],
            nodes=executor.get("nodes", "?"),
            cpus=executor.get("cpus", "?"),
            task_cpus=task.get("num_cpus", 1),
            memory=human_bytes(task.get("memory") or 0),
            retries=task.get("max_retries", 0),
        )
    if "width" in executor:
        return i18n.ui(
            "batch_executor_pool",
            width=executor["width"],
            threads=executor.get("threads", 1),
            rule=executor.get("rule", ""),
            memory=memory,
        )
    return i18n.ui("batch_executor_idle", name=executor.get("name", "local"))


def _base_verdict(shared: dict[str, Any]) -> str:
    """The base graph's own verdict (no adapter active, onnxruntime-genai, the held-out text), as a sentence."""
    verdict = shared.get("base_onnx_verdict")
    if not verdict:
        return ""
    words = i18n.ui(
        "batch_report_base_onnx",
        status=verdict["status"],
        runtime=verdict.get("runtime") or "onnxruntime-genai",
        rule=verdict.get("rule") or "",
        reason=verdict.get("error") or verdict.get("reason") or "",
    )
    return f'<br><span class="{"ok" if verdict["status"] == "verified" else "bad"}">{html.escape(words)}</span>'


def _genai_code(base: str, adapters: list[tuple[str, Path]]) -> str:
    """The onnxruntime-genai code that serves the base graph with every .onnx_adapter, one active per request."""
    lines = ["import onnxruntime_genai as og", f"model = og.Model({str(Path(base).resolve())!r})"]
    lines += ["adapters = og.Adapters(model)"]
    lines += [f"adapters.load({str(p.resolve())!r}, {n!r})" for n, p in adapters]
    lines += [
        "params = og.GeneratorParams(model)",
        "generator = og.Generator(model, params)",
        f"generator.set_active_adapter(adapters, {adapters[0][0]!r})  # per request: the adapter it asks for",
    ]
    return "\n".join(lines)


def _serving(data: dict[str, Any]) -> str:
    """How to serve what the batch wrote: vLLM with every PEFT folder, Ollama with every Modelfile, onnxruntime-genai
    with every .onnx_adapter on the base graph."""
    from ..runtimes.genai import ADAPTER_FILE

    written = [(r["name"], a) for r in data["adapters"] if r["status"] == "done" for a in r.get("artifacts", [])]
    peft = [(n, Path(a["path"])) for n, a in written if a["format"] == "peft"]
    modelfiles = [(n, Path(a["path"]) / "Modelfile") for n, a in written if a["format"] == "gguf_lora"]
    onnx = [(n, Path(a["path"]) / ADAPTER_FILE) for n, a in written if a["format"] == "onnx_adapter"]
    if not peft and not modelfiles and not onnx:
        return ""
    lines = []
    served = [v for v in (data.get("served") or {}).get("verdicts", {}).values() if v.get("status") == "verified"]
    if served:  # the command the batch's vLLM verdicts were measured with
        lines.append(served[0]["server"]["command"])
    elif peft:
        modules = " ".join(f"{n}={p.resolve()}" for n, p in peft)
        lines.append(f"vllm serve {data['base']} --enable-lora --max-lora-rank 64 --lora-modules {modules}")
    lines += [f"ollama create {n} -f {p.resolve()}" for n, p in modelfiles]
    if onnx and data.get("shared", {}).get("base_onnx"):
        lines.append(_genai_code(data["shared"]["base_onnx"], onnx))
    body = "".join(f"<pre><code>{html.escape(line)}</code></pre>" for line in lines)
    return f"<h2>{html.escape(i18n.ui('batch_report_serve'))}</h2>{body}"
