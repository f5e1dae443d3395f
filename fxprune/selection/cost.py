"""MACs and parameters counted on the traced graph, before or after a removal, without compacting.

Formulas follow ``torch.utils.flop_counter.FlopCounterMode`` (MACs = its flops / 2), so the two agree:
convolutions, linear/matmul-like products and scaled-dot-product attention; everything else is free.
Counting from the plan's shapes makes a budget search (target MACs/params) cost milliseconds per step.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from fxprune.analysis.couple import TensorRef, as_ref
from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.rules import ops
from fxprune.analysis.schema import bind
from fxprune.compaction.resize import Reindexing

__all__ = ["Cost", "count", "CostCounter"]


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    def ratio(self, full: "Cost") -> "Cost":
        return Cost(self.macs / max(full.macs, 1), self.params / max(full.params, 1))  # type: ignore[arg-type]


Shape = Callable[[TensorRef], tuple[int, ...]]


def _conv(node: fx.Node, shape: Shape) -> int:
    b = bind(node)
    x, w, out = as_ref(b["input"]), as_ref(b["weight"]), TensorRef(node)
    ws, xs, os = shape(w), shape(x), shape(out)
    transposed = node.target in _TRANSPOSED_CONV or bool(b.get("transposed", False))
    nd = len(ws) - 2
    batch = xs[0] if len(xs) == nd + 2 else 1
    spatial = xs[-nd:] if transposed else os[-nd:]
    return batch * math.prod(ws) * math.prod(spatial)


def _linear(node: fx.Node, shape: Shape) -> int:
    b = bind(node)
    return math.prod(shape(TensorRef(node))) * shape(as_ref(b["input"]))[-1]


def _matmul(node: fx.Node, shape: Shape) -> int:
    x = as_ref(node.args[0])
    return math.prod(shape(TensorRef(node))) * shape(x)[-1]


def _addmm(node: fx.Node, shape: Shape) -> int:
    return math.prod(shape(TensorRef(node))) * shape(as_ref(node.args[1]))[-1]


def _sdpa(node: fx.Node, shape: Shape) -> int:
    b = bind(node)
    q, k, v = (shape(as_ref(b[n])) for n in ("query", "key", "value"))
    lead = math.prod(q[:-2])
    return lead * q[-2] * k[-2] * (q[-1] + v[-1])


def _einsum(node: fx.Node, shape: Shape) -> int:
    eq = node.args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return 0
    sizes: dict[str, int] = {}
    for term, t in zip(eq.split("->")[0].split(","), node.args[1]):
        ref = as_ref(t)
        if ref is None:
            return 0
        sizes.update(zip(term, shape(ref)))
    return math.prod(sizes.values())


_TRANSPOSED_CONV = set(ops("aten.conv_transpose1d.default", "aten.conv_transpose2d.input",
                           "aten.conv_transpose3d.input"))
_TABLE: dict[object, Callable[[fx.Node, Shape], int]] = {}
for _t in ops("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.conv1d.padding",
              "aten.conv2d.padding", "aten.conv3d.padding", "aten.convolution.default",
              "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input"):
    _TABLE[_t] = _conv
for _t in ops("aten.linear.default"):
    _TABLE[_t] = _linear
for _t in ops("aten.matmul.default", "aten.mm.default", "aten.bmm.default"):
    _TABLE[_t] = _matmul
for _t in ops("aten.addmm.default"):
    _TABLE[_t] = _addmm
for _t in ops("aten.scaled_dot_product_attention.default"):
    _TABLE[_t] = _sdpa
for _t in ops("aten.einsum.default"):
    _TABLE[_t] = _einsum


class CostCounter:
    """Counts a traced graph's cost under any removal; reuse it across the steps of a budget search."""

    def __init__(self, groups: ChannelGroups) -> None:
        self.groups = groups
        gm = groups.gm
        params = {n for n, _ in gm.named_parameters(remove_duplicate=True)}
        self.compute = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _TABLE]
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
        macs = sum(_TABLE[n.target](n, shape) for n in self.compute)
        params = sum(math.prod(shape(TensorRef(n))) for n in self.params) + self.unread
        return Cost(int(macs), int(params))


    def per_layer(self, removed=None) -> dict[str, int]:
        """MACs per layer: keyed by the module that owns the op's weight (``layer4.0.conv1``), else by
        the graph node (attention, matmuls of activations)."""
        shape = self._shape(removed)
        out: dict[str, int] = {}
        for n in self.compute:
            name = _layer_of(n)
            out[name] = out.get(name, 0) + _TABLE[n.target](n, shape)
        return out


def _layer_of(node: fx.Node) -> str:
    weight = bind(node).get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return weight.target.rsplit(".", 1)[0] if "." in weight.target else weight.target
    return node.name



def count(groups: ChannelGroups, removed=None) -> Cost:
    """MACs (for the example inputs) and parameter count of the graph after ``removed``."""
    return CostCounter(groups)(removed)
