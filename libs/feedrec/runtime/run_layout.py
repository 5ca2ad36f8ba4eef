"""Where one pipeline run keeps its outputs (every stage reads and writes through this)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """``<root>/world``, ``data``, ``models/{ranker,two_tower,retrieval}``, ``eval``, ``serve``,
    ``events``."""

    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ranker(self) -> Path:
        return self.model("ranker")

    @property
    def two_tower(self) -> Path:
        return self.model("two_tower")

    def model(self, kind: str) -> Path:
        """The artifact directory of a trained model kind (``ranker`` or ``two_tower``)."""
        if kind not in ("ranker", "two_tower"):
            raise ValueError(f"unknown model kind {kind!r} (ranker or two_tower)")
        return self.root / "models" / kind

    @property
    def retrieval(self) -> Path:
        """The two-tower artifact plus its faiss index (what serving loads)."""
        return self.root / "models" / "retrieval"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def events(self) -> Path:
        """The embedded event bus of the run's feed service (served feeds, client events)."""
        return self.root / "events"

    @property
    def serve(self) -> Path:
        return self.root / "serve"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"
