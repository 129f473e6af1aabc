"""Which random effects a 2x2 design supports, and the rule that simplifies a singular fit.

Maximal by default (Barr, Levy, Scheepers & Tily 2013): by-item random intercept plus slopes for A, B and
A:B as far as the design identifies them, uncorrelated (``||``) unless correlations are asked for. Prompts
enter as a fixed factor when there are fewer than :data:`MIN_RANDOM_LEVELS` of them (a variance from 2-4
levels is not an estimate), else as a crossed random factor with the slopes the design supports.

Simplification (Matuschek et al. 2017, made deterministic): when a fit is singular (lme4's ``isSingular``)
1. a correlated structure is refitted without correlations;
2. then, while the fit is singular, the first zero-variance slope in the fixed order items A:B, B, A, then
   prompts A:B, B, A is dropped and the model refitted.
A random intercept is never dropped; one estimated at zero is reported as a boundary fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

RANDOM_CHOICES = ("intercept", "uncorrelated", "correlated", "varcomp")
PROMPT_ROLES = ("auto", "fixed", "random")  # auto: fixed below MIN_RANDOM_LEVELS levels, crossed random from it
MIN_RANDOM_LEVELS = 5
SLOTS = ["1", "xa", "xb", "xab"]
DROP_ORDER = ["xab", "xb", "xa"]


@dataclass(frozen=True)
class FactorSpec:
    """One grouping factor's random terms (subset of ``1, xa, xb, xab``) and their covariance kind."""

    group: str             # column of the design data ("item", "extra")
    label: str             # name shown to the user
    terms: tuple[str, ...]
    kind: str              # "correlated" | "diagonal" | "varcomp"


@dataclass(frozen=True)
class Structure:
    """The random part of a model plus how prompts enter (None, "fixed" or "random")."""

    factors: tuple[FactorSpec, ...]
    prompts: str | None = None
    prompt_label: str | None = None
    n_prompts: int = 0
    steps: tuple[str, ...] = field(default=())
    prompt_role: str = "auto"

    def prompt_reason(self) -> str | None:
        """Which role the second grouping factor got and why (for the report's methods)."""
        if self.prompts is None:
            return None
        role = "a fixed factor" if self.prompts == "fixed" else "a crossed random factor"
        if self.prompt_role == "auto":
            rule = (f"< {MIN_RANDOM_LEVELS}" if self.prompts == "fixed" else f">= {MIN_RANDOM_LEVELS}")
            why = f"default rule: {self.n_prompts} levels {rule}"
        else:
            why = f"requested with prompt_role={self.prompt_role}"
        return f"{self.prompt_label} ({self.n_prompts} levels) entered as {role} ({why})"

    def formula(self, a: str, b: str) -> str:
        """lme4-style random part, e.g. ``(1 + a + b + a:b || item)``; with fixed prompts, ``+ prompt``."""
        names = {"1": "1", "xa": a, "xb": b, "xab": f"{a}:{b}"}
        parts = []
        for f in self.factors:
            bar = "|" if f.kind == "correlated" or len(f.terms) == 1 else "||"
            inner = " + ".join(names[t] for t in f.terms)
            if f.kind == "varcomp":
                parts.append(" + ".join(f"(1 | {f.label})" if t == "1" else f"(1 | {f.label}:{names[t]})"
                                        for t in f.terms))
            else:
                parts.append(f"({inner} {bar} {f.label})")
        fixed = f" + {self.prompt_label} (fixed, {self.n_prompts} levels)" if self.prompts == "fixed" else ""
        return f"{a}*{b}{fixed} + " + " + ".join(parts)


def supported_terms(data: pd.DataFrame, group: str) -> tuple[str, ...]:
    """Intercept, plus each slope that at least half of the group's levels (and at least 2) can inform.

    A slope for A (or B) needs levels observed at both levels of A; the A:B slope needs levels with all four
    cells and replication somewhere (more rows than level x cell combinations), else it is the residual.
    """
    g = data.groupby(group, observed=True)
    n_levels = g.ngroups
    need = max(2, int(np.ceil(n_levels / 2)))
    terms = ["1"]
    for code in ("xa", "xb"):
        if int((g[code].nunique() == 2).sum()) >= need:
            terms.append(code)
    cells = data.groupby([group, "xa", "xb"], observed=True).size()
    full = int((cells.groupby(level=0).size() == 4).sum())
    if "xa" in terms and "xb" in terms and full >= need and len(data) > len(cells):
        terms.append("xab")
    return tuple(terms)


def initial_structure(data: pd.DataFrame, random: str, item_label: str, prompt_label: str | None,
                      prompt_role: str = "auto") -> Structure:
    """The structure asked for, restricted to what the design supports.

    ``prompt_role`` decides the second grouping factor: ``auto`` (documented default: a fixed factor below
    :data:`MIN_RANDOM_LEVELS` levels, crossed random from it), ``fixed`` or ``random`` (crossed random effects
    whatever the number of levels; at least 2).
    """
    if random not in RANDOM_CHOICES:
        raise ValueError(f"random must be one of {RANDOM_CHOICES}, got {random!r}")
    if prompt_role not in PROMPT_ROLES:
        raise ValueError(f"prompt_role must be one of {PROMPT_ROLES}, got {prompt_role!r}")
    kind = {"intercept": "diagonal", "uncorrelated": "diagonal", "correlated": "correlated",
            "varcomp": "varcomp"}[random]

    def spec(group: str, label: str) -> FactorSpec:
        terms = ("1",) if random == "intercept" else supported_terms(data, group)
        return FactorSpec(group, label, terms, "diagonal" if len(terms) == 1 else kind)

    factors = [spec("item", item_label)]
    prompts, n_prompts = None, 0
    if prompt_label is not None:
        n_prompts = int(data["extra"].nunique())
        role = prompt_role if prompt_role != "auto" else ("random" if n_prompts >= MIN_RANDOM_LEVELS else "fixed")
        if n_prompts > 1 and role == "random":
            prompts = "random"
            factors.append(spec("extra", prompt_label))
        elif n_prompts > 1:
            prompts = "fixed"
    return Structure(tuple(factors), prompts, prompt_label, n_prompts, prompt_role=prompt_role)


def simplify(structure: Structure, zero_terms: list[tuple[str, str]]) -> tuple[Structure, str] | None:
    """One step of the simplification rule for a singular fit, or None when nothing is left to drop."""
    if any(f.kind == "varcomp" for f in structure.factors):
        return None  # the variance-components form exists to match R's nested-factor model as written
    if any(f.kind == "correlated" for f in structure.factors):
        factors = tuple(replace(f, kind="diagonal") for f in structure.factors)
        step = "dropped the random-effect correlations"
        return replace(structure, factors=factors, steps=structure.steps + (step,)), step
    zero = set(zero_terms)
    for i, f in enumerate(structure.factors):
        for term in DROP_ORDER:
            if term in f.terms and (f.label, term) in zero:
                kept = tuple(t for t in f.terms if t != term)
                new = replace(f, terms=kept, kind=f.kind if len(kept) > 1 else "diagonal")
                names = {"xa": "A", "xb": "B", "xab": "A:B"}
                step = f"dropped the zero-variance by-{f.label} slope for {names[term]}"
                factors = structure.factors[:i] + (new,) + structure.factors[i + 1:]
                return replace(structure, factors=factors, steps=structure.steps + (step,)), step
    return None
