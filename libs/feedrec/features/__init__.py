"""Feature logic shared by the Ray Data jobs and the Serve deployments (one implementation)."""

from feedrec.features.tables import EntityAttributes, FeatureTables
from feedrec.features.transform import FeatureTransform, ModelInputs
from feedrec.features.vocabulary import Vocabularies, Vocabulary

__all__ = [
    "EntityAttributes",
    "FeatureTables",
    "FeatureTransform",
    "ModelInputs",
    "Vocabularies",
    "Vocabulary",
]
