"""MACs and parameters counted on the traced graph, before or after a removal, without compacting.

An op's MACs are its record's ``cost`` in the op registry (``fxprune.analysis.rules``): convolutions,
linear/matmul-like products, einsum and scaled-dot-product attention, with formulas that follow
``torch.utils.flop_counter.FlopCounterMode`` (MACs = its flops / 2), so the two agree; an op without a
cost is free.
Counting from the plan's shapes makes a budget search (target MACs/params) cost milliseconds per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx

from fxprune.analysis.couple import TensorRef
from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.rules import RULES
from fxprune.analysis.schema import bind

if TYPE_CHECKING:
    from fxprune.analysis.rules import Shape

__all__ = ["Cost", "count", "CostCounter", "node_macs"]


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    def ratio(self, full: "Cost") -> "Cost":
        return Cost(self.macs / max(full.macs, 1), self.params / max(full.params, 1))  # type: ignore[arg-type]


def _macs(node: fx.Node, shape: Shape) -> int:
    return RULES[node.target].cost(node, shape)


def node_macs(node: fx.Node, shape: Shape) -> int:
    """One node's MACs under ``shape`` (a TensorRef -> shape function); 0 for an op without a cost."""
    record = RULES.get(node.target) if node.op == "call_function" else None
    return 0 if record is None or record.cost is None else int(record.cost(node, shape))


class CostCounter:
    """Counts a traced graph's cost under any removal; reuse it across the steps of a budget search."""

    def __init__(self, groups: ChannelGroups) -> None:
        self.groups = groups
        gm = groups.gm
        params = {n for n, _ in gm.named_parameters(remove_duplicate=True)}
        self.compute = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RULES
                        and RULES[n.target].cost is not None]
        seen: set[str] = set()
        self.params: list[fx.Node] = []
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target in params and n.target not in seen:
                seen.add(n.target)
                self.params.append(n)
        # Parameters the graph never reads (e.g. a tied twin) still count once in the original.
        self.unread = sum(p.numel() for name, p in gm.named_parameters() if name not in seen)

    def _shape(self, removed) -> Shape:
        import numpy as np

        return Reindexing(self.groups, removed if removed is not None else
                       np.zeros(len(self.groups.comp_group), bool)).new_shape

    def __call__(self, removed=None) -> Cost:
        shape = self._shape(removed)
        macs = sum(_macs(n, shape) for n in self.compute)
        params = sum(math.prod(shape(TensorRef(n))) for n in self.params) + self.unread
        return Cost(int(macs), int(params))

    def per_node(self, removed=None) -> dict[str, int]:
        """MACs of every op with a cost, by node name."""
        shape = self._shape(removed)
        return {n.name: int(_macs(n, shape)) for n in self.compute}

    def dependence(self, group_ids) -> dict[str, dict[int, float]]:
        """How each op's MACs depend on each of ``group_ids``: ``{node: {group: e}}`` with MACs proportional to
        (kept fraction of the group) ** e, probed by removing half of the group (e = 1 for a conv's input or
        output channels; ops it does not touch are left out). With it, MACs under per-group kept fractions
        f are ``sum_n full_n prod_g f_g ** e_ng`` (exact for products of channel counts)."""
        import numpy as np

        full = self.per_node()
        out: dict[str, dict[int, float]] = {n: {} for n in full}
        for gid in group_ids:
            group = self.groups[gid]
            half = len(group) // 2
            if half == 0:
                continue
            removed = np.zeros(len(self.groups.comp_group), dtype=bool)
            removed[group.channels[:half]] = True
            frac = (len(group) - half) / len(group)
            for name, macs in self.per_node(removed).items():
                if full[name] > 0 and macs != full[name]:
                    out[name][gid] = math.log(max(macs, 1) / full[name]) / math.log(frac)
        return out

    def per_layer(self, removed=None) -> dict[str, int]:
        """MACs per layer: keyed by the module that owns the op's weight (``layer4.0.conv1``), else by
        the graph node (attention, matmuls of activations)."""
        shape = self._shape(removed)
        out: dict[str, int] = {}
        for n in self.compute:
            name = _layer_of(n)
            out[name] = out.get(name, 0) + _macs(n, shape)
        return out


def _layer_of(node: fx.Node) -> str:
    weight = bind(node).get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return weight.target.rsplit(".", 1)[0] if "." in weight.target else weight.target
    return node.name



def count(groups: ChannelGroups, removed=None) -> Cost:
    """MACs (for the example inputs) and parameter count of the graph after ``removed``."""
    return CostCounter(groups)(removed)
