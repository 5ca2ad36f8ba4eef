"""``feedrec``: the command line. Thin: each command parses options and calls the library.

Every stage reads and writes one run directory (``--run-dir``, default ``runs/default``)::

    feedrec generate --preset small     # synthetic world -> runs/default/world
    feedrec preprocess                  # Ray Data -> runs/default/data
    feedrec train all                   # Ray Train + TorchRec -> runs/default/models/
    feedrec tune ranker --samples 4     # Ray Tune (ASHA); the best trial -> models/ranker
    feedrec evaluate                    # metrics.json + report.html -> runs/default/eval
    feedrec index                       # faiss over the item tower -> models/retrieval
    feedrec serve up                    # Triton + Ray Serve on 127.0.0.1:8000 (background)
    feedrec feed --user-id 42           # ask the service for a feed
    feedrec serve down
    feedrec models register --promote   # ranker + retrieval -> registry/ (gated promotion)
    feedrec serve up --registry registry  # serve production, follow promotions / rollbacks
    feedrec world append --drift 0.6    # the synthetic world's next day, interests drifted
    feedrec drift                       # PSI / KS train vs test day -> drift.{json,html,prom}
    feedrec retrain --registry registry # new days -> train -> evaluate -> register -> promote
    feedrec simulate --duration-s 120   # simulated users use the live service, send events
    feedrec events sink --flush         # event bus -> logs/day=D/ + live/exposures (exactly once)
    feedrec experiments report          # per-variant metrics, lifts with CIs, ground truth
    feedrec experiments ope             # off-policy value of candidate rankers (IPS/SNIPS)
    feedrec experiments shadow          # shadow model vs served: overlap, kept vs dropped
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_RUN_DIR = Path("runs/default")
#: World and training presets (the same names in both; a unit test keeps them in step).
PRESET_NAMES = ("debug", "small", "posts_1m", "large", "large_tables")


def _run(run_dir: Path) -> Any:
    from feedrec.runtime.run_layout import RunLayout

    return RunLayout(Path(run_dir))


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _stage(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run a pipeline stage; turn bad input into a CLI error with the stage's own message, which
    names the bad field or file. (Not blamed on ``--set``: a stage's ValueError may come from
    its data or from a check after training, as well as from an override.)"""
    try:
        click.echo(fn(*args, **kwargs))
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from e


run_dir_option = click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="Directory holding every stage's outputs for this run.",
)
ray_option = click.option(
    "--ray-address",
    default=None,
    envvar="RAY_ADDRESS",
    help="Ray cluster to use (default: start a local one on 127.0.0.1).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """feedrec: train and serve a personalized feed of suggested posts, end to end on Ray.

    Stages run in order (generate, preprocess, train, evaluate, index, serve) and share a run
    directory. `feedrec demo` runs them all.
    """


@main.command()
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="small", show_default=True)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a world field, e.g. --set n_users=5000 --set seed=3.",
)
@run_dir_option
def generate(preset: str, overrides: tuple[str, ...], run_dir: Path) -> None:
    """Generate the synthetic world: entities, follows, day-partitioned impression logs."""
    from feedrec import pipeline

    _run(run_dir).root.mkdir(parents=True, exist_ok=True)
    _stage(pipeline.generate, _run(run_dir), preset, _parse_overrides(overrides))


def _parse_ratios(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(part) for part in value.split(":"))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or not all(0 < r < float("inf") for r in ratios):
        raise click.BadParameter(f"expected TRAIN:VALID:TEST shares > 0, got {value!r}")
    return ratios


@main.command()
@run_dir_option
@click.option(
    "--split",
    type=click.Choice(["time", "random"]),
    default="time",
    show_default=True,
    help="Evaluation protocol: hold out the last days (time), or a random share of each "
    "user's interactions (random).",
)
@click.option(
    "--ratios",
    default="8:1:1",
    show_default=True,
    callback=_parse_ratios,
    metavar="TRAIN:VALID:TEST",
    help="--split random: shares of each user's interactions.",
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(min=0), help="--split random: seed."
)
@click.option(
    "--valid-days",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="--split time: validation days.",
)
@click.option(
    "--test-days",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="--split time: test days.",
)
@click.option(
    "--join-memory-mb",
    default=512,
    show_default=True,
    type=click.IntRange(min=0),
    help="Per-day feature statistics the join keeps in the object store at once; logged days "
    "are joined in groups that fit (0: one day per pass).",
)
@ray_option
def preprocess(
    run_dir: Path,
    split: str,
    ratios: tuple[float, ...],
    seed: int,
    valid_days: int,
    test_days: int,
    join_memory_mb: int,
    ray_address: str | None,
) -> None:
    """Ray Data: point-in-time features, vocabularies, time or random split, training examples."""
    from feedrec import pipeline

    ctx = click.get_current_context()
    other = ("valid_days", "test_days") if split == "random" else ("ratios", "seed")
    given = [
        n for n in other if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        other_split = "time" if split == "random" else "random"
        raise click.UsageError(f"{flags}: only with --split {other_split}")
    options: dict[str, Any] = {
        "split": split,
        "ratios": ratios,
        "seed": seed,
        "valid_days": valid_days,
        "test_days": test_days,
        "join_memory_mb": join_memory_mb,
    }
    _stage(pipeline.preprocess, _run(run_dir), ray_address, options)


@main.command()
@click.argument("model", type=click.Choice(["ranker", "two_tower", "all"]))
@click.option(
    "--preset",
    type=click.Choice(PRESET_NAMES),
    default=None,
    help="Training preset (default: the run's world preset).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="A TrainConfig field (--set epochs=3) or model field (--set model.num_experts=6).",
)
@run_dir_option
@ray_option
def train(
    model: str,
    preset: str | None,
    overrides: tuple[str, ...],
    run_dir: Path,
    ray_address: str | None,
) -> None:
    """Ray Train + TorchRec (DMP, sharded tables): the ranker, the two-tower model, or both."""
    from feedrec import pipeline

    for kind in ["ranker", "two_tower"] if model == "all" else [model]:
        _stage(
            pipeline.train, _run(run_dir), kind, preset, _parse_overrides(overrides), ray_address
        )


@main.command()
@click.argument("model", type=click.Choice(["ranker", "retrieval"]))
@click.option(
    "--preset", type=click.Choice(PRESET_NAMES), default=None, help="Base training preset."
)
@click.option("--samples", type=int, default=4, show_default=True, help="Trials to run.")
@click.option(
    "--max-epochs", type=int, default=2, show_default=True, help="Epochs of a full trial."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a TuneConfig field, e.g. --set grace_period=1 --set metric=valid_loss.",
)
@run_dir_option
@ray_option
def tune(
    model: str,
    preset: str | None,
    samples: int,
    max_epochs: int,
    overrides: tuple[str, ...],
    run_dir: Path,
    ray_address: str | None,
) -> None:
    """Ray Tune (ASHA) over the distributed trainer; the best trial becomes the model artifact."""
    from feedrec import pipeline

    kind = "ranker" if model == "ranker" else "two_tower"
    options = {"num_samples": samples, "max_epochs": max_epochs, **_parse_overrides(overrides)}
    _stage(pipeline.tune, _run(run_dir), kind, preset, options, ray_address)


@main.command()
@run_dir_option
def evaluate(run_dir: Path) -> None:
    """Test-day metrics (model vs oracle vs popularity) -> metrics.json + report.html."""
    from feedrec import pipeline

    _stage(pipeline.evaluate, _run(run_dir))


@main.command()
@run_dir_option
def index(run_dir: Path) -> None:
    """Embed every eligible post with the item tower and build the faiss index."""
    from feedrec import pipeline

    _stage(pipeline.index, _run(run_dir))


DEFAULT_REGISTRY = Path("registry")
registry_option = click.option(
    "--registry",
    "registry_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_REGISTRY,
    envvar="FEEDREC_REGISTRY",
    show_default=True,
    help="Model registry root (versions + production pointers); serving can watch it.",
)
#: The registry's model names (``model_registry.MODEL_NAMES``; not imported, so the CLI starts
#: without loading the model code).
MODEL_NAME = click.Choice(["ranker", "retrieval"])
model_name_argument = click.argument("name", type=MODEL_NAME)


def _registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Registry and artifact errors are the user's to fix: exit 2 with the reason."""
    from feedrec.artifacts import ArtifactError
    from feedrec.artifacts.model_registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, ArtifactError, FileNotFoundError) as e:
        click.echo(f"Error: {e}", err=True)
        click.get_current_context().exit(2)


@main.group()
def models() -> None:
    """The model registry: register a run's models, list, promote (gated), roll back."""


@models.command("register")
@run_dir_option
@registry_option
@click.option("--promote", is_flag=True, help="Also promote both models through the gate.")
@click.option("--force", is_flag=True, help="With --promote: promote even if the gate fails.")
def models_register(run_dir: Path, registry_dir: Path, promote: bool, force: bool) -> None:
    """Copy the run's ranker and retrieval artifacts (verified) in as new versions."""
    from feedrec import pipeline

    click.echo(_registry_call(pipeline.register, _run(run_dir), registry_dir, promote, force))


@models.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(registry_dir: Path, as_json: bool) -> None:
    """Every registered version; * marks production, ~ the shadow ranker."""
    from feedrec.artifacts.model_registry import MODEL_NAMES, ModelRegistry

    registry = ModelRegistry(registry_dir)
    rows = [(e, live) for name in MODEL_NAMES for e, live in registry.list(name)]
    shadow = {name: registry.shadow_version(name) for name in MODEL_NAMES}
    if as_json:
        listed = [
            {**e.to_dict(), "production": live, "shadow": shadow[e.name] == e.version}
            for e, live in rows
        ]
        click.echo(json.dumps(listed, indent=2))
        return
    if not rows:
        click.echo(f"no models registered in {registry.root}")
    for e, live in rows:
        headline = {k: v for k, v in e.metrics.items() if k.startswith(("auc.like", "recall@100"))}
        registered = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.registered_unix))
        mark = "*" if live else "~" if shadow[e.name] == e.version else " "
        click.echo(
            f"{mark} {e.label:<14} {e.artifact_version:<24} {registered} UTC  "
            + "  ".join(f"{k}={v:.4f}" for k, v in headline.items())
        )


@models.command("promote")
@model_name_argument
@click.argument("version", type=click.IntRange(min=1))
@registry_option
@click.option("--force", is_flag=True, help="Promote even if the metric gate fails.")
@click.option(
    "--max-relative-drop",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.01,
    show_default=True,
    help="Gate: how far AUC/recall may fall (and logloss rise) relative to production.",
)
def models_promote(
    name: str, version: int, registry_dir: Path, force: bool, max_relative_drop: float
) -> None:
    """Make VERSION production if its offline metrics do not regress beyond the gate."""
    from feedrec.artifacts.model_registry import ModelRegistry, PromotionGate

    done = _registry_call(
        ModelRegistry(registry_dir).promote,
        name,
        version,
        gate=PromotionGate(max_relative_drop=max_relative_drop),
        force=force,
    )
    for line in done.gate_failures:
        click.echo(f"gate overridden (--force): {line}", err=True)
    click.echo(f"{name}: production v{done.previous} -> v{done.version}")


@models.command("shadow")
@click.argument("version", type=click.IntRange(min=1), required=False)
@registry_option
@click.option("--clear", is_flag=True, help="Stop shadow traffic.")
@click.option(
    "--model",
    "name",
    type=MODEL_NAME,
    default="ranker",
    show_default=True,
    help="ranker: VERSION re-ranks the served candidates; retrieval: VERSION's candidates are "
    "ranked and re-ranked as served ones are.",
)
def models_shadow(version: int | None, registry_dir: Path, clear: bool, name: str) -> None:
    """Run a share of served requests through VERSION too, without showing its feeds (shadow
    traffic: logged as shadow records); --clear stops it."""
    from feedrec.artifacts.model_registry import ModelRegistry

    if (version is None) != clear:
        raise click.UsageError("give a VERSION or --clear, not both or neither")
    previous = _registry_call(ModelRegistry(registry_dir).set_shadow, name, version)
    before = "none" if previous is None else f"v{previous}"
    click.echo(f"{name}: shadow {before} -> {'none' if version is None else f'v{version}'}")


@models.command("rollback")
@model_name_argument
@registry_option
def models_rollback(name: str, registry_dir: Path) -> None:
    """Production goes back to the previously promoted version."""
    from feedrec.artifacts.model_registry import ModelRegistry

    done = _registry_call(ModelRegistry(registry_dir).rollback, name)
    click.echo(f"{name}: production v{done.previous} -> v{done.version} (rolled back)")


@main.command()
@run_dir_option
@registry_option
@click.option(
    "--append-days",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First simulate this many new log days (synthetic worlds: the generator's next days).",
)
@click.option(
    "--drift",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="With --append-days: share of each user's interests redrawn.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-promote", is_flag=True, help="Register only; promote later by hand.")
@click.option("--force", is_flag=True, help="Promote even if the metric gate fails.")
@click.option(
    "--warm-start",
    is_flag=True,
    help="Start both models from the production versions (embedding rows remapped to the new "
    "vocabularies) instead of from scratch.",
)
@ray_option
def retrain(
    run_dir: Path,
    registry_dir: Path,
    append_days: int,
    drift: float,
    seed: int,
    no_promote: bool,
    force: bool,
    warm_start: bool,
    ray_address: str | None,
) -> None:
    """New log days -> preprocess -> train -> evaluate -> index -> register -> gated promote."""
    from feedrec import pipeline

    click.echo(
        _registry_call(
            pipeline.retrain,
            _run(run_dir),
            registry_dir,
            append_days=append_days,
            drift=drift,
            seed=seed,
            promote=not no_promote,
            force=force,
            warm_start=warm_start,
            ray_address=ray_address,
            echo=click.echo,
        )
    )


@main.group()
def serve() -> None:
    """Run the feed service: Triton (ranker) + Ray Serve (ingress, retrieval, re-ranking)."""


def _serve_files(run_dir: Path) -> tuple[Path, Path]:
    serve_dir = _run(run_dir).serve
    return serve_dir / "stack.pid", serve_dir / "stack.log"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


serve_registry_option = click.option(
    "--registry",
    "registry_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Serve this model registry's production versions and follow promotions/rollbacks "
    "(default: the run's models, fixed).",
)


def _check_feature_store(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is not None:
        from feedrec.serving.redis_feature_source import parse_location

        try:
            parse_location(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
    return value


serve_feature_store_option = click.option(
    "--feature-store",
    default=None,
    callback=_check_feature_store,
    help="Read the online features from Redis: redis://host:port/db[?prefix=NAME], filled by "
    "`feedrec features publish` (default: embedded in each replica).",
)


def _check_serve_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Any:
    if value is None:
        return None
    from feedrec.serving.config import deployment_options
    from feedrec.serving.stack import APP_NAME

    try:
        deployment_options(value, APP_NAME)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    return value


serve_config_option = click.option(
    "--serve-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    callback=_check_serve_config,
    help="The serve deploy YAML whose per-deployment options (autoscaling, ...) apply "
    "(default: apps/feed_service/serve_config.yaml; on a cluster: serve_config.cluster.yaml).",
)


@serve.command("run")
@run_dir_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@serve_registry_option
@serve_feature_store_option
@serve_config_option
@ray_option
def serve_run(
    run_dir: Path,
    host: str,
    port: int,
    registry_dir: Path | None,
    feature_store: str | None,
    serve_config: Path | None,
    ray_address: str | None,
) -> None:
    """Run the stack in the foreground until SIGINT/SIGTERM."""
    from feedrec.serving.stack import ServingStack, StackConfig

    overrides = {} if feature_store is None else {"feature_store": feature_store}
    config = StackConfig(
        run_dir=run_dir,
        http_host=host,
        http_port=port,
        ray_address=ray_address,
        registry=registry_dir,
        service_overrides=overrides,
    )
    if serve_config is not None:
        config = dataclasses.replace(config, serve_config=serve_config.resolve())
    stack = ServingStack(config)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    with stack:
        # Installed after start: ray.init replaces the SIGTERM handler of the driver.
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        click.echo(f"feed service ready at {stack.url}", err=True)
        while not stopping:
            time.sleep(0.5)


@serve.command("up")
@run_dir_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for health.")
@serve_registry_option
@serve_feature_store_option
@serve_config_option
@ray_option
def serve_up(
    run_dir: Path,
    host: str,
    port: int,
    timeout: float,
    registry_dir: Path | None,
    feature_store: str | None,
    serve_config: Path | None,
    ray_address: str | None,
) -> None:
    """Start the stack in the background (PID file in <run>/serve) and wait until healthy."""
    import httpx

    pid_file, log_file = _serve_files(run_dir)
    if pid_file.exists() and _pid_alive(int(pid_file.read_text())):
        raise click.UsageError(f"already running (pid {pid_file.read_text()}); `serve down` first")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "feedrec.cli",
        "serve",
        "run",
        "--run-dir",
        str(run_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    if registry_dir:
        cmd += ["--registry", str(registry_dir)]
    if feature_store:
        cmd += ["--feature-store", feature_store]
    if serve_config:
        cmd += ["--serve-config", str(serve_config.resolve())]
    with log_file.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            tail = log_file.read_text(errors="replace").splitlines()[-30:]
            raise click.ClickException("serving stack exited:\n" + "\n".join(tail))
        try:
            if httpx.get(f"http://{host}:{port}/healthz", timeout=2).status_code == 200:
                click.echo(f"feed service up at http://{host}:{port} (pid {proc.pid})")
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    raise click.ClickException(f"not healthy after {timeout:.0f} s; see {log_file}")


@serve.command("down")
@run_dir_option
@click.option("--timeout", default=60.0, show_default=True)
def serve_down(run_dir: Path, timeout: float) -> None:
    """Stop the background stack started by `serve up` (by its PID)."""
    pid_file, _ = _serve_files(run_dir)
    if not pid_file.exists():
        click.echo("not running")
        return
    pid = int(pid_file.read_text())
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)  # its own session: the local Ray processes too
    # Triton runs in a session of its own; if the stack could not stop it, do it here.
    triton_pid = pid_file.with_name("triton.pid")
    if triton_pid.exists():
        tpid = int(triton_pid.read_text())
        if _pid_alive(tpid):
            os.kill(tpid, signal.SIGTERM)
        triton_pid.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    click.echo(f"stopped (pid {pid})")


@serve.command("status")
@run_dir_option
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
def serve_status(run_dir: Path, url: str) -> None:
    """Is the stack running and healthy?"""
    import httpx

    pid_file, _ = _serve_files(run_dir)
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    alive = pid is not None and _pid_alive(pid)
    try:
        healthy = httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        healthy = False
    click.echo(json.dumps({"pid": pid, "running": alive, "healthy": healthy, "url": url}))
    if not healthy:
        sys.exit(1)


@main.command()
@click.option("--user-id", type=int, required=True)
@click.option("--count", type=int, default=10, show_default=True)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--debug", is_flag=True, help="Ask for per-stage timings.")
def feed(user_id: int, count: int, url: str, debug: bool) -> None:
    """Fetch a feed from the running service and print it."""
    import httpx

    from feedrec.serving.feed_client import format_feed

    body = {"user_id": user_id, "count": count, "debug": debug}
    try:
        resp = httpx.post(f"{url}/v1/feed", json=body, timeout=30)
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach {url}: {e}") from e
    if resp.status_code != 200:
        raise click.ClickException(f"HTTP {resp.status_code}: {resp.text}")
    click.echo(format_feed(resp.json()))


@main.command()
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="small", show_default=True)
@click.option(
    "--run-dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--users", default=3, show_default=True, help="How many sample feeds to fetch.")
@click.option(
    "--experiment-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Seconds of simulated users in the online experiment (trained ranker, popularity, "
    "exploring ranker; then off-policy evaluation).",
)
def demo(preset: str, run_dir: Path, port: int, users: int, experiment_s: float) -> None:
    """Every stage (generate .. serve) on a preset, sample feeds over HTTP, then an online
    A/B with simulated users whose events flow back through the event bus."""
    from feedrec.pipeline import run_demo

    run_demo(
        preset=preset,
        run_dir=run_dir,
        port=port,
        n_feeds=users,
        experiment_s=experiment_s,
        echo=click.echo,
    )


# ---------------------------------------------------------------------------------------------
# Bring your own logs: `feedrec logs import` (library: feedrec.data.log_import)
# ---------------------------------------------------------------------------------------------


def _parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``("a=x,b=y", "c=z")`` -> ``{"a": "x", "b": "y", "c": "z"}``; a key may appear once."""
    out: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            key, sep, column = (part.strip() for part in pair.partition("="))
            if not sep or not key or not column:
                raise click.BadParameter(f"expected TARGET=COLUMN, got {pair!r}", param_hint=option)
            if key in out:
                raise click.BadParameter(f"{key} given twice", param_hint=option)
            out[key] = column
    return out


def _parse_map(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    return _parse_pairs(values, "--map")


def _parse_thresholds(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    out: dict[str, float] = {}
    for key, value in _parse_pairs(values, "--threshold").items():
        try:
            out[key] = float(value)
        except ValueError as e:
            raise click.BadParameter(
                f"{key}: {value!r} is not a number", param_hint="--threshold"
            ) from e
    return out


@main.group()
def logs() -> None:
    """Bring your own interaction logs (CSV or Parquet) instead of the synthetic world."""


@logs.command("import")
@click.option(
    "--path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="A file, or a directory whose --format files are read in sorted order.",
)
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), required=True)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    required=True,
    callback=_parse_map,
    metavar="TARGET=COLUMN[,...]",
    help="Source columns of user_id, item_id, timestamp (required) and optionally label (= like), "
    "view, like, comment, share, hide, dwell. E.g. user_id=userId,item_id=movieId,"
    "timestamp=timestamp,label=rating.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="World directory to write: RUN_DIR/world, then `feedrec preprocess --run-dir RUN_DIR`.",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    callback=_parse_thresholds,
    metavar="LABEL=VALUE",
    help="A binary label is 1 where its column is >= VALUE (default 1), e.g. label=4 for "
    "5-star ratings.",
)
@click.option(
    "--timestamp-unit",
    type=click.Choice(["s", "ms", "us", "ns"]),
    default="s",
    show_default=True,
    help="Unit of numeric timestamps since the Unix epoch (text may also be ISO 8601).",
)
@click.option(
    "--day-seconds",
    type=click.FloatRange(min=1.0),
    default=86_400.0,
    show_default=True,
    help="Length of one day of the layout (longer days: smaller feature tables for long logs).",
)
@click.option(
    "--delimiter", default=",", show_default=True, help="CSV field delimiter (\\t for tab)."
)
@click.option(
    "--max-days",
    type=click.IntRange(min=4),
    default=3660,
    show_default=True,
    help="Refuse logs spanning more days (usually a wrong --timestamp-unit).",
)
@click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Write bad rows to OUT.quarantine.parquet next to --out and import the rest.",
)
@click.option("--overwrite", is_flag=True, help="Replace a world already in --out.")
def logs_import(
    path: Path,
    fmt: str,
    mapping: dict[str, str],
    out: Path,
    thresholds: dict[str, float],
    timestamp_unit: str,
    day_seconds: float,
    delimiter: str,
    max_days: int,
    skip_bad_rows: bool,
    overwrite: bool,
) -> None:
    """Import an interaction log into the layout of a world (exit status 2 on bad input)."""
    from feedrec.data.log_import import ImportSpec, LogImportError, import_logs

    try:
        spec = ImportSpec(
            path=path,
            format=fmt,  # type: ignore[arg-type]
            columns=mapping,
            out_dir=out,
            thresholds=thresholds,
            timestamp_unit=timestamp_unit,  # type: ignore[arg-type]
            day_seconds=day_seconds,
            delimiter="\t" if delimiter == "\\t" else delimiter,
            skip_bad_rows=skip_bad_rows,
            overwrite=overwrite,
            max_days=max_days,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        result = import_logs(spec)
    except LogImportError as e:
        click.echo(f"Error: {e}", err=True)
        click.get_current_context().exit(2)
    except (FileExistsError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from e
    click.echo(result.summary())


# ---------------------------------------------------------------------------------------------
# Operations: drifted days (`feedrec world append`) and drift detection (`feedrec drift`)
# (library: feedrec.world.generator.append_days, feedrec.monitoring.drift)
# ---------------------------------------------------------------------------------------------

#: Exit status of `feedrec drift` when a feature crosses the alert threshold.
DRIFT_ALERT_EXIT = 3


@main.group()
def world() -> None:
    """Change a generated world in place (then re-run `feedrec preprocess`)."""


@world.command("append")
@run_dir_option
@click.option("--days", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--drift",
    "drift_share",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Share of each user's topic interests replaced by a fresh draw (0: no drift).",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
def world_append(run_dir: Path, days: int, drift_share: float, seed: int) -> None:
    """Simulate more days after the world's last one, with drifted user interests."""
    from feedrec.world.generator import append_days, load_world_config

    world_dir = _run(run_dir).world
    started = time.perf_counter()
    try:
        layout = append_days(world_dir, days, drift_share, seed, progress=True)
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    n_days = load_world_config(layout).n_days
    click.echo(
        f"world: appended days {n_days - days}..{n_days - 1} (drift {drift_share}) in "
        f"{time.perf_counter() - started:.1f} s; now {n_days} days. "
        f"Next: feedrec preprocess --run-dir {run_dir}"
    )


@main.command()
@run_dir_option
@click.option(
    "--ranker-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Ranker artifact whose predictions are compared too [default: RUN_DIR/models/ranker "
    "if it exists].",
)
@click.option("--no-predictions", is_flag=True, help="Compare features only.")
@click.option(
    "--reference-run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Run whose preprocessed examples are the reference [default: RUN_DIR].",
)
@click.option(
    "--reference-split",
    type=click.Choice(["train", "valid", "test"]),
    default="train",
    show_default=True,
)
@click.option(
    "--reference-days",
    type=click.IntRange(min=1),
    default=None,
    help="The last N days of the reference split [default: its days with full feature windows].",
)
@click.option(
    "--recent-split",
    type=click.Choice(["train", "valid", "test"]),
    default="test",
    show_default=True,
)
@click.option(
    "--recent-days",
    type=click.IntRange(min=1),
    default=None,
    help="The last N days of the recent split [default: all].",
)
@click.option("--psi-warn", default=0.1, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--psi-alert", default=0.2, show_default=True, type=click.FloatRange(min=0.0))
@click.option(
    "--ks-alert",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Also alert when the KS statistic reaches this [default: KS is reported only].",
)
@click.option("--max-rows", default=20_000, show_default=True, type=click.IntRange(min=100))
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where drift.json and drift.html go [default: RUN_DIR/drift].",
)
def drift(
    run_dir: Path,
    ranker_dir: Path | None,
    no_predictions: bool,
    reference_run_dir: Path | None,
    reference_split: str,
    reference_days: int | None,
    recent_split: str,
    recent_days: int | None,
    psi_warn: float,
    psi_alert: float,
    ks_alert: float | None,
    max_rows: int,
    out_dir: Path | None,
) -> None:
    """PSI / KS drift of features and ranker predictions, training time vs recent days.

    Writes drift.json + drift.html; exit status 3 when a feature crosses the alert threshold.
    """
    from feedrec.monitoring.drift import DriftConfig, DriftJob, run_drift

    run = _run(run_dir)
    if ranker_dir is not None and no_predictions:
        raise click.UsageError("--ranker-dir and --no-predictions exclude each other")
    if ranker_dir is None and not no_predictions and run.ranker.exists():
        ranker_dir = run.ranker
    try:
        job = DriftJob(
            data_dir=run.data,
            out_dir=out_dir or run.root / "drift",
            ranker_dir=ranker_dir,
            reference_data_dir=_run(reference_run_dir).data if reference_run_dir else None,
            reference_split=reference_split,
            recent_split=recent_split,
            reference_days=reference_days,
            recent_days=recent_days,
            max_rows=max_rows,
            stats=DriftConfig(psi_warn=psi_warn, psi_alert=psi_alert, ks_alert=ks_alert),
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    started = time.perf_counter()
    try:
        result = run_drift(job)
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    click.echo(result.summary())
    click.echo(f"report: {job.out_dir / 'drift.html'} ({time.perf_counter() - started:.1f} s)")
    if result.alerts:
        click.echo(f"DRIFT ALERT: {', '.join(result.alerts)}", err=True)
        click.get_current_context().exit(DRIFT_ALERT_EXIT)


# ---------------------------------------------------------------------------------------------
# Capacity planning: `feedrec capacity` (library: feedrec.planning.capacity_plan)
# ---------------------------------------------------------------------------------------------


@main.command()
@click.option("--dau", type=click.IntRange(min=1), default=None, help="Daily active users.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Change an assumption (the list is in the written document), e.g. --set "
    "peak_to_average=3 --set index_posts=1e10.",
)
@click.option(
    "--bench-dir",
    type=click.Path(path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="Measured per-replica numbers: serve.json (incl. its ann section) and train.json.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("docs/capacity.md"), show_default=True
)
def capacity(dau: int | None, overrides: tuple[str, ...], bench_dir: Path, out: Path) -> None:
    """Capacity plan for a target DAU from the measured benchmarks and stated assumptions."""
    from feedrec.planning.capacity_plan import (
        BenchFileError,
        CapacityAssumptions,
        load_measurements,
        plan_capacity,
        write_capacity_doc,
    )

    values = _parse_overrides(overrides)
    if dau is not None:
        if "dau" in values:
            raise click.UsageError("give the DAU once: --dau or --set dau=..., not both")
        values["dau"] = dau
    try:
        assumptions = CapacityAssumptions.from_overrides(values)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--set") from e
    try:
        plan = plan_capacity(assumptions, load_measurements(bench_dir))
    except BenchFileError as e:
        raise click.UsageError(str(e)) from e
    words = ["feedrec capacity", *([f"--dau {dau}"] if dau is not None else [])]
    words += [f"--set {o}" for o in overrides]
    if bench_dir != Path("bench/results"):
        words.append(f"--bench-dir {bench_dir}")
    path = write_capacity_doc(plan, out, command=" ".join(words))
    click.echo(plan.summary())
    click.echo(f"wrote {path}")


@main.group()
def features() -> None:
    """The online feature store of the feed service."""


@features.command("publish")
@run_dir_option
@click.option(
    "--to",
    "url",
    required=True,
    help="The Redis server: redis://[user:password@]host[:port][/db][?prefix=NAME] "
    "(prefix default feedrec:features). Serve replicas read it with feature_store=URL.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Snapshots kept in Redis: older ones are deleted after this one is complete.",
)
def features_publish(run_dir: Path, url: str, keep: int) -> None:
    """Write the serving day's per-entity features (users, posts, creators) of RUN_DIR's
    preprocess output to Redis, as a snapshot of its own: replicas serving the previous one
    are unaffected until they are redeployed."""
    from feedrec.serving.online_store import FeatureStoreError
    from feedrec.serving.redis_feature_source import RedisFeatureSource

    run = _run(run_dir)
    if not run.data.joinpath("meta.json").is_file():
        raise click.BadParameter(
            f"{run.data}: no preprocess output (run `feedrec preprocess`)", param_hint="--run-dir"
        )
    try:
        report = RedisFeatureSource.publish(url, run.data, run.world, keep=keep)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--to") from e
    except FeatureStoreError as e:
        raise click.UsageError(str(e)) from e
    click.echo(
        f"published {report.snapshot}: {report.users} users, {report.posts} posts, "
        f"{report.creators} creators in {report.seconds:.1f} s"
        + (f"; dropped {', '.join(report.dropped)}" if report.dropped else "")
    )


@main.group()
def events() -> None:
    """The event bus of the feed service: served feeds and client events."""


@events.command("sink")
@run_dir_option
@click.option(
    "--bus",
    default=None,
    help="The bus to compact: a directory or redis://host:port/db?stream=NAME "
    "[default: RUN_DIR/events, where `feedrec serve` records].",
)
@click.option(
    "--world-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where logs/ and live/ are written [default: RUN_DIR/world].",
)
@click.option(
    "--window-s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1800.0,
    show_default=True,
    help="Attribution window: events later than this after their feed are rejected as late.",
)
@click.option(
    "--flush", is_flag=True, help="Close every open window now (end of day, end of a test)."
)
@click.option(
    "--close-day",
    is_flag=True,
    help="Then count the live day as a day of the world (preprocess and retrain read it).",
)
@click.option(
    "--retain",
    is_flag=True,
    help="Then drop the bus records the sink will not read again and older than --keep-s.",
)
@click.option(
    "--keep-s",
    type=click.FloatRange(min=0.0),
    default=None,
    help="With --retain: keep records received this recently "
    "[default: the 8 h a starting replica replays].",
)
@click.option(
    "--follow-s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Run until stopped (SIGTERM, Ctrl-C), a pass every this many seconds "
    "(a long-lived job: `ray job submit -- python -m jobs.events sink --follow-s 60 --retain`).",
)
def events_sink(
    run_dir: Path,
    bus: str | None,
    world_dir: Path | None,
    window_s: float,
    flush: bool,
    close_day: bool,
    retain: bool,
    keep_s: float | None,
    follow_s: float | None,
) -> None:
    """Compact the bus into day-partitioned logs (exactly once; safe to re-run any time)."""
    from feedrec.events.event_bus import open_event_bus, redact
    from feedrec.events.event_log import EventLog, EventLogError
    from feedrec.events.event_sink import EventSink, SinkConfig

    if keep_s is not None and not retain:
        raise click.BadParameter("is only used with --retain", param_hint="--keep-s")
    if follow_s is not None and (flush or close_day):
        raise click.BadParameter(
            "runs until stopped: --flush and --close-day end one pass", param_hint="--follow-s"
        )
    run = _run(run_dir)
    location = bus if bus is not None else str(run.events)
    if "://" not in location and not Path(location).is_dir():
        raise click.BadParameter(f"{location} is not an event bus directory", param_hint="--bus")
    try:
        sink = EventSink(
            open_event_bus(location),
            world_dir or run.world,
            SinkConfig(attribution_window_s=window_s),
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--bus") from e
    except EventLogError as e:
        raise click.UsageError(str(e)) from e
    unit = "segments" if isinstance(sink.log, EventLog) else "entries"
    keep: float | None = None
    if retain:
        from feedrec.serving.realtime_signals import REPLAY_S

        keep = REPLAY_S if keep_s is None else keep_s
    if follow_s is not None:
        _follow_sink(sink, redact(location), follow_s, keep, unit)
        return
    try:
        click.echo(sink.run(flush=flush).summary())
    except EventLogError as e:
        raise click.UsageError(str(e)) from e
    if close_day:
        try:
            click.echo(f"day {sink.close_day()} is now a day of the world in {sink.world.root}")
        except (FileNotFoundError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--close-day") from e
    if keep is not None:
        try:
            kept_from, dropped = sink.retain(keep)
        except EventLogError as e:
            raise click.UsageError(str(e)) from e
        click.echo(f"retention: the bus keeps seq {kept_from} on; dropped {dropped} {unit}")


def _follow_sink(
    sink: Any, location: str, interval_s: float, keep_s: float | None, unit: str
) -> None:
    """``feedrec events sink --follow-s``: passes until SIGTERM (``ray job stop``) or Ctrl-C
    set the stop event; a pass in progress finishes first. Prints the passes that did work."""
    import threading

    from feedrec.events.event_log import EventLogError

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def stamp() -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S")

    def on_pass(report: Any, retained: tuple[int, int] | None) -> None:
        if report.records or (retained is not None and retained[1]):
            kept = ""
            if retained is not None:
                kept = f"; retention keeps seq {retained[0]} on, dropped {retained[1]} {unit}"
            click.echo(f"{stamp()} {report.summary()}{kept}")

    def on_outage(e: Exception) -> None:
        click.echo(f"{stamp()} bus unavailable, next try in {interval_s:g} s: {e}", err=True)

    click.echo(f"{stamp()} sink following {location} every {interval_s:g} s")
    try:
        sink.follow(interval_s, stop, on_pass, keep_s=keep_s, on_outage=on_outage)
    except EventLogError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"{stamp()} sink stopped")


@main.command()
@run_dir_option
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option(
    "--duration-s", type=click.FloatRange(min=0.0, min_open=True), default=60.0, show_default=True
)
@click.option(
    "--rate",
    "rate_rps",
    type=click.FloatRange(min=0.0, min_open=True),
    default=8.0,
    show_default=True,
    help="Feed requests per second, all clients together.",
)
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--users",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Panel size (world users drawn at random); 0 = every user.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Any other SimulationConfig field, e.g. --set fatigue=0.7 --set max_pages=5.",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where truth.parquet goes [default: RUN_DIR/simulation].",
)
def simulate(
    run_dir: Path,
    url: str,
    duration_s: float,
    rate_rps: float,
    clients: int,
    users: int,
    seed: int,
    overrides: tuple[str, ...],
    out_dir: Path | None,
) -> None:
    """Simulated users (the world's ground truth) use the live service and send events."""
    from feedrec.data import PreprocessLayout
    from feedrec.experiments.user_simulator import SimulationConfig, UserSimulator

    run = _run(run_dir)
    values = {
        "duration_s": duration_s,
        "rate_rps": rate_rps,
        "clients": clients,
        "users": users,
        "seed": seed,
        **_parse_overrides(overrides),
    }
    try:
        cfg = SimulationConfig(**values)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--set") from e
    if not PreprocessLayout(run.data).meta.exists():
        raise click.UsageError(f"--run-dir: {run.root} has no preprocessed data (serving day)")
    serving_day = int(PreprocessLayout(run.data).read_meta()["serving_day"])
    simulator = UserSimulator(url, run.world, serving_day, cfg)
    result = simulator.run(out_dir or run.root / "simulation")
    click.echo(result.summary())
    click.echo(f"truth of every impression: {result.truth_path}")


#: Where ``feedrec events sink`` wrote the exposure log that experiment reports read.
exposures_option = click.option(
    "--world-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the sink wrote live/exposures [default: RUN_DIR/world].",
)


@main.group()
def experiments() -> None:
    """Online experiments: per-variant results of live (or simulated) traffic."""


@experiments.command("report")
@run_dir_option
@exposures_option
@click.option("--baseline", default=None, help="Variant to compare with [default: popularity].")
@click.option(
    "--session-gap-s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1800.0,
    show_default=True,
    help="A gap between a user's feeds longer than this starts a new session (simulations: "
    "a little under `feedrec simulate --set min_return_s`).",
)
@click.option(
    "--truth",
    type=click.Path(path_type=Path),
    default=None,
    help="A simulation's truth.parquet: report on its feeds only, with the ground truth's "
    "lift [default: RUN_DIR/simulation/truth.parquet if present].",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where report.{md,json,png} go [default: RUN_DIR/experiment].",
)
def experiments_report(
    run_dir: Path,
    world_dir: Path | None,
    baseline: str | None,
    session_gap_s: float,
    truth: Path | None,
    out_dir: Path | None,
) -> None:
    """Metrics per variant with 95% CIs, lifts with p-values, guardrails, plots."""
    import pyarrow.parquet as pq

    from feedrec.experiments.experiment_report import (
        analyse,
        read_exposures,
        write_report,
    )

    run = _run(run_dir)
    default_truth = run.root / "simulation" / "truth.parquet"
    truth_path = truth or (default_truth if default_truth.exists() else None)
    try:
        truth_table = pq.read_table(truth_path).to_pandas() if truth_path else None
        feeds = None if truth_table is None else truth_table["request_id"].unique()
        exposures = read_exposures(world_dir or run.world, request_ids=feeds)
        if truth_table is not None:
            click.echo(f"feeds of the simulation in {truth_path} only")
        report = analyse(
            exposures, baseline=baseline, session_gap_s=session_gap_s, truth=truth_table
        )
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--baseline") from e
    path = write_report(report, out_dir or run.root / "experiment")
    for lift in report.lifts:
        low, high = lift.ci
        truth_note = "" if lift.truth is None else f"  truth {lift.truth:+.4f}"
        click.echo(
            f"{lift.variant} vs {lift.baseline} {lift.metric}: {lift.diff:+.4f} "
            f"[{low:+.4f}, {high:+.4f}] p={lift.p_value:.2g}{truth_note}"
        )
    click.echo(f"wrote {path}")


@experiments.command("shadow")
@run_dir_option
@exposures_option
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where shadow.{md,json,png} go [default: RUN_DIR/experiment].",
)
def experiments_shadow(run_dir: Path, world_dir: Path | None, out_dir: Path | None) -> None:
    """Shadow rankers against the served one: overlap, same first post, and the engagement of
    served posts the shadow ranker would have kept vs dropped."""
    from feedrec.experiments.experiment_report import read_exposures
    from feedrec.experiments.shadow_report import (
        analyse_shadow,
        read_shadow,
        write_shadow_report,
    )

    run = _run(run_dir)
    world = world_dir or run.world
    try:
        report = analyse_shadow(read_shadow(world), read_exposures(world))
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    for c in report.comparisons:
        click.echo(
            f"{c.shadow_model_version} shadowing {c.served_model_version}: {c.feeds} feeds, "
            f"overlap {c.mean_overlap:.3f}, same first post {c.top1_agreement:.1%}, "
            f"engagement kept {c.kept.value:.4f} / dropped {c.dropped.value:.4f}"
        )
    click.echo(f"wrote {write_shadow_report(report, out_dir or run.root / 'experiment')}")


def _candidate(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep else (Path(text).name, Path(text))


@experiments.command("ope")
@run_dir_option
@exposures_option
@click.option(
    "--variant",
    default=None,
    help="The exploring variant whose feeds to use [default: every explored feed].",
)
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    help="A ranker artifact directory to evaluate, as PATH or NAME=PATH (repeatable) "
    "[default: RUN_DIR/models/ranker].",
)
@click.option(
    "--simulation-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A simulation's output (truth.parquet, simulation.json): its feeds only, with the "
    "ground truth of every policy [default: RUN_DIR/simulation if present].",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where ope.{md,json,png} go [default: RUN_DIR/experiment/ope].",
)
def experiments_ope(
    run_dir: Path,
    world_dir: Path | None,
    variant: str | None,
    candidates: tuple[str, ...],
    simulation_dir: Path | None,
    out_dir: Path | None,
) -> None:
    """Off-policy evaluation: IPS/SNIPS of candidate rankers from an exploring variant's log."""
    import pyarrow.parquet as pq

    from feedrec.experiments.experiment_report import read_exposures
    from feedrec.experiments.off_policy import evaluate_exposures, write_report
    from feedrec.experiments.user_simulator import TRUTH_FILE
    from feedrec.serving.config import ServiceConfig

    run = _run(run_dir)
    named = dict(_candidate(c) for c in candidates) or {"ranker": run.ranker}
    for name, path in named.items():
        if not (path / "manifest.json").exists():
            raise click.BadParameter(
                f"{name}: {path} is not a model artifact", param_hint="--candidate"
            )
    default_sim = run.root / "simulation"
    sim = simulation_dir or (default_sim if (default_sim / "simulation.json").exists() else None)
    try:
        feeds = None  # with a simulation: only its feeds are evaluated, so only they are read
        if sim is not None:
            truth_file = sim / TRUTH_FILE
            feeds = pq.read_table(truth_file, columns=["request_id"]).column(0).to_pylist()
        report = evaluate_exposures(
            read_exposures(world_dir or run.world, request_ids=feeds),
            world_dir=run.world,
            data_dir=run.data,
            candidates=named,
            rules=ServiceConfig.from_run(run.root).rerank_config(),
            variant=variant,
            simulation_dir=sim,
        )
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--variant") from e
    path = write_report(report, out_dir or run.root / "experiment" / "ope")
    low, high = report.logging.ci
    click.echo(
        f"{report.feeds} feeds of {report.users} users ({report.explored:.0%} explored); "
        f"logging {report.logging.value:.4f} [{low:.4f}, {high:.4f}]"
    )
    for p in report.policies:
        low, high = p.ips.ci
        truth_note = "" if p.truth is None else f"  truth {p.truth:.4f}"
        if not p.interval_reliable:
            truth_note += f"  (only {p.rewarded_matches} rewarded matches: interval unreliable)"
        click.echo(
            f"{p.name}: IPS {p.ips.value:.4f} [{low:.4f}, {high:.4f}] SNIPS "
            f"{p.snips.value:.4f} matched {p.match_rate:.0%} ESS {p.ess:.0f}{truth_note}"
        )
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
