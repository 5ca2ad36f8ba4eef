"""Talking to a running feed service: readiness, and formatting responses for people."""

from __future__ import annotations

import time
from typing import Any

import httpx


def wait_healthy(url: str, timeout_s: float) -> None:
    """Block until ``GET {url}/healthz`` answers 200; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"feed service not healthy at {url} after {timeout_s:.0f} s")


def format_feed(response: dict[str, Any]) -> str:
    flags = [f"model {response['model_version']}"]
    if response.get("variant"):
        flags.append(f"variant {response['variant']}")
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
