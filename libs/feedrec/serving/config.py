"""Feed service configuration (pydantic: read from YAML, env or CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from feedrec.events.event_bus import bus_location
from feedrec.runtime.run_layout import RunLayout
from feedrec.serving.experiment import Experiment
from feedrec.serving.rerank import RerankConfig


class StageTimeouts(BaseModel):
    """Per-stage deadlines (seconds); a stage past its deadline triggers the fallback feed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval_s: float = Field(default=2.0, gt=0)
    ranking_s: float = Field(default=2.0, gt=0)
    rerank_s: float = Field(default=1.0, gt=0)


class ServiceConfig(BaseModel):
    """Everything the Serve application needs. Build one with :meth:`from_run`."""

    # Inputs stay out of errors: a redis:// URL may carry a password (the messages of the
    # URL validators show it redacted).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    world_dir: Path
    data_dir: Path
    ranker_dir: Path
    retrieval_dir: Path
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "ranker"
    registry_dir: Path | None = Field(
        default=None,
        description="a model registry: replicas follow its production versions (ranker_dir and "
        "retrieval_dir are then unused); None serves ranker_dir and retrieval_dir as they are",
    )
    registry_poll_s: float = Field(default=2.0, gt=0, le=3600)
    admin_token_file: Path | None = Field(
        default=None,
        description="a chmod-600 file with the bearer token of the admin endpoints (promote, "
        "rollback); None (default) disables them. $FEEDREC_ADMIN_TOKEN_FILE also works",
    )
    events_dir: Path | None = Field(
        default=None,
        description="the embedded event bus (an append-only log directory): served feeds are "
        "recorded there and POST /v1/events writes to it; None disables both",
    )
    events_bus: str | None = Field(
        default=None,
        description="another event bus, replacing events_dir when set: "
        "redis://host:port/db?stream=NAME (Redis Streams; the server must run appendonly yes "
        "and appendfsync always) or a directory (the embedded log)",
    )
    feature_store: str | None = Field(
        default=None,
        description="where the per-entity online features are read: None (default) holds "
        "them in each replica (embedded, from data_dir); redis://host:port/db[?prefix=NAME] "
        "reads them from Redis, filled by `feedrec features publish` from the same data_dir",
    )
    experiment: Experiment | None = Field(
        default=None, description="an online experiment: users are split between its variants"
    )
    realtime: bool = Field(
        default=True,
        description="follow the event bus for real-time signals (hot topics, engagement "
        "velocity) used in candidate generation and re-ranking; needs an event bus",
    )
    realtime_candidates: int = Field(
        default=30, ge=0, le=1000, description="posts of the viewer's hot topics added to ranking"
    )
    realtime_interest_weight: float = Field(
        default=1.0, ge=0, description="re-ranking boost per unit of real-time topic interest"
    )
    shadow_share: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="share of personalised feeds also ranked by the registry's shadow ranker "
        "and built from its shadow retrieval's candidates, when one is set (logged as shadow "
        "records, never shown); needs registry_dir",
    )
    retrieve_k: int = Field(default=300, ge=1, le=10_000)
    rank_k: int = Field(default=150, ge=1, le=5_000)
    timeouts: StageTimeouts = StageTimeouts()
    freshness_weight: float = Field(default=0.3, ge=0)
    max_per_creator: int = Field(default=2, ge=1)
    topic_window: int = Field(default=4, ge=1)
    max_per_topic: int = Field(default=2, ge=1)
    fair_share: float = Field(default=0.2, ge=0, le=1)
    small_creator_quantile: float = Field(
        default=0.25, gt=0, lt=1, description="creators at or below it (followers) are small"
    )

    @field_validator("events_bus")
    @classmethod
    def _bus_location_parses(cls, value: str | None) -> str | None:
        if value is not None:
            bus_location(value)  # a malformed redis:// URL fails here, naming its bad part
        return value

    @field_validator("feature_store")
    @classmethod
    def _feature_store_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from feedrec.serving.redis_feature_source import parse_location

            parse_location(value)  # a malformed URL fails here, naming its bad part
        return value

    def event_bus_location(self) -> str | Path | None:
        """Where served feeds and client events are recorded: ``events_bus`` if set, else
        ``events_dir``; None: not recorded."""
        return self.events_bus if self.events_bus is not None else self.events_dir

    @model_validator(mode="after")
    def _rules_are_consistent(self) -> ServiceConfig:
        self.rerank_config()  # raises naming the field, e.g. max_per_topic > topic_window
        return self

    @property
    def shadowing(self) -> bool:
        """Whether shadow traffic can run: a registry (its shadow pointers name the candidates)
        and a share above 0."""
        return self.registry_dir is not None and self.shadow_share > 0

    def rerank_config(self) -> RerankConfig:
        """The re-ranking rules (validated again there: max_per_topic <= topic_window)."""
        return RerankConfig(
            freshness_weight=self.freshness_weight,
            max_per_creator=self.max_per_creator,
            topic_window=self.topic_window,
            max_per_topic=self.max_per_topic,
            fair_share=self.fair_share,
            interest_weight=self.realtime_interest_weight,
        )

    @classmethod
    def from_run(cls, root: Path, **overrides: object) -> ServiceConfig:
        run = RunLayout(Path(root).resolve())
        fields: dict[str, object] = {
            "world_dir": run.world,
            "data_dir": run.data,
            "ranker_dir": run.ranker,
            "retrieval_dir": run.retrieval,
            "events_dir": run.events,
        }
        return cls(**{**fields, **overrides})  # type: ignore[arg-type]


def deployment_options(serve_config: Path, app_name: str) -> dict[str, dict[str, Any]]:
    """Per-deployment options (autoscaling, max ongoing requests, actor resources) of
    ``app_name`` in a ``serve deploy`` YAML, validated by Ray Serve's own schema.

    ``serve deploy`` applies that section itself; ``feedrec serve up`` (``serve.run`` from
    Python) passes these to ``build_app``, so both paths run with one configuration.
    """
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(serve_config).read_text())
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValueError as e:
        raise ValueError(f"{serve_config}: not a valid Serve config: {e}") from e
    for app in schema.applications:
        if app.name != app_name:
            continue
        options = {
            d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments
        }
        for name, opts in options.items():
            try:  # the schema keeps autoscaling_config a plain dict: check its fields too
                AutoscalingConfig.model_validate(opts.get("autoscaling_config") or {})
            except ValueError as e:
                raise ValueError(f"{serve_config}: deployment {name}: {e}") from e
        return options
    raise ValueError(f"{serve_config}: no application named {app_name!r}")
