"""flop: Structured Pruning of Large Language Models by factorised L0 (Wang, Wohlwend & Lei, EMNLP 2020).

Defaults follow the authors' released code (asappresearch/flop: ``HardConcrete``, the enwik8 scripts).

- Factorisation (``prepare``): each targeted linear map ``W`` (out x in) becomes ``P diag(z) Q`` at full
  rank ``min(in, out)``, initialised from the SVD of the given ``W`` (``P = U sqrt(S)``,
  ``Q = sqrt(S) V^T``: the model is unchanged, float64 round-off aside): ``fxprune.edits.factorize``,
  traced and analysed again, so each rank axis is one more channel group (producer: Q's rows,
  ``<path>.weight_v``; consumer: P's columns, ``<path>.weight_u``). ``targets``: comma-separated
  module-path patterns (fnmatch) of linear layers or 1x1 convolutions; default: every linear layer with
  at least one axis in a prunable channel group (a layer the analysis freezes on both sides, e.g. a
  language model's output head, is left dense). ``rank_init="svd"`` is the only initialisation.
- z: one hard-concrete gate per rank component (:class:`HardConcrete`): temperature ``beta = 1.0``,
  stretch ``(l, r) = (-0.1, 1.1)``, ``eps = 1e-6``, ``log_alpha ~ N(log((1 - m) / m), 0.01)`` with
  ``m = init_drop = 0.05`` (the authors' enwik8 default). Training samples
  ``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (r - l) + l, 0, 1)``; expected L0 =
  ``sum sigmoid(log_alpha - beta log(-l / r))``. The gates are masks in the traced graph
  (``fxprune.masking``), acting on Q's rows.
- Sparsity ``s = 1 - sum_layers (in + out) E[L0] / sum_layers (in + out) r`` (the authors' "prunable
  parameters": the factorised size). Augmented Lagrangian ``lambda1 (s - t) + lambda2 (s - t)^2``,
  ``lambda1 = lambda2 = 0`` at the start, both trained by gradient ASCENT (Adam maximising, lr
  ``prune_lr = 3``, the enwik8 script's): while ``s < t``, lambda1 goes negative and lambda2 grows, so the
  penalty pushes ``s`` up. The target ``t`` is warmed up linearly over ``warmup_steps`` (default: the
  first half of the steps). Weights (AdamW, ``lr``, no weight decay) and gates (the engine's mask
  optimiser, Adam at ``mask_lr = 0.05``: the authors train them at the model's rate over ~10^5 steps, a
  run of a few hundred steps needs a faster one; ``mask_lr=<lr>`` is theirs) train jointly on the task
  loss + the penalty for ``epochs`` epochs; by default (``epochs=-1``, fxprune's default) the whole epochs
  that give about ``STEPS = 500`` optimiser steps (``ceil(500 / batches per epoch)``): one epoch of a small
  data set leaves the Lagrangian far from its target (a ViT on digits, 23 steps: expected sparsity 0.006 for
  a 0.68 target), 500 steps reach it (0.680) so that the cut costs nothing, as in the paper.
- t from the run's budget: with ``--target-params P`` (or ``--target-macs``), the fraction of every rank
  group whose removal brings the factorised model to ``P`` of the USER's model, by fxprune's cost model
  (an error if the layers it does not factorise alone exceed the budget); with a ratio ``t = R``.
- Scores: the authors' evaluation mask ``sigmoid(0.8 log_alpha)`` per rank component; selection is
  global over all rank groups (no normalisation) under the run's budget, so the budget is met exactly
  (the authors zero the ``round(E[#zeros])`` smallest, which the Lagrangian drives to the same count).
  The survivors' soft values are folded into Q's rows (``masked.fold``: the same function as folding
  them into P's columns).
- Compaction: a rank-``r`` pair is kept only where ``r (in + out) < in x out``; otherwise it is merged
  back into one dense layer ``P Q`` under its original weight name
  (``fxprune.edits.factorize.merge_unprofitable``). Budgets count the pair (the merged layer is never
  larger), so a parameter target is met or beaten. ``PruneResult.base`` is the factorised model.
"""
from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import ChannelGroups
from fxprune.edits.factorize import factorizable, factorized_graph, merge_unprofitable
from fxprune.masking import MaskedModel
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState, batches_per_epoch, epochs_for_steps
from fxprune.selection.cost import CostCounter

from .base import Decision, Finish, Pass, PassContext, Scores
from .registry import PassError

__all__ = ["Flop", "HardConcrete", "Lagrangian"]

STEPS = 500  # gate training without epochs=: about this many optimiser steps (whole epochs, at least one)


class HardConcrete(nn.Module):
    """Hard-concrete L0 gates (Louizos et al.; FLOP's defaults): sampled in training, the evaluation mask
    in eval mode (``sigmoid(0.8 log_alpha)`` with the ``round(E[#zeros])`` smallest set to 0)."""

    def __init__(self, n: int, init_drop: float = 0.05, temperature: float = 1.0, stretch: float = 0.1,
                 eps: float = 1e-6, init_std: float = 0.01) -> None:
        super().__init__()
        self.n, self.beta, self.eps = n, temperature, eps
        self.left, self.right = -stretch, 1.0 + stretch
        self.log_alpha = nn.Parameter(torch.empty(n).normal_(math.log((1 - init_drop) / init_drop), init_std))

    @property
    def shift(self) -> float:
        """``beta log(-l / r)``: P(z > 0) = sigmoid(log_alpha - shift)."""
        return self.beta * math.log(-self.left / self.right)

    def l0(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable)."""
        return torch.sigmoid(self.log_alpha - self.shift).sum()

    def sample(self) -> torch.Tensor:
        u = torch.empty_like(self.log_alpha).uniform_(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def soft(self) -> torch.Tensor:
        """The evaluation mask before zeroing: ``sigmoid(0.8 log_alpha)``."""
        return torch.sigmoid(0.8 * self.log_alpha)

    def forward(self) -> torch.Tensor:
        if self.training:
            return self.sample()
        with torch.no_grad():
            mask = self.soft().clone()
            zeros = round(self.n - float(self.l0()))
            if zeros > 0:
                mask[torch.topk(mask, zeros, largest=False).indices] = 0.0
        return mask


class Lagrangian(Hook):
    """The augmented Lagrangian penalty toward sparsity ``target`` (warmed up over ``warmup`` steps), with
    its multipliers trained by gradient ascent in their own Adam; logs s, t and the multipliers."""

    def __init__(self, gates: dict[int, HardConcrete], sizes: dict[int, int], target: float, warmup: int,
                 lr: float) -> None:
        self.gates, self.sizes, self.target, self.warmup = gates, sizes, target, warmup
        self.prunable = float(sum(sizes[g] * gates[g].n for g in gates))
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.Adam([self.lambdas], lr=lr, maximize=True)
        self.history: list[dict[str, float]] = []

    def sparsity(self) -> torch.Tensor:
        expected = sum(self.sizes[g] * gate.l0() for g, gate in self.gates.items())
        return 1.0 - expected / self.prunable

    def current_target(self, step: int) -> float:
        return self.target * min(1.0, step / self.warmup) if self.warmup > 0 else self.target

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor:
        s, t = self.sparsity(), self.current_target(state.step)
        lambdas = self.lambdas.to(s.device)
        l1, l2 = self.lambdas.detach().tolist()
        self.last = {"s": float(s.detach()), "t": t, "lambda1": l1, "lambda2": l2}
        return lambdas[0] * (s - t) + lambdas[1] * (s - t) ** 2

    def after_backward(self, state: TrainState) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_epoch(self, state: TrainState) -> None:
        self.history.append(dict(self.last, epoch=state.epoch + 1))

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": self.lambdas.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lambdas" in state:
            with torch.no_grad():
                self.lambdas.copy_(state["lambdas"])
            self.optimizer.load_state_dict(state["optimizer"])


def noam(step: int, warmup: int) -> float:
    """The noam factor of step ``step`` (1-based): ``min(step^-0.5, step warmup^-1.5)``."""
    step = max(step, 1)
    return min(step ** -0.5, step * warmup ** -1.5)


class Noam(Hook):
    """The authors' ``--noam`` rates, set before every step t: the weights and the gates at
    ``noam(t) lr / sqrt(d)``, the multipliers' ascent at ``noam(t) prune_lr / sqrt(d)``."""

    def __init__(self, warmup: int, d: int, lr: float, prune_lr: float, penalty: Lagrangian) -> None:
        self.warmup, self.scale, self.lr, self.prune_lr, self.penalty = warmup, d ** -0.5, lr, prune_lr, penalty

    def rates(self, step: int) -> tuple[float, float]:
        """(the weights' and gates' rate, the multipliers' rate) at step ``step`` (1-based)."""
        f = noam(step, self.warmup) * self.scale
        return f * self.lr, f * self.prune_lr

    def before_forward(self, state: TrainState) -> None:
        model, multipliers = self.rates(state.step + 1)
        for opt in (state.optimizer, state.mask_optimizer):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"] = model
        for group in self.penalty.optimizer.param_groups:
            group["lr"] = multipliers


def _in_prunable_group(groups: ChannelGroups, weight: str) -> bool:
    return any(p.name == weight and p.role in ("producer", "consumer") for g in groups.prunable for p in g.params)


@dataclass(frozen=True)
class Flop(Pass):
    name = "flop"
    graph_only = "its factorised layers are edits of the traced graph"
    description = ("FLOP (Wang et al. 2020): linear maps factorised P diag(z) Q from their SVD, hard-concrete L0 "
                   "gates on the rank, augmented Lagrangian to the target sparsity")
    scope = "global"
    normalize = "none"
    needs = ("train_loader",)
    # the authors' enwik8 script (--noam): every rate on the noam schedule, the gates at the model's rate, the
    # gates' initial mean 0.5
    presets = {"paper": {"schedule": "noam", "init_drop": 0.5}}

    epochs: int = -1              # -1: the whole epochs that give about STEPS optimiser steps
    lr: float = 1e-3              # weights (AdamW, no weight decay)
    mask_lr: float = 0.05         # the gates' log_alpha (Adam); the authors train them at the model's rate over
    #                               ~10^5 steps, a short run needs a faster one (mask_lr=lr is theirs)
    targets: str = ""             # comma-separated fnmatch patterns of layer paths; "": every linear in a
    #                               prunable group
    init_drop: float = 0.05       # m: log_alpha ~ N(log((1 - m) / m), 0.01)
    temperature: float = 1.0      # beta
    stretch: float = 0.1          # (l, r) = (-stretch, 1 + stretch)
    prune_lr: float = 3.0         # the multipliers' Adam (ascent)
    warmup_steps: int = -1        # steps over which the target grows from 0; -1: half of the training steps
    rank_init: str = "svd"
    schedule: str = "constant"    # "noam" (the authors' --noam): rates x min(t^-0.5, t w^-1.5) / sqrt(d), gates at lr
    noam_warmup: int = 32000      # w, the noam schedule's warmup steps (the enwik8 script's default)
    d_model: int = 0              # d of the noam schedule (0: the widest input of a factorised layer)
    preset: str = ""              # "paper": the authors' enwik8 schedule and gate initialisation

    def __post_init__(self) -> None:
        if self.rank_init != "svd":
            raise PassError(f"flop: rank_init must be 'svd' (the paper's initialisation), got {self.rank_init!r}")
        if not 0.0 < self.init_drop < 1.0:
            raise PassError(f"flop: init_drop is a probability in (0, 1), got {self.init_drop}")
        if self.schedule not in ("constant", "noam") or self.noam_warmup < 1 or self.d_model < 0:
            raise PassError(f"flop: schedule must be 'constant' or 'noam' (noam_warmup >= 1, d_model >= 0), got "
                            f"{self.schedule!r}")
        if (self.epochs < -1 or self.lr <= 0 or self.mask_lr <= 0 or self.prune_lr <= 0 or self.temperature <= 0
                or self.stretch <= 0):
            raise PassError("flop: epochs must be >= 0 (or -1: about 500 optimiser steps); lr, prune_lr, temperature "
                            "and stretch > 0")

    # ---- which layers --------------------------------------------------------------------------
    def layers(self, ctx: PassContext) -> dict[str, tuple[int, int]]:
        """Layer path -> (out, in) of the layers to factorise: ``targets``' matches among every layer
        ``fxprune.edits.factorize`` takes (linear maps, GPT-2's addmm, 1x1 convolutions); by default the
        linear maps (not convolutions) with an axis in a prunable group."""
        found = factorizable(ctx.gm)
        if self.targets:
            patterns = [p.strip() for p in self.targets.split(",") if p.strip()]
            chosen = {k: (v.out, v.inp) for k, v in found.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
            if not chosen:
                names = sorted(found)
                raise PassError(f"flop: targets={self.targets!r} matches no linear layer; layers: "
                                f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
            return chosen
        return {k: (v.out, v.inp) for k, v in found.items()
                if v.op != "conv" and _in_prunable_group(ctx.groups, f"{k}.weight")}

    def prepare(self, ctx: PassContext) -> PassContext:
        layers = self.layers(ctx)
        if not layers:
            raise PassError("flop: the model has no linear layer to factorise (give --opt targets=PATTERN)")
        gm, groups = factorized_graph(ctx.gm, None, {k: min(shape) for k, shape in layers.items()})
        gm.train(ctx.model.training)  # the factorised model is the one compacted: it keeps the user's mode
        return ctx.prepared(gm, groups, gm)

    def rank_groups(self, ctx: PassContext, layers: dict[str, tuple[int, int]] | None = None
                    ) -> dict[int, tuple[str, int]]:
        """Group id -> (layer path, in + out) of every factorised layer's rank group (``ctx``: the factorised
        model's context, which ``prepare`` made; ``layers``: ``self.layers(ctx.user)`` when the caller has it)."""
        if ctx.origin is None:
            raise PassError("flop scores the factorised copy of the model its prepare() makes (fxprune.prune and "
                            "the command line call it): give score() that context")
        out: dict[int, tuple[str, int]] = {}
        for path, (o, i) in (self.layers(ctx.user) if layers is None else layers).items():
            group = next((g for g in ctx.groups.prunable if any(p.name == f"{path}.weight_v" and p.role == "producer"
                                                                 for p in g.params)), None)
            if group is not None:
                out[group.id] = (path, o + i)
        return out

    @staticmethod
    def target_sparsity(ctx: PassContext, ranks: dict[int, tuple[str, int]]) -> float:
        """t: with a ratio, the ratio; with a MACs/params target, the fraction f of every rank group's
        components whose removal brings the factorised model (counted by fxprune's cost model) to the
        target fraction of the user's model (bisection; removing a fraction f of each rank group is
        sparsity f). An error when even f = 1 misses it."""
        if ctx.target is None:
            return float(ctx.selection.ratio) if ctx.selection is not None else 0.5
        which, goal = ctx.target
        counter, full = CostCounter(ctx.groups), max(getattr(CostCounter(ctx.user.groups)(), which), 1)

        def kept(f: float) -> float:
            removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
            for g in ranks:
                channels = ctx.groups[g].channels
                removed[channels[:int(round(f * len(channels)))]] = True
            return getattr(counter(removed), which) / full

        if kept(1.0) > goal:
            raise PassError(f"flop: a {which} target of {goal} is below what the layers it does not factorise "
                            f"cost ({kept(1.0):.3f} of the model); raise it or widen --opt targets")
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept(mid) > goal else (lo, mid)
        return hi

    # ---- training and scores ---------------------------------------------------------------------
    def score(self, ctx: PassContext) -> Decision:
        layers = self.layers(ctx.user)
        ranks = self.rank_groups(ctx, layers)
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError("flop needs train_loader= to learn its gates")
        masked = ctx.insert_masks(lambda g: HardConcrete(len(g), self.init_drop, self.temperature, self.stretch),
                                  only=list(ranks))
        gates: dict[int, HardConcrete] = {g: m for g, m in masked.masks.items()}  # type: ignore[misc]
        t = self.target_sparsity(ctx, ranks)
        epochs = self.epochs if self.epochs >= 0 else epochs_for_steps(loader, STEPS)
        steps = epochs * (batches_per_epoch(loader) or 100)
        warmup = steps // 2 if self.warmup_steps < 0 else self.warmup_steps
        penalty = Lagrangian(gates, {g: size for g, (_, size) in ranks.items()}, t, warmup, self.prune_lr)
        hooks: list[Hook] = [penalty]
        if self.schedule == "noam":
            d = self.d_model or max(inp for _, inp in layers.values())
            hooks.insert(0, Noam(self.noam_warmup, d, self.lr, self.prune_lr, penalty))
        train_masked(masked, ctx.data, epochs=epochs, lr=self.lr, optimizer="adamw", loader=loader,
                     mask_lr=self.mask_lr if self.schedule == "constant" else self.lr, mask_optimizer="adamw",
                     hooks=hooks, weight_decay=0.0, schedule="none")
        with torch.no_grad():
            soft = {g: gate.soft().double().cpu().numpy() for g, gate in gates.items()}
            expected = float(penalty.sparsity())
        report: dict[str, Any] = {"factorised": {k: list(v) for k, v in layers.items()}, "epochs": epochs,
                                  "target_sparsity": t,
                                  "expected_sparsity": expected, "lagrangian": penalty.history}
        if (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["trained_metrics"] = metrics
        scores: Scores = {g.id: np.full(len(g), np.inf) for g in ctx.groups.prunable}  # only ranks shrink
        scores.update(soft)
        return Decision(scores, masks=soft, report=report, finish=functools.partial(_finish, masked, layers))


def _finish(masked: MaskedModel, layers: dict[str, tuple[int, int]], removed: np.ndarray) -> Finish:
    """Survivors keep their soft gate value, folded into Q's rows; layers whose kept rank saves nothing are
    merged back into one matrix."""
    values = {g: masked.masks[g].soft().detach().double().cpu().numpy() for g in masked.masks}
    return Finish(masked.fold(values).weights, [merge_unprofitable(layers)])
