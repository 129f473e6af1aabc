"""Writes docs/tutorial.ipynb (outputs stripped). Edit the cells here, then run: python docs/make_tutorial.py

Why a generator: the notebook's JSON is machine-written, so reviews read this file, and git never holds outputs.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# fis-interventions in one notebook

The whole pipeline through the Python API, each call named like its CLI command:
**load a model -> harvest activations -> train a joint SAE -> evaluate -> read a 2x2 design -> screen features on
the design's discovery items -> clamp the top features (and controls) on the held-out items -> statistics ->
report**.

It runs on `tiny-random` (a seeded random-init model, < 2 minutes on 2 CPU cores) so that you can see every step
quickly; its numbers mean nothing. To run it on the real default model (SmolLM2-135M-Instruct, ~15 minutes),
change the one line below to `MODEL = "smollm2-135m"`."""),
    new_code_cell("""MODEL = "tiny-random"   # "smollm2-135m" for the real default model (the only line to change)"""),
    new_code_cell("""import tempfile
from pathlib import Path

import yaml

from fis_interventions.demo import DESIGN, SIZES

S = SIZES["quick" if MODEL == "tiny-random" else "full"]   # the demo's sizes: tiny for tiny-random
OUT = Path(tempfile.mkdtemp(prefix="fis-tutorial-"))     # every stage writes a folder under here
print("writing under", OUT)"""),
    new_markdown_cell("""## 1. The model
`load_model` loads any model offline as a transformer-lens `TransformerBridge`; `default_hook` is the
residual stream after the middle block, where the paper trained its SAEs."""),
    new_code_cell("""from fis_interventions.models import default_hook, greedy_continuation, load_model, resolve_hook

bridge = load_model(MODEL)
hook = resolve_hook(bridge, default_hook(bridge)).name
print(hook, "|", repr(greedy_continuation(bridge, "The capital of France is")))"""),
    new_markdown_cell("""## 2. Harvest activations (`fis harvest`)
Activations at the hook are written to safetensors shards with a manifest; special tokens and massive
activations are excluded by a frozen rule, and the normalisation statistics travel with the data."""),
    new_code_cell("""from fis_interventions.activations import harvest

acts = OUT / "activations"
manifest = harvest(bridge=bridge, model=MODEL, hook=hook, out=acts, tokens=S["tokens"],
                   context_length=S["context_length"], progress=False)
print(manifest["token_count"], "tokens;", manifest["excluded"])"""),
    new_markdown_cell("""## 3. Train a joint SAE (`fis train`)
A TopK SAE trained jointly with the integration module (a Neural Factorization Machine over its latents),
then a secondary SAE on the module's output. The config is the same YAML `fis train` reads."""),
    new_code_cell("""from fis_interventions.demo import _train_config
from fis_interventions.training import train

cfg = _train_config(acts, "joint", S)
(OUT / "train_joint.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
print(yaml.safe_dump(cfg, sort_keys=False))
checkpoint = train(OUT / "train_joint.yaml", OUT / "joint", progress=False).checkpoint
print("checkpoint:", checkpoint)"""),
    new_markdown_cell("""## 4. Evaluate (`fis eval`)
FVU, L0, dead latents, and KL / CE with the reconstruction spliced into the model, against zero-ablation and
random-direction baselines, per component."""),
    new_code_cell("""from fis_interventions.evaluation import comparison_table, evaluate, format_table

ev = evaluate(checkpoint, bridge=bridge, max_contexts=S["eval_contexts"], progress=False, name="joint")
print(format_table(comparison_table([ev])))"""),
    new_markdown_cell("""## 5. A 2x2 design (`fis stimuli validate`)
Designs are YAML: matched items (one sentence per cell), a readout prompt and target word sets with a
contrast. Validation checks structure, balance and that every target word is one token."""),
    new_code_cell("""from fis_interventions.designs import validate

print(DESIGN.read_text()[:900], "...")
check = validate(DESIGN)
print(check.items_per_cell, "| warnings:", check.warnings)"""),
    new_markdown_cell("""## 6. Screen features (`fis screen`)
Every feature at every point is tested for an A x B interaction of its activation, on the **discovery** items
only; the rest are held out so that the battery never tests a feature on the items it was picked on."""),
    new_code_cell("""from fis_interventions.screening import screen

screened = screen(checkpoint, DESIGN, model=MODEL, bridge=bridge, out=OUT / "screen", progress=False)
print(screened.summary["split"])
screened.table.sort_values("p_ab").head(8)"""),
    new_markdown_cell("""## 7. Clamp features (`fis battery`)
The top integration features from the screen, a random control and a linear-path control are clamped inside
the forward pass on the held-out items; every row records the shift of the readout contrast."""),
    new_code_cell("""from fis_interventions.interventions import BatteryConfig, battery, read_results

battery_cfg = {
    "name": "tutorial", "model": MODEL, "checkpoint": str(checkpoint), "designs": [str(DESIGN)],
    "features": [
        {"from_screening": str(OUT / "screen"), "point": "secondary.hook_latents", "top": 2, "role": "top"},
        {"point": "secondary.hook_latents", "random": 1, "role": "random_control"},
    ],
    "interventions": [{"kind": "scale", "values": [0.0, 4.0]}],
    "seed": 0, "batch_size": 16, "out": str(OUT / "battery"), "max_items": S["max_items"],
}
store = battery(BatteryConfig.model_validate(battery_cfg), bridge=bridge, progress=False)
rows = read_results(store)
rows.head()"""),
    new_markdown_cell("""## 8. Statistics (`fis stats`)
Any table with a measure, two factors and an item column gets Type III ANOVA, the by-item RM-ANOVA, a linear
mixed model with item random effects (Satterthwaite df) and the interaction contrast."""),
    new_code_cell("""from fis_interventions.stats.analyze import stats

# one feature, one clamp (ablation: scale 0), one readout (the design's "emotion" contrast), every prompt
top = rows[(rows.role == "top") & (rows.value == 0.0) & (rows.readout == "emotion")]
one = top[top.feature == top.feature.iloc[0]]
result = stats(one, dv="shift", factors=["a", "b"], item="item", prompt="prompt_id")
result["lmm"]["fixed"] if result["lmm"] else result["warnings"]"""),
    new_markdown_cell("""## 9. Report (`fis report`)
Markdown and HTML with the verdict, the primary tests, figures, feature cards and a generated methods
section."""),
    new_code_cell("""from fis_interventions.reports import report

folder = Path(report(OUT / "battery", out=OUT / "report"))
md = (folder / "report.md").read_text()
print(md[:2500])"""),
]

nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
nbformat.write(nb, Path(__file__).with_name("tutorial.ipynb"))
