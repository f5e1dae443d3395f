"""thinet: ThiNet (Luo et al., ICCV 2017): prune a channel by what the NEXT layer loses without it.

- Calibration: ``batches`` batches from ``train_loader`` (``calibration="val"``: ``val_loader``;
  either falls back to the other). We default to training data because ``evaluate()`` usually
  measures on the validation set, and calibrating on it would leak.
- For each group whose consumers are all Conv2d (groups=1) or Linear layers: at ``per_batch``
  sampled (image, location) pairs per batch, the contribution x_c of every channel c to every output
  of every consumer (rows = (location, output channel) pairs, subsampled to ``rows``). Greedy: grow
  the removal set T with the channel minimising ||sum_{c in T} x_c||^2, all the way down to one
  channel. The score of a channel is its step in that order (removed first = lowest score), so
  selection at ANY ratio in group scope removes exactly the greedy set of that size: the pass needs
  no target count.
- Reconstruction (after selection, :meth:`ThiNet.weights`): for every consumer reading a removed
  channel, in graph order, least squares over a scale per kept input channel,
  w = argmin ||y - X w||^2 with y the ORIGINAL layer's outputs (less its bias) and X the kept
  contributions in the copy already pruned up to that layer; w is folded into the consumer's weight
  (its columns scaled) and handed to compaction.
- Groups whose consumers are not conv/linear (depthwise, attention, a graph output...) fall back to
  the l1 score (producer filter norms), unreconstructed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._calibrate import Calibrated, Consumer, Solver, contributions, group_contributions, live_outputs
from .base import PassContext, Scores

__all__ = ["ThiNet", "greedy_order"]


def greedy_order(x: np.ndarray) -> np.ndarray:
    """ThiNet's greedy removal order over the columns of ``x`` (rows x channels)."""
    n = x.shape[1]
    sq = (x * x).sum(0)
    s = np.zeros(x.shape[0])
    left = list(range(n))
    order = []
    for _ in range(n):
        cost = 2.0 * (s @ x[:, left]) + sq[left]
        j = left.pop(int(np.argmin(cost)))
        order.append(j)
        s += x[:, j]
    return np.array(order)


@dataclass(frozen=True)
class ThiNet(Calibrated):
    name = "thinet"
    description = "ThiNet (Luo et al. 2017): greedy next-layer reconstruction error, least-squares rescale"

    def score_consumed(self, ctx: PassContext, cons: dict[int, list[Consumer]], batches: list[Any],
                       samples: dict[str, tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator) -> Scores:
        scores: Scores = {}
        for gid, cs in cons.items():
            group = ctx.groups[gid]
            blocks = []
            for c in cs:
                if c.layer not in samples:
                    continue
                x, _ = samples[c.layer]
                w = c.module.weight.detach().double().cpu()
                contrib = group_contributions(c, x, w, gid, len(group))[:, :, :len(group)]  # others: one ignored unit
                blocks.append(contrib.reshape(-1, len(group)).numpy())
            if not blocks:
                continue
            xg = np.concatenate(blocks)
            xg = xg[self.subsample(rng, len(xg))]
            rank = np.empty(len(group))
            rank[greedy_order(xg)] = np.arange(len(group))
            scores[gid] = rank
        return scores

    def solver(self) -> Solver:
        return _rescale


def _rescale(c: Consumer, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, unit: np.ndarray,
             gone: np.ndarray) -> dict[str, torch.Tensor]:
    """ThiNet's least squares: one scale per kept input unit, folded into the consumer's columns."""
    n_units = int(unit.max()) + 1
    keep_units = np.unique(unit[~gone])
    rows = live_outputs(w)
    bias = c.module.bias.detach().double().cpu() if getattr(c.module, "bias", None) is not None else 0.0
    a = contributions(x, w, unit, n_units)[:, rows][:, :, torch.as_tensor(keep_units)].reshape(-1, len(keep_units))
    t = (y - bias)[:, rows].reshape(-1)
    scale_units = torch.zeros(n_units, dtype=torch.float64)
    if len(keep_units) and len(t):
        scale_units[torch.as_tensor(keep_units)] = torch.linalg.lstsq(a, t.unsqueeze(1)).solution.squeeze(1)
    scale = scale_units[torch.as_tensor(unit)]
    shape = [1, -1] + [1] * (w.dim() - 2)
    return {c.slot.name: (w * scale.reshape(shape)).to(c.module.weight.dtype)}
