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

import numpy as np
import torch

from .base import Pass, PassContext, Scores

from . import _calibrate as C
from .l1 import L1Norm

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


def _out_rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).abs().sum(1) > 0  # outputs not masked away


@dataclass(frozen=True)
class ThiNet(Pass):
    name = "thinet"
    description = "ThiNet (Luo et al. 2017): greedy next-layer reconstruction error, least-squares rescale"
    scope = "group"
    normalize = "max"
    needs = ("train_loader",)

    batches: int = 8
    per_batch: int = 64        # sampled (image, location) pairs per batch and layer
    rows: int = 8000           # (location, output) rows kept for the greedy search
    calibration: str = "train"
    seed: int = 0

    def score(self, ctx: PassContext) -> Scores:
        scores = L1Norm().score(ctx)  # the fallback
        cons = C.consumers(ctx)
        if not cons:
            return scores
        batches = C.calibration(ctx, self.calibration, self.batches)
        layers = sorted({c.layer for cs in cons.values() for c in cs})
        samples = C.sample_layers(ctx.model, layers, batches, self.per_batch)
        rng = np.random.default_rng(self.seed)
        for gid, cs in cons.items():
            group = ctx.groups[gid]
            blocks = []
            for c in cs:
                if c.layer not in samples:
                    continue
                x, _ = samples[c.layer]
                w = c.module.weight.detach().double().cpu()
                g, pos = c.units
                unit = np.where(g == gid, pos, len(group))  # other inputs into one ignored unit
                contrib = C.contributions(x, w, unit, len(group) + 1)[:, _out_rows(w), :len(group)]
                blocks.append(contrib.reshape(-1, len(group)).numpy())
            if not blocks:
                continue
            xg = np.concatenate(blocks)
            if len(xg) > self.rows:
                xg = xg[rng.choice(len(xg), self.rows, replace=False)]
            rank = np.empty(len(group))
            rank[greedy_order(xg)] = np.arange(len(group))
            scores[gid] = rank
        return scores

    def weights(self, ctx: PassContext, removed: np.ndarray) -> dict[str, torch.Tensor]:
        return C.reconstruct_removed(ctx, removed, _rescale, self.calibration, self.batches, self.per_batch)


def _rescale(c: C.Consumer, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, unit: np.ndarray,
             gone: np.ndarray) -> dict[str, torch.Tensor]:
    """ThiNet's least squares: one scale per kept input unit, folded into the consumer's columns."""
    n_units = int(unit.max()) + 1
    keep_units = np.unique(unit[~gone])
    rows = _out_rows(w)
    bias = c.module.bias.detach().double().cpu() if getattr(c.module, "bias", None) is not None else 0.0
    a = C.contributions(x, w, unit, n_units)[:, rows][:, :, torch.as_tensor(keep_units)].reshape(-1, len(keep_units))
    t = (y - bias)[:, rows].reshape(-1)
    scale_units = torch.zeros(n_units, dtype=torch.float64)
    if len(keep_units) and len(t):
        scale_units[torch.as_tensor(keep_units)] = torch.linalg.lstsq(a, t.unsqueeze(1)).solution.squeeze(1)
    scale = scale_units[torch.as_tensor(unit)]
    shape = [1, -1] + [1] * (w.dim() - 2)
    return {c.slot.name: (w * scale.reshape(shape)).to(c.module.weight.dtype)}
