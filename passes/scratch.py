"""scratch: Pruning from Scratch (Wang et al., AAAI 2020).

Learn channel gates on a RANDOMLY initialised network, pick the architecture from the gates under a
MACs budget, then train that architecture from scratch (the CLI's recovery defaults to Scratch-B for
this pass). No pre-training is used.

- Working copy: a deep copy of the user's eager model, re-initialised (``reinit=True``, the default:
  ``fxprune.recovery.modes.reinitialize`` under ``torch.manual_seed(seed)``: every module's
  ``reset_parameters()``, BatchNorm statistics reset too). ``reinit=False`` learns the gates on the
  weights as given.
- Gates: one scalar per prunable channel (initialised to 1) of every group that has an affine
  BatchNorm, multiplying that BatchNorm's output (before the activation) through a forward hook on the
  working copy. Residual streams (groups with more than one producer) are NOT gated by default, as in
  the authors' code: they are kept whole. This also keeps the budget search fine: one residual-stream
  channel of a ResNet's first stage costs ~0.5% of its MACs, more than the 0.1% tolerance, while an
  inner channel costs at most ~0.2%. ``residual=True`` gates them too (one gate per channel shared
  by all the stream's BatchNorms).
- Training: ONLY the gates train (every weight is frozen at its random initialisation; the copy runs
  in train mode, so BatchNorm running statistics still update). Adam (no weight decay, constant
  lr 0.01). Loss = task loss + ``lam * (mean|g| - r)^2`` (the authors' code; ``lam=0.5``, ``r=0.2``)
  or, with ``sparsity="l1"``, ``lam * mean|g|`` (the paper's text). Gates are clamped to [0, 1]
  after every optimiser step. ``epochs`` defaults to 2 so the bundled example stays quick; the paper
  uses 10 (``--opt epochs=10``).
- Score of a channel: its gate. Scope "global", no normalisation (gates are comparable); a
  ``--target-macs`` search must land within 0.1% (``tolerance = 0.001``).
- Groups without an affine BatchNorm (fxprune's fallback, not the paper's): not gated; scored by the
  L1 norm of their producing filters in the model AS GIVEN, rescaled so that the group's mean equals
  the mean gate of the whole model (they compete under the same threshold, like slimming's fallback).
- Compaction: the gates are folded into the BatchNorms (``gamma * g``, ``beta * g``) and the working
  copy's whole state goes to compaction through ``ctx.weights``: the compacted model is exactly the
  gated random network restricted to the kept channels. No gate node exists in any graph: the gates
  only ever live as hooks on the eager working copy, removed after training. Recovery (scratch-b)
  re-initialises those weights anyway; without recovery the output is the searched architecture with
  the gated random weights.
- ``expand`` (the paper's x1.25): learn the gates on a WIDER copy. ``prepare`` widens every prunable
  group of the traced graph to ``round(expand * n)`` channels (``fxprune.compaction.widen``: the
  inverse of compaction, through the same literal rewrites and shape verifier), re-initialises the
  whole wide model (``fxprune.recovery.modes.reinitialize``: each layer type's PyTorch default at
  the new widths; it needs ``reinit=True``) and traces it; gates, selection and compaction then run
  on it, so the searched architecture may keep more channels in a layer than the original had. A
  ``--target-macs`` budget stays a fraction of the ORIGINAL model's MACs (x1.25 widths cost ~1.56x
  the MACs, so 0.5 keeps ~32% of the wide model). ``PruneResult.plan`` and ``base`` refer to the wide
  model. Unprunable groups (inputs, outputs, exactness-protected normalised streams) are not widened.
  With ``expand``, groups without a BatchNorm (the L1 fallback) are scored on the re-initialised wide
  copy, i.e. by random weights: gate BatchNorm models, or keep expand=1 elsewhere.
  Residual streams are widened too (``expand_residual=True``, as the authors' CIFAR ResNets, whose
  base width scales every stage) and, being ungated by default, stay x``expand`` wide in the result;
  ``expand_residual=False`` widens only inner channels (as their ImageNet ResNet-50, which scales the
  bottleneck widths and keeps the block outputs).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from .base import PassContext, Scores
from .registry import PassError
from ._scales import BN, LearnedScales, mean_scale, rescaled_l1
from fxprune.recovery.engine import Hook, TrainState, train
from fxprune.recovery.modes import reinitialize

__all__ = ["Scratch", "Gates", "GateHook"]

class Gates:
    """Channel gates on an eager model's BatchNorms, one parameter vector per gated group."""

    def __init__(self, model: nn.Module, groups: ChannelGroups, candidates: Iterable[Group], residual: bool = False):
        modules = dict(model.named_modules())
        self.params: dict[int, nn.Parameter] = {}
        self.where: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # bn -> (gid, bn idx, gate pos)
        for group in candidates:
            if not residual and len(group.layers("producer")) > 1:
                continue
            entries = []
            seen: set[str] = set()
            for p in group.params:
                mod = p.name.rsplit(".", 1)[0] if "." in p.name else ""
                m = modules.get(mod)
                if p.role != "norm" or mod in seen or not isinstance(m, BN) or m.weight is None:
                    continue
                seen.add(mod)
                gid, pos = groups.positions(p.key)
                mask = gid == group.id
                entries.append((mod, torch.as_tensor(np.nonzero(mask)[0]), torch.as_tensor(pos[mask])))
            if not entries:
                continue
            self.params[group.id] = nn.Parameter(torch.ones(len(group)))
            for mod, idx, pos in entries:
                self.where.setdefault(mod, []).append((group.id, idx, pos))
        self.modules = {name: modules[name] for name in self.where}
        self.handles: list[Any] = []

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.params.values())

    def full(self, bn: str, like: torch.Tensor) -> torch.Tensor:
        """The gate of every channel of BatchNorm ``bn`` (1 where no gated group covers it)."""
        n = self.modules[bn].num_features
        g = like.new_ones(n)
        for gid, idx, pos in self.where[bn]:
            param = self.params[gid]
            g = g.index_put((idx.to(g.device),), param[pos.to(param.device)].to(g.dtype))
        return g

    def attach(self) -> Gates:
        for name, m in self.modules.items():
            def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> torch.Tensor:
                g = self.full(name, out)
                return out * g.view(1, -1, *([1] * (out.dim() - 2)))
            self.handles.append(m.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def to(self, device: torch.device) -> Gates:
        self.params = {k: nn.Parameter(v.detach().to(device)) for k, v in self.params.items()}
        return self

    def fold(self) -> dict[str, torch.Tensor]:
        """``{"<bn>.weight": gamma * g, "<bn>.bias": beta * g}``: the gated BatchNorms as plain ones."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, m in self.modules.items():
                g = self.full(name, m.weight.detach())
                prefix = f"{name}." if name else ""
                out[prefix + "weight"] = m.weight.detach() * g
                if m.bias is not None:
                    out[prefix + "bias"] = m.bias.detach() * g
        return out


class GateHook(Hook):
    """The sparsity term on the gates, and the clamp to [0, 1] after every step."""

    def __init__(self, gates: Gates, lam: float, r: float, sparsity: str) -> None:
        self.gates, self.lam, self.r, self.sparsity = gates, lam, r, sparsity

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        if not self.gates.params:
            return None
        mean = torch.cat([p.abs() for p in self.gates.params.values()]).mean()
        return self.lam * (mean if self.sparsity == "l1" else (mean - self.r) ** 2)

    def after_step(self, state: TrainState) -> None:
        with torch.no_grad():
            for p in self.gates.params.values():
                p.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Scratch(LearnedScales):
    name = "scratch"
    description = ("Pruning from Scratch (Wang et al. 2020): BatchNorm channel gates learned on random weights, "
                   "global gate threshold; recovery defaults to scratch-b")
    tolerance = 0.001
    default_recovery = "scratch-b"

    epochs: int = 2          # gate-training epochs (the paper: 10)
    lr: float = 0.01         # Adam
    lam: float = 0.5         # sparsity weight
    r: float = 0.2           # target mean gate (sparsity="mean")
    sparsity: str = "mean"   # "mean": lam * (mean|g| - r)^2 (authors' code); "l1": lam * mean|g| (paper text)
    reinit: bool = True      # learn the gates on a randomly re-initialised copy (the method); False: as given
    seed: int = 0
    residual: bool = False   # also gate residual streams (default: only inner channels, as the authors' code)
    expand: float = 1.0      # learn the gates on a copy this much wider (the paper: 1.25)
    expand_residual: bool = True  # widen residual streams too (authors' CIFAR ResNets); False: inner only (their ResNet-50)

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
        from fxprune.analysis import analyze
        from fxprune.compaction.widen import widen
        from fxprune.tracing.tracer import META_INPUTS, trace

        only = [g.id for g in ctx.groups.prunable if self.expand_residual or len(g.layers("producer")) <= 1]
        wide, _ = widen(ctx.gm, ctx.groups, self.expand, only=only, training=ctx.model.training)
        reinitialize(wide, self.seed)
        args, kwargs = ctx.gm.meta[META_INPUTS]
        gm = trace(wide, kwargs if kwargs else args)
        return PassContext(gm, analyze(gm, allow_inexact=ctx.groups.allow_inexact), wide, ctx.data, ctx.selection)

    def learn(self, ctx: PassContext) -> tuple[nn.Module, Gates]:
        """Train gates on a (re-initialised) copy; returns the copy (hooks removed) and its gates."""
        loader = self.train_loader(ctx, "to learn its gates")
        work = copy.deepcopy(ctx.model)
        if self.reinit and self.expand == 1.0:  # a wide copy (prepare) is already freshly initialised
            reinitialize(work, self.seed)
        for p in work.parameters():
            p.requires_grad_(False)
        device = next(work.parameters()).device
        gates = Gates(work, ctx.groups, self.prunable(ctx), self.residual).to(device).attach()
        try:
            if gates.params and self.epochs > 0:
                train(work, loader, ctx.data.get("loss"), self.epochs, self.lr, device, optimizer="adamw",
                      weight_decay=0.0, schedule="none", parameters=list(gates.params.values()),
                      hooks=[GateHook(gates, self.lam, self.r, self.sparsity)])
        finally:
            gates.remove()
        return work, gates

    def score(self, ctx: PassContext) -> Scores:
        work, gates = self.learn(ctx)
        self.hand_over(ctx, work, gates.fold(), evaluate=bool(gates.params))  # the gated network, before pruning
        values = {gid: p.detach().float().cpu().numpy().astype(np.float64) for gid, p in gates.params.items()}
        ctx.masks.update(values)  # the learned gates, written on the graph beside the scores (fxprune.masks)
        mean_gate = mean_scale(values)
        scores: Scores = {}
        for group in self.prunable(ctx):
            if group.id in values:
                scores[group.id] = values[group.id]
                continue
            if not self.residual and len(group.layers("producer")) > 1 and any(p.role == "norm" for p in group.params):
                scores[group.id] = np.full(len(group), np.inf)  # an ungated residual stream: kept whole
                continue
            # fallback: the given model's, rescaled to the mean gate
            scores[group.id] = rescaled_l1(ctx.groups, group, ctx.tensor, max(mean_gate, 1e-6))
        return scores
