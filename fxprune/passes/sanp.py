"""sanp: Self-Adaptive Network Pruning (Chen, Zhu, Li & Zhao, ICONIP 2019): per-sample channel decisions
that really skip work.

No code was released; the abstract and METHODS.md are what is known. What the paper leaves open is
fxprune's choice, each an option:

- Saliency-and-Pruning Module (SPM, :class:`SPM`): one per gated channel group, beside its producing layer,
  deciding from that layer's INPUT (so the decision is made before the layer runs): global average pool
  over every axis but batch and channels -> Linear(C_in, max(C_out / ``reduction``, 4)) -> ReLU ->
  Linear(-, C_out), one logit per output channel; the last bias starts at ``init_bias`` = 1 (every channel
  open: training starts from the given network). A per-sample mask of ``fxprune.masking``
  that reads its producer's input (``reads_input``), multiplying the channel after its normalisation.
- Binarisation (``binarize``): ``st``, a straight-through hard threshold (forward ``sigmoid(l) > 0.5``,
  backward the sigmoid's gradient), or ``gumbel``, the same on ``sigmoid((l + logistic noise) /
  temperature)``; hard (``l > 0``) at inference.
- Which groups: those written by convs/linears whose channels reach their consumers through ops the dynamic
  module can slice per sample (channel-wise ops: normalisation, activations, pooling, dropout, products;
  re-layouts: reshape, permute, transpose, unbind; attention: SDPA, matmuls, softmax): one layer's output, a
  chain of them (an inverted residual's expand conv, its depthwise conv and its squeeze-excite scale), decided
  from the input of the chain's first layer, or attention heads (a head's rows of q, k, v and columns of the
  output projection; the reshapes' head count follows the kept count, ``fxprune.compaction.dynamic.
  symbolic_sizes``); and where a channel zeroed at the group's mask sites reaches every consumer as zero (a
  sigmoid or a bias after the last site would not; ``fxprune.compaction.dynamic.closed_leak``). Residual streams
  (several layers' outputs added) are not gated. The dynamic module is checked against the masked network
  (``_verify_dynamic``) before it is returned.
- Cost loss (``cost_weight`` 5): ``(mean over the batch of the per-sample MACs / full - target)^2``, the
  per-sample MACs counted by fxprune's cost model with each sample's kept channels (every op's MACs times
  the kept fraction of each group it depends on, ``CostCounter.dependence``), plus the SPMs' own MACs.
  Target: ``--target-macs`` (the AVERAGE over samples); with a ratio alone, (1 - ratio)^2.
- Training (``epochs``): backbone (SGD ``lr`` 0.01, momentum 0.9, cosine) and SPMs (Adam ``spm_lr`` 1e-2)
  jointly on the task loss + the cost loss.
- Statistics (``stats``): the average per-sample MACs and the static variant are measured on the
  validation data (``val_loader``; the training batches, said in the report, when there is none;
  ``stats=train``: the training batches), at most ``calibration`` batches of it.
- Fine-tune (``finetune``, fxprune's): then the backbone alone with the SPMs frozen, the cost loss still on,
  distilling from the model as given (``distill``): the per-sample network's own recovery. A threshold
  controller (``steer``, :class:`SanpHook`) holds the average MACs on the target meanwhile, so the channels it
  opens or closes train in place.
- On budget (``fit``, fxprune's): when the average per-sample MACs on those samples end more than 0.02
  from the target, one shift of every SPM's decision threshold (added to its last bias), found by
  bisection, brings them to it; the report (``fit``) and a note say so. A shift that costs more than 2
  points of ``evaluate()`` (it opens channels closed for every training sample, never trained in place) is
  undone, and said: the method's own decisions stay, off budget.
- Static variant (the output's ``model.pt2``, a second product): ``static="budget"`` (the default) keeps the
  channels the statistics' samples keep most often, selected to the same MACs target (+- 0.02, as far as
  the gated groups reach), removed by normal compaction, and the run's recovery fine-tunes it;
  ``static="union"`` removes only what no sample keeps. ``dynamic=false`` stops there.
- Dynamic module (``dynamic=true``, the default; ``dynamic/`` in the output folder; ``PruneResult.module``, the
  method's product, with the static variant as ``PruneResult.compacted``): the traced graph with
  the SPMs in it; for each gated group the kept channels' indices (``nonzero``) slice every tensor of the
  group (the producer's rows, its normalisation's parameters and statistics, the consumers' columns) with
  ``index_select``, so the producer and its consumers run on the kept channels only. At batch 1 that is the
  sample's own decision; a larger batch runs on the union of its samples' kept channels, each sample's own
  others zeroed (``batch="union"``: one pass, saves less the more the samples differ), or sample by sample
  (``batch="split"``: each at its own decision, one launch per sample). torch.export cannot express
  data-dependent channel counts, so it is saved as Python source (``dynamic/model.py``, plain PyTorch: a
  module whose forward is the graph's code) and ``dynamic/weights.safetensors``: no pickle.

This file is the method; the dynamic module's emitter is ``fxprune.compaction.dynamic``, its serializer
``fxprune.artifacts.source``, the batch-1 timer ``fxprune.measure.batch1_ms``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.groups import Group
from fxprune.analysis.rules import ops
from fxprune.artifacts.source import write_dynamic
from fxprune.compaction.dynamic import (
    ANY_ZERO,
    KEEPS_ZERO,
    ZERO_WITH_ARG,
    Gate,
    Owner,
    ShapeError,
    closed_leak,
    depthwise,
    dynamic_module,
    symbolic_sizes,
)
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState
from fxprune.selection.budget import search_budget
from fxprune.selection.cost import CostCounter
from fxprune.selection.fit import BUDGET_TOLERANCE, Fit, fit_selection, on_budget, removal_scores
from fxprune.state import seeded

from ._scales import residual_stream
from .base import Decision, Pass, PassContext, Scores
from .registry import PassError

__all__ = ["Sanp", "SPM", "SanpHook"]

aten = torch.ops.aten
_LAYERS = frozenset(ops("aten.conv2d.default", "aten.conv1d.default", "aten.linear.default", "aten.addmm.default"))
# ops a gated group's channels may pass: the layers, ops that keep a closed channel at zero (the exactness rule's
# tables), per-channel BatchNorm, and ops that make a value of a closed channel (closed_leak refuses those where the
# value reaches a consumer)
_CHANNELWISE = _LAYERS | KEEPS_ZERO | ANY_ZERO | frozenset(ZERO_WITH_ARG) | frozenset(ops(
    "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default", "aten.sigmoid.default",
    "aten.t.default", "aten._softmax.default", "aten.softmax.int"))


class SPM(nn.Module):
    """A saliency-and-pruning module (see the module docstring): ``forward(x)`` of the producing layer's input
    returns (batch, channels) decisions in {0, 1} (straight-through in training)."""

    per_sample = True
    reads_input = True

    def __init__(self, c_in: int, c_out: int, axis: int, reduction: int = 4, binarize: str = "st",
                 temperature: float = 0.5, init_bias: float = 3.0) -> None:
        super().__init__()
        self.axis, self.binarize, self.temperature = axis, binarize, temperature
        self.hidden = max(c_out // reduction, 4)
        self.fc1, self.fc2 = nn.Linear(c_in, self.hidden), nn.Linear(self.hidden, c_out)
        nn.init.constant_(self.fc2.bias, init_bias)
        self.last: torch.Tensor | None = None  # the last forward's decisions (with their straight-through gradient)

    @property
    def macs(self) -> int:
        return self.fc1.in_features * self.hidden + self.hidden * self.fc2.out_features

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d not in (0, self.axis)]
        pooled = x.mean(dims) if dims else x
        return self.fc2(F.relu(self.fc1(pooled.to(self.fc1.weight.dtype))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if not self.training:
            self.last = (logits > 0).to(logits.dtype)
            return self.last
        if self.binarize == "gumbel":
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = (logits + torch.log(u) - torch.log1p(-u)) / self.temperature
        soft = torch.sigmoid(logits)
        self.last = (soft > 0.5).to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1, the sigmoid's gradient
        return self.last


class SanpHook(Hook):
    """The cost loss: (mean per-sample MACs / full - target)^2, weighted. With ``steer`` > 0 (fxprune's fine-tune
    of the per-sample network, whose SPMs are frozen), also a controller on the decisions' threshold: after each
    step every SPM's decision bias moves by ``gain * (target - the batch's mean MACs)``, so the average MACs
    settle on the target while the backbone trains in the channels that opens or closes. The gain starts at
    ``steer`` and halves each time the error changes sign (down to ``steer / 32``), so decisions that flip all at
    once (logits close together) converge instead of swinging."""

    def __init__(self, spms: dict[int, SPM], dependence: dict[str, dict[int, float]], full_nodes: dict[str, int],
                 extra: int, target: float, weight: float) -> None:
        self.spms, self.dependence, self.full_nodes, self.extra = spms, dependence, full_nodes, extra
        self.full = sum(full_nodes.values())
        self.target, self.weight = target, weight
        self.steer, self.shifted = 0.0, 0.0  # the controller's gain, and the threshold shift it has applied
        self._gain, self._error = 0.0, 0.0  # the gain now (halved as the error changes sign), the last error
        self.history: list[float] = []

    def fraction(self) -> torch.Tensor:
        """Per sample of the last forward: MACs kept / full (with the SPMs' own)."""
        fracs = {gid: spm.last.mean(1) for gid, spm in self.spms.items() if spm.last is not None}
        total: torch.Tensor | float = float(self.extra)
        for name, full in self.full_nodes.items():
            term: torch.Tensor | float = float(full)
            for gid, e in self.dependence.get(name, {}).items():
                if gid in fracs:
                    term = term * fracs[gid] ** e
            total = total + term
        return torch.as_tensor(total) / self.full

    def steering(self, gain: float) -> None:
        """Start the controller at ``gain`` (0: stop it)."""
        self.steer, self._gain, self._error = gain, gain, 0.0

    def before_epoch(self, state: TrainState) -> None:
        self._epoch: list[float] = []

    def after_epoch(self, state: TrainState) -> None:
        self.history.append(float(np.mean(self._epoch)) if self._epoch else float("nan"))

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        frac = self.fraction().mean()
        self._epoch.append(float(frac.detach()))
        return self.weight * (frac - self.target) ** 2

    def after_step(self, state: TrainState) -> None:
        if not self.steer or not self._epoch:
            return
        error = self.target - self._epoch[-1]
        if error * self._error < 0:
            self._gain = max(self._gain / 2, self.steer / 32)
        self._error = error
        delta = self._gain * error
        self.shifted += delta
        with torch.no_grad():
            for spm in self.spms.values():
                spm.fc2.bias.add_(delta)


def _owner(gid: np.ndarray, pos: np.ndarray, group: Group) -> Owner:
    """The group channel at each position of a tensor's axis (``len(group)``: another group's), or None when
    position i holds channel i."""
    mine = gid == group.id
    if mine.all() and np.array_equal(pos, np.arange(len(group))):
        return None
    return torch.as_tensor(np.where(mine, pos, len(group)), dtype=torch.int64)


def _site_owner(site: Any, group: Group) -> Owner:
    """:func:`_owner` of a mask site (``site.index[i]`` holds channel ``site.pos[i]``)."""
    gid = np.full(site.size, -1)
    pos = np.zeros(site.size, dtype=np.int64)
    gid[site.index], pos[site.index] = group.id, site.pos
    return _owner(gid, pos, group)


def _gates(ctx: PassContext, spm: Callable[[Group, int, int], SPM]) -> tuple[dict[int, Gate], dict[int, str]]:
    """The groups SANP gates, in graph order, with why the others are not."""
    from fxprune.masking.sites import GraphFacts, find_sites, first_layer, layer_input, producer_layers

    facts = GraphFacts(ctx.gm)
    nodes = {n.name: n for n in ctx.gm.graph.nodes}
    shapes = copy.deepcopy(ctx.gm.graph)  # the size arguments are probed on a copy
    gates: dict[int, Gate] = {}
    skipped: dict[int, str] = {}
    candidates = []
    for group in ctx.groups.prunable:
        layers = producer_layers(group, facts)
        if residual_stream(ctx.groups, group) or not layers:
            skipped[group.id] = ("its channels add up several layers' outputs (a residual stream)" if layers else
                                 "no layer writes its channels")
            continue
        ops_in = [nodes[n] for n in group.nodes if n in nodes and nodes[n].op == "call_function"]
        if any(layer.target not in _LAYERS for layer in layers) or any(n.target not in _CHANNELWISE for n in ops_in):
            skipped[group.id] = "its channels pass through an op fxprune cannot slice per sample (a concat, a norm...)"
            continue
        sites = find_sites(ctx.gm, ctx.groups, group, "output", facts)
        if sites.skipped:
            skipped[group.id] = sites.skipped
            continue
        try:
            symbolic_sizes(shapes, ctx.groups, group.id, None, skip=_LAYERS)
        except ShapeError as exc:
            skipped[group.id] = f"a size its reshapes name does not follow its kept count: {exc}"
            continue
        leak = closed_leak(ctx.gm, set(group.nodes), {s.node for s in sites.activations}, _LAYERS)
        if leak is not None:
            skipped[group.id] = leak
            continue
        first = first_layer(layers, facts)  # the chain's start decides for the group
        x = layer_input(first)
        if x is None:
            skipped[group.id] = "its first layer's input is not a tensor of the graph"
            continue
        dw = sorted(n for n in group.nodes if n in nodes and depthwise(nodes[n]))
        candidates.append((facts.order[first], group, first, x, sites.activations, dw))
    for _, group, layer, x, sites, dw in sorted(candidates, key=lambda c: c[0]):
        val = x.meta.get("val")
        axis = 1 if layer.target in ops("aten.conv2d.default", "aten.conv1d.default") else val.dim() - 1
        key = (x.name, 0, axis)
        input_gate = None
        if key in ctx.groups.table.index:
            g, _ = ctx.groups.positions(key)
            owners = set(int(v) for v in g)
            gated_here = owners & set(gates)
            if gated_here and len(owners) > 1:
                skipped[group.id] = "its layer's input mixes a gated group with other channels"
                continue
            input_gate = next(iter(gated_here), None)
        if not all((ctx.groups.positions(p.key)[0] == group.id).all() for p in group.params) or \
                not all(len(s.index) == s.size for s in sites):
            skipped[group.id] = "a tensor holds these channels with others"
            continue
        params = [(p.name, p.axis, _owner(*ctx.groups.positions(p.key), group)) for p in group.params]
        gates[group.id] = Gate(group.id, spm(group, int(val.shape[axis]), axis), x.name, axis, input_gate,
                               [(s.node, s.axis, _site_owner(s, group)) for s in sites], params, dw)
    return gates, skipped


def _biases(gates: dict[int, Gate]) -> dict[int, torch.Tensor]:
    """Every SPM's decision bias (its last layer's), a copy to shift from or put back."""
    return {gid: g.spm.fc2.bias.detach().clone() for gid, g in gates.items()}


def _shift(gates: dict[int, Gate], biases: dict[int, torch.Tensor], delta: float = 0.0) -> None:
    """Every SPM's decision threshold moved by ``delta`` from ``biases`` (more keeps more channels; 0 puts them
    back)."""
    with torch.no_grad():
        for gid, g in gates.items():
            g.spm.fc2.bias.copy_(biases[gid] + delta)


def _fit_cost(before: dict[str, Any] | None, after: dict[str, Any] | None, points: float = 0.02) -> str | None:
    """What the budget fit cost, in words, when ``evaluate()``'s first metric (in [0, 1], higher is better) fell by
    more than ``points``; None otherwise or without a metric."""
    if not before or not after:
        return None
    name = next(iter(before))
    b, a = before.get(name), after.get(name)
    if not isinstance(b, float) or not isinstance(a, float) or not 0.0 <= b <= 1.0 or b - a <= points:
        return None
    return f"{name} {b:.4g} -> {a:.4g}"


def _verify_dynamic(dyn: fx.GraphModule, masked: nn.Module, loader: Iterable[Any], samples: int = 4) -> None:
    """The dynamic module against the masked network it was built from, on the first ``samples`` inputs of
    ``loader``: sample by sample (each at its own decisions) and as one batch (the union); a PassError when an
    output differs beyond float tolerance (a rewrite fxprune got wrong: nothing is written)."""
    from fxprune.measure import to_device
    from fxprune.tracing.compat import tree_leaves

    x = to_device(next(iter(loader))[0], next(iter(masked.parameters())).device)[:samples]
    was = masked.training
    masked.eval()
    try:
        with torch.no_grad():
            want = tree_leaves(masked(x))
            runs = {"as one batch": tree_leaves(dyn(x)),
                    "sample by sample": [torch.cat(parts) for parts in
                                         zip(*(tree_leaves(dyn(x[i:i + 1])) for i in range(len(x))))]}
    finally:
        masked.train(was)
    for how, got in runs.items():
        for w, g in zip(want, got):
            scale = float(w.abs().max()) if w.numel() else 0.0
            gap = float((g.to(w.dtype) - w).abs().max()) if w.numel() else 0.0
            if g.shape != w.shape or gap > 1e-4 * max(scale, 1.0):
                raise PassError(f"sanp: the per-sample module differs from the network it was built from, {how} "
                                f"(largest difference {gap:.3g} at outputs up to {scale:.3g}): a rewrite fxprune "
                                "got wrong; please report it with the model")


def _write_dynamic(dyn: fx.GraphModule, folder: Path) -> None:
    """The dynamic module as the output folder's ``dynamic/`` (``fxprune.artifacts.source``)."""
    write_dynamic(dyn, folder / "dynamic")


@dataclass(frozen=True)
class Sanp(Pass):
    name = "sanp"
    graph_only = "its per-sample module is compiled from the traced graph"
    description = ("Self-Adaptive Network Pruning (Chen et al. 2019): per-sample saliency modules decide which "
                   "channels each input runs; a dynamic module that skips them, and its static variant")
    scope = "global"
    normalize = "none"
    needs = ("train_loader",)
    presets = {"paper": {"fit": False, "finetune": 0}}  # no code was released: the cost loss alone meets the budget
    tolerance = 1.0  # the pass selects the static variant itself (to the target); the average MACs are the target

    epochs: int = 3
    reduction: int = 4
    binarize: str = "st"         # "st" (straight-through threshold) or "gumbel"
    temperature: float = 0.5     # gumbel
    init_bias: float = 1.0
    cost_weight: float = 5.0
    finetune: int = 20           # fxprune's: epochs of the per-sample network with its SPMs frozen (0: none)
    steer: float = 5.0           # ... its threshold controller's gain (see SanpHook; 0: the cost loss alone)
    distill: bool = True         # ... distilling from the model as given
    lr: float = 0.01             # backbone: SGD, momentum 0.9, cosine
    spm_lr: float = 1e-2         # SPMs: Adam
    dynamic: bool = True         # also build the dynamic module (dynamic/ in the output folder)
    batch: str = "union"         # the dynamic module at batch > 1: "union" or "split"
    calibration: int = 0         # batches of the statistics' data measured (0: all)
    stats: str = "val"           # the average MACs and the static variant on "val" (val_loader) or "train" data
    fit: bool = True             # average MACs off budget (+-0.02): shift the SPMs' decision threshold to it
    static: str = "budget"       # the static variant: "budget" (most often kept, to the target) or "union"
    latency_samples: int = 64    # batch-1 samples the report's latencies average over
    seed: int = 0
    preset: str = ""             # "paper": no threshold shift (the paper has only its cost loss)

    def __post_init__(self) -> None:
        if self.binarize not in ("st", "gumbel"):
            raise PassError(f"sanp: binarize must be 'st' or 'gumbel', got {self.binarize!r}")
        if self.batch not in ("union", "split"):
            raise PassError(f"sanp: batch must be 'union' or 'split', got {self.batch!r}")
        if self.stats not in ("val", "train") or self.static not in ("budget", "union"):
            raise PassError(f"sanp: stats must be 'val' or 'train' and static 'budget' or 'union', got "
                            f"{self.stats!r}, {self.static!r}")
        if self.reduction < 1 or self.epochs < 0 or self.calibration < 0 or self.finetune < 0:
            raise PassError("sanp: reduction must be >= 1, epochs, finetune and calibration >= 0")

    def score(self, ctx: PassContext) -> Decision:
        with seeded(self.seed):  # the pass's own seed; the caller's random stream is put back after
            return self._score(ctx)

    def _score(self, ctx: PassContext) -> Decision:
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError("sanp needs train_loader= to train its saliency modules")
        target = ctx.macs_target("sanp")
        gates, skipped = _gates(ctx, lambda g, c_in, axis: SPM(c_in, len(g), axis, self.reduction, self.binarize,
                                                               self.temperature, self.init_bias))
        if not gates:
            raise PassError("sanp: no channel group can be gated (" + "; ".join(sorted(set(skipped.values()))) + ")")
        counter = CostCounter(ctx.groups)
        spm_macs = sum(g.spm.macs for g in gates.values())
        self._check_reachable(ctx, counter, gates, skipped, spm_macs, target)
        masked = ctx.insert_masks(lambda g: gates[g.id].spm, only=list(gates), training=True)
        full_nodes = counter.per_node()
        hook = SanpHook({gid: g.spm for gid, g in gates.items()}, counter.dependence(list(gates)), full_nodes,
                        spm_macs, target, self.cost_weight)
        train_masked(masked, ctx.data, epochs=self.epochs, lr=self.lr, optimizer="sgd", loader=loader,
                     mask_lr=self.spm_lr, mask_optimizer="adam", hooks=[hook])
        finetuned = self._finetune(ctx, masked, gates, hook, loader)
        stats, stats_on = self._stats_loader(ctx)
        frequency, per_sample = self._calibrate(ctx, masked, gates, counter, spm_macs, stats)
        fit, undone = None, None
        if self.fit and not on_budget(float(np.mean(per_sample)), target):
            before = trained_metrics(masked, ctx.data)
            biases = _biases(gates)
            fit, fitted, fitted_samples = self._fit(ctx, masked, gates, counter, spm_macs, stats, target,
                                                    float(np.mean(per_sample)))
            if (cost := _fit_cost(before, trained_metrics(masked, ctx.data))) is None:
                frequency, per_sample = fitted, fitted_samples
            else:  # a channel closed for every training sample has never trained in its place: opening it can wreck
                _shift(gates, biases)
                undone = cost
                warnings.warn(f"fxprune: sanp: the budget fit's threshold shift cost {cost}; the method's own "
                              f"decisions are kept, at {float(np.mean(per_sample)):.3f} of the MACs (target "
                              f"{target:.3f}): train longer (--opt epochs=N) or ask for that target", stacklevel=2)
        weights = masked.state()
        removed, static_macs = self._static(ctx, counter, frequency, target)
        report: dict[str, Any] = {
            "target_macs": target, "gated_groups": len(gates), "skipped": skipped, "stats_on": stats_on,
            "fit": {**fit.report(), "undone": undone} if fit is not None else {"ran": False}, "static": self.static,
            "static_macs": static_macs,
            "average_macs": float(np.mean(per_sample)), "per_sample_macs": {
                "min": float(np.min(per_sample)), "p10": float(np.quantile(per_sample, 0.1)),
                "median": float(np.median(per_sample)), "p90": float(np.quantile(per_sample, 0.9)),
                "max": float(np.max(per_sample))},
            "spm_macs": spm_macs / max(sum(full_nodes.values()), 1), "search": hook.history, "finetune": finetuned,
            "steered": hook.shifted,
            "histograms": {"per_sample_macs": {"before": [], "after": per_sample.tolist(),
                                               "threshold": target, "xlabel": "MACs kept per sample"}}}
        if (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["dynamic_metrics"] = metrics
        scores = removal_scores(removed, ctx.groups)
        if not self.dynamic:
            return Decision(scores, report=report, weights=weights)
        dyn = dynamic_module(ctx.gm, weights, gates, ctx.groups)
        _verify_dynamic(dyn, masked.module, stats)
        report["latency_ms_batch1"] = self._latencies(ctx, dyn, removed, weights)
        return Decision(scores, report=report, weights=weights, extras={"dynamic": dyn}, product=dyn,
                        artifacts={"dynamic": functools.partial(_write_dynamic, dyn)})

    def _finetune(self, ctx: PassContext, masked: Any, gates: dict[int, Gate], hook: SanpHook,
                  loader: Iterable[Any]) -> list[float]:
        """fxprune's: the per-sample network fine-tuned with its SPMs frozen (``finetune`` epochs, the backbone's
        ``lr``), the cost loss still on (the decisions move with the backbone's activations) and the threshold
        controller (``steer``) holding the average MACs at the target, distilling from the model as given
        (``distill``). Returns each epoch's average MACs on the training batches."""
        if self.finetune <= 0:
            return []
        searched = len(hook.history)
        from fxprune.recovery import DistillHook

        kd = DistillHook(ctx.model) if self.distill else None
        for gate in gates.values():
            gate.spm.requires_grad_(False)
        hook.steering(self.steer)
        try:
            with kd or contextlib.nullcontext():
                train_masked(masked, ctx.data, epochs=self.finetune, lr=self.lr, optimizer="sgd", loader=loader,
                             mask_lr=0.0, masks=[], hooks=[hook, *([kd] if kd is not None else [])])
        finally:
            hook.steering(0.0)
            for gate in gates.values():
                gate.spm.requires_grad_(True)
        finetuned, hook.history = hook.history[searched:], hook.history[:searched]
        return finetuned

    @staticmethod
    def _check_reachable(ctx: PassContext, counter: CostCounter, gates: dict[int, Gate], skipped: dict[int, str],
                         spm_macs: int, target: float) -> None:
        """A PassError before any training when closing every gated channel for every sample still keeps more than
        the target (+- the budget tolerance): the cost loss would close them all and end at chance, off budget."""
        removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
        for gid in gates:
            removed[ctx.groups[gid].channels] = True
        floor = (counter(removed).macs + spm_macs) / max(counter().macs, 1)
        if floor <= target + BUDGET_TOLERANCE:
            return
        why = "; ".join(f"{n} group{'s' * (n > 1)} because {reason}" for reason, n in
                        sorted(Counter(skipped.values()).items(), key=lambda kv: -kv[1]))
        raise PassError(f"sanp: a MACs target of {target:.2f} is out of reach on this model: the {len(gates)} channel "
                        f"groups sanp can gate per sample hold {1 - floor:.2f} of the MACs, so closing every one of "
                        f"them for every sample still keeps {floor:.2f} (not gated: {why or 'none'}). Ask for a "
                        f"target of at least {min(floor + 0.1, 1.0):.2f} (--target-macs), or prune this model with a "
                        f"static pass (l1, slimming, thinet...)")

    def _stats_loader(self, ctx: PassContext) -> tuple[Iterable[Any], str]:
        """Where the average MACs and the static variant are measured, and its name for the report."""
        if self.stats == "val" and ctx.data.get("val_loader") is not None:
            return ctx.data["val_loader"], "val_loader"
        if self.stats == "val":
            return ctx.data["train_loader"], "train_loader (no val_loader was given)"
        return ctx.data["train_loader"], "train_loader"

    def _fit(self, ctx: PassContext, masked: Any, gates: dict[int, Gate], counter: CostCounter, spm_macs: int,
             stats: Iterable[Any], target: float, ended: float) -> tuple[Fit, dict[int, np.ndarray], np.ndarray]:
        """The shared budget fit for a per-sample method: one shift of every SPM's decision threshold (added to the
        last layer's bias), found by bisection, that brings the average per-sample MACs on the statistics' samples
        within ``BUDGET_TOLERANCE`` of the target (the closest one found when none does)."""
        lo, hi = -20.0, 20.0  # more shift keeps more channels
        biases = _biases(gates)

        def measured(delta: float) -> tuple[float, dict[int, np.ndarray], np.ndarray]:
            _shift(gates, biases, delta)
            frequency, per_sample = self._calibrate(ctx, masked, gates, counter, spm_macs, stats)
            return float(np.mean(per_sample)), frequency, per_sample

        best: tuple[float, float, dict[int, np.ndarray], np.ndarray] | None = None
        for _ in range(20):
            delta = (lo + hi) / 2
            mean, frequency, per_sample = measured(delta)
            if best is None or abs(mean - target) < abs(best[1] - target):
                best = (delta, mean, frequency, per_sample)
            if on_budget(mean, target):
                break
            lo, hi = (delta, hi) if mean < target else (lo, delta)
        assert best is not None
        delta, mean, frequency, per_sample = best
        measured(delta)
        fit = Fit("sanp", "macs", target, ended, mean, f"shifting every SPM's decision threshold by {delta:+.3g}")
        fit.warn()
        return fit, frequency, per_sample

    def _static(self, ctx: PassContext, counter: CostCounter, frequency: dict[int, np.ndarray],
                target: float) -> tuple[np.ndarray, float]:
        """The static variant's removal and its MACs (a fraction of full): ``static="budget"``, the channels the
        statistics' samples keep most often, selected to the target +- ``BUDGET_TOLERANCE`` (as far as the gated
        groups reach); ``"union"``, every channel some sample keeps."""
        full = max(counter().macs, 1)
        if self.static == "union":
            removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
            for gid, f in frequency.items():
                removed[ctx.groups[gid].channels[f == 0]] = True
            return removed, counter(removed).macs / full
        scores: Scores = {g.id: np.full(len(g), np.inf) for g in ctx.groups.prunable}
        scores.update({gid: f.astype(np.float64) for gid, f in frequency.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a static variant short of the target is in the report
            removed, _ = search_budget(ctx.groups, scores, fit_selection(), lambda rem: counter(rem).macs / full,
                                       target, BUDGET_TOLERANCE)
        return removed, counter(removed).macs / full

    def _latencies(self, ctx: PassContext, dyn: fx.GraphModule, removed: np.ndarray,
                   weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Batch-1 latency (ms, mean over ``latency_samples`` inputs, median of 3 rounds) of the original
        model (eager, and its traced graph: the same op-by-op execution as the two others), the dynamic
        module and the static variant, on this process's device and threads."""
        from fxprune.compaction import compact
        from fxprune.measure import batch1_ms, to_device

        static = compact(ctx.gm, ctx.groups, removed, ctx.model, weights=weights).module.eval()
        loader = ctx.data.get("val_loader") or ctx.data["train_loader"]
        device = next(iter(dyn.parameters()), next(iter(ctx.model.parameters()))).device
        samples: list[torch.Tensor] = []
        for x, _ in loader:
            x = to_device(x, device)
            samples += [x[i:i + 1] for i in range(len(x))]
            if len(samples) >= self.latency_samples:
                break
        samples = samples[: self.latency_samples]
        was = ctx.model.training
        ctx.model.eval()
        try:
            return {name: batch1_ms(m, samples) for name, m in
                    (("original", ctx.model), ("original graph", ctx.gm), ("dynamic", dyn), ("static", static))}
        finally:
            ctx.model.train(was)

    def _calibrate(self, ctx: PassContext, masked: Any, gates: dict[int, Gate], counter: CostCounter, spm_macs: int,
                   loader: Iterable[Any]) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """How often each channel is kept (the fraction of ``loader``'s samples, at most ``calibration`` batches),
        and every sample's MACs kept (a fraction of full)."""
        from fxprune.measure import to_device

        device = next(iter(masked.module.parameters())).device
        kept = {gid: np.zeros(len(ctx.groups[gid])) for gid in gates}
        decisions: list[dict[int, np.ndarray]] = []
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if self.calibration and i >= self.calibration:
                    break
                masked.module(to_device(x, device))
                batch = {gid: g.spm.last.cpu().numpy() > 0 for gid, g in gates.items()}
                for gid, d in batch.items():
                    kept[gid] += d.sum(0)
                decisions += [{gid: d[s] for gid, d in batch.items()} for s in range(len(next(iter(batch.values()))))]
        full = counter().macs
        cache: dict[bytes, float] = {}
        fractions = []
        for sample in decisions[:2048]:
            removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
            for gid, d in sample.items():
                removed[ctx.groups[gid].channels[~d]] = True
            key = np.packbits(removed).tobytes()
            if key not in cache:
                cache[key] = (counter(removed).macs + spm_macs) / full
            fractions.append(cache[key])
        return {gid: k / max(len(decisions), 1) for gid, k in kept.items()}, np.asarray(fractions)
