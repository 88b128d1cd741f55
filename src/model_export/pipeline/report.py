"""report.json and a self-contained report.html: what was exported, and whether it can be trusted.

The HTML has no external assets: the plots are inline SVG (logit-difference distribution per
artifact, artifact sizes against the base model, step durations, memory over time), so the file
can be mailed or opened offline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .. import i18n
from ..files import strict_json, write_atomic
from ..monitoring import human_bytes
from ..verify.reference import reference_line
from ..verify.serving import serving_line
from .manifest import RunManifest
from .plots import bars, logit_histogram_plot, memory_plot

__all__ = ["write_report", "summary_rows", "verdict_summary"]

_CSS = """td.unit{padding-left:1.6em;color:#4b5563}
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#1d2330}
h1{font-size:22px}h2{font-size:17px;margin-top:2em}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #e3e6ec;padding:6px 8px;text-align:left;vertical-align:top}th{background:#f5f7fa}
td code{overflow-wrap:anywhere}.rule{font-size:12px}.artifacts td:nth-child(2){min-width:11em}
.note{font-size:13px;max-width:440px}
.banner{padding:14px 18px;border-radius:8px;font-size:17px;font-weight:600}
.pass{background:#e5f6ea;color:#17642f}.fail{background:#fde8e8;color:#9b1c1c}.partial{background:#fef3c7;color:#92400e}.muted{color:#6b7280}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}
svg{background:#fbfcfd;border:1px solid #e3e6ec;border-radius:6px}
code{background:#f1f3f6;padding:1px 4px;border-radius:3px}.ok{color:#17642f}.bad{color:#9b1c1c}.warn{color:#92400e}"""


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per artifact: format, path, size (and against the base), verdict (verified, failed, or not_run with
    its reason), perplexity on the held-out text, and a warning when the artifact is larger than the base model."""
    export = results.get("export", {})
    verify = results.get("verify", {})
    verdicts = verify.get("verdicts", {})
    base_bytes = results.get("check", {}).get("base_bytes")
    rows = []
    sizes = export.get("sizes", {})
    for fmt, path in [*export.get("artifacts", {}).items(), *_unexported(verdicts)]:
        # An ONNX folder holds two graphs (plain and optimized), each verified: one row each; an artifact served by a
        # server (safetensors@vllm) has a row of its own.
        extra = [(label, v) for label, v in verdicts.items() if label.startswith((f"{fmt}-", f"{fmt}@"))]
        for label, v, where, size in [
            (fmt, verdicts.get(fmt), path, sizes.get(fmt, 0) if fmt in sizes else _folder_bytes(path)),
            *[
                (label, v, v["artifact"], sizes.get(fmt, 0) if "@" in label else _graph_bytes(v["artifact"]))
                for label, v in extra
            ],
        ]:
            if v is None:  # verification did not run this artifact at all
                v = {
                    "status": "not_run",
                    "rule": "",
                    "reason": verify.get("skipped") or i18n.ui("reason_verify_not_reached"),
                }
            rows.append(
                {
                    "format": label,
                    "path": where,
                    "bytes": size,
                    "status": v["status"],
                    "verified": v["status"] == "verified",
                    "reason": v.get("reason"),
                    "serving": serving_line(v.get("serving")),
                    "runtime": v.get("runtime"),
                    "server": v.get("server"),
                    "method": _method(results, fmt),
                    "peak_rss": v.get("peak_rss"),
                    "rule": v.get("rule"),
                    "max_abs_diff": v.get("max_abs_diff"),
                    "mean_kl": v.get("mean_kl"),
                    "top1": v.get("top1_agreement"),
                    "perplexity": v.get("perplexity"),
                    "reference_perplexity": v.get("reference_perplexity"),
                    "size_vs_base": round(size / base_bytes, 3) if base_bytes else None,
                    "warning": _size_warning(
                        label, export.get("weight_sizes", {}).get(label, size) if label == fmt else size, results, v
                    ),
                }
            )
    return rows


def _unexported(verdicts: dict[str, Any]) -> list[tuple[str, str]]:
    """What a server verified that no export wrote (``adapter@vllm``: the run's adapter as a LoRA on the base), as
    (label, path)."""
    return [(label, v["artifact"]) for label, v in verdicts.items() if label.startswith("adapter@")]


def _folder_bytes(path: str) -> int:
    folder = Path(path)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _method(results: dict[str, Any], fmt: str) -> str | None:
    """How an artifact was quantized, in words: the method, and for GPTQ its output error on the calibration inputs
    against round-to-nearest's (what the calibrate step measured per matrix)."""
    method = results.get("export", {}).get("details", {}).get(fmt, {}).get("method")
    gptq = results.get("calibrate", {}).get("gptq")
    if method == "gptq" and gptq:
        return i18n.ui("report_gptq", error=gptq["output_error"], rtn=gptq["output_error_rtn"])
    if method == "imatrix":
        calibrate = results.get("calibrate", {})
        return i18n.ui("report_imatrix", samples=calibrate.get("samples"), tokens=calibrate.get("tokens"))
    return method


def verdict_summary(rows: list[dict[str, Any]]) -> str:
    """``3 verified, 1 not run (gguf: llama-cpp-python is not installed)``: how many of each, and why not run."""
    counts = {status: [r for r in rows if r["status"] == status] for status in ("verified", "failed", "not_run")}
    parts = [i18n.ui("count_verified", count=len(counts["verified"]))]
    if counts["failed"]:
        parts.append(
            i18n.ui(
                "count_failed", count=len(counts["failed"]), formats=", ".join(r["format"] for r in counts["failed"])
            )
        )
    if counts["not_run"]:
        reasons = "; ".join(f"{r['format']}: {r['reason']}" for r in counts["not_run"])
        parts.append(i18n.ui("count_not_run", count=len(counts["not_run"]), reasons=reasons))
    return ", ".join(parts)


def _size_warning(label: str, weight_bytes: int, results: dict[str, Any], verdict: dict[str, Any]) -> str | None:
    """Why an artifact's weights take more room than the base's, naming only the causes that apply to this run."""
    check = results.get("check", {})
    base_bytes = check.get("base_bytes")
    if not base_bytes or weight_bytes <= base_bytes * 1.05:
        return None
    causes = []
    half = set(check.get("base_dtypes", [])) & {"BF16", "F16"}
    if verdict.get("precision") == "full" and half:
        causes.append(
            i18n.ui("cause_widened_onnx" if label.startswith("onnx") else "cause_widened", dtype="/".join(sorted(half)))
        )
    if results.get("merge", {}).get("untied_embeddings"):
        causes.append(i18n.ui("cause_untied"))
    if label.startswith("onnx"):
        causes.append(i18n.ui("cause_onnx_tables"))
    if verdict.get("precision") in ("reduced", "int4") and not half and label.startswith("onnx"):
        causes.append(i18n.ui("cause_float_embedding"))
    if not causes:
        causes.append(i18n.ui("cause_unknown"))
    return i18n.ui("warn_larger", ratio=f"{weight_bytes / base_bytes:.2f}", causes="; ".join(causes))


def _graph_bytes(graph: str) -> int:
    """An ONNX graph file and its external data."""
    path = Path(graph)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _perplexities(reference: dict[str, Any], measured: list[dict[str, Any]]) -> dict[str, float]:
    """Perplexity on the held-out text: the base alone, the reference (base + adapter), then each artifact."""
    values = {i18n.ui("report_base_alone"): reference.get("base_perplexity")}
    values[i18n.ui("report_reference")] = reference.get("perplexity") or (
        measured[0]["reference_perplexity"] if measured else None
    )
    values.update({r["format"]: r["perplexity"] for r in measured})
    return {label: value for label, value in values.items() if value is not None}


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


_STATUS_CLASS = {"verified": "ok", "failed": "bad", "not_run": "warn"}
STATUS_TEXT = {"verified": "status_verified", "failed": "status_failed", "not_run": "status_not_run"}


def _artifact_row(r: dict[str, Any]) -> str:
    verdict = f'<b class="{_STATUS_CLASS[r["status"]]}">{html.escape(i18n.ui(STATUS_TEXT[r["status"]]))}</b>'
    ran = r.get("runtime")
    if ran and r.get("peak_rss"):
        ran = i18n.ui("verify_peak", runtime=ran, memory=human_bytes(r["peak_rss"]))
    server = r.get("server") or {}
    if ran and server.get("start_seconds") is not None:
        memory = human_bytes(server["peak_rss"]) if server.get("peak_rss") else "?"
        ran = i18n.ui("report_server", runtime=ran, seconds=server["start_seconds"], memory=memory)
    for note in (r["reason"], ran, r.get("serving")):
        if note:
            verdict += f'<br><span class="muted">{html.escape(note)}</span>'
    if server.get("command"):
        verdict += f'<br><code class="rule">{html.escape(server["command"])}</code>'
    ratio = "" if r["size_vs_base"] is None else f" ({r['size_vs_base']:.2f}×)"
    method = r.get("method")
    quantized = (
        f'<br><span class="muted">{html.escape(i18n.ui("report_method", method=method))}</span>' if method else ""
    )
    if r["rule"]:
        verdict += f'<br><span class="muted rule">{html.escape(r["rule"])}</span>'
    return (
        f"<tr><td><b>{r['format']}</b>{quantized}</td><td><code>{html.escape(r['path'])}</code></td>"
        f"<td>{human_bytes(r['bytes'])}{ratio}</td>"
        f"<td>{verdict}</td><td>{_number(r['max_abs_diff'], '.3g')}</td>"
        f"<td>{_number(r['mean_kl'], '.3g')}</td><td>{_number(r['top1'], '.3f')}</td>"
        f"<td>{_number(r['perplexity'], '.3f')}</td></tr>"
    )


def banner(rows: list[dict[str, Any]], failure: Any) -> tuple[str, str]:
    """The report's first line: (css class, text). Passed only when every artifact was run and verified."""
    if failure is not None:
        return "fail", i18n.ui("report_fail", error=failure, summary=verdict_summary(rows))
    if rows and all(r["status"] == "verified" for r in rows):
        return "pass", i18n.ui("report_pass", count=len(rows))
    return "partial", i18n.ui("report_partial", count=len(rows), summary=verdict_summary(rows))


def _html(manifest: dict[str, Any], results: dict[str, Any], samples: list, failure: Any) -> str:
    rows = summary_rows(results)
    banner_class, banner_text = banner(rows, failure)
    table = "".join(_artifact_row(r) for r in rows)
    steps = manifest.get("steps", {})
    reference = results.get("verify", {}).get("reference") or {}
    plots = _plots(results, rows, steps, samples, reference)
    detection = results.get("detect", {})
    check = results.get("check", {})
    where = " · " + html.escape(reference_line(reference["device"], reference["precision"])) if reference else ""
    ppl_line = ""
    if reference.get("base_perplexity") is not None and reference.get("perplexity") is not None:
        text = i18n.ui(
            "report_ppl_line", base=f"{reference['base_perplexity']:.3f}", reference=f"{reference['perplexity']:.3f}"
        )
        ppl_line = f'<p class="muted">{html.escape(text)}</p>'
    if reference.get("judged"):
        judged = reference["judged"]
        text = i18n.ui(
            "report_judged",
            prompts=judged["prompts"],
            tokens=max(judged["greedy_tokens"], default=0),
            heldout=judged["heldout_tokens"],
        )
        ppl_line += f'<p class="muted">{html.escape(text)}</p>'
    if reference.get("other_road"):
        ppl_line += f'<p class="muted">{html.escape(i18n.ui("other_road_line", **reference["other_road"]))}</p>'
    t = lambda key: html.escape(i18n.ui(key))  # noqa: E731
    columns = "".join(f"<th>{html.escape(c)}</th>" for c in i18n.ui("report_columns").split(";"))
    step_columns = "".join(f"<th>{html.escape(c)}</th>" for c in i18n.ui("report_step_columns").split(";"))
    warnings = "".join(
        f'<p class="bad">⚠ {html.escape(r["format"])}: {html.escape(r["warning"])}</p>' for r in rows if r["warning"]
    )
    selected = html.escape(str(detection.get("selected", "?")))
    base = html.escape(str(check.get("base_model", "?")))
    # a QLoRA base: what it is and which weights the adapter was merged into
    quantized = (
        f'<p class="muted">{html.escape(check["base_quantization"])}</p>' if check.get("base_quantization") else ""
    )
    return f"""<!doctype html><html lang="{i18n.current_language()}"><head><meta charset="utf-8">
<title>model-export report</title>
<style>{_CSS}</style></head><body><h1>model-export report</h1>
<div class="banner {banner_class}">{html.escape(str(banner_text))}</div>
<p class="muted">{t("report_checkpoint")} <code>{selected}</code> · {t("report_base")}
<code>{base}</code> · LoRA r={check.get("rank", "?")}, alpha={check.get("lora_alpha", "?")}{where}</p>{quantized}
<h2>{t("report_artifacts")}</h2><table class="artifacts"><tr>{columns}</tr>{table}</table>{ppl_line}{warnings}
<h2>{t("report_plots")}</h2><div class="grid">{"".join(plots)}</div>
<h2>{t("report_steps")}</h2><table><tr>{step_columns}</tr>{_step_rows(steps)}</table>
<p class="muted">{t("report_footer")}</p></body></html>"""


def _step_rows(steps: dict[str, Any]) -> str:
    """One row per step, a step's units (export:gguf, verify:onnx) indented under it."""
    skipped = html.escape(i18n.ui("report_skipped"))
    unit = ' class="unit"'
    return "".join(
        f"<tr><td{unit if ':' in name else ''}>{html.escape(name)}</td>"
        f"<td>{s.get('status')}{skipped if s.get('skipped') else ''}</td>"
        f"<td>{s.get('seconds') or 0:.2f} s</td><td>{_gib(s.get('peak_rss'))}</td></tr>"
        for name, s in steps.items()
    )


def _gib(peak: int | None) -> str:
    """A step's peak memory; a unit measured inside its step has none of its own (the step's row has it)."""
    return f"{peak / 2**30:.2f} GiB" if peak else "–"


def _plots(results: dict[str, Any], rows: list, steps: dict[str, Any], samples: list, reference: dict) -> list[str]:
    """The report's plots: step durations (the steps themselves; their units are in the table), sizes, perplexities,
    the benchmark's, each artifact's logit differences, memory."""
    top = {name: s for name, s in steps.items() if ":" not in name}
    durations = [s.get("seconds") or 0 for s in top.values()]
    plots = [bars(i18n.ui("report_durations"), list(top), durations, lambda v: f"{v:.2f} s", "#f59e0b")]
    base_bytes = results.get("check", {}).get("base_bytes")
    if rows:
        labels = ([i18n.ui("report_base")] if base_bytes else []) + [r["format"] for r in rows]
        sizes = ([base_bytes] if base_bytes else []) + [r["bytes"] for r in rows]
        plots.append(bars(i18n.ui("report_sizes"), labels, sizes, human_bytes, "#10b981"))
    ppl = _perplexities(reference, [r for r in rows if r["perplexity"] is not None])
    if len(ppl) > 1:
        plots.append(bars(i18n.ui("report_perplexity"), list(ppl), list(ppl.values()), lambda v: f"{v:.3f}", "#8b5cf6"))
    plots += _benchmark_plots(results)
    for fmt, verdict in results.get("verify", {}).get("verdicts", {}).items():
        plots.append(logit_histogram_plot(i18n.ui("report_diffs", format=fmt), verdict))
    plots.append(memory_plot(samples))
    skipped_steps = [name for name, s in top.items() if s.get("skipped")]
    if skipped_steps and samples:
        note = i18n.ui("report_memory_skipped", count=len(skipped_steps), steps=", ".join(skipped_steps))
        plots.append(f'<p class="muted note">{html.escape(note)}</p>')
    return plots


def _benchmark_plots(results: dict[str, Any]) -> list[str]:
    timings = [r for r in results.get("benchmark", {}).get("results", []) if r.get("decode_tokens_per_s")]
    if not timings:
        return []
    labels = [r["label"] for r in timings]
    speed = [r["decode_tokens_per_s"] for r in timings]
    return [
        bars(i18n.ui("report_decode_speed"), labels, speed, lambda v: f"{v:.1f} tok/s", "#0ea5e9"),
        bars(i18n.ui("report_ttft"), labels, [r["ttft_s"] * 1000 for r in timings], lambda v: f"{v:.2f} ms", "#0ea5e9"),
        bars(i18n.ui("report_load"), labels, [r["load_s"] for r in timings], lambda v: f"{v:.2f} s", "#0ea5e9"),
    ]


def write_report(
    out: Path, manifest: dict[str, Any], results: dict[str, Any], samples: list[tuple[float, int]], failure: Any = None
) -> dict[str, str]:
    """Write report.json and report.html into ``out``; return their paths."""
    rows = summary_rows(results)
    status = {"pass": "passed", "fail": "failed", "partial": "not_verified"}[banner(rows, failure)[0]]
    data = {
        "status": status,
        "summary": verdict_summary(rows),
        "error": failure.to_dict() if failure else None,
        "artifacts": rows,
        "steps": manifest.get("steps", {}),
        "results": results,
        "memory_samples": samples,
    }
    write_atomic(out / "report.json", strict_json(data))
    write_atomic(out / "report.html", _html(manifest, results, samples, failure))
    return {"json": str(out / "report.json"), "html": str(out / "report.html")}


def rerender_report(run_dir: Path, benchmark_results: list[dict[str, Any]]) -> str:
    """Write report.html and report.json of a finished run again, with benchmark results added; return the html path."""
    manifest = RunManifest.load(run_dir)
    results = {**manifest.results(), "benchmark": {"results": benchmark_results}}
    return write_report(run_dir, {"steps": manifest.steps_dict()}, results, [])["html"]
