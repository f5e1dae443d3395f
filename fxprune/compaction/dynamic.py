"""Per-sample channel gating as a graph that skips the work (sanp's dynamic module).

Each gated group has a gate (``Gate``): a small module that reads the producing layer's INPUT, pooled over
every axis but batch and channels, and decides per sample which of the group's channels run
(``fc2(relu(fc1(pooled))) > 0``). ``dynamic_module`` writes those decisions into a copy of the traced graph:
the channels some sample of the batch keeps (``nonzero``, and at least the best one) slice every tensor of
the group with ``index_select`` (the producers' rows, their normalisations' parameters and statistics, the
consumers' columns), so the producers and consumers run on those channels only (a depthwise convolution of
the group runs with as many groups as kept channels); each sample's own other channels are zeroed at the
group's mask sites. At batch 1 that is the sample's own decision.

A group whose channels each span several positions of a tensor (attention heads: a head's rows of the q, k and v
projections, its columns of the output projection) slices by an owner map (``Gate.params``/``Gate.sites``: the
channel of every position), and the shapes its reshapes name follow the kept count: each size argument the
static rewrite rules would give at 1 and at 2 kept channels is a line in the count, written into the graph as
``slope * kept + intercept`` (:func:`_symbolic_sizes`; checked against the full width).

Which groups may be gated so: :func:`closed_leak` checks, by a table of ops that keep a zero, that a channel
zeroed at the mask sites reaches every consumer as zero (so slicing it away is exact per sample).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.rules import RULES, ops
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
    "aten.contiguous.default")) | {operator.getitem} | frozenset(ops(  # re-layouts: a zero moves with its channel
        "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.permute.default",
        "aten.transpose.int", "aten.unbind.int", "aten.select.int", "aten.flatten.using_ints", "aten.unflatten.int",
        "aten.squeeze.dim", "aten.unsqueeze.default"))
# zero where any operand is: squeeze-excite's x * scale, and products whose channel axis is a batch axis (attention's
# probabilities @ v per head)
ANY_ZERO = frozenset(ops("aten.mul.Tensor", "aten.matmul.default", "aten.bmm.default"))
ZERO_WITH_ARG = {op: 2 for op in ops("aten.scaled_dot_product_attention.default")}  # zero where its value is


Owner = torch.Tensor | None  # the group channel at each position of an axis (C: another group's, always kept);
#                              None: position i holds channel i


@dataclass
class Gate:
    """One gated group: where its SPM reads, where its decisions act, the tensors they slice."""

    gid: int
    spm: nn.Module                    # fc1, fc2 (Linear): channel c runs where fc2(relu(fc1(pool(x))))[c] > 0
    input: str                        # the producing layer's input node
    input_axis: int
    input_gate: int | None            # a gated group that fills that input's channel axis, if any
    sites: list[tuple[str, int, Owner]]   # (node, axis, owner): the activations the decisions multiply (mask sites)
    params: list[tuple[str, int, Owner]]  # (tensor name, axis, owner) of every tensor of the group
    depthwise: list[str] = field(default_factory=list)  # the group's depthwise convolutions (their groups = kept)


def depthwise(node: fx.Node) -> bool:
    """A convolution with one input channel per group and one output per group: channel c reads channel c."""
    layout = conv_layout(node)
    w = layout[0] if layout else None
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    return val is not None and layout[1] > 1 and val.shape[0] == layout[1] and val.shape[1] == 1


def _stays_zero(n: fx.Node, inside: list[fx.Node], zero: set[str], sites: set[str]) -> bool:
    """Does the group's closed channel stay zero at ``n`` (a node of the group) when it is zero where ``zero`` says?"""
    if n.name in sites:
        return True
    if n.target in KEEPS_ZERO:
        return bool(inside) and all(a.name in zero for a in inside)
    if n.target in ANY_ZERO:
        return any(a.name in zero for a in inside)
    arg = ZERO_WITH_ARG.get(n.target)
    value = n.args[arg] if arg is not None and len(n.args) > arg else None
    return isinstance(value, fx.Node) and value.name in zero


def closed_leak(gm: fx.GraphModule, nodes: set[str], sites: set[str], layers: frozenset) -> str | None:
    """Where a channel of a group (``nodes``: the nodes whose output carries it) zeroed at ``sites`` would
    reach a consumer as a non-zero value, in words; None when it reaches every consumer as zero. Zeros follow
    :data:`KEEPS_ZERO`, :data:`ANY_ZERO` and :data:`ZERO_WITH_ARG`; anything else (a normalisation, a sigmoid, a
    bias, a softmax) makes a value. A layer of ``layers`` inside the group reads its own channels only when it is
    depthwise."""
    zero: set[str] = set()
    for n in gm.graph.nodes:
        inside = [a for a in n.all_input_nodes if a.name in nodes]
        if n.name in nodes and not (n.target in layers and inside and not depthwise(n)):
            if _stays_zero(n, inside, zero, sites):
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

    def attr(self, name: str) -> fx.Node:
        with self.graph.inserting_after(self.anchor):
            self.anchor = self.graph.get_attr(name)
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


class _Kept:
    """The positions of an axis that run, from the kept channels ``index`` of a group of ``channels``: the
    channels themselves where the axis holds each once (owner None), else every position whose owner is kept
    (another group's positions always are), in order."""

    def __init__(self, chain: _Chain, root: dict[str, Any], gid: int, channels: int, index: fx.Node,
                 decide: fx.Node) -> None:
        self.chain, self.root, self.prefix, self.index, self.decide = chain, root, f"fxprune_spm.g{gid}", index, decide
        self.channels = channels
        self._keep: fx.Node | None = None
        self._decide_all: fx.Node | None = None
        self._tables = 0

    def _const(self, name: str, value: torch.Tensor) -> fx.Node:
        self.root[f"{self.prefix}.{name}"] = value
        return self.chain.attr(f"{self.prefix}.{name}")

    def positions(self, owner: Owner) -> tuple[fx.Node, fx.Node | None]:
        """(the kept positions, their owners) of an axis; owner None: (the kept channels, None)."""
        if owner is None:
            return self.index, None
        if self._keep is None:  # a bool per channel, and a last True: "another group's"
            free = torch.zeros(self.channels + 1, dtype=torch.bool)
            free[-1] = True
            self._keep = self.chain(aten.index_fill.int_Scalar, self._const("free", free), 0, self.index, True)
        table = self._const(f"owner{self._tables}", owner.to(torch.int64))
        self._tables += 1
        hit = self.chain(aten.index_select.default, self._keep, 0, table)
        rows = self.chain(aten.squeeze.dim, self.chain(aten.nonzero.default, hit), 1)
        return rows, self.chain(aten.index_select.default, table, 0, rows)

    def own(self, owners: fx.Node | None, mine: fx.Node) -> fx.Node:
        """Each sample's own decisions at the kept positions (batch, positions): ``mine`` where the axis holds each
        kept channel once, else the decision of each position's owner (True for another group's)."""
        if owners is None:
            return mine
        if self._decide_all is None:
            ones = self.chain(aten.new_ones.default, self.decide, [1, 1])
            wide = self.chain(aten.expand.default, ones, [self.chain(aten.sym_size.int, self.decide, 0), 1])
            self._decide_all = self.chain(aten.cat.default, [self.decide, wide], 1)
        return self.chain(aten.index_select.default, self._decide_all, 1, owners)


def _slice(chain: _Chain, graph: fx.Graph, latest: dict[str, fx.Node], params: list[tuple[str, int, Owner]],
           kept: _Kept) -> None:
    """Every tensor of the group read through ``index_select`` of its kept positions on its channel axis."""
    for name, axis, owner in params:
        source = latest.get(name) or next((n for n in graph.nodes if n.op == "get_attr" and n.target == name), None)
        if source is None:
            continue
        users = list(source.users)
        rows, _ = kept.positions(owner)
        sel = chain(aten.index_select.default, source, axis, rows)
        for u in users:
            u.replace_input_with(source, sel)
        latest[name] = sel


def _zero_others(graph: fx.Graph, site: fx.Node, axis: int, mine: fx.Node) -> None:
    """``site * mine`` (each sample's own decisions on the batch's positions), broadcast along ``axis``."""
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


class ShapeError(ValueError):
    """A size argument that does not follow the kept count of a group as a line (the group cannot be gated)."""


Make = Any  # (slope, intercept) -> the value an argument takes at the kept count


def _line(full: Any, one: Any, two: Any, count: int, make: Make) -> Any:
    """The argument ``full`` (at ``count`` channels) as a function of the kept count, from its values at one and at
    two kept channels: unchanged where they agree, ``make(slope, intercept)`` where an integer moves."""
    if isinstance(full, (list, tuple, dict)):
        if type(one) is not type(full) or type(two) is not type(full) or len(one) != len(full) or \
                len(two) != len(full):
            raise ShapeError(f"the argument {full} changes its structure with the kept count")
        if isinstance(full, dict):
            return {k: _line(full[k], one[k], two[k], count, make) for k in full}
        return type(full)(_line(f, a, b, count, make) for f, a, b in zip(full, one, two))
    if one is full and two is full:
        return full
    numbers = [v for v in (full, one, two) if isinstance(v, int) and not isinstance(v, bool)]
    if len(numbers) < 3:
        if one == full and two == full and type(one) is type(full):
            return full
        raise ShapeError(f"the argument {full} changes with the kept count, and is not a whole number")
    slope, intercept = two - one, 2 * one - two
    if slope * count + intercept != full:
        raise ShapeError(f"the argument {full} is not a line in the kept count ({one} at 1, {two} at 2)")
    return full if slope == 0 else make(slope, intercept)


def _removal(groups: ChannelGroups, gid: int, keep: int) -> np.ndarray:
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    removed[groups[gid].channels[keep:]] = True
    return removed


def _arithmetic(graph: fx.Graph, before: fx.Node, kept: fx.Node) -> Make:
    def make(slope: int, intercept: int) -> fx.Node:
        with graph.inserting_before(before):
            value = kept if slope == 1 else graph.call_function(operator.mul, (kept, slope))
            return value if intercept == 0 else graph.call_function(operator.add, (value, intercept))
    return make


def symbolic_sizes(graph: fx.Graph, groups: ChannelGroups, gid: int, kept: fx.Node | None,
                   skip: frozenset = frozenset()) -> list[str]:
    """Every op of ``graph`` (besides ``skip``: the layers, whose tensors are sliced) whose arguments the static
    rewrite rules change when group ``gid`` shrinks, rewritten to follow the kept count ``kept`` (a graph node; None:
    only check that they can). Returns those nodes' names; a ShapeError names an argument that is not a line in
    the count."""
    count = len(groups[gid])
    if count < 2:
        return []
    r1, r2 = (Reindexing(groups, _removal(groups, gid, k)) for k in (1, 2))
    done = []
    for node in list(graph.nodes):
        rule = RULES.get(node.target) if node.op == "call_function" else None
        if rule is None or rule.rewrite is None or node.target in skip or \
                not r1.touches(node.name, [a.name for a in node.all_input_nodes]):
            continue
        args, kwargs = node.args, dict(node.kwargs)
        seen = []
        for r in (r1, r2):
            rule.rewrite(node, r)
            seen.append((node.args, dict(node.kwargs)))
            node.args, node.kwargs = args, kwargs
        if seen[0] == (args, kwargs) and seen[1] == (args, kwargs):
            continue
        make = _arithmetic(graph, node, kept) if kept is not None else (lambda slope, intercept: None)
        lined = _line((args, kwargs), seen[0], seen[1], count, make)
        if kept is not None:
            node.args, node.kwargs = lined[0], lined[1]
        done.append(node.name)
    return done


def dynamic_module(gm: fx.GraphModule, weights: dict[str, torch.Tensor], gates: dict[int, Gate],
                   groups: ChannelGroups | None = None) -> fx.GraphModule:
    """The traced graph with the SPMs in it, every gated group's tensors sliced to the channels some sample
    of the batch keeps, each sample's other channels zeroed (see the module docstring). ``groups``: the analysis,
    needed when a gated group's reshapes name its size (attention heads)."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    root: dict[str, Any] = {n.target: weights[n.target] if n.target in weights else attribute(gm, n.target)
                            for n in graph.nodes if n.op == "get_attr"}
    spm, top = _spm_tensors(graph, root, gates)
    latest: dict[str, fx.Node] = {}
    indices: dict[int, fx.Node] = {}
    layers = frozenset(ops("aten.conv2d.default", "aten.conv1d.default", "aten.linear.default", "aten.addmm.default"))
    for gid, gate in gates.items():
        x = nodes[gate.input]
        chain = _Chain(graph, top if x.op == "placeholder" else x)
        decide, indices[gid] = _decide(chain, x, gate, spm, indices.get(gate.input_gate))
        mine = chain(aten.index_select.default, decide, 1, indices[gid])
        kept = _Kept(chain, root, gid, int(gate.spm.fc2.out_features), indices[gid], decide)
        _slice(chain, graph, latest, gate.params, kept)
        count = chain(aten.sym_size.int, indices[gid], 0)
        for name in gate.depthwise:
            _set_groups(nodes[name], count)
        if groups is not None:
            symbolic_sizes(graph, groups, gid, count, skip=layers)
        for site, axis, owner in gate.sites:
            _, owners = kept.positions(owner)
            _zero_others(graph, nodes[site], axis, kept.own(owners, mine))
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(root, graph)
