"""What the report concludes and how: the pre-registered primary test, test families, the manipulation check,
the top-feature-vs-matched-controls test and the verdict.

- **Primary test**: one clamp and one contrast readout per feature, named in the battery config (``primary``)
  and recorded in run.json; runs without it get the documented default (first clamp that is not a no-op, first
  contrast readout of the design) and a warning. Every other clamp value and readout is secondary.
- **Families** (BH within each): primary tests of the features; primary tests of the controls; feature minus
  matched controls; secondary tests; exploratory tests (selected and tested on the same items). A control that
  is a screen hit is not a null: it is labelled an alternative explanation and tested in the secondary family.
- **Manipulation check**: on the clean model, each contrast readout must move with its own factor (main effect
  in the expected direction, p < .05, primary LMM); tests on a readout that fails are uninterpretable.
- **Feature vs matched controls**: per item x cell x prompt, the feature's shift minus the mean shift of its
  matched controls, analysed with the primary 2x2 LMM: its A x B term is the role x A x B interaction of a mixed
  model with feature role as a within-item factor (by-item random slopes), i.e. the feature's interaction
  contrast minus its controls', by item.
- **Verdict** per design: yes / no / inconclusive (see :func:`verdicts`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..stats import analyze_2x2
from .runfolder import Run

ALPHA = 0.05
POWER = 0.8
FAMILIES = {
    "primary": "primary tests of the features (one pre-registered clamp and readout per feature)",
    "controls": "primary tests of the controls",
    "vs_controls": "feature minus its matched controls (primary clamp and readout)",
    "secondary": "secondary tests (other clamp values and readouts; controls that are screen hits)",
    "exploratory": "exploratory tests only (features selected and tested on the same items)",
}
ALTERNATIVE = "alternative explanation (a screen hit), not a null control"


def is_control(role: str) -> bool:
    return "control" in str(role)


def primary_of(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The run's primary test (run.json ``primary``) or the documented default, with the warnings to show."""
    recorded = (run.info.model_extra or {}).get("primary")
    if isinstance(recorded, dict) and recorded.get("readout") is not None:
        notes = ([] if not recorded.get("default") else
                 [f"no primary test was named in the battery config: the default is used ({_clamp(recorded)}); "
                  "name it under `primary:` before the run"])
        return recorded, notes
    listed: list[tuple[str, float, str]] = []
    for spec in run.info.config.get("interventions") or []:
        kind = spec.get("kind", "scale")
        label = (f"{kind}_relative_to_max" if spec.get("relative_to_max") else  # the results' intervention label
                 f"{kind}_quantile" if spec.get("quantile") else kind)
        for v in (spec.get("values") or [0.0]) if kind != "zero" else [0.0]:
            listed.append((label, float(v), spec.get("where", "all")))
    res = run.results
    if not listed:
        listed = list(dict.fromkeys(zip(res["intervention"], res["value"].astype(float), res["position"])))
    real = [c for c in listed if not ((c[0] == "scale" and c[1] == 1.0) or (c[0] == "add" and c[1] == 0.0))]
    kind, value, where = (real or listed)[0]
    design = next(iter(run.info.designs.values()))
    contrasts = list(design.contrasts) or sorted(res.loc[res["readout_kind"] == "contrast", "readout"].unique())
    primary = {"intervention": kind, "value": value, "position": where, "readout": contrasts[0], "sesoi": None,
               "default": True}
    return primary, [f"the run records no primary test (made by an older battery): the default is used "
                     f"({_clamp(primary)}); name it under `primary:` in the battery config"]


def _clamp(p: dict[str, Any]) -> str:
    return f"{p['intervention']} {float(p['value']):g} [{p['position']}] on `{p['readout']}`"


def is_primary(tests: pd.DataFrame, primary: dict[str, Any]) -> pd.Series:
    return ((tests["intervention"] == primary["intervention"]) & (tests["value"].astype(float) == float(primary["value"]))
            & (tests["position"] == primary["position"]) & (tests["readout"] == primary["readout"]))


def screen_hits(run: Run) -> set[tuple[str, str]]:
    """(point, feature label) of the screening's hits (q_ab < .05) where the run folder holds screening.csv."""
    s = run.screening
    if s is None or not {"point", "feature", "q_ab"} <= set(s.columns):
        return set()
    sig = s[s["q_ab"] < ALPHA]
    return {(str(p), str(int(f))) for p, f in zip(sig["point"], sig["feature"], strict=True)}


def groups(tests: pd.DataFrame, run: Run) -> pd.Series:
    """feature / control / alternative (a control that is a screen hit) per test."""
    hits = screen_hits(run)
    out = []
    for role, point, feature in zip(tests["role"], tests["point"], tests["feature"], strict=True):
        if not is_control(role):
            out.append("feature")
        else:
            out.append("alternative" if (str(point), str(feature)) in hits else "control")
    return pd.Series(out, index=tests.index)


# ---------------------------------------------------------------- manipulation check


def readout_factor(name: str, expr: str, factors: dict[str, list[str]]) -> tuple[str, int | None] | None:
    """The factor a contrast readout ``name: 'setA - setB'`` measures and the expected sign of its main effect
    (second level minus first): a set named after a level ties it; else a readout named after a factor
    (direction unknown); None when nothing ties it."""
    sets = [s.strip() for s in str(expr).split(" - ")]
    set_a, set_b = (sets + ["", ""])[:2]
    for factor, (l1, l2) in factors.items():
        if set_a == l2 or set_b == l1:
            return factor, 1
        if set_a == l1 or set_b == l2:
            return factor, -1
    for factor in factors:
        if name == factor:
            return factor, None
    return None


def manipulation_check(run: Run) -> pd.DataFrame:
    """Clean-model readout by cell and its main effects (LMM, 95% CI) per design x contrast readout, with the
    check of its own factor: ``status`` passed / failed / not checked."""
    res = run.results
    rows = []
    for design_name, design in run.info.designs.items():
        a, b = design.names
        sub = res[(res["design"] == design_name) & (res["readout_kind"] == "contrast")]
        for readout, rsub in sub.groupby("readout", sort=False):
            clean = rsub.drop_duplicates(["item", "cell", "prompt_id"]).rename(columns={"a": a, "b": b})
            prompts = clean["prompt_id"].nunique()
            out = analyze_2x2(clean, "score_clean", a, b, item="item",
                              levels={a: design.factors[a], b: design.factors[b]},
                              prompt="prompt_id" if prompts > 1 else None)
            fixed = {r["term"]: r for r in (out["lmm"] or {}).get("fixed", [])}
            means = clean.groupby([a, b])["score_clean"].mean()
            tie = readout_factor(str(readout), design.contrasts.get(str(readout), ""), design.factors)
            row: dict[str, Any] = {"design": design_name, "readout": readout,
                                   **{f"mean[{la}.{lb}]": float(means.get((la, lb), np.nan))
                                      for la in design.factors[a] for lb in design.factors[b]}}
            for factor in (a, b):
                f = fixed.get(factor, {})
                row.update({f"{factor}_effect": f.get("estimate"), f"{factor}_ci_low": f.get("ci_low"),
                            f"{factor}_ci_high": f.get("ci_high"), f"{factor}_p": f.get("p")})
            if tie is None:
                row.update(factor=None, expected=None, status="not checked",
                           note="the readout is not tied to a factor (no set named after a level)")
            else:
                factor, sign = tie
                f = fixed.get(factor, {})
                est, p = f.get("estimate"), f.get("p")
                levels = design.factors[factor]
                expected = (f"{levels[1]} > {levels[0]}" if sign == 1 else f"{levels[0]} > {levels[1]}"
                            if sign == -1 else "moves (direction not known)")
                if est is None or p is None:
                    status, note = "failed", "the main effect could not be estimated"
                elif sign is not None and np.sign(est) != sign:
                    status, note = "failed", f"moves the wrong way ({factor} effect {est:.3g}, p = {p:.2g})"
                elif p >= ALPHA:
                    status, note = "failed", f"does not move with {factor} (effect {est:.3g}, p = {p:.2g})"
                else:
                    status, note = "passed", f"{factor} effect {est:.3g}, p = {p:.2g}"
                row.update(factor=factor, expected=expected, status=status, note=note)
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- feature vs matched controls


CONTROL_KINDS = {"matched_latent": "matched controls", "random_direction": "norm-matched random directions"}


def matched_sets(run: Run) -> dict[tuple[str, str, str], list[str]]:
    """(point, feature, control kind) -> labels of its controls of that kind (run.json ``matched_to``;
    ``control_kind`` random_direction for norm-matched random residual directions, else matched_latent)."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for f in run.info.features:
        extra = f.model_extra or {}
        to = extra.get("matched_to")
        if to is not None:
            kind = str(extra.get("control_kind") or "matched_latent")
            out.setdefault((f.point, str(to), kind), []).append(str(f.feature))
    return out


def vs_controls(run: Run, primary: dict[str, Any]) -> pd.DataFrame:
    """Per design x feature x control kind (matched latents; norm-matched random directions): the feature's
    primary interaction contrast minus its controls' (LMM on the by-item differences), and both KLs at the
    primary clamp. One BH family over all rows (both kinds)."""
    res = run.results
    sets = matched_sets(run)
    clamp = ((res["intervention"] == primary["intervention"]) & (res["value"].astype(float) == float(primary["value"]))
             & (res["position"] == primary["position"]))
    rows = []
    keys = ["item", "cell", "a", "b", "prompt_id"]
    for design_name, design in run.info.designs.items():
        a, b = design.names
        dres = res[(res["design"] == design_name) & clamp]
        read = dres[dres["readout"] == primary["readout"]]
        kl = dres[dres["readout_kind"] == "kl"]
        for (point, feature, kind), controls in sets.items():
            f_rows = read[(read["point"] == point) & (read["feature"] == feature)]
            c_rows = read[(read["point"] == point) & read["feature"].isin(controls)]
            if f_rows.empty or c_rows.empty:
                continue
            c_mean = c_rows.groupby(keys, as_index=False)["shift"].mean()
            both = f_rows[keys + ["shift"]].merge(c_mean, on=keys, suffixes=("_f", "_c"))
            both["diff"] = both["shift_f"] - both["shift_c"]
            data = both.rename(columns={"a": a, "b": b})
            prompts = data["prompt_id"].nunique()
            out = analyze_2x2(data, "diff", a, b, item="item", levels={a: design.factors[a], b: design.factors[b]},
                              prompt="prompt_id" if prompts > 1 else None)
            inter = out["contrast"]["interaction"]
            f_kl = kl[(kl["point"] == point) & (kl["feature"] == feature)]["shift"]
            c_kl = kl[(kl["point"] == point) & kl["feature"].isin(controls)]["shift"]
            rows.append({"design": design_name, "point": point, "feature": feature, "control_kind": kind,
                         "controls": ",".join(controls), "n_controls": len(controls),
                         "intervention": primary["intervention"], "value": float(primary["value"]),
                         "position": primary["position"], "readout": primary["readout"],
                         "n_items": out["n_items"], **{k: inter.get(k) for k in
                                                       ("estimate", "se", "df", "ci_low", "ci_high", "p")},
                         "kl_feature": float(f_kl.mean()) if len(f_kl) else None,
                         "kl_controls": float(c_kl.mean()) if len(c_kl) else None,
                         "kl_ratio": (float(f_kl.mean() / c_kl.mean()) if len(c_kl) and c_kl.mean() > 0 else None)})
    table = pd.DataFrame(rows)
    if not table.empty:
        from ..stats import add_qvalues

        table = add_qvalues(table, p_col="p", out="q")
        table["q_family"] = FAMILIES["vs_controls"]
    return table


# ---------------------------------------------------------------- power and verdict


def detectable(se: float | None, df: float | None, family: int, power: float = POWER, alpha: float = ALPHA
               ) -> float | None:
    """Smallest |effect| the test finds with ``power`` at two-sided ``alpha / family`` (BH's threshold when only
    one of ``family`` tests is non-null): ``(t_crit + t_power) x SE``."""
    if se is None or df is None or not np.isfinite(se) or not np.isfinite(df) or df <= 0:
        return None
    crit = sps.t.ppf(1 - alpha / (2 * max(family, 1)), df)
    return float((crit + sps.t.ppf(power, df)) * se)


def power_at(effect: float, se: float | None, df: float | None, family: int, alpha: float = ALPHA) -> float | None:
    """Power of the two-sided t test at ``alpha / family`` for a true ``effect`` (noncentral t)."""
    if se is None or df is None or not se or not np.isfinite(se) or not np.isfinite(df) or df <= 0:
        return None
    crit = sps.t.ppf(1 - alpha / (2 * max(family, 1)), df)
    nc = effect / se
    # the lower tail as the upper tail of -T (noncentrality -nc): scipy's nct.cdf(-crit) is NaN for a large nc
    # (a precise test of a large effect printed "power nan%"), its sf is not
    return float(sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc))


def verdicts(run: Run, tests: pd.DataFrame, vs: pd.DataFrame, manip: pd.DataFrame, primary: dict[str, Any]
             ) -> list[dict[str, Any]]:
    """One verdict per design on "the top features carry the A x B interaction beyond matched controls":

    - **inconclusive** when the primary readout failed its manipulation check (its tests are uninterpretable),
      when no feature has matched controls, or when nothing is significant and the items could not rule out
      the smallest effect of interest (or none was named);
    - **yes** when some feature's primary test is significant in its family (q < .05) AND its difference from
      its matched controls is significant in that family, with the same sign;
    - **no** when neither holds and, with a smallest effect of interest (``primary.sesoi``), every feature's
      95% CI of the difference from its controls lies inside (-sesoi, +sesoi).
    """
    out = []
    sesoi = primary.get("sesoi")
    for design_name, design in run.info.designs.items():
        a, b = design.names
        hyp = (f"evidence that the top features carry the {a} x {b} interaction on `{primary['readout']}` "
               f"beyond matched controls")
        m = manip[(manip["design"] == design_name) & (manip["readout"] == primary["readout"])] if len(manip) else manip
        mstatus = m["status"].iloc[0] if len(m) else "not checked"
        feats = tests[(tests["design"] == design_name) & (tests["family"] == "primary")]
        feats = feats.sort_values("p", na_position="last")
        dvs = vs[vs["design"] == design_name] if len(vs) else vs
        fam = int(dvs["q_family_size"].max()) if len(dvs) else 1
        answer, why, best = "inconclusive", "", None
        if mstatus == "failed":
            why = f"the readout failed the manipulation check ({m['note'].iloc[0]}): its tests are uninterpretable"
        elif dvs.empty:
            why = "no feature was run with matched controls, so 'beyond controls' was not tested"
        else:
            merged = dvs.merge(feats[["point", "feature", "estimate", "q"]].rename(
                columns={"estimate": "feature_estimate", "q": "feature_q"}), on=["point", "feature"], how="left")
            merged["beats"] = ((merged["q"] < ALPHA) & (merged["feature_q"] < ALPHA)
                               & (np.sign(merged["estimate"]) == np.sign(merged["feature_estimate"])))
            # a feature wins only if it beats every kind of control it was run with; its weakest row is shown
            wins = merged.groupby(["point", "feature"])["beats"].transform("all")
            winners = merged[wins].sort_values("p", ascending=False, na_position="first")
            winners = winners.drop_duplicates(["point", "feature"])
            best = (winners if len(winners) else merged).sort_values("p", na_position="last").iloc[0]
            if len(winners):
                answer = "yes"
                kinds = merged[(merged["point"] == best["point"]) & (merged["feature"] == best["feature"])]
                beaten = " and ".join(f"{int(r.n_controls)} {_kind_label(r)}" for r in kinds.itertuples())
                why = f"feature {best['feature']} beats its {beaten}"
                if sesoi is not None and abs(best["estimate"]) < sesoi:  # significant, yet below what matters
                    why += (f"; but its difference from them ({best['estimate']:.3g}) is smaller than the smallest "
                            f"effect of interest ({sesoi:g})")
            elif sesoi is not None and ((merged["ci_low"] > -sesoi) & (merged["ci_high"] < sesoi)).all():
                answer = "no"
                why = f"every feature's difference from its controls lies within +-{sesoi:g} (the smallest effect of interest)"
            else:
                why = "no feature beats its matched controls" + (
                    "" if sesoi is not None else "; name a smallest effect of interest (`primary.sesoi`) to allow 'no'")
        detail = ""
        if best is not None:
            mde = detectable(best["se"], best["df"], fam)
            pw = power_at(sesoi, best["se"], best["df"], fam) if sesoi is not None else None
            detail = (f"feature {best['feature']} minus {_kind_label(best)}: {best['estimate']:.3g} "
                      f"[95% CI {best['ci_low']:.3g}, {best['ci_high']:.3g}], p = {best['p']:.2g}, q = {best['q']:.2g}; "
                      f"{int(best['n_items'])} items: 80% power for |effect| >= "
                      + (f"{mde:.3g}" if mde is not None else "n/a")
                      + f" at alpha {ALPHA:g}/{fam}" + (f", power {pw:.0%} at the sesoi {sesoi:g}" if pw is not None else ""))
        elif len(feats):
            top = feats.iloc[0]
            detail = (f"best feature {top['feature']}: {top['estimate']:.3g} [95% CI {top['ci_low']:.3g}, "
                      f"{top['ci_high']:.3g}], p = {top['p']:.2g}, q = {top['q']:.2g}")
        if mstatus == "not checked":
            why += ("; " if why else "") + "the readout is not tied to a factor, so it was not manipulation-checked"
        out.append({"design": design_name, "hypothesis": hyp, "answer": answer, "reason": why, "detail": detail,
                    "manipulation": mstatus})
    return out


def _kind_label(row: Any) -> str:
    """'matched controls' or 'norm-matched random directions' for a vs_controls row (older tables: matched)."""
    kind = getattr(row, "control_kind", None) if not isinstance(row, pd.Series) else row.get("control_kind")
    return CONTROL_KINDS.get(str(kind), "matched controls") if isinstance(kind, str) else "matched controls"


def verdict_sentence(v: dict[str, Any]) -> str:
    text = f"{v['design']}: {v['hypothesis']}: **{v['answer']}**"
    if v["reason"]:
        text += f" ({v['reason']})"
    if v["detail"]:
        text += f". {v['detail']}"
    return text + "."


def primary_table(tests: pd.DataFrame, vs: pd.DataFrame) -> pd.DataFrame:
    """The compact table of primary tests: features (by p), features minus controls, then controls."""
    cols = ["term", "estimate", "ci_low", "ci_high", "df", "p", "q", "family", "interpretable"]
    prim = tests[tests["primary"]].copy()
    if prim.empty:
        return pd.DataFrame(columns=cols)
    prim["term"] = [f"{d}: feature {f} ({r}) {a} x {b}" for d, f, r, a, b in
                    zip(prim["design"], prim["feature"], prim["role"], prim["factor_a"], prim["factor_b"], strict=True)]
    order = {"feature": 0, "control": 2, "alternative": 3}
    prim["_o"] = prim["group"].map(order)
    parts = [prim.sort_values(["_o", "p"])]
    if len(vs):
        v = vs.copy()
        v["term"] = [f"{d}: feature {f} minus its {n} {_kind_label(r)}" for (d, f, n), r in
                     zip(zip(v["design"], v["feature"], v["n_controls"], strict=True), v.itertuples(), strict=True)]
        v["family"], v["interpretable"], v["_o"] = "vs_controls", True, 1
        parts.append(v)
    table = pd.concat(parts, ignore_index=True).sort_values("_o", kind="stable")
    return table[cols]
