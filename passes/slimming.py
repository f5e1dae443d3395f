"""slimming: Network Slimming (Liu et al., ICCV 2017).

Sparsity training, then one global threshold on |gamma| of the BatchNorm scales.

- Training (``train=True``, the default): a deep copy of the user's eager model (its BatchNorm gammas
  are real parameters) is trained with the shared engine for ``epochs`` epochs; after every backward
  pass a :class:`~fxprune.train.engine.Hook` adds the L1 subgradient ``s * sign(gamma)`` to the
  gradient of every BatchNorm scale, exactly as the paper's code does (not a loss term, so the
  logged loss stays the task loss). The channels are scored on the trained copy, and the trained
  copy's whole state (weights, BatchNorm statistics) goes to compaction through ``ctx.weights``: the
  pruned model is the slimmed network, not the original one.
- ``train=False``: score the given model's |gamma| directly (an already-slimmed model).
- Score of a channel: the mean |gamma| over the group's BatchNorm scales (a residual stream has
  several; the mean keeps such groups comparable with single-BN groups under one threshold).
- Selection: ONE global threshold (scope "global", no normalisation: gammas are comparable).
- Fallback for a group with no BatchNorm: the L1 norm of its producing filters, rescaled so that the
  group's mean equals the mean |gamma| of the whole model (so it competes under the same
  threshold without dominating or vanishing). This is fxprune's choice, not the paper's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fxprune.pass_api import Pass, PassContext, Scores
from fxprune.train.engine import Hook, TrainState, train

__all__ = ["Slimming", "SparsityHook", "bn_scales"]


class SparsityHook(Hook):
    """Adds ``s * sign(gamma)`` to the gradient of every BatchNorm scale (the L1 subgradient)."""

    def __init__(self, s: float) -> None:
        self.s = s

    def after_backward(self, state: TrainState) -> None:
        for m in state.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.grad is not None:
                m.weight.grad.add_(self.s * torch.sign(m.weight.detach()))


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<bn>.weight": gamma}`` for every affine BatchNorm of ``model``."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None}


@dataclass(frozen=True)
class Slimming(Pass):
    name = "slimming"
    description = "Network Slimming (Liu et al. 2017): L1 sparsity on BatchNorm scales, one global |gamma| threshold"
    scope = "global"
    normalize = "none"
    needs = ("train_loader",)

    train: bool = True      # sparsity-train a copy first; False: score the given model's |gamma|
    s: float = 1e-4         # the paper: 1e-4 for VGG, 1e-5 for ResNet/DenseNet
    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"

    def _slimmed(self, ctx: PassContext) -> nn.Module:
        if not self.train:
            return ctx.model
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError("slimming needs train_loader= for sparsity training (or --opt train=false)")
        work = copy.deepcopy(ctx.model)
        device = next(work.parameters()).device
        train(work, loader, ctx.data.get("loss"), self.epochs, self.lr, device, optimizer=self.optimizer,
              hooks=[SparsityHook(self.s)])
        ctx.weights.update({k: v.detach().clone() for k, v in work.state_dict().items()})
        return work

    def score(self, ctx: PassContext) -> Scores:
        model = self._slimmed(ctx)
        gammas = {k: v.detach().abs().float().cpu().numpy() for k, v in bn_scales(model).items()}
        mean_gamma = float(np.mean(np.concatenate(list(gammas.values())))) if gammas else 1.0
        scores: Scores = {}
        for group in self.prunable(ctx):
            norm = [p for p in group.params if p.name in gammas and p.role == "norm"]
            if norm:
                scores[group.id] = sum(ctx.groups.channel_sum(group, p, gammas[p.name]) for p in norm) / len(norm)
                continue
            total = np.zeros(len(group))  # fallback: producer L1, rescaled to the model's mean |gamma|
            state = dict(model.named_parameters(remove_duplicate=False))
            for p in [p for p in group.params if p.role == "producer"] or group.params:
                w = state[p.name].detach() if p.name in state else ctx.tensor(p.name).detach()
                dims = [d for d in range(w.dim()) if d != p.axis]
                per_index = (w.abs().sum(dim=dims) if dims else w.abs()).float().cpu().numpy()
                total += ctx.groups.channel_sum(group, p, per_index)
            scores[group.id] = total * mean_gamma / max(float(total.mean()), 1e-12)
        return scores
