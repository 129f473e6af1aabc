"""One call that runs every 2x2 analysis on one measure and returns a JSON-ready dict (``fis stats``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import FisError
from .anova import anova_design, rm_anova_design
from .contrast import contrast_design
from .design import Levels, finite_or_none, prepare_2x2, records
from .lmm import lmm_design
from .structure import RANDOM_CHOICES

log = logging.getLogger(__name__)


def analyze_2x2(df: pd.DataFrame, dv: str, a: str, b: str, item: str | None = None,
                levels: Levels | None = None, method: str = "REML", random: str = "uncorrelated",
                prompt: str | None = None, prompt_role: str = "auto", simple: Sequence[str] = (),
                variance_ci: bool = False, compare: bool = True, simple_below: float | None = None
                ) -> dict[str, Any]:
    """Type III ANOVA, by-item RM-ANOVA, LMM, interaction contrast and cell means, as plain JSON data.

    Keys: ``anova``, ``rm_anova`` and ``lmm`` (None without ``item``), ``contrast`` (interaction, cells,
    effect sizes), ``levels``, ``n``, ``n_items``, ``warnings``. Nothing is NaN: what cannot be computed is
    None, and ``warnings`` says why. The LMM has the random effects of ``random`` (default: maximal,
    uncorrelated; see :mod:`.structure`) and, with ``prompt``, prompts as a fixed (< 5) or crossed factor
    (``prompt_role``: auto / fixed / random). ``simple``: factors whose simple effects to add (key
    ``simple_effects``); ``variance_ci``: profile CIs of the SDs (key ``variance_ci``); ``compare=False``
    skips the likelihood-ratio tests of a simplified random structure against the maximal one (ML refits
    that change no other number; the battery report does not show them). ``simple_below``: add the simple
    effects only when the LMM's interaction p is below it (a report shows them for significant interactions
    only, and a BH q is never below its p).
    """
    design = prepare_2x2(df, dv, a, b, item=item, levels=levels, extra_random=prompt if item else None)
    from .simple import check_simple_factor, simple_effects_records

    for name in simple:
        check_simple_factor(design, name)
    if (simple or variance_ci) and item is None:
        raise FisError("--simple and --variance-ci need the LMM: pass --item", field="--item",
                       fix="pass --item ITEM_COLUMN")
    warnings = list(design.warnings)
    anova, notes = anova_design(design)
    warnings += notes
    out: dict[str, Any] = {"dv": dv, "factors": [a, b], "item": item, "levels": design.levels,
                           "anova": records(anova), "rm_anova": None, "lmm": None}
    lmm = None
    if item is not None:
        rm, info = rm_anova_design(design)
        warnings += info["warnings"]
        out["rm_anova"] = records(rm)
        out["n_items_complete"] = info["n_items_complete"]
        lmm = lmm_design(design, method=method, random=random, extra_random=prompt, prompt_role=prompt_role,
                         compare=compare)
        warnings += lmm.warnings
        out["lmm"] = lmm.to_dict()
        if simple:
            p_inter = lmm.fixed["p"].iloc[3] if lmm.converged else None
            wanted = simple_below is None or (p_inter is not None and p_inter < simple_below)
            out["simple_effects"] = simple_effects_records(design, lmm, simple) if lmm.converged and wanted else []
        if variance_ci:
            out["variance_ci"] = _variance_ci(design, lmm, warnings)
    contrast = contrast_design(design, lmm, anova)
    warnings += contrast.pop("warnings")
    out["contrast"] = contrast
    out["n"] = int(len(design.data))
    out["n_items"] = int(design.data["item"].nunique()) if item is not None else None
    out["cell_counts"] = [{a: la, b: lb, "n": k} for (la, lb), k in design.cell_counts().items()]
    out["warnings"] = list(dict.fromkeys(warnings))
    for note in out["warnings"]:
        log.warning(note)
    return _json_safe(out)


def _variance_ci(design: Any, lmm: Any, warnings: list[str]) -> list[dict[str, Any]]:
    """Profile CIs of the fitted (possibly simplified) structure; a singular fit gets a stated warning."""
    from .compare import profile_ci

    if not lmm.converged or lmm.fitted_structure is None:
        warnings.append("profile CIs of the random-effect SDs not computed: the LMM was not fitted (see the "
                        "warning above)")
        return []
    structure = lmm.fitted_structure
    rows, notes = profile_ci(design, structure, start=lmm.theta, cache=lmm.problems)
    warnings += notes
    return rows


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return finite_or_none(x)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file (by extension) with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise FisError("file not found", source=path, fix="check the path")
    if path.is_dir():
        raise FisError("is a folder, expected a CSV or Parquet file", source=path)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            _refuse_duplicate_header(path)
            # low_memory=False: one dtype per column from the whole file (no DtypeWarning from chunked
            # inference); a bad value is then named by row and column in prepare_2x2
            table = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FisError(f"cannot read table: {first}", source=path,
                       fix="pass a UTF-8 CSV with a header row, or a .parquet file") from None
    dup = [c for c in dict.fromkeys(map(str, table.columns)) if list(map(str, table.columns)).count(c) > 1]
    if dup:
        raise FisError(f"column name {dup[0]!r} appears more than once", source=path, field=dup[0],
                       fix="give every column a different name")
    # CSV rows are numbered from 2 (line 1 is the header), so an error naming "row N" points at line N
    if path.suffix.lower() not in (".parquet", ".pq"):
        table.index = table.index + 2
    return table


def _refuse_duplicate_header(path: Path) -> None:
    """pandas renames a repeated column to ``name.1`` and fis would silently use the first: refuse it."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # read_csv reports these
    names = [h.strip() for h in header]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FisError(f"column name {name!r} appears more than once in the header", source=path,
                           field=name, fix="give every column a different name")
        seen.add(name)


def stats(data: pd.DataFrame | str | Path, dv: str, factors: Sequence[str], item: str | None = None,
          levels: Levels | None = None, method: str = "REML", random: str = "uncorrelated",
          prompt: str | None = None, prompt_role: str = "auto", simple: Sequence[str] = (),
          variance_ci: bool = False) -> dict[str, Any]:
    """Python API of ``fis stats``: read ``data`` (DataFrame or CSV/Parquet path) and run :func:`analyze_2x2`."""
    source = None
    if not isinstance(data, pd.DataFrame):
        source = str(data)
        data = read_table(data)
    factors = list(factors)
    if len(factors) != 2:
        raise FisError(f"a 2x2 analysis needs exactly two factors, got {len(factors)}: {factors}",
                       source=source, fix="pass --factor twice")
    method = method.upper()
    if method not in ("REML", "ML"):
        raise FisError(f"method must be REML or ML, got {method!r}", source=source)
    if random not in RANDOM_CHOICES[:3]:
        raise FisError(f"--random must be intercept, uncorrelated or correlated, got {random!r}",
                       source=source, field="--random", fix="pass --random uncorrelated (the default)")
    from .structure import PROMPT_ROLES

    if prompt_role not in PROMPT_ROLES:
        raise FisError(f"--prompt-role must be one of {', '.join(PROMPT_ROLES)}, got {prompt_role!r}",
                       source=source, field="--prompt-role", fix="pass --prompt-role auto (the default)")
    if prompt is not None and item is None:
        raise FisError("--prompt needs --item", source=source, field="--prompt", fix="pass --item as well")
    try:
        return analyze_2x2(data, dv, factors[0], factors[1], item=item, levels=levels, method=method,
                           random=random, prompt=prompt, prompt_role=prompt_role, simple=list(simple),
                           variance_ci=variance_ci)
    except FisError as err:
        if source is None or err.source is not None:
            raise
        raise FisError(err.detail, source=source, field=err.field, fix=err.fix) from None
