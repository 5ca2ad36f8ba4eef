"""Online experiments: deterministic assignment of viewers to variants.

A viewer's bucket is ``sha256("<experiment>:<user_id>") mod 10000``; variant ``i`` owns the
buckets ``[sum(w[:i]), sum(w[:i+1]))`` of the weights scaled to 10000. Assignment is stable
across replicas and restarts (no state), independent between experiments (the name salts the
hash), and a user keeps their variant for the whole experiment, which is what per-user metrics
(sessions per user) need.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedrec.events.feed_event import VARIANT_PATTERN
from feedrec.serving.exploration import NO_EXPLORATION, Exploration

BUCKETS = 10_000
#: What a variant serves: the trained chain (retrieval -> Triton ranker -> re-rank), or the
#: popularity ranker (the most-liked eligible posts, same filters) as a baseline arm.
Policy = Literal["model", "popularity"]
#: The variant of every response when no experiment runs.
DEFAULT_VARIANT = "control"


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=VARIANT_PATTERN)
    weight: float = Field(gt=0, description="relative share of users")
    policy: Policy = "model"
    exploration: Exploration = Field(
        default=NO_EXPLORATION,
        description="randomise a share of this arm's feeds with logged propensities (model only)",
    )

    @model_validator(mode="after")
    def _explores_the_model(self) -> Variant:
        if self.exploration.enabled and self.policy != "model":
            raise ValueError(f"variant {self.name}: exploration needs policy 'model'")
        return self


class Experiment(BaseModel):
    """``experiment:`` of the service config, e.g. ``{"name": "ranker-vs-pop", "variants":
    [{"name": "control", "weight": 1}, {"name": "popularity", "weight": 1, "policy":
    "popularity"}]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    variants: tuple[Variant, ...] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _distinct(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: variant names repeat: {names}")
        return self

    def bucket(self, user_id: int) -> int:
        digest = hashlib.sha256(f"{self.name}:{user_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % BUCKETS

    def assign(self, user_id: int) -> Variant:
        """The variant of ``user_id`` (the same on every call, replica and restart)."""
        total = sum(v.weight for v in self.variants)
        point = self.bucket(user_id) / BUCKETS * total
        upper = 0.0
        for variant in self.variants:
            upper += variant.weight
            if point < upper:
                return variant
        return self.variants[-1]  # float rounding at the very top


#: The single variant when no experiment is configured.
NO_EXPERIMENT = Variant(name=DEFAULT_VARIANT, weight=1.0, policy="model")
