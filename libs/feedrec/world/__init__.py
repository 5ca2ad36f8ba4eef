"""Synthetic feed world: entities, a hidden ground-truth engagement model, a logging policy."""

from feedrec.world.config import PRESETS, WorldConfig
from feedrec.world.generator import generate_world
from feedrec.world.layout import WorldLayout
from feedrec.world.truth import GroundTruth

__all__ = ["PRESETS", "GroundTruth", "WorldConfig", "WorldLayout", "generate_world"]
