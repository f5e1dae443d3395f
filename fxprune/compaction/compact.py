"""The compaction stage as one call: a removal (or the selection written on the graph) -> the compacted
module, its plan and the removal applied, keeping whole the groups around a rewrite that fails."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis import ChannelGroups, UnsupportedOpWarning
from fxprune.analysis.reindex import Reindexing
from fxprune.annotations import read_selection, write_selection

from .emit import CompactionError, GraphEdit, emit
from .plan import Plan, add_aliases, build_plan

__all__ = ["compact", "Compacted"]


class Compacted(NamedTuple):
    module: fx.GraphModule
    plan: Plan
    removed: np.ndarray


def compact(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray | None = None,
            model: torch.nn.Module | None = None, *, verify: bool = True,
            weights: Mapping[str, torch.Tensor] | None = None, edits: Sequence[GraphEdit] = ()) -> Compacted:
    """Apply a removal (bool per channel) to a traced graph: the compacted module, its plan, and the
    removal actually applied. ``removed=None``: the selection written on the graph (``fxprune.selection``
    on its nodes, see ``fxprune.annotations``); the removal applied is written back there.

    A rewrite that fails (an op whose literal arguments we cannot fix) never crashes the run: the
    groups around that node are kept whole, a warning names the node, and compaction is retried.
    """
    removed = read_selection(gm, groups) if removed is None else removed.copy()
    training = bool(model.training) if model is not None else False
    while True:
        reindexing = Reindexing(groups, removed)
        plan = build_plan(gm, reindexing)
        try:
            module = emit(gm, reindexing, plan, verify=verify, training=training, weights=weights, edits=edits)
            break
        except CompactionError as exc:
            culprits = [g for g in sorted(groups.groups_near(exc.node)) if removed[groups[g].channels].any()] \
                if exc.node else []
            if not culprits:
                raise
            warnings.warn(f"fxprune: {exc}; keeping channel groups {culprits} whole", UnsupportedOpWarning,
                          stacklevel=2)
            for g in culprits:
                removed[groups[g].channels] = False
    write_selection(gm, groups, removed)
    if model is not None:
        plan = add_aliases(plan, model)
    return Compacted(module, plan, removed)
