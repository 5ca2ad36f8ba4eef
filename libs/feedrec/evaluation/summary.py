"""Plain-text summary of the evaluation metrics (what the demo prints)."""

from __future__ import annotations

from typing import Any

SYSTEMS = ("model", "oracle", "popularity")


def format_summary(metrics: dict[str, Any]) -> str:
    ranking, retrieval = metrics["ranking"], metrics["retrieval"]
    tasks = [
        t for t in ranking if isinstance(ranking[t], dict) and "auc" in ranking[t].get("model", {})
    ]
    lines = [f"test AUC ({ranking['rows']} impressions)   " + "".join(f"{s:>12}" for s in SYSTEMS)]
    for t in tasks:
        lines.append(f"  {t:<34}" + "".join(f"{ranking[t][s]['auc']:>12.4f}" for s in SYSTEMS))
    lines.append(
        f"  {'dwell RMSE (s)':<34}"
        + "".join(f"{ranking['dwell'][s]['rmse']:>12.3f}" for s in SYSTEMS)
    )
    lines.append(f"retrieval ({retrieval['users']} users, {retrieval['corpus']} posts)")
    for k in retrieval["model"]:
        lines.append(f"  {k:<34}" + "".join(f"{retrieval[s][k]:>12.4f}" for s in SYSTEMS))
    return "\n".join(lines)
