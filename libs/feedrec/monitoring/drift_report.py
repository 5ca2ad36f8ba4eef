"""``drift.html``: a self-contained report (plots embedded as PNG) of a drift comparison."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by jobs, not shown
import matplotlib.pyplot as plt

# The evaluation report's PNG embedding (figure -> base64, figure closed).
from feedrec.evaluation.report import png_base64
from feedrec.monitoring.drift import DriftResult, FeatureDrift

STATUS_COLORS = {"ok": "#2ca02c", "warn": "#ff7f0e", "alert": "#d62728"}
REFERENCE_COLOR, RECENT_COLOR = "#1f77b4", "#d62728"
#: Non-prediction features plotted as histograms (the largest PSI first).
TOP_FEATURES = 6


def _psi_plot(result: DriftResult) -> str:
    rows = sorted(result.features, key=lambda r: r.psi)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.24 * len(rows) + 1)))
    ax.barh(
        [r.name for r in rows],
        [r.psi for r in rows],
        color=[STATUS_COLORS[r.status] for r in rows],
    )
    cfg = result.config
    ax.axvline(cfg.psi_warn, color=STATUS_COLORS["warn"], ls="--", label=f"warn {cfg.psi_warn}")
    ax.axvline(cfg.psi_alert, color=STATUS_COLORS["alert"], ls="--", label=f"alert {cfg.psi_alert}")
    # A log scale keeps the stable features (PSI ~0.001) readable next to a drifted one (> 1).
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("PSI (recent vs reference)")
    ax.set_title("Population stability index per feature and prediction")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right")
    return png_base64(fig)


def _histogram_axes(ax: Any, row: FeatureDrift) -> None:
    hist = row.histogram
    ref, rec = hist["reference"], hist["recent"]
    if "categories" in hist:
        x = list(range(len(ref)))
        ax.bar([i - 0.2 for i in x], ref, 0.4, color=REFERENCE_COLOR, label="reference")
        ax.bar([i + 0.2 for i in x], rec, 0.4, color=RECENT_COLOR, label="recent")
        ax.set_xticks(x, hist["categories"], rotation=90, fontsize=6)
    else:
        edges = hist["edges"]
        for shares, color, label in (
            (ref, REFERENCE_COLOR, "reference"),
            (rec, RECENT_COLOR, "recent"),
        ):
            ax.stairs(shares, edges, fill=True, alpha=0.35, color=color, label=label)
            ax.stairs(shares, edges, color=color)
    ks = f", KS {row.ks:.3f}" if row.ks is not None else ""
    ax.set_title(f"{row.name}: PSI {row.psi:.3f}{ks}", fontsize=9, color=STATUS_COLORS[row.status])
    ax.set_ylabel("share", fontsize=8)
    ax.tick_params(labelsize=7)


def _histograms_plot(rows: list[FeatureDrift], title: str) -> str:
    cols = 3
    n_rows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(11, 2.8 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        _histogram_axes(ax, row)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return png_base64(fig)


def _table(result: DriftResult) -> str:
    def num(x: float | None, digits: int = 4) -> str:
        return "" if x is None else f"{x:.{digits}f}"

    rows = sorted(result.features, key=lambda r: -r.psi)
    body = "".join(
        f"<tr><th>{escape(r.name)}</th><td>{r.kind}</td>"
        f'<td style="color:{STATUS_COLORS[r.status]}"><b>{r.status}</b></td>'
        f"<td>{num(r.psi)}</td><td>{num(r.ks)}</td>"
        f"<td>{num(r.reference_mean)}</td><td>{num(r.recent_mean)}</td></tr>"
        for r in rows
    )
    head = (
        "<tr><th>feature</th><th>kind</th><th>status</th><th>PSI</th><th>KS</th>"
        "<th>reference mean</th><th>recent mean</th></tr>"
    )
    return f"<table>{head}{body}</table>"


def _side(side: dict[str, Any]) -> str:
    return escape(
        f"{side.get('split')} split, days {side.get('days')}, {side.get('rows')} sampled rows "
        f"of {side.get('data_dir')}"
    )


def write_drift_report(result: DriftResult, path: Path) -> None:
    """Write ``drift.html``: the verdict, PSI per feature, histograms of the top drifted
    features and of the ranker's predictions, and the table of every row."""
    features = [r for r in result.features if r.kind != "prediction"]
    predictions = [r for r in result.features if r.kind == "prediction"]
    top = sorted(features, key=lambda r: -r.psi)[:TOP_FEATURES]
    images = [_psi_plot(result)]
    if top:
        images.append(_histograms_plot(top, "Largest feature drift: reference vs recent"))
    if predictions:
        images.append(_histograms_plot(predictions, "Ranker predictions: reference vs recent"))
    body = "".join(f'<img src="data:image/png;base64,{img}"/>' for img in images)
    cfg = result.config
    if result.alerts:
        verdict = (
            f'<p style="color:{STATUS_COLORS["alert"]}"><b>ALERT</b>: PSI >= {cfg.psi_alert} '
            f"for {escape(', '.join(result.alerts))}</p>"
        )
    else:
        verdict = (
            f'<p style="color:{STATUS_COLORS["ok"]}"><b>No alert</b> (PSI < {cfg.psi_alert})</p>'
        )
    if result.warnings:
        verdict += f"<p>Warnings (PSI >= {cfg.psi_warn}): {escape(', '.join(result.warnings))}</p>"
    ranker = escape(result.ranker) if result.ranker else "none (features only)"
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>feedrec drift</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>feedrec drift report</h1>
<p>Reference: {_side(result.reference)}<br/>Recent: {_side(result.recent)}<br/>
Ranker: {ranker}</p>
{verdict}
{body}
<h2>Every feature</h2>{_table(result)}</body></html>"""
    path.write_text(html)
