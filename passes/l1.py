"""l1: L1-norm filter pruning (Li et al., ICLR 2017).

A channel's score is the sum of |W| of the filters that produce it (over input channels and
kernel); for a group with several producers (a residual stream) the producers' norms are summed.
No data needed. Per-group selection by default, as in the paper (same fraction in every group).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fxprune.pass_api import Pass, PassContext, Scores


@dataclass(frozen=True)
class L1Norm(Pass):
    name = "l1"
    description = "L1-norm of the producing filters (Li et al. 2017); no data needed"
    scope = "group"

    def score(self, ctx: PassContext) -> Scores:
        scores: Scores = {}
        for group in self.prunable(ctx):
            total = np.zeros(len(group))
            slots = [p for p in group.params if p.role == "producer"] or group.params
            for p in slots:
                w = ctx.tensor(p.name).detach()
                dims = [d for d in range(w.dim()) if d != p.axis]
                per_index = w.abs().sum(dim=dims).float().cpu().numpy() if dims else w.abs().float().cpu().numpy()
                total += ctx.groups.channel_sum(group, p, per_index)
            scores[group.id] = total
        return scores
