"""Battery configuration (YAML, pydantic): which features to clamp, how, where, and on which designs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from ..config import StrictModel

Where = Literal["all", "stimulus", "readout"]


class FeatureSpec(StrictModel):
    """One entry of ``features``: exactly one selector (index, indices, random, from_screening, top_linear)."""

    point: str | None = Field(None, description="named point of the joint model, e.g. secondary.hook_latents")
    index: int | None = Field(None, ge=0, description="one feature")
    indices: list[int] | None = Field(None, description="a group of features edited together")
    random: PositiveInt | None = Field(None, description="this many random features of the point (a control)")
    from_screening: Path | None = Field(None, description="a screening folder or its top.json")
    top: PositiveInt = Field(3, description="with from_screening: how many of its top features")
    top_linear: PositiveInt | None = Field(None, description="SAE latents with the largest linear-part weight "
                                                              "among those active on the design (a control)")
    role: str = Field("feature", description="label in the results, e.g. top, random_control, linear_control")

    @model_validator(mode="after")
    def _one_selector(self) -> FeatureSpec:
        chosen = [k for k in ("index", "indices", "random", "from_screening", "top_linear")
                  if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of index, indices, random, from_screening, top_linear")
        if chosen[0] in ("index", "indices", "random") and self.point is None:
            raise ValueError(f"'{chosen[0]}' needs a point")
        if self.indices is not None and not self.indices:
            raise ValueError("indices must not be empty")
        return self


class InterventionSpec(StrictModel):
    """``scale`` multiplies the activation (the paper: -4, 0, 1, 4), ``set`` clamps it (optionally relative to
    the feature's largest activation observed on the design's stimuli), ``add`` adds, ``zero`` ablates."""

    kind: Literal["scale", "set", "add", "zero"]
    values: list[float] = Field(default_factory=lambda: [0.0])
    relative_to_max: bool = False
    where: Where = "all"

    @model_validator(mode="after")
    def _check(self) -> InterventionSpec:
        if self.kind == "zero":
            self.__dict__["values"] = [0.0]
        if not self.values:
            raise ValueError("values must not be empty")
        if self.relative_to_max and self.kind != "set":
            raise ValueError("relative_to_max only applies to kind: set")
        return self


class BatteryConfig(StrictModel):
    """A whole battery: model, checkpoint, designs, features, interventions, run settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "smollm2-135m"
    checkpoint: Path
    designs: list[Path] = Field(min_length=1)
    features: list[FeatureSpec] = Field(min_length=1)
    interventions: list[InterventionSpec] = Field(min_length=1)
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: PositiveInt = 16
    max_batch_rows: PositiveInt = Field(512, description="most rows in one stacked suffix pass: (features x "
                                        "conditions + 1 clean copy) x batch_size; lower it if memory runs out")
    out: Path = Path("runs/battery")
    max_items: PositiveInt | None = Field(None, description="use only the first N items per design (pilots)")
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
                key = (spec.kind, float(value), spec.where, spec.relative_to_max)
                if key in seen:
                    raise ValueError(f"condition {spec.kind} {value:g} (where: {spec.where}) is listed twice; "
                                     "remove the repeat")
                seen.add(key)
        return self
