"""Per-sample channel gating as a graph that skips the work (sanp's dynamic module).

Each gated group has a gate (``Gate``): a small module that reads the producing layer's INPUT, pooled over
every axis but batch and channels, and decides per sample which of the group's channels run
(``fc2(relu(fc1(pooled))) > 0``). ``dynamic_module`` writes those decisions into a copy of the traced graph:
the channels some sample of the batch keeps (``nonzero``, and at least the best one) slice every tensor of
the group with ``index_select`` (the producers' rows, their normalisations' parameters and statistics, the
consumers' columns), so the producers and consumers run on those channels only (a depthwise convolution of
the group runs with as many groups as kept channels); each sample's own other channels are zeroed at the
group's mask sites. At batch 1 that is the sample's own decision.

Which groups may be gated so: :func:`closed_leak` checks, by a table of ops that keep a zero, that a channel
zeroed at the mask sites reaches every consumer as zero (so slicing it away is exact per sample).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.rules import ops
from fxprune.analysis.rules.layers import conv_layout
from fxprune.state import attribute

__all__ = ["Gate", "closed_leak", "depthwise", "dynamic_module"]

aten = torch.ops.aten

# f(0) = 0 channel by channel: a channel that is zero at the op's (group) inputs is zero at its output
KEEPS_ZERO = frozenset(ops(
    "aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.gelu.default", "aten.silu.default", "aten.silu_.default", "aten.hardswish.default",
    "aten.hardswish_.default", "aten.leaky_relu.default", "aten.elu.default", "aten.tanh.default",
    "aten.dropout.default", "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.mean.dim",
    "aten.adaptive_avg_pool2d.default", "aten.max_pool2d_with_indices.default", "aten.clone.default",
    "aten.contiguous.default")) | {operator.getitem}
ANY_ZERO = frozenset(ops("aten.mul.Tensor"))  # zero where any operand is (squeeze-excite's x * scale)


@dataclass
class Gate:
    """One gated group: where its SPM reads, where its decisions act, the tensors they slice."""

    gid: int
    spm: nn.Module                    # fc1, fc2 (Linear): channel c runs where fc2(relu(fc1(pool(x))))[c] > 0
    input: str                        # the producing layer's input node
    input_axis: int
    input_gate: int | None            # a gated group that fills that input's channel axis, if any
    sites: list[tuple[str, int]]      # (node, axis): the activations the decisions multiply (the mask sites)
    params: list[tuple[str, int]]     # (tensor name, axis) of every tensor of the group
    depthwise: list[str] = field(default_factory=list)  # the group's depthwise convolutions (their groups = kept)


def depthwise(node: fx.Node) -> bool:
    """A convolution with one input channel per group and one output per group: channel c reads channel c."""
    layout = conv_layout(node)
    w = layout[0] if layout else None
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    return val is not None and layout[1] > 1 and val.shape[0] == layout[1] and val.shape[1] == 1


def closed_leak(gm: fx.GraphModule, nodes: set[str], sites: set[str], layers: frozenset) -> str | None:
    """Where a channel of a group (``nodes``: the nodes whose output carries it) zeroed at ``sites`` would
    reach a consumer as a non-zero value, in words; None when it reaches every consumer as zero. Zeros follow
    :data:`KEEPS_ZERO` and :data:`ANY_ZERO`; anything else (a normalisation, a sigmoid, a bias) makes a
    value. A layer of ``layers`` inside the group reads its own channels only when it is depthwise."""
    zero: set[str] = set()
    for n in gm.graph.nodes:
        inside = [a for a in n.all_input_nodes if a.name in nodes]
        if n.name in nodes and not (n.target in layers and inside and not depthwise(n)):
            if n.name in sites or (n.target in KEEPS_ZERO and inside and all(a.name in zero for a in inside)) or \
                    (n.target in ANY_ZERO and any(a.name in zero for a in inside)):
                zero.add(n.name)
            continue
        for a in inside:
            if a.name not in zero:
                return f"a closed channel reaches {n.name} as a non-zero value (through {a.name})"
    return None


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


def _set_groups(conv: fx.Node, groups: fx.Node) -> None:
    """A convolution's ``groups`` argument (the 7th of ``aten.conv2d``/``conv1d``) read from ``groups``."""
    if len(conv.args) >= 7:
        conv.args = (*conv.args[:6], groups, *conv.args[7:])
    else:
        conv.kwargs = {**conv.kwargs, "groups": groups}


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
        if gate.depthwise:
            kept = chain(aten.sym_size.int, indices[gid], 0)
            for name in gate.depthwise:
                _set_groups(nodes[name], kept)
        for site, axis in gate.sites:
            _zero_others(graph, nodes[site], axis, mine)
    graph.lint()
    return fx.GraphModule(root, graph)
