"""The pipeline's stages over one run directory; the CLI and the demo both call these."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedrec.runtime.run_layout import RunLayout

if TYPE_CHECKING:
    from feedrec.artifacts.model_registry import ModelRegistry, RegistryEntry

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


def preprocess(
    run: RunLayout, ray_address: str | None = None, options: dict[str, Any] | None = None
) -> str:
    """``options``: PreprocessConfig fields, e.g. ``{"split": "random", "ratios": (8, 1, 1)}``."""
    from feedrec.data import PreprocessConfig, run_preprocess
    from feedrec.data.log_validation import LogValidation
    from feedrec.runtime import init_ray

    if not (run.world / "world.json").exists():
        raise FileNotFoundError(
            f"no world in {run.world}: run `feedrec generate` or `feedrec logs import` first"
        )
    cfg = PreprocessConfig(world_dir=run.world, out_dir=run.data, **(options or {}))
    init_ray(ray_address)
    meta = run_preprocess(cfg).read_meta()
    validation = LogValidation.from_dict(meta["validation"])
    return (
        f"preprocess ({meta['split']['kind']} split): examples {meta['rows']}, "
        f"retrieval pairs {meta['pairs']}, {meta['seconds']} s {meta['phase_seconds']}\n"
        f"{validation.summary()}"
    )


def _trained(run: RunLayout, kind: str, stage: str) -> str:
    """Track the new artifact of ``kind`` in MLflow; a one-line summary."""
    from feedrec.artifacts import load_artifact
    from feedrec.tracking import ExperimentTracker

    artifact = load_artifact(run.model(kind))
    run_id = ExperimentTracker(run.root).log_training(artifact, data_root=run.data)
    last = artifact.metadata["history"][-1]
    valid = {
        k.removeprefix("valid_"): round(v, 4) for k, v in last.items() if k.startswith("valid")
    }
    return (
        f"{stage} {kind}: {artifact.metadata['train_seconds']} s, "
        f"{last['samples_per_s_per_worker']:.0f} samples/s/worker, last epoch {valid}; "
        f"MLflow run {run_id}"
    )


def _training_data(run: RunLayout) -> Any:
    from feedrec.data import PreprocessLayout

    data = PreprocessLayout(run.data)
    if not data.meta.exists():
        raise FileNotFoundError(f"no preprocessed data in {run.data}: run `feedrec preprocess`")
    return data


def train(
    run: RunLayout,
    kind: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
) -> str:
    """``overrides``: TrainConfig fields, and model config fields prefixed ``model.``."""
    from feedrec.runtime import init_ray
    from feedrec.training.config import PRESETS
    from feedrec.training.trainer import train_model
    from feedrec.training.tuning import split_params

    data = _training_data(run)
    train_fields, model_fields = split_params(overrides or {})
    cfg = PRESETS[run_preset(run, preset)][kind].with_overrides(**train_fields)  # type: ignore[index]
    init_ray(ray_address)
    train_model(
        cfg, data, run.model(kind), storage_dir=run.ray_results, model_overrides=model_fields
    )
    return _trained(run, kind, "train")


def tune(
    run: RunLayout,
    kind: str,
    preset: str | None = None,
    options: dict[str, Any] | None = None,
    ray_address: str | None = None,
) -> str:
    """Ray Tune (ASHA) over the distributed trainer; the best trial becomes the model artifact.

    ``options``: TuneConfig fields (num_samples, max_epochs, ...).
    """
    from feedrec.runtime import init_ray
    from feedrec.training.config import PRESETS
    from feedrec.training.tuning import TuneConfig, tune_model

    data = _training_data(run)
    tune_cfg = TuneConfig(model=kind, **(options or {}))  # type: ignore[arg-type]
    base = PRESETS[run_preset(run, preset)][kind]  # type: ignore[index]
    init_ray(ray_address)
    tune_model(tune_cfg, base, data, run.model(kind), storage_dir=run.ray_results)
    return _trained(run, kind, "tune")


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


def data_snapshot(run: RunLayout) -> dict[str, Any]:
    """What a model was trained on: world config, log days and the preprocess output's meta
    (sha256 of each file), so a registered version names its data exactly."""
    import hashlib

    def sha(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    logs = run.world / "logs"
    days = sorted(int(p.name.split("=", 1)[1]) for p in logs.glob("day=*")) if logs.is_dir() else []
    return {
        "run_dir": str(run.root.resolve()),
        "world_json_sha256": sha(run.world / "world.json"),
        "log_days": days,
        "preprocess_meta_sha256": sha(run.data / "meta.json"),
    }


def register_models(run: RunLayout, registry: ModelRegistry) -> dict[str, RegistryEntry]:
    """Register the run's ranker and retrieval artifacts with their evaluation metrics and data
    snapshot -> the new entries by model name (what a caller promotes: not "the newest
    version", which a concurrent registration may have taken)."""
    from feedrec.artifacts.model_registry import flat_metrics

    metrics_path = run.eval / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no {metrics_path}: run `feedrec evaluate` before registering")
    metrics = json.loads(metrics_path.read_text())
    snapshot = data_snapshot(run)
    return {
        name: registry.register(
            name, artifact_dir, metrics=flat_metrics(name, metrics), data_snapshot=snapshot
        )
        for name, artifact_dir in (("ranker", run.ranker), ("retrieval", run.retrieval))
    }


def register(run: RunLayout, registry_dir: Path, promote: bool = False, force: bool = False) -> str:
    """Register the run's ranker and retrieval artifacts (:func:`register_models`); with
    ``promote``, promote both through the gate (a refused gate raises ``RegistryError``)."""
    from feedrec.artifacts.model_registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    lines = []
    for name, entry in register_models(run, registry).items():
        line = f"registered {entry.label} ({entry.artifact_version})"
        if promote:
            done = registry.promote(name, entry.version, force=force)
            line += f"; promoted (was v{done.previous})" if done.previous else "; promoted"
        lines.append(line)
    return "\n".join(lines)


def retrain(
    run: RunLayout,
    registry_dir: Path,
    *,
    append_days: int = 0,
    drift: float = 0.0,
    seed: int = 0,
    promote: bool = True,
    force: bool = False,
    warm_start: bool = False,
    ray_address: str | None = None,
    echo: Echo = print,
) -> str:
    """Continual training, one round: (optionally simulate ``append_days`` new log days with
    ``drift``) -> preprocess (the newest day becomes the test day) -> train both models, from
    scratch or (``warm_start``) from the production versions with their rows remapped to the
    new vocabularies -> evaluate -> index -> register; then evaluate the production models on
    the same test day and promote each new model whose metrics pass the gate against them.

    Serving that watches the registry picks promoted versions up without a restart."""
    from feedrec.artifacts.model_registry import ModelRegistry, flat_metrics
    from feedrec.evaluation.evaluate import EvaluationConfig
    from feedrec.evaluation.evaluate import evaluate as run_evaluation

    registry = ModelRegistry(registry_dir)
    starts: dict[str, dict[str, Any]] = {"ranker": {}, "two_tower": {}}
    if warm_start:
        for kind, name in (("ranker", "ranker"), ("two_tower", "retrieval")):
            production = registry.production(name)
            if production is None:
                echo(f"{kind}: no production {name} to warm-start from; training from scratch")
            else:
                starts[kind] = {"warm_start": str(production.path)}
                echo(f"{kind}: warm start from {production.label}")
    if append_days:
        from feedrec.world.generator import append_days as simulate_days

        simulate_days(run.world, n_days=append_days, drift=drift, seed=seed)
        echo(f"appended {append_days} log day(s), drift {drift}")
    for label, step in (
        ("preprocess", lambda: preprocess(run, ray_address)),
        ("train ranker", lambda: train(run, "ranker", None, starts["ranker"], ray_address)),
        (
            "train two_tower",
            lambda: train(run, "two_tower", None, starts["two_tower"], ray_address),
        ),
        ("evaluate", lambda: evaluate(run)),
        ("index", lambda: index(run)),
    ):
        echo(f"==> {label}")
        echo(step())
    champion = {name: registry.production(name) for name in ("ranker", "retrieval")}
    baseline: dict[str, dict[str, float]] = {}
    if champion["ranker"] is not None and champion["retrieval"] is not None:
        echo("==> evaluate production on the same test day")
        metrics = run_evaluation(
            EvaluationConfig(
                world_dir=run.world,
                data_dir=run.data,
                ranker_dir=champion["ranker"].path,
                two_tower_dir=champion["retrieval"].path,
                out_dir=run.root / "eval_production",
            )
        )
        baseline = {name: flat_metrics(name, metrics) for name in ("ranker", "retrieval")}
    entries = register_models(run, registry)
    lines = [f"registered {e.label} ({e.artifact_version})" for e in entries.values()]
    if promote:
        from feedrec.artifacts.model_registry import RegistryError

        for name, entry in entries.items():
            try:
                done = registry.promote(
                    name, entry.version, force=force, baseline=baseline.get(name)
                )
                lines.append(f"{name}: production v{done.previous} -> v{done.version}")
            except RegistryError as e:
                lines.append(f"{name}: kept v{registry.production_version(name)}: {e}")
    return "\n".join(lines)


#: The demo's online experiment, a third of the users each: the trained chain, a popularity
#: ranker, and the trained chain exploring (30 % of its feeds drawn at random from the top 20,
#: with logged propensities: what off-policy evaluation of the next ranker needs).
DEMO_EXPERIMENT = {
    "name": "demo-ranker-vs-popularity",
    "variants": [
        {"name": "control", "weight": 1.0, "policy": "model"},
        {"name": "popularity", "weight": 1.0, "policy": "popularity"},
        {
            "name": "explore",
            "weight": 1.0,
            "policy": "model",
            "exploration": {"epsilon": 0.3, "pool_size": 20},
        },
    ],
}


def online_experiment(run: RunLayout, url: str, duration_s: float, users: int = 0) -> str:
    """Simulated users on the live service at ``url`` for ``duration_s``, their events
    compacted by the sink, then the experiment report (``run/experiment/report.md``) and the
    off-policy evaluation of the trained ranker from the exploring arm
    (``run/experiment/ope/ope.md``)."""
    import pyarrow.parquet as pq

    from feedrec.data import PreprocessLayout
    from feedrec.events.event_log import EventLog
    from feedrec.events.event_sink import EventSink
    from feedrec.experiments.experiment_report import (
        analyse,
        read_exposures,
        write_report,
    )
    from feedrec.experiments.off_policy import evaluate_exposures
    from feedrec.experiments.off_policy import write_report as write_off_policy_report
    from feedrec.experiments.user_simulator import SimulationConfig, UserSimulator
    from feedrec.serving.config import ServiceConfig
    from feedrec.serving.realtime_signals import REPLAY_S

    serving_day = int(PreprocessLayout(run.data).read_meta()["serving_day"])
    cfg = SimulationConfig(duration_s=duration_s, users=users, min_return_s=5.0)
    result = UserSimulator(url, run.world, serving_day, cfg).run(run.root / "simulation")
    sink_job = EventSink(EventLog(run.events), run.world)
    sink = sink_job.run(flush=True)
    # What the sink is done with and a starting replica would not replay: a reused run dir's
    # bus stays bounded instead of growing by every run and benchmark.
    kept_from, dropped = sink_job.retain(REPLAY_S)
    truth = pq.read_table(result.truth_path).to_pandas()
    # One read, of this simulation's feeds only: the A/B report and OPE share it.
    exposures = read_exposures(run.world, request_ids=truth["request_id"].unique())
    report = analyse(exposures, session_gap_s=2.5, truth=truth)
    path = write_report(report, run.root / "experiment")
    ope = evaluate_exposures(
        exposures,
        world_dir=run.world,
        data_dir=run.data,
        candidates={"trained": run.ranker},
        rules=ServiceConfig.from_run(run.root).rerank_config(),
        variant="explore",
        simulation_dir=run.root / "simulation",
    )
    ope_path = write_off_policy_report(ope, run.root / "experiment" / "ope")
    lines = [result.summary(), sink.summary()]
    hours = REPLAY_S / 3600
    lines.append(f"bus retention: kept seq {kept_from} on ({hours:g} h), dropped {dropped} files")
    for lift in report.lifts:
        if lift.metric in ("engagement_rate", "like_rate", "hide_rate"):
            low, high = lift.ci
            lines.append(
                f"{lift.variant} vs {lift.baseline} {lift.metric}: {lift.diff:+.4f} "
                f"[{low:+.4f}, {high:+.4f}] p={lift.p_value:.2g}, ground truth {lift.truth:+.4f}"
            )
    lines.append(f"report: {path}")
    for p in ope.policies:
        low, high = p.ips.ci
        lines.append(
            f"off-policy {p.name} from {ope.feeds} explore feeds: IPS {p.ips.value:.3f} "
            f"[{low:.3f}, {high:.3f}] engagements per feed, ground truth {p.truth:.3f}"
        )
    lines.append(f"off-policy report: {ope_path}")
    return "\n".join(lines)


def run_demo(
    *,
    preset: str,
    run_dir: Path,
    port: int,
    n_feeds: int,
    experiment_s: float = 60.0,
    echo: Echo = print,
) -> dict[str, float]:
    """Every stage on ``preset``, then a few feeds over HTTP and ``experiment_s`` of simulated
    users in an A/B of the trained ranker against popularity; stops what it started.

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
    overrides = {"experiment": DEMO_EXPERIMENT}
    config = StackConfig(run_dir=run.root, http_port=port, service_overrides=overrides)
    with ServingStack(config) as stack:
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
        stage(
            "online experiment: simulated users; ranker vs popularity vs exploring; OPE",
            lambda: online_experiment(run, stack.url, duration_s=experiment_s),
        )
    ray.shutdown()
    seconds["total"] = round(sum(seconds.values()), 1)
    echo(f"stage wall seconds: {seconds}")
    return seconds
