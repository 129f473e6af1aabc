"""Reports for battery runs: statistics over every clamp, figures, Markdown and self-contained HTML.

API: :func:`report` (``fis report``), :func:`load_run`, :func:`analyze_run`, and
:func:`write_synthetic_run` for a run folder with a known planted interaction.
"""

from .analysis import Analysis, analyze_run, feature_verdicts
from .writer import report
from .runfolder import Run, RunInfo, load_run
from .synthetic import write_synthetic_run

__all__ = ["Analysis", "Run", "RunInfo", "analyze_run", "feature_verdicts", "load_run", "report",
           "write_synthetic_run"]
