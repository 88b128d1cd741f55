"""The report's plots as inline SVG (no script, no network): bars, logit differences, memory over time."""

from __future__ import annotations

import html
from typing import Any

from .. import i18n

__all__ = ["bars", "logit_histogram_plot", "memory_plot"]


def bars(title: str, labels: list[str], values: list[float], fmt: Any, color: str = "#3b82f6") -> str:
    width, row = 440, 26
    top = max(values, default=0) or 1
    height = 34 + row * len(labels)
    parts = [
        f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
        f'<text x="10" y="20" font-weight="600">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 30 + i * row
        w = 210 * value / top
        parts.append(
            f'<text x="10" y="{y + 16}">{html.escape(label)}</text>'
            f'<rect x="132" y="{y + 4}" width="{w:.1f}" height="16" fill="{color}" rx="2"/>'
            f'<text x="{138 + w:.1f}" y="{y + 16}" class="muted">{html.escape(fmt(value))}</text>'
        )
    return "".join(parts) + "</svg>"


def logit_histogram_plot(title: str, verdict: dict[str, Any]) -> str:
    """The distribution of |logit difference| of one artifact against the reference; an artifact with none to show
    (not run, failed to run, a folder checked file by file) gets a panel that says why instead of an empty plot."""
    histogram = verdict.get("diff_histogram") or {}
    counts, edges = histogram.get("counts", []), histogram.get("edges", [])
    if not any(counts):
        if verdict.get("status") == "not_run":
            why = i18n.ui("report_no_diffs_not_run", reason=verdict.get("reason") or "")
        elif verdict.get("error"):
            why = i18n.ui("report_no_diffs_failed", error=verdict["error"])
        else:
            why = i18n.ui("report_no_diffs_files")
        text = html.escape(i18n.ui("report_no_diffs", why=why))
        return f'<div class="note"><b>{html.escape(title)}</b><p class="muted">{text}</p></div>'
    width, height = 440, 190
    top = max(counts, default=0) or 1
    bar = 400 / max(len(counts), 1)
    parts = [
        f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
        f'<text x="10" y="20" font-weight="600">{html.escape(title)}</text>',
    ]
    for i, count in enumerate(counts):
        h = 120 * count / top
        parts.append(
            f'<rect x="{20 + i * bar:.1f}" y="{150 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#8b5cf6"/>'
        )
    if edges:
        parts.append(
            f'<text x="20" y="170" class="muted">0</text><text x="330" y="170" class="muted">{edges[-1]:.3g}</text>'
            '<text x="150" y="186" class="muted">|logit difference|</text>'
        )
    return "".join(parts) + "</svg>"


def memory_plot(samples: list[tuple[float, int]]) -> str:
    width, height = 440, 190
    if len(samples) < 2:
        return ""
    t_max = samples[-1][0] or 1
    m_max = max(m for _, m in samples) or 1
    points = " ".join(f"{20 + 400 * t / t_max:.1f},{150 - 120 * m / m_max:.1f}" for t, m in samples)
    return (
        f'<svg width="{width}" height="{height}" role="img"><title>memory</title>'
        f'<text x="10" y="20" font-weight="600">{html.escape(i18n.ui("report_memory"))}</text>'
        f'<polyline points="{points}" fill="none" stroke="#0ea5e9" stroke-width="2"/>'
        f'<text x="20" y="170" class="muted">0 s</text><text x="360" y="170" class="muted">{t_max:.1f} s</text>'
        f'<text x="24" y="46" class="muted">{html.escape(i18n.ui("report_peak", gib=m_max / 2**30))}</text>'
        '<text x="24" y="146" class="muted">0</text></svg>'
    )
