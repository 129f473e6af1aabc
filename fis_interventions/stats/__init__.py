"""Statistics for 2x2 designs: Type III ANOVA, by-item RM-ANOVA, lme4-compatible LMMs, FDR, screening, power.

Every function takes a tidy DataFrame and returns tidy DataFrames or plain data; numbers are checked
against R (car, lme4, lmerTest, afex) in ``tests/test_stats_golden.py``.
"""

from .analyze import analyze_2x2, read_table, stats
from .anova import anova_2x2, rm_anova_by_item
from .contrast import interaction_contrast
from .design import Design2x2, prepare_2x2
from .fdr import add_qvalues, fdr_bh
from .lmm import LmmResult, lmm_2x2, lmm_fit
from .power import PowerSpec, power_curve
from .structure import RANDOM_CHOICES
from .screen import screen_features
from .simple import simple_effects

__all__ = ["Design2x2", "LmmResult", "PowerSpec", "RANDOM_CHOICES", "add_qvalues", "analyze_2x2",
           "anova_2x2", "fdr_bh", "interaction_contrast", "lmm_2x2", "lmm_fit", "power_curve", "prepare_2x2",
           "read_table", "rm_anova_by_item", "screen_features", "simple_effects", "stats"]
