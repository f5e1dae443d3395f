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
- Layer by layer (``layerwise=true``, the paper's procedure; ``preset=paper``): the run's budget first names how
  many channels each group loses (selecting on the one-shot scores above); then the groups are pruned one at a
  time in graph order (by their producing layer), each judged on the network as pruned, reconstructed and
  fine-tuned so far: the greedy order from that network's samples, the removed channels zeroed, the group's
  consumers rescaled by least squares against that network's own outputs, then ``layer_epochs`` epochs of
  fine-tuning (SGD at ``layer_lr``, the removed channels held at zero; the paper: one epoch at 1e-3 after each
  layer). The result is that network's weights. fxprune's default is the one-shot ranking (every group judged
  on the original network, one reconstruction, then the run's recovery): it needs no training inside the pass.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import ChannelGroups
from fxprune.recovery.engine import Hook, TrainState, train
from fxprune.state import device_of_module, named_tensors

from ._calibrate import (
    Calibrated,
    Consumer,
    Solver,
    attr_order,
    calibration,
    consumers,
    contributions,
    group_contributions,
    live_outputs,
    mask_,
    reconstruct_into,
    sample_layers,
)
from .base import Decision, Finish, PassContext, PassError, Scores

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
    graph_only = None  # runs on the modules target too: its calibration hooks the user's modules
    description = "ThiNet (Luo et al. 2017): greedy next-layer reconstruction error, least-squares rescale"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"layerwise": True}}
    calibrates: ClassVar[bool] = True  # a Hugging Face folder runs it with --calib, one decoder layer at a time

    layerwise: bool = False     # the paper's layer-by-layer pruning with a fine-tune after each layer
    layer_epochs: int = 1       # layerwise: fine-tuning epochs after each layer (the paper: 1)
    layer_lr: float = 1e-3      # layerwise: their learning rate (SGD; the paper: 1e-3)
    preset: str = ""            # "paper": layer by layer

    def score(self, ctx: PassContext) -> Decision:
        if self.layerwise and ctx.calibrate is not None:
            raise PassError("thinet: layerwise=true fine-tunes after each layer, and a folder pruned from disk is not "
                            "trained: use the default one-shot ranking (its reconstruction runs layer by layer)")
        one_shot = super().score(ctx)
        if not self.layerwise:
            return one_shot
        if ctx.select is None:
            warnings.warn("fxprune: thinet: layerwise=true needs the run's budget to know each layer's count; "
                          "ranked in one shot instead", stacklevel=2)
            return one_shot
        return self._layerwise(ctx, one_shot.scores)

    def _layerwise(self, ctx: PassContext, one_shot: Scores) -> Decision:
        """The paper's procedure (the module docstring): each group's count from the budget on the one-shot
        scores, then group by group on the network pruned, reconstructed and fine-tuned so far."""
        assert ctx.select is not None
        counts = ctx.select(one_shot)
        cons = consumers(ctx)
        batches = calibration(ctx, self.calibration, self.batches)
        work = copy.deepcopy(ctx.model).eval()
        removed = np.zeros_like(counts)
        scores: Scores = dict(one_shot)
        rng = np.random.default_rng(self.seed)
        layers = 0
        for gid in _producer_order(ctx):
            group = ctx.groups[gid]
            k = int(counts[group.channels].sum())
            if k == 0:
                continue
            if gid in cons:
                samples = sample_layers(work, sorted({c.layer for c in cons[gid]}), batches, self.per_batch)
                scores.update(self.score_consumed(ctx, {gid: cons[gid]}, batches, samples, rng))
            removed[group.channels[np.argsort(scores[gid], kind="stable")[:k]]] = True
            mask_(work, ctx.groups, removed, only={gid})
            if gid in cons:
                reconstruct_into(work, ctx, removed, cons[gid], self.solver(), batches, self.per_batch, samples)
            self._finetune(ctx, work, removed)
            layers += 1
        weights = {name: t.detach().clone() for name, t in named_tensors(work).items()}
        report: dict[str, Any] = {"layerwise": True, "layers_pruned": layers, "layer_epochs": self.layer_epochs}
        if (evaluate := ctx.data.get("evaluate")) is not None:
            report["trained_metrics"] = evaluate(work)
        return Decision(scores, report=report, finish=lambda rem: self._finished(ctx, rem, removed, weights))

    def _finetune(self, ctx: PassContext, work: nn.Module, removed: np.ndarray) -> None:
        """``layer_epochs`` epochs of SGD at ``layer_lr`` on the working copy, the removed channels held at 0."""
        loader = ctx.data.get("train_loader")
        if self.layer_epochs and loader is not None:
            train(work, loader, ctx.data.get("loss"), self.layer_epochs, lr=self.layer_lr,
                  device=device_of_module(work), hooks=[HoldRemoved(ctx.groups, removed)])

    def _finished(self, ctx: PassContext, rem: np.ndarray, removed: np.ndarray,
                  weights: dict[str, torch.Tensor]) -> Finish:
        if np.array_equal(rem, removed):
            return Finish(weights)
        warnings.warn("fxprune: thinet: the selection differs from the layer-by-layer removal (a floor or a "
                      "protected layer); the consumers are reconstructed in one shot for it instead", stacklevel=2)
        return self.reconstructed(ctx, rem)

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


class HoldRemoved(Hook):
    """Keeps the removed channels at zero while a working copy fine-tunes (after every optimiser step)."""

    def __init__(self, groups: ChannelGroups, removed: np.ndarray) -> None:
        self.groups, self.removed = groups, removed

    def after_step(self, state: TrainState) -> None:
        mask_(state.module, self.groups, self.removed)


def _producer_order(ctx: PassContext) -> list[int]:
    """The prunable groups in graph order of their first tensor (the layer that produces the channels)."""
    order = attr_order(ctx)
    first = {g.id: min((order.get(p.name, len(order)) for p in g.params), default=len(order))
             for g in ctx.groups.prunable}
    return sorted(first, key=lambda gid: (first[gid], gid))
