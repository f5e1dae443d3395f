"""The learned passes' shared final fit: on budget, every run.

A learned pass reaches its budget by its own mechanism (tas's cost loss, sanp's cost loss, anp's keep
probabilities, flop's Lagrangian). When that mechanism ends outside ``BUDGET_TOLERANCE`` of the run's MACs or
parameter target, the pass selects again, by its learned scores (its soft width distributions, keep
frequencies or keep probabilities: higher = keep), to the target within that tolerance, with the same
binary search as a target run (``fxprune.selection.budget.search_budget``) and the pass's own cost function
(which may see more than the channel groups: tas's removed blocks). The pass reports that the fit ran
(``report["fit"]``, and a warning that the command line shows as a note), and the run's recovery then trains
the fitted network as it would have trained the method's.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxprune.analysis.groups import ChannelGroups

from .budget import Scores, Selection, search_budget

__all__ = ["BUDGET_TOLERANCE", "Fit", "fit_selection", "fit_to_budget", "on_budget", "removal_scores"]

WHAT = {"macs": "MACs", "params": "parameters"}

BUDGET_TOLERANCE = 0.02  # a learned pass's result keeps its target's fraction +- this much of the full model


def on_budget(kept: float, target: float, tolerance: float = BUDGET_TOLERANCE) -> bool:
    """``kept`` (a fraction of the full model) is within ``tolerance`` of ``target``."""
    return abs(kept - target) <= tolerance + 1e-12


@dataclass(frozen=True)
class Fit:
    """Where the method's own mechanism landed (``method``) and where the fit landed (``fitted``), as fractions of
    the full model's ``which`` ("macs" or "params") for a ``target``."""

    who: str
    which: str
    target: float
    method: float
    fitted: float
    by: str  # what the fit ranked channels by

    def report(self) -> dict[str, Any]:
        return {"ran": True, "which": self.which, "target": self.target, "method": self.method,
                "fitted": self.fitted, "by": self.by}

    def note(self) -> str:
        what = WHAT.get(self.which, self.which)
        return (f"fxprune: {self.who}: the method ended at {self.method:.3f} of the {what} for a target of "
                f"{self.target:.3f} (+-{BUDGET_TOLERANCE:g}); the budget fit selected by {self.by} to "
                f"{self.fitted:.3f}")

    def warn(self, tolerance: float = BUDGET_TOLERANCE) -> None:
        """Warn the note (a run shows it), and a second line when the fit itself missed the target."""
        warnings.warn(self.note(), stacklevel=3)
        if not on_budget(self.fitted, self.target, tolerance):
            warnings.warn(f"fxprune: {self.who}: the budget fit reaches only {self.fitted:.3f} of the "
                          f"{WHAT.get(self.which, self.which)} (target {self.target:.3f}): the groups' floors, the "
                          f"channels the method cannot remove, or the method's own granularity bound it", stacklevel=3)


def fit_selection(selection: Selection | None = None, ratio: float = 0.0) -> Selection:
    """The selection a fit searches with: ``selection`` (default global, not normalised) at ``ratio``, without
    the per-layer ratios and protections of a ratio run (the target decides)."""
    return dataclasses.replace(selection or Selection(scope="global", normalize="none"), ratio=ratio, ratio_for={},
                               protect=())


def fit_to_budget(who: str, groups: ChannelGroups, scores: Scores, cost: Callable[[np.ndarray], float],
                  target: float, method: float, *, by: str, which: str = "macs", selection: Selection | None = None,
                  tolerance: float = BUDGET_TOLERANCE) -> tuple[np.ndarray, Fit]:
    """Select by ``scores`` (global, not normalised unless ``selection`` says otherwise) so that ``cost(removed)``
    (a kept fraction) is within ``tolerance`` of ``target``; ``method``: where the pass's own mechanism ended.
    Returns the removal and the :class:`Fit` (its note is warned, so a run shows it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a shortfall is reported below, with the fit's numbers
        removed, _ = search_budget(groups, scores, fit_selection(selection), cost, target, tolerance)
    done = Fit(who, which, float(target), float(method), float(cost(removed)), by)
    done.warn(tolerance)
    return removed, done


def removal_scores(removed: np.ndarray, groups: ChannelGroups) -> Scores:
    """Scores that make selection remove exactly ``removed`` (-inf) and keep the rest (+inf)."""
    return {g.id: np.where(removed[g.channels], -np.inf, np.inf) for g in groups.prunable}
