"""Sweep analysis: read Hydra multirun folders, pool seeds, test differences, fit scaling laws.

The entry point is `python -m tinyllm.report DIR`; these are the pieces it is built from.
"""

from __future__ import annotations

from tinyllm.analysis.stats import (
    HEALTH_COLUMNS,
    ConfigSummary,
    Curve,
    PowerLawFit,
    fit_power_law,
    health_cells,
    mean_curve,
    summarize,
    welch_p_value,
)
from tinyllm.analysis.sweep import Run, Sweep, is_seed_key, load_sweep

__all__ = [
    "HEALTH_COLUMNS",
    "ConfigSummary",
    "Curve",
    "PowerLawFit",
    "Run",
    "Sweep",
    "fit_power_law",
    "health_cells",
    "is_seed_key",
    "load_sweep",
    "mean_curve",
    "summarize",
    "welch_p_value",
]
