"""Intervention batteries: clamp joint-SAE features in the forward pass and record logit shifts."""

from .battery import battery, encode_rows, export, merge_shards
from .config import BatteryConfig, FeatureSpec, InterventionSpec
from .features import Target, make_edit, resolve_features
from .store import ResultStore, read_results

__all__ = ["BatteryConfig", "FeatureSpec", "InterventionSpec", "ResultStore", "Target", "battery", "encode_rows",
           "export", "make_edit", "merge_shards", "read_results", "resolve_features"]
