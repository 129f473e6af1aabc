"""Battery throughput: our battery vs a naive loop (full model, one forward per condition, hook at the hook
point, logits at every position), on the same stimuli and conditions, results checked equal. Target: >= 2.5x at
4 interventions per feature with the hook at a middle layer. Also prints peak memory.

    python bench/battery.py [--checkpoint CKPT] [--rows 64] [--features 2] [--kind scale|set] [--random-init]
With --random-init the model's architecture (its config.json) gets seeded random weights: the same shapes and
kernels, for a machine that holds the config but not the weights (the GPU node: bench/gpu_check.sh); the
speed-up is then measured, the scores are not the real model's.
Without --checkpoint a randomly initialised joint SAE (8x, k 32, NFM 64 with a non-zero output layer, secondary
256) is used. Our battery skips the suffix for edited rows whose residual is bit-identical to the clean one
(scale 1, a feature inactive on the stimulus), so with --kind scale the speed depends on how often the features
fire; --kind set changes every row (the worst case: every edited row runs). Both are printed with the share of
edited rows that ran.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fis_interventions.activations import ExclusionRule, Normalizer
from fis_interventions.attach import attach
from fis_interventions.designs import expand, load_design
from fis_interventions.interventions import BatteryConfig, battery, read_results
from fis_interventions.interventions.battery import Readouts, encode_rows
from fis_interventions.interventions.features import conditions, make_edit, resolve_features
from fis_interventions.models import load_model, resolve_hook
from fis_interventions.sae import JointArch, JointSAE, NFMArch, SAEArch, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleave, ratio  # noqa: E402  (bench/interleave.py: the one rule for ratios)
DESIGN = ROOT / "stimuli" / "formality_emotion.yaml"


def random_checkpoint(bridge, folder: Path) -> Path:
    torch.manual_seed(0)
    d = int(bridge.cfg.d_model)
    joint = JointSAE(JointArch(sae=SAEArch(d_in=d, d_sae=8 * d, k=32), nfm=NFMArch(emb_dim=64, hidden=64)))
    joint.attach_secondary(256, 8)
    # a trained NFM's output layer is not zero (it starts at zero): without this the secondary features could
    # not move the residual, and every edited row would be skipped as identical to the clean one
    torch.nn.init.normal_(joint.nfm.mlp_out.weight, std=0.05)
    hook = resolve_hook(bridge, f"blocks.{bridge.cfg.n_layers // 2 - 1}.hook_resid_post").name
    rule = ExclusionRule.for_tokenizer(bridge.tokenizer, 10.0)
    rule.median_norm = 150.0
    norm = {**Normalizer("expected_norm", scale=d**0.5 / 150.0).to_dict(), "exclusion": rule.to_dict()}
    return save_checkpoint(folder / "ckpt", joint, model_name=getattr(bridge, "fis_model_name"), hook=hook,
                           normalization=norm)


def random_init_folder(model: str, folder: Path) -> Path:
    """A local HF folder with ``model``'s config and tokenizer and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fis_interventions.models import resolve_model

    source = resolve_model(model).folder
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def sync() -> None:
    """Wait for queued GPU work, so a timer reads the work done, not the work launched."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def naive(bridge, attached, cfg: BatteryConfig, rows, readouts: Readouts, targets) -> dict:
    """One full forward per (batch, feature, condition) with a hook that edits the residual."""
    hook_name = attached.split.hook.canonical
    scores = {}
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows.iloc[start:start + cfg.batch_size]
        enc = encode_rows(chunk, bridge.tokenizer).to(attached.split.device)  # inputs where the weights are
        for t in targets:
            for c in conditions(cfg.interventions, 1.0):
                def edit_hook(value, hook, t=t, c=c):
                    keep = attached.splice.keep_mask(enc.tokens, value, enc.mask)
                    return attached.splice.edit(value, keep, {t.point: make_edit(t, c)})
                with torch.no_grad():
                    logits = bridge.run_with_hooks(enc.tokens, attention_mask=enc.mask,
                                                   fwd_hooks=[(hook_name, edit_hook)])
                at = logits[torch.arange(len(chunk), device=logits.device), enc.readout]
                words, _ = readouts.scores(at)
                for i, item in enumerate(zip(chunk["item"], chunk["cell"], chunk["prompt_id"])):
                    scores[(*item, t.label, c.value)] = words[i]
    return scores


def warm_up(bridge, attached, rows, batch_size: int) -> None:
    """One forward on the model's device, so neither leg pays first-call costs."""
    enc = encode_rows(rows.iloc[:batch_size], bridge.tokenizer).to(attached.split.device)
    with torch.no_grad():
        bridge(enc.tokens, attention_mask=enc.mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--rows", type=int, default=64, help="stimulus x prompt rows")
    ap.add_argument("--features", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (ours, naive) x this")
    ap.add_argument("--random-init", action="store_true", help="the model's architecture with random weights")
    ap.add_argument("--kind", default="scale", choices=["scale", "set"],
                    help="scale: the paper's clamps (rows an edit leaves unchanged are skipped); set: every row "
                         "changes, so every edited row runs (the worst case)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    model = str(random_init_folder(args.model, tmp / "model")) if args.random_init else args.model
    bridge = load_model(model)
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(bridge, tmp)
    design = load_design(DESIGN)
    rows = expand(design).iloc[:args.rows].reset_index(drop=True)
    n_items = rows["item"].nunique()
    cfg = BatteryConfig.model_validate({
        "name": "bench", "model": model, "checkpoint": str(ckpt), "designs": [str(DESIGN)],
        "features": [{"point": "secondary.hook_latents", "index": i} for i in range(args.features)],
        "interventions": [{"kind": args.kind, "values": [-4.0, 0.0, 1.0, 4.0]}], "batch_size": args.batch_size,
        "out": str(tmp / "run"), "max_items": n_items})
    attached = attach(bridge, ckpt)
    targets = resolve_features(cfg.features, attached.joint, attached.checkpoint.d_in, 0)
    readouts = Readouts.for_design(design, bridge.tokenizer)
    n_rows = len(expand(design).pipe(lambda d: d[d["item"].isin(rows["item"].unique())]))

    sub = expand(design).pipe(lambda d: d[d["item"].isin(rows["item"].unique())])
    warm_up(bridge, attached, sub, args.batch_size)
    from fis_interventions.splice import SplitModel

    suffix_rows: list[int] = []
    real_suffix = SplitModel.suffix

    def counting_suffix(self, resid, state, positions=None):
        suffix_rows.append(resid.shape[0])
        return real_suffix(self, resid, state, positions)

    runs = iter(range(10**6))

    def ours_leg() -> None:
        suffix_rows.clear()
        SplitModel.suffix = counting_suffix
        try:
            battery(cfg.model_copy(update={"out": tmp / f"run{next(runs)}"}), bridge=bridge, progress=False)
        finally:
            SplitModel.suffix = real_suffix

    refs: list[dict] = []
    # legs in turns (ours, naive, ours, naive, ...) on the same stimuli: load from other jobs hits both alike
    times = interleave({"ours": ours_leg, "naive": lambda: refs.append(naive(bridge, attached, cfg, sub, readouts,
                                                                           targets))},
                       rounds=args.repeats, warmup=0, sync=sync)
    t_ours, t_naive = statistics.median(times["ours"]), statistics.median(times["naive"])
    speedup = ratio(times["naive"], times["ours"])
    ref = refs[0]
    rss_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ours = read_results(tmp / "run0" / "results.sqlite")

    words = ours[ours.readout_kind == "word"]
    word_pos = {w: i for i, (w, _) in enumerate(readouts.word_ids)}
    diff = max(abs(r.score_edited - float(ref[(r.item, r.cell, r.prompt_id, r.feature, r.value)][word_pos[r.readout]]))
               for r in words.itertuples())
    n_cond = n_rows * len(targets) * 4
    weights = " (random init)" if args.random_init else ""
    print(f"model {args.model}{weights}, hook {attached.hook}, {n_rows} stimulus x prompt rows, {len(targets)} "
          f"features x 4 conditions, batch {args.batch_size}, threads {torch.get_num_threads()}, device {attached.split.device}")
    print(f"ours  : {n_cond / t_ours:8.1f} conditions x stimuli / s  (median {t_ours:.1f} s, includes SQLite writes)")
    print(f"naive : {n_cond / t_naive:8.1f} conditions x stimuli / s  (median {t_naive:.1f} s)")
    print(f"speed-up ours/naive: {speedup}  (target >= 2.5x); max |score difference| {diff:.2e}")
    n_batches = -(-n_rows // args.batch_size)
    run_rows = sum(suffix_rows) - n_rows  # the clean copy runs once per pass
    print(f"edited rows through the suffix: {run_rows} of {n_cond} (the rest are bit-identical to the clean run: "
          f"scale 1, features inactive on the stimulus); {len(suffix_rows)} suffix passes for {n_batches} batches")
    print(f"peak RSS (whole process, model included): {rss_all:.0f} MiB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
