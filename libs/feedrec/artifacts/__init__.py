"""Model artifacts: everything a model needs, written together and loaded through one function."""

from feedrec.artifacts.artifact import (
    ArtifactError,
    ModelArtifact,
    load_artifact,
    save_artifact,
    verify_artifact,
)

__all__ = ["ArtifactError", "ModelArtifact", "load_artifact", "save_artifact", "verify_artifact"]
