"""Widening: the inverse of compaction. Every prunable channel group gets ``round(factor * n)``
channels; the graph's literals (view sizes, split sizes, slice bounds, conv/GroupNorm group counts,
head counts) are rewritten by the same rules as for pruning and the result is shape-verified.

Used by Pruning from Scratch's ``expand`` (gates learned on a x1.25 copy). The extra channels start
as copies of existing ones (the plan repeats their indices), so the widened model computes the same
features twice: re-initialise it (``fxprune.recovery.modes.reinitialize``) before training anything
on it, or the copies receive identical gradients forever. Frozen groups (the model's inputs and
outputs, exactness-protected normalised streams) keep their size.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing

from .emit import emit
from .plan import Plan, build_plan

__all__ = ["widen", "widen_copies"]


def widen_copies(groups: ChannelGroups, factor: float, only: Iterable[int] | None = None) -> np.ndarray:
    """Copies per channel: each prunable group (of ``only``: group ids, default all) of n channels grows
    to ``round(factor * n)``; the extra copies are spread evenly over the group (which channels does
    not matter once re-initialised)."""
    if not factor >= 1.0:
        raise ValueError(f"widening factor must be >= 1, got {factor}")
    chosen = None if only is None else set(only)
    copies = np.ones(len(groups.comp_group), dtype=np.int64)
    for g in groups.prunable:
        if chosen is not None and g.id not in chosen:
            continue
        n = len(g)
        base, extra = divmod(int(round(factor * n)), n)
        counts = np.full(n, base, dtype=np.int64)
        if extra:
            counts[np.linspace(0, n - 1, extra).round().astype(np.int64)] += 1
        copies[g.channels] = counts
    return copies


def widen(gm: fx.GraphModule, groups: ChannelGroups, factor: float, *, only: Iterable[int] | None = None,
          training: bool = False, verify: bool = True) -> tuple[fx.GraphModule, Plan]:
    """A trainable GraphModule ``factor`` times wider than ``gm`` in every prunable group (or in the
    groups ``only`` names), and the plan that built it (name -> {dim: source index per new position})."""
    reindexing = Reindexing(groups, copies=widen_copies(groups, factor, only))
    plan = build_plan(gm, reindexing)
    return emit(gm, reindexing, plan, verify=verify, training=training), plan
