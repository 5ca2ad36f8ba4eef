"""Where a generated world lives on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorldLayout:
    """Paths of a world directory.

    ``logs/day=D/`` holds the sharded impression logs (what a real system would have);
    ``entities/`` the user/post/creator/follow tables; ``truth/`` the hidden ground truth that only
    evaluation may read (the preprocess job never opens it).

    Imported logs (``feedrec.data.log_import``) use the same layout without ``truth/`` and with a
    ``source.json`` saying where they came from.
    """

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log_day(self, day: int) -> Path:
        return self.logs / f"day={day}"

    @property
    def entities(self) -> Path:
        return self.root / "entities"

    @property
    def users(self) -> Path:
        return self.entities / "users.parquet"

    @property
    def posts(self) -> Path:
        return self.entities / "posts.parquet"

    @property
    def creators(self) -> Path:
        return self.entities / "creators.parquet"

    @property
    def follows(self) -> Path:
        return self.entities / "follows.parquet"

    @property
    def truth(self) -> Path:
        return self.root / "truth"

    @property
    def has_truth(self) -> bool:
        """Generated worlds have a ground truth; imported logs do not."""
        return self.truth_impressions.exists() and self.latent.exists()

    @property
    def latent(self) -> Path:
        return self.truth / "latent.npz"

    @property
    def truth_impressions(self) -> Path:
        return self.truth / "impressions"

    @property
    def config(self) -> Path:
        return self.root / "world.json"

    @property
    def source(self) -> Path:
        """Provenance of imported logs (absent for generated worlds)."""
        return self.root / "source.json"
