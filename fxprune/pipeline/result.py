"""The public result of a run, ``PruneResult``: its fields are the pipeline's stage values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis import ChannelGroups
from fxprune.compaction import Plan
from fxprune.selection.budget import Selection
from fxprune.selection.cost import Cost
from fxprune.tracing.dynamic import InputShapes

__all__ = ["PruneResult"]


@dataclass
class PruneResult:
    # the method's product: the compacted, trainable model (same train/eval mode as the input), or the module the
    # pass made of it (sanp: the per-sample module; the compacted model is then ``compacted``)
    module: fx.GraphModule
    plan: Plan                             # original parameter/buffer name -> {dim: kept indices} (of `base` if set)
    groups: ChannelGroups                  # the analysis it was planned on
    removed: np.ndarray                    # bool per channel component
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    cost_before: Cost | None = None        # MACs (on the example inputs) and parameters, counted on the graph
    cost_after: Cost | None = None
    selection: Selection | None = None     # the budget as applied (after a target search: the ratio found)
    log: list[dict[str, Any]] = field(default_factory=list)  # recovery training log, one record per epoch
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # new full-size tensors the pass gave compaction
    base: torch.nn.Module | None = None    # the model the plan refers to when a pass pruned another model than
    #                                        the user's (Pass.prepare, e.g. scratch's wider copy); None: the user's
    report: dict[str, Any] = field(default_factory=dict)  # what the pass reported (Decision.report), JSON-able
    # files the pass adds to an output folder (Decision.artifacts): name -> writer(folder); sanp's "dynamic"
    artifacts: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # objects the pass built besides the module (sanp: "dynamic")
    # what compaction rewrote: {"target": "graph" (the traced graph) or "modules" (the user's modules, resized), "why"}
    compaction: dict[str, str] = field(default_factory=lambda: {"target": "graph", "why": ""})
    # with target_latency: the latency model's measured full and predicted pruned milliseconds, per class of op
    # (``fxprune.selection.latency.LatencyModel.summary``); None otherwise
    latency: dict[str, Any] | None = None
    # the input axes the module takes at any size, and those it fixes that the original does not (with why)
    shapes: InputShapes = field(default_factory=InputShapes)

    @property
    def compacted(self) -> fx.GraphModule:
        """The compacted model of the plan: ``module`` itself, unless the method's product is another module
        (sanp's per-sample module), when it is its static variant (``extras["static"]``). ``cost_after`` is its."""
        return self.extras.get("static", self.module)

    def summary(self) -> list[dict[str, Any]]:
        """Kept/total channels per prunable group."""
        rows = []
        for g in self.groups.prunable:
            rows.append({"group": g.id, "kept": int((~self.removed[g.channels]).sum()), "total": len(g),
                         "producers": g.layers("producer")})
        return rows
