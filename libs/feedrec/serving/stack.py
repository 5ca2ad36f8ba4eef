"""The serving stack: a Triton server for the ranker plus the Ray Serve feed application.

``ServingStack.start()`` writes the Triton model repository from the ranker artifact, starts the
``tritonserver`` binary (loopback only), connects to / starts Ray, deploys the Serve app and waits
for ``/healthz``. ``stop()`` tears down only what it started, by handle and PID.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray import serve

from feedrec.artifacts import load_artifact
from feedrec.runtime.ray_cluster import init_ray, repo_root
from feedrec.runtime.run_layout import RunLayout
from feedrec.serving.config import deployment_options
from feedrec.serving.feed_client import wait_healthy
from feedrec.serving.triton_repository import (
    ranker_io_widths,
    write_model_repository,
    write_portable_models,
)
from feedrec.serving.triton_server import TritonServer, TritonServerConfig

APP_IMPORT_PATH = "apps.feed_service.app:build_app"
APP_NAME = "feed"
RankerRuntime = Literal["onnxruntime", "torchrec"]
#: What the Triton python-backend model builds its predictor with, per runtime.
PREDICTOR_FACTORIES: dict[str, str] = {
    "onnxruntime": "feedrec.models.portable_ranker:OnnxRankerPredictor.from_artifact",
    "torchrec": "feedrec.models.predictor:RankerPredictor.from_artifact",
}


@dataclass(frozen=True)
class StackConfig:
    """Args: run_dir: a pipeline run with trained models; http_host/port: the Serve ingress;
    ray_address: an existing cluster (None starts a local one); triton_*_port: 0 = any free;
    export_portable: also write the ONNX / TorchScript ranker (checked against eager) to
    ``serve/triton_repository_gpu`` for Triton servers with those backends;
    ranker_runtime: what the Triton python backend runs, ``onnxruntime`` (the ranker exported
    in memory and checked against eager at load; half the CPU time) or ``torchrec`` (eager);
    service_overrides: ``ServiceConfig`` fields (e.g. ``retrieve_k``); serve_config: the
    ``serve deploy`` YAML whose per-deployment options (autoscaling, ...) are applied."""

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
    serve_config: Path = field(
        default_factory=lambda: repo_root() / "apps" / "feed_service" / "serve_config.yaml"
    )

    def __post_init__(self) -> None:
        if self.ranker_runtime not in PREDICTOR_FACTORIES:
            raise ValueError(
                f"stack config: ranker_runtime must be one of {sorted(PREDICTOR_FACTORIES)}, "
                f"not {self.ranker_runtime!r}"
            )
        if not 0 < self.http_port < 65536:
            raise ValueError(f"stack config: http_port {self.http_port} is not a valid port")


class ServingStack:
    """Triton + Serve for one run. Use as a context manager or call start()/stop()."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.run = RunLayout(Path(config.run_dir).resolve())
        self.triton: TritonServer | None = None
        self._started_ray = False

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.config.http_port}"

    def start(self) -> None:
        load_artifact(self.run.ranker)  # refuse a corrupt artifact before starting anything
        options = deployment_options(self.config.serve_config, APP_NAME)  # fail before starting
        serve_dir = self.run.serve
        serve_dir.mkdir(parents=True, exist_ok=True)
        repo = serve_dir / "triton_repository"
        write_model_repository(
            repo, self.run.ranker, extra_parameters=self._factory(), **ranker_io_widths()
        )
        if self.config.export_portable:
            # Its own repository: the wheel's server has no onnxruntime/libtorch backend and
            # would refuse to start with those models in the one it loads.
            write_portable_models(serve_dir / "triton_repository_gpu", self.run.ranker)
        self.triton = TritonServer(
            TritonServerConfig(
                model_repository=repo,
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
                **self.config.service_overrides,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        wait_healthy(self.url, self.config.ready_timeout_s)

    def _factory(self) -> dict[str, str]:
        return {"predictor_factory": PREDICTOR_FACTORIES[self.config.ranker_runtime]}

    def swap_ranker(self, artifact_dir: Path) -> int:
        """Serve another ranker artifact without dropping a request: it is written as the next
        version of the Triton model and loaded; Triton retires the old version once the new one
        is ready. Returns the new version. (``model_version`` in feed responses still names the
        artifact the Serve app started with.)"""
        if self.triton is None:
            raise RuntimeError("swap_ranker() needs a started stack")
        load_artifact(artifact_dir)  # refuse a corrupt artifact before touching the repository
        repo = self.run.serve / "triton_repository"
        versions = [int(p.name) for p in (repo / "ranker").iterdir() if p.name.isdigit()]
        version = max(versions, default=0) + 1
        write_model_repository(
            repo,
            Path(artifact_dir),
            version=version,
            extra_parameters=self._factory(),
            **ranker_io_widths(),
        )
        self.triton.load_model("ranker")
        return version

    def stop(self) -> None:
        """Serve first (no request may reach a stopped Triton), then Triton, then local Ray."""
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
