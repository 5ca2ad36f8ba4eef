"""Feed service configuration (pydantic: read from YAML, env or CLI flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from feedrec.runtime.run_layout import RunLayout


class StageTimeouts(BaseModel):
    """Per-stage deadlines (seconds); a stage past its deadline triggers the fallback feed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval_s: float = Field(default=2.0, gt=0)
    ranking_s: float = Field(default=2.0, gt=0)
    rerank_s: float = Field(default=1.0, gt=0)


class ServiceConfig(BaseModel):
    """Everything the Serve application needs. Build one with :meth:`from_run`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world_dir: Path
    data_dir: Path
    ranker_dir: Path
    retrieval_dir: Path
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "ranker"
    retrieve_k: int = Field(default=300, ge=1, le=10_000)
    rank_k: int = Field(default=150, ge=1, le=5_000)
    timeouts: StageTimeouts = StageTimeouts()
    freshness_weight: float = Field(default=0.3, ge=0)
    max_per_creator: int = Field(default=2, ge=1)

    @classmethod
    def from_run(cls, root: Path, **overrides: object) -> ServiceConfig:
        run = RunLayout(Path(root).resolve())
        return cls(
            world_dir=run.world,
            data_dir=run.data,
            ranker_dir=run.ranker,
            retrieval_dir=run.retrieval,
            **overrides,  # type: ignore[arg-type]
        )
