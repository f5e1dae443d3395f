"""A latency model measured on the device: what a removal makes the model's forward cost in time.

MACs are a poor promise where much of a network's time is not in its MAC-bound ops: a depthwise network
spends half its time in batch norms, activations and depthwise convolutions, whose time follows the
activations (halved at ratio 0.5) while a pointwise convolution's MACs quarter (``benchmarks/
latency_breakdown.py``). So ``target_latency`` measures instead of counting:

1. the traced graph runs op by op on the example inputs, on their device (``fx.Interpreter``, a timer per
   node, median per node over ``runs``), and so does a probe: the graph compacted with half of every
   prunable group removed, the two taking turns run by run;
2. each class of op (``op_class``: 1x1 / kxk / grouped convolutions, then by op: batch norm, relu, add, ...)
   gets an exponent ``e`` from the two: its time follows its work (MACs for ops that have a cost,
   elements written for the rest) to the power ``e`` (a pointwise convolution at 8-48 channels, where the
   CPU kernels block badly, gets 0.7 instead of 1: 4x fewer MACs, 2.7x faster);
3. a removal's latency is predicted without compacting: the sum over nodes of the node's measured time
   times (its work after / before) ** e of its class, its work read from the plan's shapes
   (``Reindexing``), so a budget search costs milliseconds per step like a MACs target's.

The prediction is exact at the probe's width by construction and interpolates elsewhere; the CLI measures
the pruned model and reports both (``report.json``: ``latency_ms``)."""
from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.couple import TensorRef
from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.rules import RULES
from fxprune.analysis.rules.layers import conv_layout
from fxprune.selection.budget import SelectionError
from fxprune.tracing.compat import tree_leaves
from fxprune.tracing.tracer import META_INPUTS

__all__ = ["Latency", "LatencyModel", "op_class", "node_work", "half_removal", "LatencyError"]

EXPONENT_RANGE = (0.0, 1.5)  # a class's fitted exponent is clamped here (noise can push it out)


class LatencyError(SelectionError):
    """A latency target fxprune cannot measure for this model (a budget that cannot apply: exit 2 on the CLI)."""


@dataclass(frozen=True)
class Latency:
    """Milliseconds of one forward pass on the example inputs (measured, or predicted for a removal)."""

    latency: float


def _op_name(target: Any) -> str:
    name = str(getattr(target, "__name__", target)).split(".")
    base = name[1] if len(name) > 1 and name[0] == "aten" else name[0]
    return base.strip("_") or base


def op_class(node: fx.Node, module: torch.nn.Module) -> str | None:
    """The class of one node whose time is modelled together: convolutions by kernel (1x1, kxk, grouped),
    batch norms as one (aten call or module), every other op by its name; None for placeholders,
    attributes and the output."""
    if node.op == "call_module":
        kind = type(module.get_submodule(str(node.target))).__name__.lower()
        return "batch_norm" if "batchnorm" in kind else kind
    if node.op != "call_function":
        return None
    conv = conv_layout(node)
    if conv is not None:
        w, groups = conv
        val = w.meta.get("val") if isinstance(w, fx.Node) else None
        if val is None:
            return "conv"
        if groups != 1:
            return "conv grouped"
        return "conv 1x1" if all(int(k) == 1 for k in val.shape[2:]) else "conv kxk"
    name = _op_name(node.target)
    return "batch_norm" if "batch_norm" in name else name


class _Timed(fx.Interpreter):
    """Runs a GraphModule node by node and records each node's seconds (synchronising a GPU per node)."""

    def __init__(self, module: fx.GraphModule, cuda: bool) -> None:
        super().__init__(module)
        self.cuda = cuda
        self.seconds: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[n.name] = time.perf_counter() - t0
        return out


def time_nodes(models: list[fx.GraphModule], inputs: list, runs: int, warmup: int = 1,
               budget_s: float = 30.0) -> list[dict[str, float]]:
    """Each model's milliseconds per node (median over ``runs``), the models taking turns run by run so that
    a change of load hits them alike; stops early (after 3 runs) past ``budget_s``."""
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    samples: list[dict[str, list[float]]] = [{} for _ in models]
    deadline = time.perf_counter() + budget_s
    with torch.no_grad():
        for i in range(warmup + runs):
            if i >= warmup + 3 and time.perf_counter() > deadline:
                break
            for k, gm in enumerate(models):
                timed = _Timed(gm, cuda)
                timed.run(*inputs)
                if i >= warmup:
                    for name, s in timed.seconds.items():
                        samples[k].setdefault(name, []).append(1e3 * s)
    return [{name: statistics.median(v) for name, v in s.items()} for s in samples]


@dataclass
class LatencyModel:
    """Per-node measured milliseconds of the full graph and a fitted exponent per class of op; ``model(removed)``
    predicts a removal's latency (``Latency``). Build it with :meth:`measure`."""

    groups: ChannelGroups
    times: dict[str, float]                  # node name -> ms at full width
    classes: dict[str, str]                  # node name -> op class
    exponents: dict[str, float]              # op class -> e: time ~ work ** e
    probe: dict[str, Any] = field(default_factory=dict)  # what the calibration measured (for reports)

    @classmethod
    def measure(cls, gm: fx.GraphModule, groups: ChannelGroups, *, runs: int = 5, budget_s: float = 30.0,
                probe: np.ndarray | None = None) -> "LatencyModel":
        """Time ``gm`` (the traced graph, on the device of its parameters and traced inputs) and its probe
        node by node, and fit each class's exponent. ``probe``: the removal to calibrate at (default: the first
        half of every prunable group; ``fxprune.prune`` gives its selection's rules at ratio 0.5, so that the
        probe has the widths, rounded as they will be, that the search picks from)."""
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in (*gm.parameters(), *gm.buffers())):
            raise LatencyError("a latency target needs the model's weights to run it: this graph is on the meta "
                               "device (a checkpoint pruned from disk); give target_macs instead")
        inputs = tree_leaves(gm.meta[META_INPUTS])  # the graph's placeholders, in order
        classes = {n.name: c for n in gm.graph.nodes if (c := op_class(n, gm)) is not None}
        removed = half_removal(groups) if probe is None else np.asarray(probe, dtype=bool)
        probe_gm = _compacted(gm, groups, removed) if removed.any() else None
        models = [gm] if probe_gm is None else [gm, probe_gm]
        try:
            timed = time_nodes(models, inputs, runs, budget_s=budget_s)
        except Exception as exc:  # noqa: BLE001 - any failure to run the graph op by op ends the latency target
            raise LatencyError(f"a latency target times the traced graph op by op, which failed here "
                               f"({type(exc).__name__}: {str(exc)[:200]}); give target_macs instead") from exc
        full = {n: timed[0].get(n, 0.0) for n in classes}
        model = cls(groups, full, classes, {})
        if probe_gm is None:
            return model
        probe_classes = {n.name: c for n in probe_gm.graph.nodes if (c := op_class(n, probe_gm)) is not None}
        model.exponents, model.probe = _fit(model, removed, timed[1], probe_classes)
        return model

    @functools.cached_property
    def _nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.groups.gm.graph.nodes if n.name in self.times}

    def work(self, removed: np.ndarray | None = None) -> dict[str, float]:
        """Each timed node's work (``node_work``) after ``removed`` (None: the full model)."""
        if removed is None:
            removed = np.zeros(len(self.groups.comp_group), dtype=bool)
        reindexing = Reindexing(self.groups, removed)
        return {name: node_work(node, reindexing) for name, node in self._nodes.items()}

    @functools.cached_property
    def full_work(self) -> dict[str, float]:
        return self.work()

    def __call__(self, removed: np.ndarray | None = None) -> Latency:
        if removed is None or not np.asarray(removed).any():
            return Latency(sum(self.times.values()))
        full, work = self.full_work, self.work(removed)
        total = 0.0
        for name, t in self.times.items():
            w0, w1 = full[name], work[name]
            e = self.exponents.get(self.classes[name], 1.0)
            total += t * ((w1 / w0) ** e if w0 > 0 and w1 != w0 else 1.0)
        return Latency(total)

    def summary(self, removed: np.ndarray | None) -> dict[str, Any]:
        """What the model measured and predicts for ``removed`` (JSON-able, for reports)."""
        full, after = self().latency, self(removed).latency
        return {"measured_ms": round(full, 3), "predicted_ms": round(after, 3),
                "predicted_kept": round(after / full, 4) if full > 0 else None,
                "exponents": {c: round(e, 3) for c, e in sorted(self.exponents.items())}, "probe": self.probe}


def half_removal(groups: ChannelGroups) -> np.ndarray:
    """The first half of every prunable group removed."""
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    for g in groups.prunable:
        removed[g.channels[: len(g) // 2]] = True
    return removed


def _compacted(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray) -> fx.GraphModule | None:
    """The probe: ``gm`` with ``removed`` compacted away (None when a rewrite refuses it: no calibration)."""
    from fxprune.compaction import CompactionError, build_plan, emit

    reindexing = Reindexing(groups, removed)
    try:
        return emit(gm, reindexing, build_plan(gm, reindexing), verify=False, training=False).eval()
    except CompactionError:
        return None


def node_work(node: fx.Node, reindexing: Reindexing) -> float:
    """A node's work under a removal: its MACs where the op has a cost, else the elements it writes."""
    record = RULES.get(node.target) if node.op == "call_function" else None
    if record is not None and record.cost is not None:
        macs = float(record.cost(node, reindexing.new_shape))
        if macs > 0:
            return macs
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0.0
    return float(math.prod(reindexing.new_shape(TensorRef(node))))


def _fit(model: LatencyModel, removed: np.ndarray, probe_times: dict[str, float],
         probe_classes: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Each class's exponent from its measured time and modelled work at full width and at the probe."""
    full, half = model.full_work, model.work(removed)
    t0: dict[str, float] = {}
    w0: dict[str, float] = {}
    w1: dict[str, float] = {}
    for name, t in model.times.items():
        c = model.classes[name]
        t0[c] = t0.get(c, 0.0) + t
        w0[c] = w0.get(c, 0.0) + full[name]
        w1[c] = w1.get(c, 0.0) + half[name]
    t1: dict[str, float] = {}
    for name, t in probe_times.items():
        c = probe_classes.get(name)
        if c is not None:
            t1[c] = t1.get(c, 0.0) + t
    exponents: dict[str, float] = {}
    for c in t0:
        if w0[c] <= 0 or w1[c] <= 0 or t0[c] <= 0 or t1.get(c, 0.0) <= 0 or abs(math.log(w1[c] / w0[c])) < 1e-3:
            continue
        e = math.log(t1[c] / t0[c]) / math.log(w1[c] / w0[c])
        exponents[c] = min(max(e, EXPONENT_RANGE[0]), EXPONENT_RANGE[1])
    report = {"full_ms": round(sum(t0.values()), 3), "probe_ms": round(sum(t1.values()), 3),
              "classes": {c: {"ms": [round(t0[c], 3), round(t1.get(c, 0.0), 3)],
                              "work_kept": round(w1[c] / w0[c], 3) if w0[c] else None,
                              "exponent": round(exponents[c], 3) if c in exponents else None} for c in t0}}
    return exponents, report
