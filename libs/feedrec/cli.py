"""``feedrec``: the command line. Thin: each command parses options and calls the library.

Every stage reads and writes one run directory (``--run-dir``, default ``runs/default``)::

    feedrec generate --preset small     # synthetic world -> runs/default/world
    feedrec preprocess                  # Ray Data -> runs/default/data
    feedrec train all                   # Ray Train + TorchRec -> runs/default/models/
    feedrec evaluate                    # metrics.json + report.html -> runs/default/eval
    feedrec index                       # faiss over the item tower -> models/retrieval
    feedrec serve up                    # Triton + Ray Serve on 127.0.0.1:8000 (background)
    feedrec feed --user-id 42           # ask the service for a feed
    feedrec serve down
"""

from __future__ import annotations

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
PRESET_NAMES = ("debug", "small", "large")


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
    """Run a pipeline stage; turn bad input into a CLI error that names it."""
    try:
        click.echo(fn(*args, **kwargs))
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from e
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--set") from e


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


@main.command()
@run_dir_option
@ray_option
def preprocess(run_dir: Path, ray_address: str | None) -> None:
    """Ray Data: point-in-time features, vocabularies, time split, training examples."""
    from feedrec import pipeline

    _stage(pipeline.preprocess, _run(run_dir), ray_address)


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
    help="Override a TrainConfig field, e.g. --set epochs=3 --set num_workers=4.",
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


@serve.command("run")
@run_dir_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@ray_option
def serve_run(run_dir: Path, host: str, port: int, ray_address: str | None) -> None:
    """Run the stack in the foreground until SIGINT/SIGTERM."""
    from feedrec.serving.stack import ServingStack, StackConfig

    stack = ServingStack(
        StackConfig(run_dir=run_dir, http_host=host, http_port=port, ray_address=ray_address)
    )
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
@ray_option
def serve_up(run_dir: Path, host: str, port: int, timeout: float, ray_address: str | None) -> None:
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
def demo(preset: str, run_dir: Path, port: int, users: int) -> None:
    """Every stage (generate .. serve) on a preset, then sample feeds over HTTP."""
    from feedrec.pipeline import run_demo

    run_demo(preset=preset, run_dir=run_dir, port=port, n_feeds=users, echo=click.echo)


if __name__ == "__main__":
    main()
