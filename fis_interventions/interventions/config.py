"""Battery configuration (YAML, pydantic): which features to clamp, how, where, and on which designs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from ..config import Seed, StrictModel

Where = Literal["all", "stimulus", "readout"]


class FeatureSpec(StrictModel):
    """One entry of ``features``: exactly one selector (index, indices, random, from_screening, top_linear,
    matched, directions)."""

    point: str | None = Field(None, description="named point of the joint model, e.g. secondary.hook_latents")
    index: int | None = Field(None, ge=0, description="one feature")
    indices: list[NonNegativeInt] | None = Field(None, description="a group of features edited together")
    random: PositiveInt | None = Field(None, description="this many random features of the point (a control)")
    from_screening: Path | None = Field(None, description="a screening folder or its top.json")
    top: PositiveInt = Field(3, description="with from_screening: how many of its top features")
    top_linear: PositiveInt | None = Field(None, description="SAE latents with the largest linear-part weight "
                                                              "among those active on the design and not screen "
                                                              "hits (a control)")
    matched: PositiveInt | None = Field(None, description="this many controls per feature of role `match_role`: "
                                        "latents of the same point whose firing rate and mean activation on the "
                                        "battery's stimuli are within `tolerance` of the feature's")
    directions: PositiveInt | None = Field(None, description="this many random residual directions per feature of "
                                           "role `match_role`, each adding at every edited token a vector of the "
                                           "same norm as the change the feature's clamp writes into the residual "
                                           "there (same hook, positions and clamp; a control for direction edits)")
    match_role: str = Field("top", description="with matched or directions: the role of the features to match")
    tolerance: float = Field(0.25, gt=0, description="with matched: largest relative difference allowed in "
                                                     "firing rate and in mean activation (0.25 = within 25%)")
    role: str = Field("feature", description="label in the results, e.g. top, random_control, linear_control, "
                                             "matched_control")

    @model_validator(mode="after")
    def _one_selector(self) -> FeatureSpec:
        chosen = [k for k in ("index", "indices", "random", "from_screening", "top_linear", "matched", "directions")
                  if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of index, indices, random, from_screening, top_linear, matched, "
                             "directions")
        if chosen[0] == "matched" and self.role == "feature":
            self.__dict__["role"] = "matched_control"
        if chosen[0] == "directions":
            if self.role == "feature":
                self.__dict__["role"] = "direction_control"
            elif "control" not in self.role:
                raise ValueError(f"role '{self.role}' of random-direction controls must contain 'control' (the "
                                 "report tests controls by role); drop `role` for the default direction_control")
        if chosen[0] in ("index", "indices", "random") and self.point is None:
            raise ValueError(f"'{chosen[0]}' needs a point")
        if self.indices is not None and not self.indices:
            raise ValueError("indices must not be empty")
        return self


class InterventionSpec(StrictModel):
    """``scale`` multiplies the activation (the paper: -4, 0, 1, 4), ``set`` clamps it (optionally relative to
    the feature's largest activation observed on the design's stimuli, or at quantiles of the feature's own
    non-zero activations there: a clamp calibrated per feature), ``add`` adds, ``zero`` ablates."""

    kind: Literal["scale", "set", "add", "zero"]
    values: list[float] = Field(default_factory=lambda: [0.0])
    relative_to_max: bool = False
    quantile: bool = Field(False, description="kind set: values are quantiles (0..1) of the feature's own "
                                              "non-zero activations on the battery's stimuli")
    where: Where = "all"

    @property
    def variant(self) -> str:
        """How a set is calibrated ('' when the values are used as written)."""
        return "relative_to_max" if self.relative_to_max else "quantile" if self.quantile else ""

    @property
    def label(self) -> str:
        """The ``intervention`` column of its result rows: ``set_relative_to_max`` and ``set_quantile`` are
        conditions of their own (the results key must tell them from a plain ``set``)."""
        return f"{self.kind}_{self.variant}" if self.variant else self.kind

    @model_validator(mode="after")
    def _check(self) -> InterventionSpec:
        if self.kind == "zero":
            self.__dict__["values"] = [0.0]
        if not self.values:
            raise ValueError("values must not be empty")
        if self.relative_to_max and self.kind != "set":
            raise ValueError("relative_to_max only applies to kind: set")
        if self.quantile and (self.kind != "set" or self.relative_to_max):
            raise ValueError("quantile only applies to kind: set (without relative_to_max)")
        if self.quantile and any(not 0.0 <= v <= 1.0 for v in self.values):
            raise ValueError("quantile values must lie in 0..1")
        return self


class PrimarySpec(StrictModel):
    """The pre-registered primary test of every feature: one clamp and one contrast readout. Every other
    clamp value and readout is secondary (its own FDR family)."""

    intervention: Literal["scale", "set", "set_relative_to_max", "set_quantile", "add", "zero"] = Field(
        description="kind of the primary clamp (a calibrated set by its results label)")
    value: float = Field(0.0, description="its value (as listed under interventions)")
    where: Where | None = Field(None, description="its position, when the same clamp is listed at several")
    readout: str = Field(description="a contrast readout of the design(s)")
    sesoi: float | None = Field(None, gt=0, description="smallest effect of interest (readout units): lets the "
                                                         "verdict say 'no' when the items could have found it")


class BatteryConfig(StrictModel):
    """A whole battery: model, checkpoint, designs, features, interventions, run settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)  # it names files and folders
    model: str = "smollm2-135m"
    checkpoint: Path
    designs: list[Path] = Field(min_length=1)
    features: list[FeatureSpec] = Field(min_length=1)
    interventions: list[InterventionSpec] = Field(min_length=1)
    seed: Seed = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: PositiveInt = 16
    max_batch_rows: PositiveInt = Field(512, description="most rows in one stacked suffix pass: (features x "
                                        "conditions + 1 clean copy) x batch_size; lower it if memory runs out")
    out: Path = Path("runs/battery")
    max_items: PositiveInt | None = Field(None, description="use only the first N items per design (pilots)")
    primary: PrimarySpec | None = Field(None, description="the pre-registered primary test; default (with a "
                                        "warning): the first clamp that is not a no-op and the first contrast")
    items: Literal["confirmation", "all"] | None = Field(
        None, description="which items of a screened design to run: 'confirmation' (the items the screening "
                          "held out; the default when a feature comes from_screening) or 'all' (exploratory: "
                          "features are tested on the items they were selected on, and reported as such)")

    @model_validator(mode="after")
    def _no_repeats(self) -> BatteryConfig:
        """A repeated design or condition would write the same result rows twice: refuse it up front."""
        seen_designs: set[str] = set()
        for path in self.designs:
            key = str(path.resolve())
            if key in seen_designs:
                raise ValueError(f"design {path} is listed twice")
            seen_designs.add(key)
        seen: set[tuple] = set()
        for spec in self.interventions:
            for value in spec.values:
                key = (spec.label, float(value), spec.where)
                if key in seen:
                    raise ValueError(f"condition {spec.kind} {value:g} (where: {spec.where}) is listed twice; "
                                     "remove the repeat")
                seen.add(key)
        if self.primary is not None:
            self.primary_condition()
        return self

    def primary_condition(self) -> tuple[str, float, str]:
        """(kind, value, where) of the primary clamp: named (checked against ``interventions``) or the default,
        the first listed condition that is not a no-op (scale 1, add 0)."""
        listed = [(s.label, float(v), s.where) for s in self.interventions for v in s.values]
        if self.primary is None:
            real = [c for c in listed if not ((c[0] == "scale" and c[1] == 1.0) or (c[0] == "add" and c[1] == 0.0))]
            return (real or listed)[0]
        p = self.primary
        value = 0.0 if p.intervention == "zero" else float(p.value)
        match = [c for c in listed if c[0] == p.intervention and c[1] == value
                 and (p.where is None or c[2] == p.where)]
        if not match:
            shown = ", ".join(f"{k} {v:g} [{w}]" for k, v, w in listed)
            raise ValueError(f"primary clamp {p.intervention} {value:g} is not among the interventions ({shown}); "
                             "name one of them in primary.intervention/value")
        if len(match) > 1:
            raise ValueError(f"primary clamp {p.intervention} {value:g} is listed at several positions; "
                             "name one with primary.where")
        return match[0]
