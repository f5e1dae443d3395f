"""l2: score a channel by the L2 norm of the filters that produce it (a third-party fxprune pass).

Install with ``pip install -e examples/custom_pass``; then ``fxprune passes`` lists it and
``fxprune run model.py --pass l2 --opt power=1`` uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fxprune.passes.base import Pass, PassContext, Scores


@dataclass(frozen=True)
class L2Norm(Pass):
    name = "l2"
    description = "L2 norm of the producing filters (example plugin)"
    scope = "group"

    power: float = 2.0  # an option: --opt power=1 gives the L1 norm

    def score(self, ctx: PassContext) -> Scores:
        scores: Scores = {}
        for group in self.prunable(ctx):
            total = np.zeros(len(group))
            for p in [p for p in group.params if p.role == "producer"] or group.params:
                w = ctx.tensor(p.name).detach().float()
                dims = [d for d in range(w.dim()) if d != p.axis]
                per_index = w.abs().pow(self.power).sum(dim=dims) if dims else w.abs().pow(self.power)
                total += ctx.groups.channel_sum(group, p, per_index.cpu().numpy())
            scores[group.id] = total ** (1.0 / self.power)
        return scores
