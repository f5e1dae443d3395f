"""slimming: Network Slimming (Liu et al., ICCV 2017).

Sparsity training, then one global threshold on |gamma| of the BatchNorm scales.

- Training (``train=True``, the default): a masked copy of the traced graph (``fxprune.masking``; its
  BatchNorms are real modules, their gammas real parameters) is trained with the shared engine for
  ``epochs`` epochs, with the paper's L1 subgradient ``s * sign(gamma)`` added to the gradient of every
  BatchNorm scale after each backward (a :class:`~fxprune.recovery.engine.Hook`, not a loss term, so
  the logged loss stays the task loss).
- Groups without a BatchNorm (ViT heads and MLP channels, LLaMA's MLP, a plain conv or linear layer):
  the same learned scale, as a ``Scale`` mask on the group's producing layers' output (fxprune's
  extension; the paper only has BatchNorm). Its parameter starts at the model's mean |gamma| (1 when
  there is no BatchNorm) and multiplies the channel by ``parameter / that mean``, so the network starts
  unchanged and the parameter is on the gammas' scale: the same L1 subgradient, the same schedule and
  one global threshold treat both kinds. The scales train in the engine's mask optimiser (SGD at the
  pass's rate, without weight decay: the L1 term is their only regulariser).
- The channels are scored on the trained copy, and its whole state (the masks folded into the
  producing layers' rows and bias) goes to compaction as the decision's weights: the pruned model is
  the slimmed network, not the original one.
- ``schedule="fixed"`` is the paper exactly: that subgradient and nothing else. It needs the paper's
  budget (160 epochs at lr 0.1 for ``s=1e-4``): in a short run the scales barely move (10 epochs of
  the digits example move them by ~2e-4), and with a larger ``s`` every scale shrinks together,
  because a BatchNorm followed by a convolution and another BatchNorm is scale invariant; either way
  no channel is near zero, the threshold ranks near-equal values and pruning costs a lot.
- ``schedule="adaptive"`` (the default, fxprune's choice) makes the sparsity happen within the budget.
  At the start of every epoch it asks the run's budget (``ctx.select``: the ratio or the MACs/params
  target, with its floor) which channels it would remove under the current |gamma| scores; on those
  channels only, a proximal L1 step ``x <- sign(x) max(|x| - lr * s_t, 0)`` follows every optimiser
  step, on gamma AND beta (so a removed channel emits zero, not the constant its beta would give), and
  on the scale of a group without BatchNorm.
  ``s_t`` grows linearly from ``s`` to ``s_max = mean|gamma_0| / (lr * batches per epoch)`` (the
  strength that moves a typical scale to zero in about one epoch) over the first ``ramp`` of the
  steps and stays there; the remaining steps train the network around the zeroed channels. The
  selection is re-asked every epoch, so a channel the task still needs can leave the set. When the
  budget ends before the chosen channels are below the threshold, the report says so and a warning
  names what to raise (``epochs``, ``lr``).
- The report (``report.json``'s ``pass_report``, and ``gamma_histogram.png``) shows the |gamma|
  histogram before and after sparsity training (the paper's figure), the threshold
  (``threshold`` x the mean |gamma| before training), the fraction of scales below it and, when an
  ``evaluate`` is given, the sparsity-trained network's metrics (``trained_metrics``).
- ``train=False``: score the given model's |gamma| directly (an already-slimmed model).
- Score of a channel: the mean |gamma| over the group's BatchNorm scales (a residual stream has
  several; the mean keeps such groups comparable with single-BN groups under one threshold).
- Selection: ONE global threshold (scope "global", no normalisation: gammas are comparable), with a
  per-group floor (``min_keep = 0.1``: the paper never removes a whole layer; ``--min-keep`` changes it).
- Score of a group without BatchNorm: |its learned scale| x the L1 norm of each channel's producing
  filters relative to the group's mean. The scales all start equal, so the filters rank the channels at
  the first selection (|scale| alone tied every channel there, and the adaptive schedule then drove to
  zero whichever channels the tie put first: on a ViT, 3 of the 4 heads of the first layers); a scale the
  schedule drives to zero scores zero. Without training (``train=False``), or where no mask can act
  (``fxprune.masking`` says why), the L1 norm of its producing filters, rescaled so that the group's
  mean equals the mean |gamma| of the whole model (``passes/_scales.py``, shared with scratch): the
  same score with the scale at its start. fxprune's choice, not the paper's.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import ChannelGroups
from fxprune.masking import MaskedModel, Scale
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState, batches_per_epoch
from fxprune.state import user_tensors

from ._scales import BN, LearnedScales, mean_scale, rescaled_l1
from .base import Decision, PassContext, Scores
from .registry import PassError

__all__ = ["Slimming", "SparsityHook", "TargetedShrink", "bn_scales"]

Scales = dict[int, nn.Parameter]  # group id -> the learned scale of a group without BatchNorm

SCHEDULES = ("adaptive", "fixed")


class SparsityHook(Hook):
    """Adds ``s * sign(gamma)`` to the gradient of every BatchNorm scale (the L1 subgradient), and of
    every learned scale of a group without BatchNorm (``scales``)."""

    def __init__(self, s: float, scales: Scales | None = None) -> None:
        self.s, self.scales = s, dict(scales or {})

    def after_backward(self, state: TrainState) -> None:
        params = [m.weight for m in state.module.modules() if isinstance(m, BN) and m.weight is not None]
        for p in params + list(self.scales.values()):
            if p.grad is not None:
                p.grad.add_(self.s * torch.sign(p.detach()))


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<bn>.weight": gamma}`` for every affine BatchNorm of ``model``."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, BN) and m.weight is not None}


def gamma_scores(ctx: PassContext, model: nn.Module, scales: Scales | None = None) -> Scores:
    """Per prunable group: mean |gamma| over its BatchNorms; where it has none, |its learned scale| x its
    producers' L1 relative to the group's mean (``scales``), else that L1 rescaled to the model's mean |gamma|."""
    gammas = {k: v.detach().abs().float().cpu().numpy() for k, v in bn_scales(model).items()}
    mean_gamma = mean_scale(gammas)
    state = user_tensors(model)  # a masked copy of the user's modules: its parametrized tensors by their names

    def tensor(name: str) -> torch.Tensor:  # ``model``'s own, else the traced graph's
        return state[name] if name in state else ctx.tensor(name)

    scores: Scores = {}
    for group in ctx.groups.prunable:
        if scales and group.id in scales:  # |scale| x the channel's filter norm relative to its group's
            scale = scales[group.id].detach().abs().double().cpu().numpy()
            scores[group.id] = scale * rescaled_l1(ctx.groups, group, tensor, 1.0)
            continue
        norm = [p for p in group.params if p.name in gammas and p.role == "norm"]
        if norm:
            scores[group.id] = sum(ctx.groups.channel_sum(group, p, gammas[p.name]) for p in norm) / len(norm)
            continue
        scores[group.id] = rescaled_l1(ctx.groups, group, tensor, mean_gamma)
    return scores


def _targets(groups: ChannelGroups, removed: np.ndarray, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{"<bn>.weight": bool per index}`` for the BatchNorm scales ``names``: the entries of the
    channels ``removed`` selects."""
    names = set(names)
    out: dict[str, torch.Tensor] = {}
    for group in groups.prunable:
        for p in group.params:
            if p.role != "norm" or p.name not in names:
                continue
            gid, pos = groups.positions(p.key)
            hit = np.zeros(len(gid), bool)
            mine = gid == group.id
            hit[mine] = removed[group.channels[pos[mine]]]
            mask = out.setdefault(p.name, torch.zeros(len(gid), dtype=torch.bool))
            mask |= torch.as_tensor(hit)
    return out


class TargetedShrink(Hook):
    """The adaptive schedule: a proximal L1 step on the BatchNorm entries (gamma and beta) of the
    channels the budget would remove, re-chosen every epoch, with a strength that ramps up."""

    def __init__(self, ctx: PassContext, s: float, s_max: float, ramp: float, scales: Scales | None = None) -> None:
        self.ctx, self.s, self.s_max, self.ramp, self.scales = ctx, s, s_max, ramp, dict(scales or {})
        self.targets: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (tensors, bool per channel on their device)

    def before_epoch(self, state: TrainState) -> None:
        assert self.ctx.select is not None
        removed = self.ctx.select(gamma_scores(self.ctx, state.module, self.scales))
        modules = dict(state.module.named_modules())
        masks = _targets(self.ctx.groups, removed, bn_scales(state.module))
        self.targets = [([t for t in (bn.weight, bn.bias) if t is not None], mask.to(bn.weight.device))
                        for name, mask in masks.items()
                        for bn in [modules[name.rsplit(".", 1)[0] if "." in name else ""]]]
        self.targets += [([p], torch.as_tensor(removed[self.ctx.groups[gid].channels], device=p.device))
                         for gid, p in self.scales.items()]

    def after_step(self, state: TrainState) -> None:
        total = max(state.epochs * (state.batches or 1), 1)
        progress = min(state.step / max(self.ramp * total, 1.0), 1.0)
        amount = state.optimizer.param_groups[0]["lr"] * (self.s + (self.s_max - self.s) * progress)
        with torch.no_grad():
            for tensors, mask in self.targets:
                for t in tensors:
                    shrunk = torch.sign(t) * torch.clamp(t.abs() - amount, min=0.0)
                    t.copy_(torch.where(mask, shrunk, t))


@dataclass(frozen=True)
class Slimming(LearnedScales):
    name = "slimming"
    graph_only = None  # runs on the modules target too: its masks act on a copy of the user's modules
    description = ("Network Slimming (Liu et al. 2017): L1 sparsity on BatchNorm scales (adaptive so it happens "
                   "within the budget), one global |gamma| threshold")
    min_keep = 0.1          # the paper's safeguard: no layer is removed whole (a floor per group)
    presets = {"paper": {"schedule": "fixed", "s": 1e-4, "epochs": 160, "lr": 0.1}}  # VGG on CIFAR (ResNets: s=1e-5)

    train: bool = True      # sparsity-train a copy first; False: score the given model's |gamma|
    s: float = 1e-4         # the paper: 1e-4 for VGG, 1e-5 for ResNet/DenseNet (adaptive: the starting strength)
    schedule: str = "adaptive"  # "adaptive": drive the channels the budget removes to zero; "fixed": the paper's s
    ramp: float = 0.5       # adaptive: fraction of the steps over which the strength grows to s_max
    threshold: float = 0.01  # "below the threshold": |gamma| < threshold x mean |gamma| before training
    epochs: int = 20        # the paper trains sparsity for the whole schedule; 10 left a ViT 2.5-2.8 points down
    lr: float = 0.01
    optimizer: str = "sgd"
    preset: str = ""        # "paper": the fixed subgradient s=1e-4, 160 epochs at lr 0.1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PassError(f"slimming: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.ramp <= 1.0:
            raise PassError(f"slimming: ramp is a fraction of the training steps, in (0, 1]; got {self.ramp}")
        if self.epochs < 0 or self.s < 0 or self.threshold < 0:
            raise PassError("slimming: epochs, s and threshold must be >= 0")

    def _hooks(self, ctx: PassContext, loader: Any, mean_gamma: float, scales: Scales) -> list[Hook]:
        hooks: list[Hook] = [SparsityHook(self.s, scales)]
        if self.schedule == "adaptive" and ctx.select is not None:
            batches = batches_per_epoch(loader) or 100
            s_max = max(mean_gamma / (self.lr * batches), self.s)
            hooks.append(TargetedShrink(ctx, self.s, s_max, self.ramp, scales))
        return hooks

    def _slimmed(self, ctx: PassContext, mean_gamma: float) -> MaskedModel:
        """The sparsity-trained masked copy: BatchNorm gammas and, where a group has no BatchNorm, a scale."""
        loader = self.train_loader(ctx, "for sparsity training (or --opt train=false)")
        with_bn = set(bn_scales(ctx.model))
        unscaled = [g.id for g in self.prunable(ctx)
                    if not any(p.role == "norm" and p.name in with_bn for p in g.params)]
        masked = ctx.insert_masks(lambda g: Scale(len(g), mean_gamma), only=unscaled)
        scales = _learned(masked)
        train_masked(masked, ctx.data, epochs=self.epochs, lr=self.lr, optimizer=self.optimizer, loader=loader,
                     masks=list(scales.values()), mask_lr=self.lr, mask_optimizer="sgd",
                     hooks=self._hooks(ctx, loader, mean_gamma, scales))
        return masked

    def score(self, ctx: PassContext) -> Decision:
        scales_before = _abs_values(bn_scales(ctx.model))
        mean_gamma = float(scales_before.mean()) if len(scales_before) else 1.0
        if not self.train:
            return Decision(gamma_scores(ctx, ctx.model))
        masked = self._slimmed(ctx, mean_gamma)
        scales = _learned(masked)
        scores = gamma_scores(ctx, masked.module, scales)
        report = self._report(ctx, scales_before, mean_gamma, masked.module, scales, scores)
        if (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["trained_metrics"] = metrics
        # the sparsity-trained network, its scales folded in, is what compaction slices
        return Decision(scores, report=report, weights=masked.fold().weights)

    def _report(self, ctx: PassContext, gammas_before: np.ndarray, mean_gamma: float, trained: nn.Module,
                learned: Scales, scores: Scores) -> dict[str, Any]:
        """The paper's figure (|gamma| before/after; the learned scales of groups without BatchNorm
        beside them) and how sparse the scales became."""
        before = np.concatenate([gammas_before] + [np.full(len(p), mean_gamma) for p in learned.values()])
        if not len(before):
            return {}
        scales = {**bn_scales(trained), **{f"group {gid}": p for gid, p in learned.items()}}
        after = _abs_values(scales)
        threshold = self.threshold * float(before.mean())
        removal = ctx.select(scores) if ctx.select is not None else None
        chosen = _targets(ctx.groups, removal, scales) if removal is not None else {}
        if removal is not None:
            chosen.update({f"group {gid}": torch.as_tensor(removal[ctx.groups[gid].channels])
                           for gid in learned})
        gammas = {k: v.detach().abs().cpu() for k, v in scales.items()}
        chosen_values = torch.cat([gammas[k][m] for k, m in chosen.items()]) if chosen else torch.zeros(0)
        reached = bool((chosen_values < threshold).all()) if len(chosen_values) else True
        if self.schedule == "adaptive" and not reached:
            warnings.warn(f"slimming: the training budget ended before every selected channel's |gamma| fell "
                          f"below {threshold:.3g}; pruning them costs accuracy. Raise --opt epochs= (now "
                          f"{self.epochs}) or --opt lr= (now {self.lr}).", stacklevel=2)
        return {
            "sparsity": {"schedule": self.schedule, "threshold": threshold,
                         "fraction_below_before": float((before < threshold).mean()),
                         "fraction_below_after": float((after < threshold).mean()),
                         "selected_fraction": float(len(chosen_values) / len(after)),
                         "selected_below_threshold": reached},
            "histograms": {"gamma": {"before": before.tolist(), "after": after.tolist(), "threshold": threshold,
                                     "xlabel": "|gamma| of the BatchNorm scales (and learned scales where "
                                               "a group has no BatchNorm)"}},
        }


def _learned(masked: MaskedModel) -> Scales:
    """The learned scale of every group of ``masked`` without a BatchNorm."""
    return {gid: m.weight for gid, m in masked.masks.items()}


def _abs_values(scales: dict[str, torch.Tensor]) -> np.ndarray:
    if not scales:
        return np.zeros(0)
    return np.concatenate([v.detach().abs().float().cpu().numpy() for v in scales.values()])

