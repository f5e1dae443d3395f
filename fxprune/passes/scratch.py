"""scratch: Pruning from Scratch (Wang et al., AAAI 2020).

Learn channel gates on a RANDOMLY initialised network, pick the architecture from the gates under a
MACs budget, then train that architecture from scratch (the CLI's recovery defaults to Scratch-B for
this pass, with distillation from the model as given when there is one: the paper trains without a teacher,
``preset=paper``). No pre-training is used for the gates.

- Working copy: a deep copy of the user's eager model, re-initialised (``reinit=True``, the default:
  ``fxprune.recovery.modes.reinitialize`` under ``torch.manual_seed(seed)``: every module's
  ``reset_parameters()``, BatchNorm statistics reset too). ``reinit=False`` learns the gates on the
  weights as given.
- Gates: one scalar per prunable channel (initialised to 1) of every prunable group, multiplying the
  group's channels in the traced graph (``fxprune.masking``: one ``Scale`` mask per group). Where a
  BatchNorm follows the producing layer (the paper's case) the gate multiplies that BatchNorm's output,
  before the activation; elsewhere (no BatchNorm: ViT heads, MLP channels, LLaMA's MLP) it multiplies
  the producing layers' output, the same learned scale. Residual streams (groups that add up the
  outputs of different layers, ``passes/_scales.py``: not SwiGLU's gate/up pair nor q/k/v) are NOT
  gated by default, as in the authors' code: they are kept whole. This also keeps the
  budget search fine: one residual-stream channel of a ResNet's first stage costs ~0.5% of its MACs,
  more than the 0.1% tolerance, while an inner channel costs at most ~0.2%. ``residual=True`` gates
  them too (one gate per channel shared by all the stream's writers).
- Training: ONLY the gates train (every weight is frozen at its random initialisation; the masked
  graph runs in train mode, so BatchNorm running statistics still update), in the engine's mask
  optimiser (``MaskTraining``): Adam (no weight decay, constant lr 0.01). Loss = task loss +
  ``lam * (mean|g| - r)^2`` (the authors' code; ``lam=0.5``, ``r=0.2``) or, with ``sparsity="l1"``,
  ``lam * mean|g|`` (the paper's text). Gates are clamped to [0, 1] after every optimiser step.
  ``epochs`` defaults to 2 so the bundled example stays quick; the paper uses 10 (``--opt epochs=10``).
- Score of a channel: its gate. Scope "global", no normalisation (gates are comparable); a
  ``--target-macs`` search must land within 0.1% (``tolerance = 0.001``).
- Groups no gate can act on (``fxprune.masking`` names why, e.g. a BatchNorm without affine
  parameters to fold into; fxprune's fallback, not the paper's): scored by the L1 norm of their
  producing filters in the model AS GIVEN, rescaled so that the group's mean equals the mean gate of
  the whole model (they compete under the same threshold, like slimming's fallback).
- Compaction: the gates are folded into the weights (``gamma * g``, ``beta * g`` of the BatchNorm, or
  the producing layer's rows and bias) and the working copy's whole state goes to compaction through
  ``Decision.weights``: the compacted model is exactly the gated random network restricted to the kept
  channels. No gate exists in the output: the gates only ever live in the masked copy of the graph.
  Recovery (scratch-b) re-initialises those weights anyway; without recovery the output is the
  searched architecture with the gated random weights.
- ``expand`` (the paper's x1.25): learn the gates on a WIDER copy. ``prepare`` widens every prunable
  group of the traced graph to ``round(expand * n)`` channels (``fxprune.compaction.widen``: the
  inverse of compaction, through the same literal rewrites and shape verifier), re-initialises the
  whole wide model (``fxprune.recovery.modes.reinitialize``: each layer type's PyTorch default at
  the new widths; it needs ``reinit=True``) and traces it; gates, selection and compaction then run
  on it, so the searched architecture may keep more channels in a layer than the original had. A
  ``--target-macs`` budget stays a fraction of the ORIGINAL model's MACs (x1.25 widths cost ~1.56x
  the MACs, so 0.5 keeps ~32% of the wide model). ``PruneResult.plan`` and ``base`` refer to the wide
  model. Unprunable groups (inputs, outputs, exactness-protected normalised streams) are not widened.
  Groups no gate can act on (the L1 fallback) are scored on the re-initialised wide copy, i.e. by
  random weights.
  Residual streams are widened too (``expand_residual=True``, as the authors' CIFAR ResNets, whose
  base width scales every stage) and, being ungated by default, stay x``expand`` wide in the result;
  ``expand_residual=False`` widens only inner channels (as their ImageNet ResNet-50, which scales the
  bottleneck widths and keeps the block outputs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.masking import MaskedModel, Scale
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState
from fxprune.recovery.modes import reinitialize
from fxprune.state import named_tensors

from ._scales import LearnedScales, mean_scale, rescaled_l1, residual_stream
from .base import Decision, PassContext, Scores
from .registry import PassError

__all__ = ["Scratch", "GateHook"]

class GateHook(Hook):
    """The sparsity term on the gates, and the clamp to [0, 1] after every step."""

    def __init__(self, gates: list[nn.Parameter], lam: float, r: float, sparsity: str) -> None:
        self.gates, self.lam, self.r, self.sparsity = gates, lam, r, sparsity

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        if not self.gates:
            return None
        mean = torch.cat([p.abs() for p in self.gates]).mean()
        return self.lam * (mean if self.sparsity == "l1" else (mean - self.r) ** 2)

    def after_step(self, state: TrainState) -> None:
        with torch.no_grad():
            for p in self.gates:
                p.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Scratch(LearnedScales):
    name = "scratch"
    graph_only = None  # runs on the modules target too: its masks act on a copy of the user's modules
    description = ("Pruning from Scratch (Wang et al. 2020): BatchNorm channel gates learned on random weights, "
                   "global gate threshold; recovery defaults to scratch-b with distillation")
    tolerance = 0.001
    default_recovery = "scratch-b"
    # distillation from the user's (trained) model: twenty epochs from scratch left a ViT whose own training took
    # forty 3.0 points short without a teacher, 0.8 with (three seeds); the paper has no teacher
    default_distill = True
    preset_recovery = {"paper": {"distill": False}}
    presets = {"paper": {"epochs": 10}}  # the authors' CIFAR gate training (lam 0.5, r 0.2, Adam 0.01 are defaults)

    epochs: int = 2          # gate-training epochs (the paper: 10)
    lr: float = 0.01         # Adam
    lam: float = 0.5         # sparsity weight
    r: float = 0.2           # target mean gate (sparsity="mean")
    sparsity: str = "mean"   # "mean": lam * (mean|g| - r)^2 (authors' code); "l1": lam * mean|g| (paper text)
    reinit: bool = True      # learn the gates on a randomly re-initialised copy (the method); False: as given
    seed: int = 0
    residual: bool = False   # also gate residual streams (default: only inner channels, as the authors' code)
    expand: float = 1.0      # learn the gates on a copy this much wider (the paper: 1.25)
    expand_residual: bool = True  # widen residual streams too (authors' CIFAR ResNets); False: inner only
    #                               (their ResNet-50)
    preset: str = ""         # "paper": the authors' 10 gate-training epochs, and recovery without distillation

    def __post_init__(self) -> None:
        if not (1.0 <= self.expand <= 4.0):
            raise PassError(f"scratch: expand must be between 1.0 and 4.0 (the paper uses 1.25), got {self.expand}")
        if self.expand != 1.0 and not self.reinit:
            raise PassError("scratch: expand > 1 needs reinit=true (the added channels have no trained weights, and "
                            "copies of existing ones would get identical gradients)")
        if self.sparsity not in ("mean", "l1"):
            raise PassError(f"scratch: sparsity must be 'mean' or 'l1', got {self.sparsity!r}")
        if self.epochs < 0:
            raise PassError(f"scratch: epochs must be >= 0, got {self.epochs}")

    def prepare(self, ctx: PassContext) -> PassContext | None:
        """With ``expand > 1``: a re-initialised copy ``expand`` times wider, traced and analysed."""
        if self.expand == 1.0:
            return None
        if ctx.compaction == "modules":
            raise PassError("scratch: expand > 1 traces a wider copy of the model, and this one has no graph that runs "
                            "on other inputs (it is compacted by resizing its modules): leave expand at 1")
        from fxprune.analysis import analyze
        from fxprune.compaction.widen import widen
        from fxprune.tracing.tracer import INPUT_SHAPES, META_INPUTS, trace

        only = [g.id for g in ctx.groups.prunable if self.expand_residual or not residual_stream(ctx.groups, g)]
        wide, _ = widen(ctx.gm, ctx.groups, self.expand, only=only, training=ctx.model.training)
        reinitialize(wide, self.seed)
        args, kwargs = ctx.gm.meta[META_INPUTS]
        gm = trace(wide, kwargs if kwargs else args, dynamic_shapes=ctx.gm.meta.get(INPUT_SHAPES))
        return ctx.prepared(gm, analyze(gm, allow_inexact=ctx.groups.allow_inexact), wide)

    def gated(self, ctx: PassContext) -> list[int]:
        """The groups that get a gate: every prunable one, residual streams only with ``residual``."""
        return [g.id for g in self.prunable(ctx) if self.residual or not residual_stream(ctx.groups, g)]

    def learn(self, ctx: PassContext) -> MaskedModel:
        """Train gates in a masked copy of the (re-initialised) graph; returns it, weights frozen."""
        loader = self.train_loader(ctx, "to learn its gates")
        weights = None
        if self.reinit and self.expand == 1.0:  # a wide copy (prepare) is already freshly initialised
            work = copy.deepcopy(ctx.model)
            reinitialize(work, self.seed)
            weights = named_tensors(work)
        masked = ctx.insert_masks(lambda g: Scale(len(g)), only=self.gated(ctx), weights=weights, training=True)
        for p in masked.weight_parameters():
            p.requires_grad_(False)
        gates = masked.mask_parameters()
        if gates and self.epochs > 0:  # the weights stay the random ones: only the gates learn
            train_masked(masked, ctx.data, epochs=self.epochs, lr=self.lr, loader=loader, weights=[], masks=gates,
                         mask_lr=self.lr, mask_optimizer="adamw", mask_weight_decay=0.0,
                         hooks=[GateHook(gates, self.lam, self.r, self.sparsity)])
        return masked

    def score(self, ctx: PassContext) -> Decision:
        masked = self.learn(ctx)
        masked.module.eval()
        values = masked.values()
        report: dict[str, Any] = {}
        if values and (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["trained_metrics"] = metrics
        mean_gate = mean_scale(values)
        scores: Scores = {}
        for group in self.prunable(ctx):
            if group.id in values:
                scores[group.id] = values[group.id]
                continue
            if not self.residual and residual_stream(ctx.groups, group):
                scores[group.id] = np.full(len(group), np.inf)  # an ungated residual stream: kept whole
                continue
            # fallback: the given model's, rescaled to the mean gate
            scores[group.id] = rescaled_l1(ctx.groups, group, ctx.tensor, max(mean_gate, 1e-6))
        # the gated network, gates folded in, is what compaction slices; the gates are written on the graph
        return Decision(scores, masks=values, report=report, weights=masked.fold(values).weights)
