"""report.json and a self-contained report.html: what was exported, and whether it can be trusted.

The HTML has no external assets: the plots are inline SVG (logit-difference distribution per
artifact, artifact sizes against the base model, step durations, memory over time), so the file
can be mailed or opened offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from . import i18n
from .hf_layout import write_atomic
from .verify import reference_line

__all__ = ["write_report", "summary_rows"]

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#1d2330}
h1{font-size:22px}h2{font-size:17px;margin-top:2em}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #e3e6ec;padding:6px 8px;text-align:left}th{background:#f5f7fa}
.banner{padding:14px 18px;border-radius:8px;font-size:17px;font-weight:600}
.pass{background:#e5f6ea;color:#17642f}.fail{background:#fde8e8;color:#9b1c1c}.muted{color:#6b7280}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}svg{background:#fbfcfd;border:1px solid #e3e6ec;border-radius:6px}
code{background:#f1f3f6;padding:1px 4px;border-radius:3px}.ok{color:#17642f}.bad{color:#9b1c1c}"""


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per artifact: format, path, size (and against the base), verification outcome, perplexity on the
    held-out text, and a warning when the artifact is larger than the base model, saying why."""
    export = results.get("export", {})
    verdicts = results.get("verify", {}).get("verdicts", {})
    base_bytes = results.get("check", {}).get("base_bytes")
    rows = []
    for fmt, path in export.get("artifacts", {}).items():
        # An ONNX folder holds two graphs (plain and optimized), each verified: one row each.
        extra = [(label, v) for label, v in verdicts.items() if label.startswith(f"{fmt}-")]
        for label, v, where, size in [(fmt, verdicts.get(fmt), path, export.get("sizes", {}).get(fmt, 0)),
                                      *[(label, v, v["artifact"], _graph_bytes(v["artifact"])) for label, v in extra]]:
            rows.append({"format": label, "path": where, "bytes": size,
                         "verified": None if v is None else bool(v["passed"]), "rule": v and v["rule"],
                         "max_abs_diff": v and v["max_abs_diff"], "mean_kl": v and v["mean_kl"], "top1": v and v["top1_agreement"],
                         "ran": bool(v and v.get("samples")),  # False: checked without running (a GGUF read back only)
                         "perplexity": v and v.get("perplexity"), "reference_perplexity": v and v.get("reference_perplexity"),
                         "size_vs_base": round(size / base_bytes, 3) if base_bytes else None,
                         "warning": _size_warning(label, size, base_bytes, v)})
    return rows


def _size_warning(label: str, size: int, base_bytes: int | None, verdict: dict[str, Any] | None) -> str | None:
    """Why an artifact is larger than the base model, when it is."""
    if not base_bytes or size <= base_bytes * 1.05:  # metadata, tokenizer and config files are not worth a warning
        return None
    ratio = size / base_bytes
    if verdict and verdict.get("precision") == "full" and ratio > 1.5:
        key = "warn_larger_fp32"
    elif label.startswith("onnx"):
        key = "warn_larger_onnx"
    else:
        key = "warn_larger_other"
    return i18n.ui(key, ratio=f"{ratio:.2f}")


def _graph_bytes(graph: str) -> int:
    """An ONNX graph file and its external data."""
    path = Path(graph)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _bars(title: str, labels: list[str], values: list[float], fmt: Any, color: str = "#3b82f6") -> str:
    width, row = 440, 26
    top = max(values, default=0) or 1
    height = 34 + row * len(labels)
    parts = [f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="10" y="20" font-weight="600">{html.escape(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 30 + i * row
        w = 220 * value / top
        parts.append(f'<text x="10" y="{y + 16}">{html.escape(label)}</text>'
                     f'<rect x="120" y="{y + 4}" width="{w:.1f}" height="16" fill="{color}" rx="2"/>'
                     f'<text x="{126 + w:.1f}" y="{y + 16}" class="muted">{html.escape(fmt(value))}</text>')
    return "".join(parts) + "</svg>"


def _histogram(title: str, histogram: dict[str, list[float]]) -> str:
    counts, edges = histogram.get("counts", []), histogram.get("edges", [])
    width, height = 440, 190
    top = max(counts, default=0) or 1
    bar = 400 / max(len(counts), 1)
    parts = [f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="10" y="20" font-weight="600">{html.escape(title)}</text>']
    for i, count in enumerate(counts):
        h = 120 * count / top
        parts.append(f'<rect x="{20 + i * bar:.1f}" y="{150 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#8b5cf6"/>')
    if edges:
        parts.append(f'<text x="20" y="170" class="muted">0</text><text x="330" y="170" class="muted">{edges[-1]:.3g}</text>'
                     '<text x="150" y="186" class="muted">|logit difference|</text>')
    return "".join(parts) + "</svg>"


def _memory(samples: list[tuple[float, int]]) -> str:
    width, height = 440, 190
    if len(samples) < 2:
        return ""
    t_max = samples[-1][0] or 1
    m_max = max(m for _, m in samples) or 1
    points = " ".join(f"{20 + 400 * t / t_max:.1f},{150 - 120 * m / m_max:.1f}" for t, m in samples)
    return (f'<svg width="{width}" height="{height}" role="img"><title>memory</title>'
            f'<text x="10" y="20" font-weight="600">{html.escape(i18n.ui("report_memory"))}</text>'
            f'<polyline points="{points}" fill="none" stroke="#0ea5e9" stroke-width="2"/>'
            f'<text x="20" y="170" class="muted">0 s</text><text x="360" y="170" class="muted">{t_max:.1f} s</text>'
            f'<text x="24" y="46" class="muted">{html.escape(i18n.ui("report_peak", gib=m_max / 2**30))}</text>'
            '<text x="24" y="146" class="muted">0</text></svg>')


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _artifact_row(r: dict[str, Any]) -> str:
    passed, failed = html.escape(i18n.ui("report_passed")), html.escape(i18n.ui("report_failed"))
    verified = "—" if r["verified"] is None else (f'<b class="ok">{passed}</b>' if r["verified"] else f'<b class="bad">{failed}</b>')
    if r["verified"] and not r.get("ran"):
        verified = f'<b>{html.escape(i18n.ui("report_read_back"))}</b>'
    ratio = "" if r["size_vs_base"] is None else f" ({r['size_vs_base']:.2f}×)"
    return (f"<tr><td><b>{r['format']}</b></td><td><code>{html.escape(r['path'])}</code></td><td>{_gb(r['bytes'])}{ratio}</td>"
            f"<td>{verified}</td><td>{html.escape(r['rule'] or '')}</td><td>{_number(r['max_abs_diff'], '.3g')}</td>"
            f"<td>{_number(r['mean_kl'], '.3g')}</td><td>{_number(r['top1'], '.3f')}</td><td>{_number(r['perplexity'], '.3f')}</td></tr>")


def _html(manifest: dict[str, Any], results: dict[str, Any], samples: list, failure: Any) -> str:
    rows = summary_rows(results)
    passed = failure is None and all(r["verified"] is not False for r in rows)
    banner = ("pass", i18n.ui("report_pass", count=len(rows))) if passed else ("fail", i18n.ui("report_fail", error=failure or "?"))
    table = "".join(_artifact_row(r) for r in rows)
    steps = manifest.get("steps", {})
    step_rows = "".join(f"<tr><td>{name}</td><td>{s.get('status')}{html.escape(i18n.ui('report_skipped')) if s.get('skipped') else ''}</td>"
                        f"<td>{s.get('seconds', 0):.2f} s</td><td>{s.get('peak_rss', 0) / 2**30:.2f} GiB</td></tr>"
                        for name, s in steps.items())
    plots = [_bars(i18n.ui("report_durations"), list(steps), [s.get("seconds", 0) for s in steps.values()], lambda v: f"{v:.2f} s", "#f59e0b")]
    base_bytes = results.get("check", {}).get("base_bytes")
    if rows:
        labels = ([i18n.ui("report_base")] if base_bytes else []) + [r["format"] for r in rows]
        sizes = ([base_bytes] if base_bytes else []) + [r["bytes"] for r in rows]
        plots.append(_bars(i18n.ui("report_sizes"), labels, sizes, _gb, "#10b981"))
    measured = [r for r in rows if r["perplexity"] is not None]
    if measured:
        labels = [i18n.ui("report_reference")] + [r["format"] for r in measured]
        values = [measured[0]["reference_perplexity"]] + [r["perplexity"] for r in measured]
        plots.append(_bars(i18n.ui("report_perplexity"), labels, values, lambda v: f"{v:.3f}", "#8b5cf6"))
    timings = [r for r in results.get("benchmark", {}).get("results", []) if r.get("decode_tokens_per_s")]
    if timings:
        labels = [r["label"] for r in timings]
        plots.append(_bars(i18n.ui("report_decode_speed"), labels, [r["decode_tokens_per_s"] for r in timings], lambda v: f"{v:.1f} tok/s", "#0ea5e9"))
        plots.append(_bars(i18n.ui("report_ttft"), labels, [r["ttft_s"] * 1000 for r in timings], lambda v: f"{v:.2f} ms", "#0ea5e9"))
        plots.append(_bars(i18n.ui("report_load"), labels, [r["load_s"] for r in timings], lambda v: f"{v:.2f} s", "#0ea5e9"))
    for fmt, verdict in results.get("verify", {}).get("verdicts", {}).items():
        plots.append(_histogram(i18n.ui("report_diffs", format=fmt), verdict.get("diff_histogram", {})))
    plots.append(_memory(samples))
    detection = results.get("detect", {})
    check = results.get("check", {})
    reference = results.get("verify", {}).get("reference")
    where = " · " + html.escape(reference_line(reference["device"], reference["precision"])) if reference else ""
    t = lambda key: html.escape(i18n.ui(key))  # noqa: E731
    columns = "".join(f"<th>{html.escape(c)}</th>" for c in i18n.ui("report_columns").split(";"))
    step_columns = "".join(f"<th>{html.escape(c)}</th>" for c in i18n.ui("report_step_columns").split(";"))
    warnings = "".join(f'<p class="bad">⚠ {html.escape(r["format"])}: {html.escape(r["warning"])}</p>' for r in rows if r["warning"])
    return f"""<!doctype html><html lang="{i18n.current_language()}"><head><meta charset="utf-8"><title>model-export report</title>
<style>{_CSS}</style></head><body><h1>model-export report</h1>
<div class="banner {banner[0]}">{html.escape(str(banner[1]))}</div>
<p class="muted">{t("report_checkpoint")} <code>{html.escape(str(detection.get('selected', '?')))}</code> · {t("report_base")}
<code>{html.escape(str(check.get('base_model', '?')))}</code> · LoRA r={check.get('rank', '?')}, alpha={check.get('lora_alpha', '?')}{where}</p>
<h2>{t("report_artifacts")}</h2><table><tr>{columns}</tr>{table}</table>{warnings}
<h2>{t("report_plots")}</h2><div class="grid">{''.join(plots)}</div>
<h2>{t("report_steps")}</h2><table><tr>{step_columns}</tr>{step_rows}</table>
<p class="muted">{t("report_footer")}</p></body></html>"""


def write_report(out: Path, manifest: dict[str, Any], results: dict[str, Any], samples: list[tuple[float, int]],
                 failure: Any = None) -> dict[str, str]:
    """Write report.json and report.html into ``out``; return their paths."""
    data = {"status": "failed" if failure else "passed", "error": failure.to_dict() if failure else None,
            "artifacts": summary_rows(results), "steps": manifest.get("steps", {}), "results": results,
            "memory_samples": samples}
    write_atomic(out / "report.json", json.dumps(data, indent=2, default=str))
    write_atomic(out / "report.html", _html(manifest, results, samples, failure))
    return {"json": str(out / "report.json"), "html": str(out / "report.html")}


def rerender_report(run_dir: Path, benchmark_results: list[dict[str, Any]]) -> str:
    """Write report.html and report.json of a finished run again, with benchmark results added; return the html path."""
    manifest = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    results = {name: step.get("result", {}) for name, step in manifest.get("steps", {}).items()}
    results["benchmark"] = {"results": benchmark_results}
    return write_report(run_dir, manifest, results, [])["html"]
