"""The serving stack: a Triton server for the ranker plus the Ray Serve feed application.

``ServingStack.start()`` writes the Triton model repository from the ranker artifact, starts the
``tritonserver`` binary (loopback only), connects to / starts Ray, deploys the Serve app and waits
for ``/healthz``. ``stop()`` tears down only what it started, by handle and PID.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray import serve

from feedrec.artifacts import load_artifact
from feedrec.artifacts.model_registry import ModelRegistry, RegistryEntry, RegistryError
from feedrec.runtime.ray_cluster import init_ray, repo_root
from feedrec.runtime.run_layout import RunLayout
from feedrec.serving.config import deployment_options
from feedrec.serving.feed_client import wait_healthy
from feedrec.serving.model_watcher import Loaded, ModelWatcher, NotReady
from feedrec.serving.triton_repository import (
    add_model_version,
    ranker_io_widths,
    remove_model_version,
    write_model_repository,
    write_portable_models,
)
from feedrec.serving.triton_server import TritonServer, TritonServerConfig

logger = logging.getLogger("feedrec.serve")
#: How long a restarted Triton may take to load its models (every served version) before the
#: supervisor logs it as failed (and restarts it if it died meanwhile).
TRITON_RESTART_READY_S = 600.0
APP_IMPORT_PATH = "apps.feed_service.app:build_app"
APP_NAME = "feed"
RankerRuntime = Literal["onnxruntime", "torchrec"]
#: What the Triton python-backend model builds its predictor with, per runtime.
PREDICTOR_FACTORIES: dict[str, str] = {
    "onnxruntime": "feedrec.models.onnx_ranker_predictor:OnnxRankerPredictor.from_artifact",
    "torchrec": "feedrec.models.predictor:RankerPredictor.from_artifact",
}


@dataclass(frozen=True)
class StackConfig:
    """Args: run_dir: a pipeline run with trained models; http_host/port: the Serve ingress;
    ray_address: an existing cluster (None starts a local one); triton_*_port: 0 = any free;
    export_portable: also write the ONNX / TorchScript ranker (checked against eager) to
    ``serve/triton_repository_gpu`` for Triton servers with those backends;
    ranker_runtime: what the Triton python backend runs, ``onnxruntime`` (the artifact's
    ranker.onnx, exported and checked against eager at training; half the CPU time) or
    ``torchrec`` (eager);
    service_overrides: ``ServiceConfig`` fields (e.g. ``retrieve_k``); serve_config: the
    ``serve deploy`` YAML whose per-deployment options (autoscaling, ...) are applied;
    registry: serve the production versions of a model registry and follow promotions and
    rollbacks every ``registry_poll_s`` (None: the run's models, fixed); restart_triton:
    a supervisor thread restarts a Triton server that died (same ports)."""

    run_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    ray_address: str | None = None
    triton_grpc_port: int = 0
    triton_http_port: int = 0
    ready_timeout_s: float = 300.0
    export_portable: bool = True
    ranker_runtime: RankerRuntime = "onnxruntime"
    service_overrides: dict[str, Any] = field(default_factory=dict)
    registry: Path | None = None
    registry_poll_s: float = 2.0
    restart_triton: bool = True
    serve_config: Path = field(
        default_factory=lambda: repo_root() / "apps" / "feed_service" / "serve_config.yaml"
    )

    def __post_init__(self) -> None:
        if self.ranker_runtime not in PREDICTOR_FACTORIES:
            raise ValueError(
                f"stack config: ranker_runtime must be one of {sorted(PREDICTOR_FACTORIES)}, "
                f"not {self.ranker_runtime!r}"
            )
        if self.registry_poll_s <= 0:
            raise ValueError(
                f"stack config: registry_poll_s must be > 0, not {self.registry_poll_s}"
            )
        if not 0 < self.http_port < 65536:
            raise ValueError(f"stack config: http_port {self.http_port} is not a valid port")


@dataclass(frozen=True)
class ServedModels:
    """The ranker and retrieval artifacts a stack starts with, the Triton version number the
    ranker gets, and the ``ServiceConfig`` fields that point the replicas at them."""

    ranker_dir: Path
    retrieval_dir: Path
    triton_version: int
    service_fields: dict[str, Any] = field(default_factory=dict)


class ServingStack:
    """Triton + Serve for one run. Use as a context manager or call start()/stop()."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.run = RunLayout(Path(config.run_dir).resolve())
        self.triton: TritonServer | None = None
        self._started_ray = False
        self.registry = ModelRegistry(config.registry) if config.registry else None
        self.ranker_watcher: ModelWatcher[int] | None = None  # Triton follows the registry
        self.shadow_watcher: ModelWatcher[int | None] | None = None  # ... and its shadow
        self._shadow_version: int | None = None
        self.triton_restarts = 0
        self._triton_version = 1
        self._previous_version: int | None = None  # kept loaded for replicas still pinning it
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.config.http_port}"

    @property
    def _repo(self) -> Path:
        return self.run.serve / "triton_repository"

    def _models(self) -> ServedModels:
        """What this stack serves: the run's models, or the registry's production versions."""
        if self.registry is None:
            return ServedModels(self.run.ranker, self.run.retrieval, triton_version=1)
        ranker, retrieval = (
            self.registry.production("ranker"),
            self.registry.production("retrieval"),
        )
        if ranker is None or retrieval is None:
            raise RegistryError(
                f"{self.registry.root}: promote a ranker and a retrieval version first "
                "(`feedrec models register --promote`)"
            )
        return ServedModels(
            ranker.path,
            retrieval.path,
            triton_version=ranker.version,  # Triton version numbers = registry versions
            service_fields={
                "ranker_dir": str(ranker.path),
                "retrieval_dir": str(retrieval.path),
                "registry_dir": str(self.registry.root),
                "registry_poll_s": self.config.registry_poll_s,
            },
        )

    def start(self) -> None:
        models = self._models()
        load_artifact(models.ranker_dir)  # refuse corrupt artifacts before starting anything
        load_artifact(models.retrieval_dir)
        self._triton_version = models.triton_version
        options = deployment_options(self.config.serve_config, APP_NAME)  # fail before starting
        serve_dir = self.run.serve
        serve_dir.mkdir(parents=True, exist_ok=True)
        write_model_repository(
            self._repo,
            models.ranker_dir,
            version=self._triton_version,
            extra_parameters=self._factory(),
            **ranker_io_widths(),
        )
        if self.config.export_portable:
            # Its own repository: the wheel's server has no onnxruntime/libtorch backend and
            # would refuse to start with those models in the one it loads.
            write_portable_models(serve_dir / "triton_repository_gpu", models.ranker_dir)
        self.triton = TritonServer(
            TritonServerConfig(
                model_repository=self._repo,
                grpc_port=self.config.triton_grpc_port,
                http_port=self.config.triton_http_port,
                log_path=serve_dir / "triton.log",
            )
        )
        self.triton.start()
        (serve_dir / "triton.pid").write_text(str(self.triton.pid))
        self.triton.wait_ready()
        # Only a local cluster we start ourselves is ours to shut down (with all of Serve on it).
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        self._started_ray = not ray.is_initialized() and not address
        init_ray(self.config.ray_address)
        serve.start(http_options={"host": self.config.http_host, "port": self.config.http_port})
        if str(repo_root()) not in sys.path:
            sys.path.insert(0, str(repo_root()))
        from ray._common.utils import import_attr

        build_app = import_attr(APP_IMPORT_PATH)
        app = build_app(
            {
                "run_dir": str(self.run.root),
                "triton_url": self.triton.grpc_url,
                "deployments": options,
                **models.service_fields,
                **self.config.service_overrides,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        try:
            wait_healthy(self.url, self.config.ready_timeout_s)
        except TimeoutError as e:
            # The usual cause on a shared cluster: Serve was already running with other HTTP
            # options, and serve.start() does not move its proxy.
            raise TimeoutError(
                f"{e}; if Serve was already running on this cluster, its proxy keeps the "
                "host/port it was started with: use those (or `serve shutdown`)"
            ) from e
        if self.registry is not None:
            self.ranker_watcher = ModelWatcher(
                self.registry,
                "ranker",
                self._load_in_triton,
                poll_s=self.config.registry_poll_s,
                initial=Loaded(self._triton_version, self._triton_version),
            )
            self.shadow_watcher = ModelWatcher(
                self.registry,
                "ranker",
                self._load_shadow_in_triton,
                poll_s=self.config.registry_poll_s,
                pointer="shadow",
            )
            self._shadow_version = self.shadow_watcher.version
        self._supervisor = threading.Thread(target=self._supervise, name="stack", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """Restart a dead Triton; load the registry's new production ranker into Triton (the
        Ingress replicas switch once it is ready there)."""
        while not self._stopping.wait(self.config.registry_poll_s):
            triton = self.triton
            if self.config.restart_triton and triton is not None and not triton.is_running():
                logger.error("tritonserver (pid %s) died; restarting it", triton.pid)
                try:
                    triton.restart()
                    self.triton_restarts += 1
                    # Until it is ready, the Ingress replicas' calls fail fast and feeds are
                    # the flagged fallback; a slow start is not a failed one.
                    triton.wait_ready(timeout_s=TRITON_RESTART_READY_S)
                    logger.info("tritonserver restarted (pid %s)", triton.pid)
                except Exception:  # keep supervising: a dead server is restarted next round
                    logger.exception("tritonserver restart failed")
                    continue
                if self._stopping.is_set():
                    triton.stop()
            if self.ranker_watcher is not None:
                self.ranker_watcher.poll_once()
            if self.shadow_watcher is not None:
                cleared = self._shadow_version
                self.shadow_watcher.poll_once()
                self._shadow_version = self.shadow_watcher.version
                if cleared is not None and self._shadow_version is None:
                    self._unload_shadow_in_triton(cleared)

    def _add_to_triton(self, entry: RegistryEntry, keep: list[int | None]) -> None:
        """Add registry version N as Triton version N next to the versions in ``keep`` (None:
        none), load it; every other version goes."""
        if self.triton is None or not self.triton.is_running():
            raise NotReady("tritonserver is not running")
        load_artifact(entry.path)  # ArtifactError: the watcher refuses this version for good
        kept = [v for v in keep if v is not None]
        add_model_version(self._repo, entry.path, entry.version, keep=kept)
        self.triton.load_model("ranker")  # loads the new version only; config.pbtxt unchanged

    def _load_in_triton(self, entry: RegistryEntry) -> int:
        """The registry's new production version, next to the one in service (replicas on the
        old vocabularies pin that one until they switch) and the shadow version."""
        previous = self._triton_version
        self._add_to_triton(entry, [previous, self._shadow_version])
        self._triton_version, self._previous_version = entry.version, previous
        return entry.version

    def _load_shadow_in_triton(self, entry: RegistryEntry) -> int:
        """The registry's shadow version, next to production and the previous production
        version (the Ingress replicas score shadow traffic with it once it is ready)."""
        self._add_to_triton(entry, [self._triton_version, self._previous_version])
        return entry.version

    def _unload_shadow_in_triton(self, version: int) -> None:
        """A cleared shadow version leaves Triton (its instances hold memory and, were Triton
        restarted, would load again), unless it is production now (it was promoted)."""
        if version in (self._triton_version, self._previous_version) or self.triton is None:
            return
        if remove_model_version(self._repo, version) and self.triton.is_running():
            try:
                self.triton.load_model("ranker")
            except Exception:  # Triton restarting: it will not load the removed version
                logger.exception("unloading shadow ranker v%s", version)

    def _factory(self) -> dict[str, str]:
        return {"predictor_factory": PREDICTOR_FACTORIES[self.config.ranker_runtime]}

    def stop(self) -> None:
        """Serve first (no request may reach a stopped Triton), then Triton, then local Ray."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=self.config.registry_poll_s + 120)
            self._supervisor = None
        try:
            if ray.is_initialized():
                serve.delete(APP_NAME)
                if self._started_ray:
                    serve.shutdown()
        finally:
            if self.triton is not None:
                self.triton.stop()
                (self.run.serve / "triton.pid").unlink(missing_ok=True)
                self.triton = None
            if self._started_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> ServingStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
