"""Activations: harvesting at a named hook point, shards on disk, normalisation and exclusion rules."""

from .exclusion import ExclusionRule
from .harvester import HarvestConfig, capture_hook, harvest, open_activations
from .normalization import Normalizer, RunningStats
from .shards import ActivationStore, read_manifest

__all__ = ["ActivationStore", "ExclusionRule", "HarvestConfig", "Normalizer", "RunningStats", "capture_hook",
           "harvest", "open_activations", "read_manifest"]
