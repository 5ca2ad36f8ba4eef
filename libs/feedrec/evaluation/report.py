"""A small self-contained HTML report (plots embedded as PNG) of the evaluation metrics."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by jobs, not shown
import matplotlib.pyplot as plt

from feedrec.evaluation.metrics import systems_in

COLORS = {
    "model": "#1f77b4",
    "oracle": "#2ca02c",
    "oracle_no_taste": "#8fd18f",
    "history_oracle": "#9467bd",
    "popularity": "#ff7f0e",
}


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _auc_plot(ranking: dict[str, Any], tasks: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    systems = systems_in(ranking[tasks[0]]) if tasks else []
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        values = [ranking[t][system]["auc"] for t in tasks]
        ax.bar(
            [x + (i - (len(systems) - 1) / 2) * width for x in range(len(tasks))],
            values,
            width,
            label=system,
            color=COLORS[system],
        )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0.45, 1.0)
    ax.set_ylabel("test AUC")
    ax.set_title("Ranker heads: model vs the oracle and what the logs reveal of it")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png_base64(fig)


def _recall_plot(retrieval: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for system in systems_in(retrieval):
        points = sorted((int(k.split("@")[1]), v) for k, v in retrieval[system].items())
        ax.plot(
            [k for k, _ in points],
            [v for _, v in points],
            marker="o",
            label=system,
            color=COLORS[system],
        )
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(
        f"Retrieval over {retrieval['corpus']} eligible posts ({retrieval['users']} users)"
    )
    ax.legend()
    return png_base64(fig)


def _curves_plot(training: dict[str, list[dict[str, float]]]) -> str:
    """Per model (a column): train and validation loss by epoch, and below them the
    validation quality by epoch (the ranker's AUC per head, the two-tower's in-batch top-1)."""
    fig, axes = plt.subplots(2, len(training), figsize=(9, 6.4), squeeze=False)
    for col, (name, history) in enumerate(training.items()):
        epochs = [h["epoch"] + 1 for h in history]
        ax = axes[0][col]
        ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
        ax.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="valid loss")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.legend()
        ax = axes[1][col]
        quality = sorted(
            {k for h in history for k in h if k.startswith(("valid_auc_", "valid_inbatch"))}
        )
        for key in quality:
            label = key.removeprefix("valid_").replace("_", " ")
            ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_title(f"{name}: validation")
        if quality:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return png_base64(fig)


def _table(ranking: dict[str, Any], tasks: list[str]) -> str:
    systems = systems_in(ranking[tasks[0]]) if tasks else []
    rows = []
    for t in tasks:
        cells = "".join(
            f"<td>{ranking[t][s]['auc']:.4f}</td><td>{ranking[t][s]['logloss']:.4f}</td>"
            for s in systems
        )
        rows.append(f"<tr><th>{escape(t)}</th>{cells}</tr>")
    head = "".join(f"<th colspan=2>{s}</th>" for s in systems)
    sub = "<th>AUC</th><th>logloss</th>" * len(systems)
    return f"<table><tr><th></th>{head}</tr><tr><th>task</th>{sub}</tr>{''.join(rows)}</table>"


def _full_ranking_table(full: dict[str, Any]) -> str:
    systems = systems_in(full)
    names = list(full[systems[0]]) if systems else []
    head = "".join(f"<th>{s}</th>" for s in systems)
    rows = "".join(
        f"<tr><th>{escape(n)}</th>"
        + "".join(f"<td>{full[s][n]:.4f}</td>" for s in systems)
        + "</tr>"
        for n in names
    )
    return (
        f"<h2>Full ranking ({full['users']} users, {full['corpus']} eligible posts, excluding "
        f"{escape(full['excluded'])})</h2><table><tr><th></th>{head}</tr>{rows}</table>"
    )


def _oracle_note(metrics: dict[str, Any]) -> str:
    oracle = metrics.get("oracle", {"available": True})
    if oracle["available"]:
        return ""
    return f"<p>Oracle: unavailable ({escape(oracle['reason'])}).</p>"


def write_report(metrics: dict[str, Any], path: Path) -> None:
    """Write ``report.html`` for the metrics produced by ``feedrec.evaluation.evaluate``."""
    ranking = metrics["ranking"]
    tasks = [t for t in ranking if isinstance(ranking[t], dict) and "model" in ranking[t]]
    tasks = [t for t in tasks if "auc" in ranking[t]["model"]]
    images = [
        _auc_plot(ranking, tasks),
        _recall_plot(metrics["retrieval"]),
        _curves_plot(metrics["training"]),
    ]
    body = "".join(f'<img src="data:image/png;base64,{img}"/>' for img in images)
    dwell = ", ".join(
        f"{s} {ranking['dwell'][s]['rmse']:.3f}" for s in systems_in(ranking["dwell"])
    )
    full = _full_ranking_table(metrics["full_ranking"]) if "full_ranking" in metrics else ""
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>feedrec evaluation</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>feedrec evaluation (test days {metrics["test_days"]})</h1>
{_oracle_note(metrics)}
<h2>Ranking ({ranking["rows"]} test impressions)</h2>{_table(ranking, tasks)}
<p>Dwell RMSE (s): {dwell}</p>
{full}
{body}</body></html>"""
    path.write_text(html)
