"""The Python API: one function per CLI command, with the same name.

    from fis_interventions import api
    api.harvest(out="runs/acts", tokens=50_000)            # fis harvest
    api.train("train.yaml", "runs/joint")                   # fis train
    api.eval(["runs/sae/checkpoint", "runs/joint/checkpoint"])  # fis eval
    api.validate("stimuli/formality_emotion.yaml")          # fis stimuli validate
    api.screen("runs/joint/checkpoint", "stimuli/formality_emotion.yaml", out="runs/screen")  # fis screen
    api.features("runs/joint/checkpoint", "secondary.hook_latents", [60, 218], out="cards")  # fis features
    api.battery("battery.yaml")                              # fis battery
    api.stats(df, dv="shift", factors=["a", "b"], item="item")  # fis stats
    api.power("runs/battery", out="runs/power", select={"feature": 12, "readout": "formal_vs_casual"})  # fis power
    api.report("runs/battery")                               # fis report
    api.export("runs/sae/checkpoint", "runs/sae-saelens")    # fis export --format saelens
"""

from __future__ import annotations

from .activations import harvest
from .cards import features
from .demo import demo
from .designs import show, validate
from .evaluation import evaluate_many as eval  # noqa: A001 - same name as `fis eval`
from .interventions import battery, merge_shards as merge
from .models import model_info as info
from .planning import power
from .reports import report
from .sae.saelens import export
from .screening import screen
from .stats import stats
from .training import refit, train

__all__ = ["battery", "demo", "eval", "export", "features", "harvest", "info", "merge", "power", "refit", "report",
           "screen", "show", "stats", "train", "validate"]
