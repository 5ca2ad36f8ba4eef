"""The pipeline's stages over one run directory; the CLI and the demo both call these."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feedrec.runtime.run_layout import RunLayout

Echo = Callable[[str], None]


def run_preset(run: RunLayout, preset: str | None) -> str:
    """The preset given, else the one the run's world was generated with."""
    if preset:
        return preset
    info = run.root / "run.json"
    return str(json.loads(info.read_text())["preset"]) if info.exists() else "small"


def generate(run: RunLayout, preset: str, overrides: dict[str, Any] | None = None) -> str:
    from feedrec.world import PRESETS, generate_world

    cfg = PRESETS[preset].with_overrides(**(overrides or {}))
    started = time.perf_counter()
    generate_world(cfg, run.world)
    (run.root / "run.json").write_text(json.dumps({"preset": preset, "world": cfg.to_dict()}))
    n = cfg.n_days * cfg.impressions_per_day
    return (
        f"world: ~{n:,} impressions over {cfg.n_days} days in {time.perf_counter() - started:.1f} s"
    )


def preprocess(run: RunLayout, ray_address: str | None = None) -> str:
    from feedrec.data import PreprocessConfig, run_preprocess
    from feedrec.runtime import init_ray

    if not (run.world / "world.json").exists():
        raise FileNotFoundError(f"no world in {run.world}: run `feedrec generate` first")
    init_ray(ray_address)
    meta = run_preprocess(PreprocessConfig(world_dir=run.world, out_dir=run.data)).read_meta()
    return (
        f"preprocess: examples {meta['rows']}, retrieval pairs {meta['pairs']}, {meta['seconds']} s"
    )


def train(
    run: RunLayout,
    kind: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
) -> str:
    from feedrec.artifacts import load_artifact
    from feedrec.data import PreprocessLayout
    from feedrec.runtime import init_ray
    from feedrec.training.config import PRESETS
    from feedrec.training.trainer import train_model

    data = PreprocessLayout(run.data)
    if not data.meta.exists():
        raise FileNotFoundError(f"no preprocessed data in {run.data}: run `feedrec preprocess`")
    cfg = PRESETS[run_preset(run, preset)][kind].with_overrides(**(overrides or {}))  # type: ignore[index]
    init_ray(ray_address)
    out = run.ranker if kind == "ranker" else run.two_tower
    artifact = load_artifact(train_model(cfg, data, out, storage_dir=run.ray_results))
    last = artifact.metadata["history"][-1]
    valid = {
        k.removeprefix("valid_"): round(v, 4) for k, v in last.items() if k.startswith("valid")
    }
    return (
        f"train {kind}: {artifact.metadata['train_seconds']} s, "
        f"{last['samples_per_s_per_worker']:.0f} samples/s/worker, last epoch {valid}"
    )


def evaluate(run: RunLayout) -> str:
    from feedrec.evaluation.evaluate import EvaluationConfig
    from feedrec.evaluation.evaluate import evaluate as run_evaluation
    from feedrec.evaluation.summary import format_summary

    metrics = run_evaluation(
        EvaluationConfig(
            world_dir=run.world,
            data_dir=run.data,
            ranker_dir=run.ranker,
            two_tower_dir=run.two_tower,
            out_dir=run.eval,
        )
    )
    return format_summary(metrics) + f"\nreport: {run.eval / 'report.html'}"


def index(run: RunLayout) -> str:
    from feedrec.artifacts import load_artifact
    from feedrec.retrieval.build import build_retrieval_artifact

    out = build_retrieval_artifact(run.two_tower, run.data, run.world, run.retrieval)
    info = load_artifact(out).metadata["index"]
    return f"index: {info['posts']} posts, {info['faiss_type']}, {info['build_seconds']} s"


def run_demo(
    *, preset: str, run_dir: Path, port: int, n_feeds: int, echo: Echo = print
) -> dict[str, float]:
    """Every stage on ``preset``, then a few feeds over HTTP; stops what it started.

    Returns wall seconds per stage.
    """
    import httpx
    import numpy as np
    import ray

    from feedrec.serving.feed_client import format_feed
    from feedrec.serving.stack import ServingStack, StackConfig

    run = RunLayout(Path(run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], str]) -> None:
        echo(f"==> {name}")
        started = time.perf_counter()
        echo(fn())
        seconds[name] = round(time.perf_counter() - started, 1)

    stage("generate", lambda: generate(run, preset))
    stage("preprocess", lambda: preprocess(run))
    stage("train ranker", lambda: train(run, "ranker", preset))
    stage("train two_tower", lambda: train(run, "two_tower", preset))
    stage("evaluate", lambda: evaluate(run))
    stage("index", lambda: index(run))
    echo("==> serve (Triton + Ray Serve)")
    started = time.perf_counter()
    with ServingStack(StackConfig(run_dir=run.root, http_port=port)) as stack:
        seconds["serve start"] = round(time.perf_counter() - started, 1)
        world = json.loads((run.root / "run.json").read_text())["world"]
        rng = np.random.default_rng(0)
        users = [int(u) for u in rng.choice(world["n_users"], size=n_feeds, replace=False)]
        users.append(world["n_users"] + 7)  # a user the system has never seen: cold start
        for user in users:
            body = {"user_id": user, "count": 5, "debug": True}
            resp = httpx.post(f"{stack.url}/v1/feed", json=body, timeout=30)
            resp.raise_for_status()
            echo(format_feed(resp.json()))
    ray.shutdown()
    seconds["total"] = round(sum(seconds.values()), 1)
    echo(f"stage wall seconds: {seconds}")
    return seconds
