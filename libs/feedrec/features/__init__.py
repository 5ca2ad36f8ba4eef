"""Feature logic shared by the Ray Data jobs and the Serve deployments (one implementation)."""

from feedrec.features.tables import EntityAttributes, FeatureSnapshot, FeatureTables
from feedrec.features.transform import FeatureTransform, ModelInputs
from feedrec.features.vocabulary import Vocabularies, Vocabulary

__all__ = [
    "EntityAttributes",
    "FeatureSnapshot",
    "FeatureTables",
    "FeatureTransform",
    "ModelInputs",
    "Vocabularies",
    "Vocabulary",
]
