"""fis-interventions: joint SAE + integration module, factorial designs, interventions, statistics.

The pipeline, one sub-package per stage:
models -> activations -> sae (joint SAE) -> designs -> interventions -> stats -> reports.
"""

__version__ = "0.1.0"
