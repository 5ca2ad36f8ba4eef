"""Plain-text summary of the evaluation metrics (what the demo prints)."""

from __future__ import annotations

from typing import Any

from feedrec.evaluation.metrics import systems_in


def format_summary(metrics: dict[str, Any]) -> str:
    ranking, retrieval = metrics["ranking"], metrics["retrieval"]
    tasks = [
        t for t in ranking if isinstance(ranking[t], dict) and "auc" in ranking[t].get("model", {})
    ]
    ranked = systems_in(ranking["dwell"])
    lines = [f"test AUC ({ranking['rows']} impressions)".ljust(36)]
    lines[0] += "".join(f"{s:>16}" for s in ranked)
    for t in tasks:
        lines.append(f"  {t:<34}" + "".join(f"{ranking[t][s]['auc']:>16.4f}" for s in ranked))
    lines.append(
        f"  {'dwell RMSE (s)':<34}"
        + "".join(f"{ranking['dwell'][s]['rmse']:>16.3f}" for s in ranked)
    )
    retrieved = systems_in(retrieval)
    lines.append(f"retrieval ({retrieval['users']} users, {retrieval['corpus']} posts)")
    lines.append(f"  {'':<34}" + "".join(f"{s:>16}" for s in retrieved))
    for k in retrieval["model"]:
        lines.append(f"  {k:<34}" + "".join(f"{retrieval[s][k]:>16.4f}" for s in retrieved))
    full = metrics.get("full_ranking")
    if full is not None:
        lines.append(
            f"full ranking ({full['users']} users, {full['corpus']} posts, excluding "
            f"{full['excluded']})"
        )
        shown = {f"@{min(full['k'])}", f"@{max(full['k'])}"} if full["k"] else set()
        for name in (n for n in full["model"] if "@" + n.split("@")[1] in shown):
            lines.append(
                f"  {name:<34}" + "".join(f"{full[s][name]:>16.4f}" for s in systems_in(full))
            )
    oracle = metrics.get("oracle", {"available": True})
    if not oracle["available"]:
        lines.append(f"oracle: unavailable ({oracle['reason']})")
    return "\n".join(lines)
