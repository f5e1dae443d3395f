"""The public entry point: ``fxprune.prune(model, example_inputs, method="l1", ratio=0.5)``.

trace -> analyze -> score (the pass) -> select -> compact. The user's model is never modified.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx

from .analyze import ChannelGroups, UnsupportedOpWarning, analyze
from .compact import CompactionError, Plan, Resizer, add_aliases, build_plan, emit
from .compact.emit import GraphEdit
from .pass_api import Pass, PassContext
from .registry import make_pass
from .select import check_ratio, select_per_group
from .trace import trace

__all__ = ["prune", "PruneResult", "compact", "Compacted"]


@dataclass
class PruneResult:
    module: fx.GraphModule                 # the compacted, trainable model (same train/eval mode as the input)
    plan: Plan                             # original parameter/buffer name -> {dim: kept indices}
    groups: ChannelGroups                  # the analysis it was planned on
    removed: np.ndarray                    # bool per channel component
    scores: dict[int, np.ndarray] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Kept/total channels per prunable group."""
        rows = []
        for g in self.groups.prunable:
            rows.append({"group": g.id, "kept": int((~self.removed[g.channels]).sum()), "total": len(g),
                         "producers": g.layers("producer")})
        return rows


def compact(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray, model: torch.nn.Module | None = None,
            *, verify: bool = True, weights: Mapping[str, torch.Tensor] | None = None,
            edits: Sequence[GraphEdit] = ()) -> Compacted:
    """Apply a removal (bool per channel) to a traced graph: the compacted module, its plan, and the
    removal actually applied.

    A rewrite that fails (an op whose literal arguments we cannot fix) never crashes the run: the
    groups around that node are kept whole, a warning names the node, and compaction is retried.
    """
    removed = removed.copy()
    training = bool(model.training) if model is not None else False
    while True:
        resizer = Resizer(groups, removed)
        plan = build_plan(gm, resizer)
        try:
            module = emit(gm, resizer, plan, verify=verify, training=training, weights=weights, edits=edits)
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
    if model is not None:
        plan = add_aliases(plan, model)
    return Compacted(module, plan, removed)


class Compacted(NamedTuple):
    module: fx.GraphModule
    plan: Plan
    removed: np.ndarray


def prune(model: torch.nn.Module, example_inputs: Any, method: str | Pass = "l1", ratio: float = 0.5, *,
          options: dict[str, Any] | None = None, allow_inexact: bool = False, verify: bool = True,
          progress: Callable[[str], None] | None = None, **data: Any) -> PruneResult:
    """Prune ``model``: remove ``ratio`` of the channels of every prunable group, scored by ``method``.

    ``example_inputs``: a tuple of positional inputs (or a dict of keyword inputs).
    ``options``: the pass's options. ``data``: train_loader=, val_loader=, loss=, evaluate= for passes
    that need data. ``progress`` is called with the name of each stage as it starts ("trace",
    "analyze", "score", "select", "compact"). Returns a :class:`PruneResult`; ``model`` is left bit-identical.
    """
    check_ratio(ratio)
    the_pass = make_pass(method, options)
    stage = progress or (lambda name: None)
    stage("trace")
    gm = trace(model, example_inputs)
    stage("analyze")
    groups = analyze(gm, allow_inexact=allow_inexact)
    stage("score")
    scores = the_pass.score(PassContext(gm, groups, model, data)) if ratio > 0 else {}
    stage("select")
    removed = select_per_group(groups, scores, ratio)
    stage("compact")
    out = compact(gm, groups, removed, model, verify=verify)
    return PruneResult(out.module, out.plan, groups, out.removed, scores)
