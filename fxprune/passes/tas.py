"""tas: Transformable Architecture Search (Dong & Yang, NeurIPS 2019): learned widths AND depths, then
distillation. The search follows the authors' released code (AutoDL-Projects, ``search-shape``) except where
said below (the weights' rate, the search length, the budget fit, the recovery); ``preset=paper`` is theirs.

- Channel order: a group's prefix of width C_i is its C_i most important channels, importance = the L1
  norm of the producing filters of the model as given (``producer_l1``; summed over a residual stream's
  writers), so the prefix is meaningful on a trained model and the removal at the end drops the
  least important channels.
- Width: one :class:`WidthChoice` per prunable group (a *transform* mask of ``fxprune.masking``, acting
  where the group's masks act: after its normalisation, else on its producers' outputs): logits over the
  candidate widths ``widths`` x C (0.3, 0.4, ..., 1.0; duplicates merged on small groups), init
  N(0, 0.01). Search forward: Gumbel-softmax probabilities at temperature tau, two candidates sampled from
  them without replacement, their perturbed logits re-softmaxed into two weights; each candidate keeps its
  prefix of C_i channels, channel-wise interpolation (adaptive average pooling over the channel axis, the
  authors' ``ChannelWiseInter``) stretches it to the larger of the two widths, and the weighted sum fills
  the first max(C_i) channels (the rest are zero: what the next layer would read if its input were
  sliced). One candidate-specific BatchNorm per width (the authors' code) is not reproduced: the
  group's own normalisation serves every width. Groups whose tensors hold channels more than once
  (attention heads) get no width search.
- Depth (``depth=true``): per stage of consecutive residual blocks (``fxprune.edits.blocks``: stages of
  two or more blocks chained exit to entry), logits over how many blocks to keep, the authors'
  ``get_depth_choices``: {1, 2, 3} up to three blocks, else {1, 3, 5, ..., n} (n always included; a stage's
  downsampling first block, which is not a removable block, counts as its first and is always kept),
  init N(0, 0.01), Gumbel-softmax probabilities p at tau; the stage's output is
  replaced by ``sum_k p_k * exit_{d_k}``, exit_d being the output of its first d blocks
  (``fxprune.edits.blocks.mix_exits``), as the authors' code mixes the stage's exits.
- Temperature: cosine from 5 to 0.1 over the search epochs (set per epoch).
- Cost: the expected MACs E from the width and depth distributions by fxprune's cost model, so any
  architecture works: every op's MACs on the example inputs times, per group it depends on, the expected
  kept fraction to the power the op depends on it (probed: 1 for a conv's input or output channels), times
  the probability its block is kept. F = the MACs of the argmax architecture (exact, by the cost model),
  R = target x the full model, tolerance 0.05 x full: loss = -log E if F < R - tol, +log E if F > R, else 0;
  architecture loss = CE + 2 loss.
- Training (``epochs`` search epochs): weights (SGD, Nesterov, lr ``lr`` 0.01, wd 5e-4, cosine) and the
  architecture (Adam, lr ``arch_lr`` 1e-3, betas (0.5, 0.999), wd 1e-3) updated alternately on two
  fixed halves of the training data (the engine's alternating scheme), starting from the weights as given.
  The authors search from scratch at lr 0.1; fxprune searches a trained network, which 0.1 undoes (a
  small ViT at 99.4% fell to chance in three epochs), so its weights continue at the fine-tuning rate.
- Target: ``--target-macs T``; with a ratio alone (fraction of channels to remove, r), T = (1 - r)^2 (what
  removing r of every channel costs a chain of convolutions); ``--target-params`` is refused (TAS's cost
  is MACs).
- Which architecture: after every epoch the argmax architecture, its MACs and (with ``evaluate()``) its
  validation metric are recorded; the result is the best-validated one in budget, as the authors' search
  returns (the latest one without ``evaluate()``). In budget: within 0.02 of the target (fxprune's promise
  for every learned pass, ``fxprune.selection.fit``); the authors' band [R - tol, R] with ``fit=false``.
  When no epoch is in budget (a short search), the shared budget fit selects every group's width by its
  channels' survival probability under the width distribution (P(width > position)), the argmax depths
  kept, to the target +- 0.02; the report says so (``fit``) and a note names where the search ended.
  ``fit=false`` keeps the last argmax and warns instead.
- Final architecture: that width per group (its prefix kept: scores +inf, the rest -inf, so selection
  keeps exactly the search's choice), argmax depth per stage (blocks beyond it removed, an exact edit:
  the compacted model equals the searched network with those branches zeroed and the other channels
  removed). The CLI's recovery then fine-tunes the searched weights (their BatchNorm statistics
  re-estimated on ``recalibrate`` batches for the argmax architecture) with knowledge distillation from the
  unpruned model (``(1 - 0.9) CE + 0.9 T^2 KL``, T = 4), for ``--epochs`` epochs; the authors train the
  searched architecture from scratch (``--recover scratch-e``, which ``preset=paper`` implies: ten epochs from
  scratch left that ViT at 90%, fine-tuning at 98.6%); ``--no-distill`` trains without the teacher.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.edits.blocks import Block, leads_in, mix_exits, remove_blocks, residual_blocks, stage_exits
from fxprune.masking import MaskedModel
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState
from fxprune.selection.cost import CostCounter
from fxprune.selection.fit import BUDGET_TOLERANCE, Fit, fit_selection, fit_to_budget, on_budget
from fxprune.state import seeded
from fxprune.tracing.compat import batch_norm_types

from .base import Decision, Finish, Pass, PassContext, Scores
from .l1 import producer_l1
from .registry import PassError

__all__ = ["Tas", "Searched", "WidthChoice", "StageDepth", "ExpectedMacs", "channel_map", "cost_loss",
           "depth_choices"]

WIDTHS = "0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"


def channel_map(k: int, m: int, order: torch.Tensor) -> torch.Tensor:
    """(n, n), n = len(order): the channels ``order[:k]`` stretched to ``m`` by adaptive average pooling over
    the channel axis, written to the channels ``order[:m]`` (``y = x @ M``)."""
    n = len(order)
    stretch = F.adaptive_avg_pool1d(torch.eye(k).unsqueeze(1), m).squeeze(1)  # (k, m): input i -> output j
    out = torch.zeros(n, n)
    out[order[:k].unsqueeze(1), order[:m].unsqueeze(0)] = stretch
    return out


def gumbel_softmax(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(perturbed logits / tau, their softmax): the authors' ``select2withP`` before the draw."""
    while True:  # a Gumbel of exactly 0 or inf is redrawn (as the authors do)
        gumbels = -torch.empty_like(logits).exponential_().log()
        if torch.isfinite(gumbels).all():
            break
    perturbed = (logits.log_softmax(-1) + gumbels) / tau
    return perturbed, perturbed.softmax(-1)


class WidthChoice(nn.Module):
    """A group's width distribution, as a transform mask: (C, C) channel map in training, the argmax
    prefix as a 0/1 value per channel in eval mode."""

    transform = True

    def __init__(self, order: torch.Tensor, fractions: Iterable[float]) -> None:
        super().__init__()
        n = len(order)
        self.counts = sorted({min(n, max(1, round(f * n))) for f in fractions})
        self.register_buffer("order", order.clone(), persistent=False)
        self.logits = nn.Parameter(torch.randn(len(self.counts)) * 0.01)
        self.tau = 5.0
        self.probs: torch.Tensor | None = None  # the last forward's Gumbel-softmax probabilities
        self.fixed: torch.Tensor | None = None  # the budget fit's keep (0/1 per channel), replacing the argmax
        self._maps: dict[tuple[int, int], torch.Tensor] = {}

    def _map(self, k: int, m: int) -> torch.Tensor:
        if (k, m) not in self._maps:
            self._maps[(k, m)] = channel_map(k, m, self.order.cpu()).to(self.logits.device)
        return self._maps[(k, m)]

    def argmax_count(self) -> int:
        return self.counts[int(self.logits.argmax())]

    def keep(self) -> torch.Tensor:
        """1 on the argmax prefix, 0 elsewhere (the budget fit's choice once it ran)."""
        if self.fixed is not None:
            return self.fixed.to(self.logits.device)
        keep = torch.zeros(len(self.order), device=self.logits.device)
        keep[self.order[: self.argmax_count()]] = 1.0
        return keep

    def survival(self) -> np.ndarray:
        """P(width > i) for the channel at position i of the order, under the softmax of the logits, per channel
        (the fit's score: higher = kept by more of the distribution), less 1e-9 per position so that a prefix
        stays a prefix among equal probabilities."""
        with torch.no_grad():
            probs = self.logits.softmax(-1).double().cpu().numpy()
        n = len(self.order)
        alive = np.array([[float(k > i) for k in self.counts] for i in range(n)])  # (position, choice)
        out = np.empty(n)
        out[self.order.cpu().numpy()] = alive @ probs - 1e-9 * np.arange(n)
        return out

    def expected_fraction(self) -> torch.Tensor:
        probs = self.probs if self.probs is not None else self.logits.softmax(-1)
        counts = torch.tensor(self.counts, dtype=probs.dtype, device=probs.device)
        return (probs * counts).sum() / len(self.order)

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.keep()
        if len(self.counts) == 1:
            self.probs = torch.ones(1, device=self.logits.device)
            return self._map(self.counts[0], self.counts[0])
        perturbed, self.probs = gumbel_softmax(self.logits, self.tau)
        with torch.no_grad():
            picked = torch.multinomial(self.probs.detach().cpu() + 1e-7, 2, replacement=False).tolist()
        self.picked = picked
        weights = perturbed[picked].softmax(-1)
        ks = [self.counts[i] for i in picked]
        m = max(ks)
        return weights[0] * self._map(ks[0], m) + weights[1] * self._map(ks[1], m)


def depth_choices(n: int) -> list[int]:
    """How many blocks a stage of ``n`` may keep, as the authors' ``get_depth_choices``: every count up to 3
    blocks (1, 2, 3), then 1, 3, 5, ... and n."""
    if n <= 3:
        return list(range(1, n + 1))
    return sorted(set(range(1, n + 1, 2)) | {n})


class StageDepth(nn.Module):
    """A stage's depth distribution: logits over ``depth_choices(n)``, n its blocks counting a leading layer
    that is not a removable block (``lead``: a ResNet stage's downsampling first block, always kept);
    ``kept[k]``: how many removable blocks choice k keeps. ``forward()`` returns one weight per choice
    (the Gumbel-softmax probabilities in training, one-hot at the argmax in eval mode), with which
    ``fxprune.edits.blocks.mix_exits`` mixes the stage's exits."""

    def __init__(self, blocks: int, lead: bool = False) -> None:
        super().__init__()
        self.choices = depth_choices(blocks + int(lead))
        self.kept = [d - int(lead) for d in self.choices]
        self.logits = nn.Parameter(torch.randn(len(self.choices)) * 0.01)
        self.tau = 5.0
        self.probs: torch.Tensor | None = None  # the last forward's probabilities
        self.fixed: int | None = None  # the budget fit's choice (an index), replacing the argmax

    def choice(self) -> int:
        """The argmax choice's index (the budget fit's once it ran)."""
        return self.fixed if self.fixed is not None else int(self.logits.argmax())

    def argmax_depth(self) -> int:
        """How many removable blocks the argmax (or the budget fit) keeps."""
        return self.kept[self.choice()]

    def forward(self) -> torch.Tensor:
        if not self.training:
            return F.one_hot(torch.tensor(self.choice(), device=self.logits.device),
                             len(self.choices)).to(self.logits.dtype)
        self.probs = gumbel_softmax(self.logits, self.tau)[1]
        return self.probs

    def expected_keeps(self, j: int) -> torch.Tensor:
        """P(depth > j): the probability that block j (0-based) is kept."""
        probs = self.probs if self.probs is not None else self.logits.softmax(-1)
        alive = torch.tensor([float(d > j) for d in self.kept], device=probs.device)
        return (probs * alive).sum()


def stages_of(gm: Any, blocks: list[Block]) -> dict[str, list[Block]]:
    """Blocks by stage, in graph order, where a depth can be chosen: the blocks chain exit to entry, and
    there are two of them, or one after a leading layer of the stage (``leads_in``)."""
    out: dict[str, list[Block]] = {}
    for b in blocks:
        out.setdefault(b.stage, []).append(b)
    return {k: v for k, v in out.items()
            if stage_exits(gm.graph, v) is not None and len(v) + int(leads_in(gm.graph, v)) > 1}


class ExpectedMacs:
    """Expected and argmax-architecture MACs of a graph under width and depth distributions (see the
    module docstring), from fxprune's cost model."""

    def __init__(self, groups: ChannelGroups, widths: dict[int, WidthChoice], stages: dict[str, list[Block]],
                 depths: dict[str, StageDepth]) -> None:
        self.groups, self.widths, self.depths = groups, widths, depths
        self.counter = CostCounter(groups)
        self.full_nodes = self.counter.per_node()
        self.full = sum(self.full_nodes.values())
        self.exponents = self.counter.dependence(list(widths))  # how each op's MACs depend on each group
        self.block_of: dict[str, tuple[str, int]] = {}
        for stage, blocks in stages.items():
            for j, b in enumerate(blocks):
                for name in b.nodes:
                    self.block_of[name] = (stage, j)

    def expected(self) -> torch.Tensor:
        fracs = {gid: w.expected_fraction() for gid, w in self.widths.items()}
        total = torch.zeros(())
        for name, full in self.full_nodes.items():
            term = torch.tensor(float(full))
            for gid, e in self.exponents[name].items():
                term = term * fracs[gid].cpu() ** e
            if name in self.block_of and self.block_of[name][0] in self.depths:
                stage, j = self.block_of[name]
                term = term * self.depths[stage].expected_keeps(j).cpu()
            total = total + term
        return total

    def removal(self) -> np.ndarray:
        """The argmax widths' removal (a bool per channel component)."""
        removed = np.zeros(len(self.groups.comp_group), dtype=bool)
        for gid, w in self.widths.items():
            keep = w.keep().cpu().numpy() > 0
            removed[self.groups[gid].channels[~keep]] = True
        return removed

    def argmax(self) -> int:
        """MACs of the argmax architecture: argmax widths, blocks beyond each stage's argmax depth removed."""
        return self.macs(self.removal(), {stage: d.argmax_depth() for stage, d in self.depths.items()})

    def macs(self, removed: np.ndarray, kept: dict[str, int]) -> int:
        """MACs of the network without the channels ``removed`` and the blocks beyond ``kept[stage]`` of each
        searched stage."""
        per_node = self.counter.per_node(removed)
        gone = {name for name, (stage, j) in self.block_of.items() if stage in kept and j >= kept[stage]}
        return sum(m for name, m in per_node.items() if name not in gone)


def cost_loss(expected: torch.Tensor, argmax: float, target: float, tolerance: float) -> torch.Tensor:
    """TAS's cost loss: -log E below the band [target - tolerance, target], +log E above it, 0 inside."""
    if argmax < target - tolerance:
        return -torch.log(expected)
    if argmax > target:
        return torch.log(expected)
    return expected.new_zeros(())


@dataclass(frozen=True)
class Epoch:
    """One search epoch's argmax architecture (its logits), its MACs (a fraction of full) and validation metric."""

    epoch: int
    macs: float
    metric: float | None
    logits: list[torch.Tensor]


class TasHook(Hook):
    """Temperature per epoch (cosine 5 -> 0.1), the cost loss on the architecture's steps; after each epoch, the
    argmax architecture, its MACs and (with ``evaluate``) its validation metric (``epochs``)."""

    def __init__(self, choices: list[Any], cost: ExpectedMacs, target: float, tolerance: float, weight: float,
                 tau: tuple[float, float], module: nn.Module | None = None, evaluate: Any = None) -> None:
        self.choices, self.cost, self.target, self.tolerance, self.weight, self.tau = \
            choices, cost, target, tolerance, weight, tau
        self.module, self.evaluate = module, evaluate
        self.history: list[dict[str, float]] = []
        self.epochs: list[Epoch] = []

    def after_epoch(self, state: TrainState) -> None:
        metric = None
        if self.evaluate is not None and self.module is not None:
            self.module.eval()  # the argmax architecture
            try:
                with torch.no_grad():
                    metrics = self.evaluate(self.module)
                metric = float(next(iter(metrics.values())))
            finally:
                self.module.train()
        self.epochs.append(Epoch(state.epoch + 1, self.cost.argmax() / self.cost.full, metric,
                                 [c.logits.detach().clone() for c in self.choices]))

    def before_epoch(self, state: TrainState) -> None:
        hi, lo = self.tau
        t = state.epoch / max(state.epochs - 1, 1)
        tau = lo + (hi - lo) * (1 + math.cos(math.pi * t)) / 2
        for c in self.choices:
            c.tau = tau

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        if state.phase != "masks":
            return None
        expected = self.cost.expected()
        argmax = self.cost.argmax()
        if state.batch == 0:
            self.history.append({"epoch": state.epoch + 1, "expected": float(expected.detach()) / self.cost.full,
                                 "argmax": argmax / self.cost.full})
        return self.weight * cost_loss(expected, argmax, self.target, self.tolerance).to(state.device)


def recalibrate(module: nn.Module, loader: Iterable[Any], batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics (a cumulative average over ``batches`` batches of
    ``loader``) for the argmax architecture: during the search they averaged over sampled mixtures of
    widths, which the argmax network does not compute (the authors keep one BatchNorm per width)."""
    from fxprune.measure import to_device

    norms = [m for m in module.modules() if isinstance(m, batch_norm_types()) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    device = next(iter(module.parameters())).device
    module.train()
    for m in module.modules():
        if isinstance(m, (WidthChoice, StageDepth)):
            m.eval()  # the argmax architecture
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        with torch.no_grad():
            for i, (inputs, _) in enumerate(loader):
                if i >= batches:
                    break
                inputs = to_device(inputs, device)
                module(*inputs) if isinstance(inputs, (tuple, list)) else module(inputs)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.eval()


def halves(loader: Any, seed: int) -> tuple[Any, Any]:
    """Two fixed halves of a DataLoader's dataset (same batch size, collate and shuffling); any other
    iterable of batches: its even and odd batches."""
    from torch.utils.data import DataLoader, RandomSampler, Subset

    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and dataset is not None and hasattr(dataset, "__len__") and len(dataset) > 1:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffle = isinstance(loader.sampler, RandomSampler)
        parts = []
        for i, idx in enumerate((order[: len(order) // 2], order[len(order) // 2:])):
            parts.append(DataLoader(Subset(dataset, idx), batch_size=loader.batch_size, shuffle=shuffle,
                                    collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                                    drop_last=loader.drop_last,
                                    generator=torch.Generator().manual_seed(seed + 1 + i)))
        return parts[0], parts[1]
    return _EveryOther(loader, 0), _EveryOther(loader, 1)


class _EveryOther:
    def __init__(self, loader: Iterable[Any], parity: int) -> None:
        self.loader, self.parity = loader, parity

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i, batch in enumerate(self.loader):
            if i % 2 == self.parity:
                yield batch

    def __len__(self) -> int:
        return (len(self.loader) + 1 - self.parity) // 2  # type: ignore[arg-type]


@dataclass(frozen=True)
class Tas(Pass):
    name = "tas"
    graph_only = "its width mixtures and depth choices are edits of the traced graph"
    description = ("Transformable Architecture Search (Dong & Yang 2019): learned widths and depths under a MACs "
                   "target, then training with distillation")
    scope = "global"
    normalize = "none"
    needs = ("train_loader",)
    presets = {"paper": {"epochs": 600, "fit": False, "lr": 0.1}}  # AutoDL-Projects' search-shape on CIFAR
    tolerance = 1.0  # the selection keeps exactly the searched widths; the pass itself warns when it missed the band
    default_recovery = "finetune"  # the searched weights, with distillation (the authors': scratch-e, the preset's)
    preset_recovery = {"paper": {"mode": "scratch-e"}}
    default_distill = True

    epochs: int = 3             # search epochs (the authors': 600 on CIFAR)
    widths: str = WIDTHS        # candidate width fractions, comma-separated
    depth: bool = True          # search depths of residual stages too
    tolerance_macs: float = 0.05  # the cost loss's band, as a fraction of the full model's MACs
    cost_weight: float = 2.0
    lr: float = 0.01            # weights: SGD, Nesterov, cosine (the authors', searching from scratch: 0.1)
    weight_decay: float = 5e-4
    arch_lr: float = 1e-3       # architecture: Adam, betas (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.1
    recalibrate: int = 20       # batches that re-estimate BatchNorm statistics for the argmax architecture
    fit: bool = True            # off budget (+-0.02): fit the widths to it (False: the authors' band, else a warning)
    seed: int = 0
    preset: str = ""            # "paper": the authors' search (600 epochs at lr 0.1, their band, no fit; scratch-e)

    def __post_init__(self) -> None:
        try:
            fractions = self.fractions()
        except ValueError:
            raise PassError(f"tas: widths must be comma-separated fractions, got {self.widths!r}") from None
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise PassError(f"tas: every width must be in (0, 1], got {self.widths!r}")
        if self.epochs < 0 or not 0 < self.tau_min <= self.tau_max or self.tolerance_macs < 0:
            raise PassError("tas: epochs must be >= 0, 0 < tau_min <= tau_max and tolerance_macs >= 0")

    def _choose(self, epochs: list[Epoch], target: float) -> Epoch | None:
        """The epoch whose argmax architecture has the best validation metric (the latest without ``evaluate()``)
        among those in budget: within ``BUDGET_TOLERANCE`` of the target (``fit=false``: the authors' band,
        ``[target - tolerance_macs, target]``); None when no epoch is."""
        def inside(e: Epoch) -> bool:
            return on_budget(e.macs, target) if self.fit else target - self.tolerance_macs <= e.macs <= target + 1e-12

        candidates = [e for e in epochs if inside(e)]
        if not candidates:
            return None
        return max(candidates, key=lambda e: (e.metric if e.metric is not None else -math.inf, e.epoch))

    def _fit(self, ctx: PassContext, widths: dict[int, WidthChoice], cost: ExpectedMacs, kept: dict[str, int],
             target: float, searched: float) -> Fit:
        """The shared budget fit (``fxprune.selection.fit``): widths selected by each channel's survival probability
        under its group's width distribution, the stages' argmax depths kept; fixed on the width choices."""
        scores = {gid: w.survival() for gid, w in widths.items()}
        kept = self._reachable(ctx, widths, cost, dict(kept), scores, target)
        removed, fit = fit_to_budget("tas", ctx.groups, scores, lambda rem: cost.macs(rem, kept) / cost.full,
                                     target, searched, by="the width distributions' survival probabilities",
                                     selection=ctx.selection)
        for gid, w in widths.items():
            w.fixed = torch.as_tensor(~removed[ctx.groups[gid].channels], dtype=torch.float32)
        for stage, d in cost.depths.items():
            d.fixed = d.kept.index(kept[stage])
        return fit

    def _reachable(self, ctx: PassContext, widths: dict[int, WidthChoice], cost: ExpectedMacs, kept: dict[str, int],
                   scores: Scores, target: float) -> dict[str, int]:
        """Stage depths from which widths alone can reach ``target``: from the argmax depths, one stage at a time
        (the one whose next choice has the largest logit) deeper while every channel kept stays under the target,
        shallower while the narrowest widths stay over it."""
        from fxprune.selection.budget import select

        narrowest = select(ctx.groups, scores, fit_selection(ctx.selection, ratio=0.999))
        none = np.zeros(len(ctx.groups.comp_group), dtype=bool)
        for removal, short, step in ((none, lambda f: f < target - BUDGET_TOLERANCE, 1),
                                     (narrowest, lambda f: f > target + BUDGET_TOLERANCE, -1)):
            while short(cost.macs(removal, kept) / cost.full):
                moves = []
                for stage, d in cost.depths.items():
                    k = d.kept.index(kept[stage]) + step
                    if 0 <= k < len(d.kept):
                        moves.append((float(d.logits[k]), stage, d.kept[k]))
                if not moves:
                    break
                _, stage, depth = max(moves)
                kept[stage] = depth
        return kept

    def fractions(self) -> list[float]:
        return [float(f) for f in self.widths.split(",") if f.strip()]

    def order(self, ctx: PassContext, group: Group) -> torch.Tensor:
        """The group's channels, most important (largest producing-filter L1) first."""
        l1 = producer_l1(ctx.groups, group, ctx.tensor)
        return torch.as_tensor(np.lexsort((np.arange(len(l1)), -l1)), dtype=torch.long)

    def score(self, ctx: PassContext) -> Decision:
        with seeded(self.seed):  # the pass's own seed; the caller's random stream is put back after
            return self._score(ctx)

    def _score(self, ctx: PassContext) -> Decision:
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError("tas needs train_loader= to search")
        target = ctx.macs_target("tas")
        fractions = self.fractions()
        stages = stages_of(ctx.gm, residual_blocks(ctx.gm)) if self.depth else {}
        depths = {stage: StageDepth(len(bs), leads_in(ctx.gm.graph, bs)) for stage, bs in stages.items()}
        masked = ctx.insert_masks(lambda g: WidthChoice(self.order(ctx, g), fractions), training=True,
                                  edits=[mix_exits(list(stages.values()), lambda bs: depths[bs[0].stage])])
        widths: dict[int, WidthChoice] = masked.masks  # type: ignore[assignment]
        cost = ExpectedMacs(ctx.groups, widths, stages, depths)
        arch = [p for w in widths.values() for p in w.parameters()] + [d.logits for d in depths.values()]
        hook = TasHook([*widths.values(), *depths.values()], cost, target * cost.full,
                       self.tolerance_macs * cost.full, self.cost_weight, (self.tau_max, self.tau_min),
                       module=masked.module, evaluate=ctx.data.get("evaluate"))
        if self.epochs > 0 and arch:
            weights_half, arch_half = halves(loader, self.seed)
            train_masked(masked, ctx.data, epochs=self.epochs, lr=self.lr, optimizer="sgd", loader=weights_half,
                         weights=[p for p in masked.weight_parameters() if all(p is not a for a in arch)],
                         masks=arch, mask_lr=self.arch_lr, mask_optimizer="adam",
                         mask_weight_decay=self.arch_weight_decay, mask_betas=(0.5, 0.999), mask_loader=arch_half,
                         hooks=[hook], nesterov=True, weight_decay=self.weight_decay, schedule="cosine")
        chosen = self._choose(hook.epochs, target)
        if chosen is not None:  # the best-validated in-budget architecture, as the authors return
            with torch.no_grad():
                for c, logits in zip([*widths.values(), *depths.values()], chosen.logits):
                    c.logits.copy_(logits)
        kept_depths = {stage: d.argmax_depth() for stage, d in depths.items()}
        searched = cost.argmax() / cost.full
        fit = None
        if chosen is None and self.fit and not on_budget(searched, target):
            fit = self._fit(ctx, widths, cost, kept_depths, target, searched)
            kept_depths = {stage: d.argmax_depth() for stage, d in depths.items()}
        elif chosen is None and not target - self.tolerance_macs <= searched <= target + self.tolerance_macs:
            warnings.warn(f"fxprune: tas: the searched architecture keeps {searched:.3f} of the MACs, outside the "
                          f"target {target:.3f} +- {self.tolerance_macs:g}: search longer (--opt epochs=N) or let the "
                          "architecture move faster (--opt arch_lr=...)", stacklevel=2)
        if self.epochs > 0 and arch and self.recalibrate > 0:
            recalibrate(masked.module, loader, self.recalibrate)
        masked.module.eval()
        kept_widths = {gid: int(w.keep().sum()) for gid, w in widths.items()}
        report: dict[str, Any] = {
            "target_macs": target, "searched_macs": searched, "search": hook.history,
            "epochs": [{"epoch": e.epoch, "macs": e.macs, "metric": e.metric} for e in hook.epochs],
            "chosen_epoch": chosen.epoch if chosen is not None else None,
            "fit": fit.report() if fit is not None else {"ran": False},
            "final_macs": fit.fitted if fit is not None else searched,
            "widths": {str(gid): {"channels": len(ctx.groups[gid]), "kept": k} for gid, k in kept_widths.items()},
            "stages": {stage: {"blocks": len(stages[stage]) + int(leads_in(ctx.gm.graph, stages[stage])),
                               "kept": k + int(leads_in(ctx.gm.graph, stages[stage])),
                               "removed": [b.name for b in stages[stage][k:]]} for stage, k in kept_depths.items()},
            "skipped": masked.skipped}
        if (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["trained_metrics"] = metrics
        scores: Scores = {g.id: np.full(len(g), np.inf) for g in ctx.groups.prunable}
        for gid, w in widths.items():
            scores[gid] = np.where(w.keep().cpu().numpy() > 0, np.inf, -np.inf)
        gone = [b for stage, bs in stages.items() for b in bs[kept_depths[stage]:]]
        return Decision(scores, report=report, finish=Searched(masked, gone))


@dataclass(frozen=True)
class Searched:
    """Tas's finish: the searched network for the removal, each width's expected mask folded in and 0 on every
    removed channel; the blocks after each stage's argmax depth (``gone``) removed."""

    masked: MaskedModel
    gone: list[Block]

    def __call__(self, removed: np.ndarray) -> Finish:
        values = self.masked.values()
        for gid, v in values.items():
            v[removed[self.masked.groups[gid].channels]] = 0.0
        return Finish(self.masked.fold(values).weights, [remove_blocks(self.gone)] if self.gone else [])
