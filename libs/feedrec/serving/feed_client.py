"""Formatting of feed responses for people (CLI and demo)."""

from __future__ import annotations

from typing import Any


def format_feed(response: dict[str, Any]) -> str:
    flags = [f"model {response['model_version']}"]
    if response.get("fallback"):
        flags.append("FALLBACK")
    if response.get("cold_start"):
        flags.append("cold start")
    lines = [f"feed for user {response['user_id']} ({', '.join(flags)})"]
    for rank, item in enumerate(response["items"], start=1):
        scores = " ".join(f"{k}={v:.3f}" for k, v in item["scores"].items())
        lines.append(f"  {rank:>2}. post {item['post_id']:>7}  score {item['score']:.4f}  {scores}")
    debug = response.get("debug")
    if debug:
        timing = {k: round(v, 1) if isinstance(v, float) else v for k, v in debug.items()}
        lines.append(f"  debug: {timing}")
    return "\n".join(lines)
