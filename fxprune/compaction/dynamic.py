"""Per-sample channel gating as a graph that skips the work (sanp's dynamic module).

Each gated group has a gate (``Gate``): a small module that reads the producing layer's INPUT, pooled over
every axis but batch and channels, and decides per sample which of the group's channels run
(``fc2(relu(fc1(pooled))) > 0``). ``dynamic_module`` writes those decisions into a copy of the traced graph:
the channels some sample of the batch keeps (``nonzero``, and at least the best one) slice every tensor of
the group with ``index_select`` (the producer's rows, its normalisation's parameters and statistics, the
consumers' columns), so the producer and its consumers run on those channels only; each sample's own other
channels are zeroed after the normalisation. At batch 1 that is the sample's own decision.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.state import attribute

__all__ = ["Gate", "dynamic_module"]

aten = torch.ops.aten


@dataclass
class Gate:
    """One gated group: where its SPM reads, where its decisions act, the tensors they slice."""

    gid: int
    spm: nn.Module                    # fc1, fc2 (Linear): channel c runs where fc2(relu(fc1(pool(x))))[c] > 0
    input: str                        # the producing layer's input node
    input_axis: int
    input_gate: int | None            # a gated group that fills that input's channel axis, if any
    site: str                         # the activation the decisions multiply (after the normalisation)
    site_axis: int
    params: list[tuple[str, int]]     # (tensor name, axis) of every tensor of the group


class _Chain:
    """Nodes appended one after another from an anchor node of a graph."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor

    def __call__(self, target: Any, *args: Any) -> fx.Node:
        with self.graph.inserting_after(self.anchor):
            self.anchor = self.graph.call_function(target, args)
        return self.anchor


def _spm_tensors(graph: fx.Graph, root: dict[str, Any], gates: dict[int, Gate]) -> tuple[dict[str, fx.Node], fx.Node]:
    """Every SPM's weights as get_attr nodes right after the inputs (before anything runs); returns them by
    name and the last of them."""
    nodes: dict[str, fx.Node] = {}
    top = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for gid, gate in gates.items():
        for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            name = f"fxprune_spm.g{gid}.{k}"
            root[name] = gate.spm.get_parameter(k).detach()
            with graph.inserting_after(top):
                top = nodes[name] = graph.get_attr(name)
    return nodes, top


def _decide(chain: _Chain, x: fx.Node, gate: Gate, spm: dict[str, fx.Node], input_index: fx.Node | None
            ) -> tuple[fx.Node, fx.Node]:
    """The SPM on the layer's input: (decisions (batch, C) as bools, indices of the channels the batch
    runs: any sample's, and at least the best one, since a layer of no channels fails)."""
    g = f"fxprune_spm.g{gate.gid}"
    dims = [d for d in range(x.meta["val"].dim()) if d not in (0, gate.input_axis)]
    pooled = chain(aten.mean.dim, x, dims) if dims else x
    w1 = spm[f"{g}.fc1.weight"]
    if input_index is not None:  # the input holds only the kept channels of a gated group
        w1 = chain(aten.index_select.default, w1, 1, input_index)
    hidden = chain(aten.relu.default, chain(aten.linear.default, chain(aten.type_as.default, pooled, w1), w1,
                                            spm[f"{g}.fc1.bias"]))
    logits = chain(aten.linear.default, hidden, spm[f"{g}.fc2.weight"], spm[f"{g}.fc2.bias"])
    decide = chain(aten.gt.Scalar, logits, 0)
    best = chain(aten.amax.default, logits, [0])
    keep = chain(aten.logical_or.default, chain(aten.any.dim, decide, 0),
                 chain(aten.ge.Tensor, best, chain(aten.amax.default, best)))
    return decide, chain(aten.squeeze.dim, chain(aten.nonzero.default, keep), 1)


def _slice(chain: _Chain, graph: fx.Graph, latest: dict[str, fx.Node], params: list[tuple[str, int]],
           index: fx.Node) -> None:
    """Every tensor of the group read through ``index_select`` on its channel axis."""
    for name, axis in params:
        source = latest.get(name) or next((n for n in graph.nodes if n.op == "get_attr" and n.target == name), None)
        if source is None:
            continue
        users = list(source.users)
        sel = chain(aten.index_select.default, source, axis, index)
        for u in users:
            u.replace_input_with(source, sel)
        latest[name] = sel


def _zero_others(graph: fx.Graph, site: fx.Node, axis: int, mine: fx.Node) -> None:
    """``site * mine`` (each sample's own decisions on the batch's channels), broadcast along ``axis``."""
    chain = _Chain(graph, site)
    made = [chain(aten.type_as.default, mine, site)]
    for d in range(1, site.meta["val"].dim()):
        if d != axis:
            made.append(chain(aten.unsqueeze.default, made[-1], d))
    masked = chain(aten.mul.Tensor, site, made[-1])
    made.append(masked)
    for u in list(site.users):
        if u not in made:
            u.replace_input_with(site, masked)


def dynamic_module(gm: fx.GraphModule, weights: dict[str, torch.Tensor], gates: dict[int, Gate]) -> fx.GraphModule:
    """The traced graph with the SPMs in it, every gated group's tensors sliced to the channels some sample
    of the batch keeps, each sample's other channels zeroed (see the module docstring)."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    root: dict[str, Any] = {n.target: weights[n.target] if n.target in weights else attribute(gm, n.target)
                            for n in graph.nodes if n.op == "get_attr"}
    spm, top = _spm_tensors(graph, root, gates)
    latest: dict[str, fx.Node] = {}
    indices: dict[int, fx.Node] = {}
    for gid, gate in gates.items():
        x = nodes[gate.input]
        chain = _Chain(graph, top if x.op == "placeholder" else x)
        decide, indices[gid] = _decide(chain, x, gate, spm, indices.get(gate.input_gate))
        mine = chain(aten.index_select.default, decide, 1, indices[gid])
        _slice(chain, graph, latest, gate.params, indices[gid])
        _zero_others(graph, nodes[gate.site], gate.site_axis, mine)
    graph.lint()
    return fx.GraphModule(root, graph)
