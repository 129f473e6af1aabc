"""Attach a trained joint-SAE checkpoint to a loaded model: the one place that pairs them.

Everything that runs a checkpoint inside the model (evaluation, screening, batteries) goes through
:func:`attach`, which refuses a checkpoint trained on another model or d_model (a one-line error), splits the
model at exactly the hook the checkpoint was harvested and trained at (paper flaw 1), and uses the
normalisation and exclusion rule saved with it (flaw 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .activations import ExclusionRule, Normalizer
from .errors import FisError
from .model_identity import check_same_model, of_bridge, of_checkpoint
from .models import model_name, weights_device
from .sae import Checkpoint, load_checkpoint
from .splice import JointSplice, SplitModel


log = logging.getLogger(__name__)


@dataclass
class Attached:
    checkpoint: Checkpoint
    split: SplitModel
    splice: JointSplice

    @property
    def joint(self) -> Any:
        return self.checkpoint.model

    @property
    def hook(self) -> str:
        return self.split.hook.name


def checkpoint_preprocessing(normalization: dict[str, Any] | None, source: Path | str) -> tuple[Normalizer, ExclusionRule]:
    """The normaliser and exclusion rule stored in a checkpoint's ``normalization`` entry."""
    if not normalization or "exclusion" not in normalization:
        raise FisError("checkpoint has no normalisation/exclusion statistics, so it cannot be spliced into a model",
                       source=source, fix="train it with `fis train` on harvested activations")
    return Normalizer.from_dict(normalization), ExclusionRule.from_dict(normalization["exclusion"])


def attach(bridge: Any, checkpoint: Path | str | Checkpoint) -> Attached:
    """Load (if needed) and attach a checkpoint; see the module docstring for the checks."""
    device = weights_device(bridge)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint), device=device)
    ckpt.model.to(device).eval()
    name = model_name(bridge)
    saelens = ckpt.meta.get("format") == "saelens"
    check_same_model(of_checkpoint(ckpt), of_bridge(bridge), source=ckpt.path)  # by content where recorded
    if ckpt.d_in != int(bridge.cfg.d_model):
        raise FisError(f"checkpoint expects d_model {ckpt.d_in}, model has {bridge.cfg.d_model}",
                       source=ckpt.path / "cfg.json" if saelens else ckpt.path, field="d_in" if saelens else "model",
                       fix="use the model the checkpoint was trained on")
    if not ckpt.hook:
        raise FisError("checkpoint does not record its hook point", source=ckpt.path, field="hook",
                       fix="train it with `fis train` on harvested activations")
    if saelens:
        _warn_other_model(ckpt, bridge, name)
        # a SAELens SAE saw raw activations and comes with no harvest: our exclusion rule for this tokenizer
        # (special tokens; no massive-activation threshold, since no statistics were gathered)
        rule = ExclusionRule.for_tokenizer(bridge.tokenizer, norm_multiple=None)
        ckpt.normalization = {**(ckpt.normalization or {}), "exclusion": rule.to_dict()}
        if ckpt.hook not in bridge.hook_dict or int(bridge.cfg.n_layers) <= int(ckpt.hook.split(".")[1]):
            raise FisError(f"model {name} has no hook {ckpt.meta.get('saelens_hook_name')!r}",
                           source=ckpt.path / "cfg.json", field="metadata.hook_name",
                           fix="load the model the SAE was trained on")
    normalizer, rule = checkpoint_preprocessing(ckpt.normalization, ckpt.path)
    split = SplitModel(bridge, ckpt.hook)
    return Attached(ckpt, split, JointSplice(ckpt.model, normalizer, rule))


def _short(name: str) -> str:
    """A model name without organisation, path or case: ``HuggingFaceTB/SmolLM2-135M`` -> ``smollm2-135m``."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _warn_other_model(ckpt: Checkpoint, bridge: Any, name: str) -> None:
    """A SAELens SAE records the model it was trained on only as a free-form name (no fingerprint), so a
    mismatch with the loaded model is a warning, not a refusal: d_model and the hook point still must match."""
    theirs = ckpt.meta.get("saelens_model_name")
    ours = {_short(name), _short(str(getattr(hf_config(bridge), "_name_or_path", "") or name))}
    if theirs and _short(str(theirs)) not in ours:
        log.warning("SAELens SAE %s was trained on model %r, the loaded model is %r: the splice is only meaningful "
                    "if they are the same model (d_model %s and the hook point match)", ckpt.path, theirs, name,
                    ckpt.d_in)


def hf_config(bridge: Any) -> Any:
    return getattr(getattr(bridge, "original_model", None), "config", None)
