"""l1: L1-norm filter pruning (Li et al., ICLR 2017).

A channel's score is the sum of |W| of the filters that produce it (over input channels and
kernel); for a group with several producers (a residual stream) the producers' norms are summed.
No data needed. Per-group selection by default, as in the paper (same fraction in every group).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fxprune.analysis.groups import ChannelGroups, Group

from .base import Pass, PassContext, Scores

__all__ = ["L1Norm", "producer_l1"]


def producer_l1(groups: ChannelGroups, group: Group, tensor: Callable[[str], torch.Tensor]) -> np.ndarray:
    """Per channel of ``group``: the sum of |W| of its producing filters (every slot when it has no
    producer), over all other axes; ``tensor(name)`` looks a parameter up. Also the fallback score
    of slimming and scratch for groups without a BatchNorm."""
    total = np.zeros(len(group))
    for p in [p for p in group.params if p.role == "producer"] or group.params:
        w = tensor(p.name).detach()
        dims = [d for d in range(w.dim()) if d != p.axis]
        per_index = (w.abs().sum(dim=dims) if dims else w.abs()).float().cpu().numpy()
        total += groups.channel_sum(group, p, per_index)
    return total


@dataclass(frozen=True)
class L1Norm(Pass):
    name = "l1"
    description = "L1-norm of the producing filters (Li et al. 2017); no data needed"
    scope = "group"
    runs_graph = False  # weights only: prunes models without a static graph too

    def score(self, ctx: PassContext) -> Scores:
        return {group.id: producer_l1(ctx.groups, group, ctx.tensor) for group in self.prunable(ctx)}
