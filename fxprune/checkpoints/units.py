"""Whole units removed from a folder (decoder blocks, routed experts, an expert's neurons): how many, and which."""
from __future__ import annotations

import math

import numpy as np

from .folder import CheckpointError

__all__ = ["removal_count", "least", "kept"]


def removal_count(units: int, unit_params: int, total_params: int, *, count: int | None = None,
                  ratio: float | None = None, target_params: float | None = None, what: str = "") -> int:
    """How many of ``units`` to remove: ``count``, or ``round(ratio * units)``, or as many as bring the parameters
    to ``target_params`` of ``total_params`` (each unit holds ``unit_params``); at least one stays."""
    if count is None and target_params is not None:
        count = max(0, math.ceil((total_params - target_params * total_params) / max(unit_params, 1)))
    elif count is None:
        count = round((ratio or 0.0) * units)
    if not 0 <= count < units:
        raise CheckpointError(f"cannot remove {count} of {units}{' ' + what if what else ''}: at least one must stay")
    return count


def least(scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` lowest-scoring indices (ties: the lower index first), sorted."""
    return sorted(int(i) for i in np.argsort(np.asarray(scores), kind="stable")[:k])


def kept(scores: np.ndarray, k: int) -> list[int]:
    """The indices left when the ``k`` lowest-scoring go (:func:`least`'s complement), sorted."""
    return sorted(int(i) for i in np.argsort(np.asarray(scores), kind="stable")[k:])
