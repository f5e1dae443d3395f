"""Selection: scores + a ratio -> which channels go (a boolean per channel component)."""
from __future__ import annotations

import math

import numpy as np

from .analyze.groups import ChannelGroups
from .pass_api import Scores

__all__ = ["select_per_group", "SelectionError"]


class SelectionError(ValueError):
    """Scores that do not fit the groups, or a ratio outside [0, 1)."""


def check_ratio(ratio: float) -> float:
    if not (0.0 <= float(ratio) < 1.0) or math.isnan(float(ratio)):
        raise SelectionError(f"ratio must be in [0, 1) (the fraction of channels removed), got {ratio}")
    return float(ratio)


def select_per_group(groups: ChannelGroups, scores: Scores, ratio: float) -> np.ndarray:
    """Remove floor(ratio * n) lowest-scoring channels in every prunable group (at least one kept).

    Ties keep the earlier channel; ``-inf`` channels always go and ``+inf`` channels always stay.
    """
    check_ratio(ratio)
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    for group in groups.prunable:
        s = scores.get(group.id)
        if s is None:
            continue
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (len(group),):
            raise SelectionError(f"group {group.id}: expected {len(group)} scores, got shape {s.shape}")
        n_drop = min(int(math.floor(ratio * len(group) + 1e-9)), len(group) - 1)
        must = np.isneginf(s)
        keep_always = np.isposinf(s)
        order = np.lexsort((np.arange(len(s)), s))  # ascending score, earlier index first among ties
        drop = [i for i in order if not keep_always[i]][:n_drop]
        mask = np.zeros(len(s), bool)
        mask[drop] = True
        mask |= must
        if mask.all():
            mask[int(np.argmax(s))] = False
        removed[group.channels[mask]] = True
    return removed
