"""Where a channel group's mask acts: the activations it multiplies and the weights it hard-zeroes.

A group's channels live in several tensors (a residual stream written by several layers, the parts of
a concat, the q/k/v rows of attention heads). Its mask acts at the group's *sites*, read from the
traced graph and its analysis, never from module types:

- ``placement="output"`` (the default): the output of every normalisation whose affine parameters the
  group shrinks, and the output of every producing layer (conv / linear / matmul with a weight) whose
  result does not flow into such a normalisation first (a conv followed by its BatchNorm is masked
  after the BatchNorm: that is where Network Slimming's scale and Pruning from Scratch's gate sit).
  A mask m there is foldable: it is ``m * gamma`` and ``m * beta`` of the norm, or ``m * rows`` and
  ``m * bias`` of the producer. Attention heads have no norm: q, k and v are all masked (a zero
  removes the head; a soft value also rescales its attention logits).
- ``placement="prenorm"``: the output of every producing layer that feeds a normalisation (Adversarial
  Neural Pruning's masks sit before BatchNorm). A zero there makes the channel emit the norm's
  constant; folding carries that constant into the consumers (``fxprune.masking.fold``). A group that
  no producer-then-norm pair carries (ViT heads, MLP units) is masked where ``"output"`` masks it.

*Hard* sites (``placement="output"`` only, masks of shape (channels,)): every other weight of the group
(producer rows behind a norm, consumer columns, biases, per-channel parameters of other ops), except
the normalisations' own tensors (a BatchNorm stays a BatchNorm module, so ``.train()`` switches it) and
a weight-norm direction (``v`` of ``g * v / ||v||``: zeroing it would be 0/0). In eval mode these are
multiplied by ``(m != 0)``, so a zero mask gives exactly the masked original (every tensor of the
channel zeroed), even where the path to a consumer does not keep zeros (a sigmoid). In training mode
they are left alone, so a gate at zero still receives gradient (as in the papers' gating).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups, Group, ParamSlot
from fxprune.analysis.rules import RULES, Role, ops
from fxprune.analysis.rules.norm import DIRECTION
from fxprune.analysis.schema import bind
from fxprune.state import named_tensors

__all__ = ["Site", "GroupSites", "GraphFacts", "find_sites", "is_norm", "layer_of", "producer_layers", "first_producer",
           "first_layer", "PLACEMENTS", "MASKS", "SITES"]

PLACEMENTS = ("output", "prenorm")
MASKS, SITES = "fxprune_masks", "fxprune_mask_sites"  # where a masked graph keeps its masks and what applies them

# ops between a weight's get_attr and the layer that uses it (make_fx writes ``linear`` as ``t`` + ``addmm``)
_VIEWS = frozenset(ops("aten.t.default", "aten.permute.default", "aten.transpose.int", "aten.view.default",
                       "aten.reshape.default", "aten.unsqueeze.default", "aten.expand.default",
                       "aten.contiguous.default", "aten._to_copy.default", "aten.clone.default",
                       "aten.to.dtype", "aten.alias.default"))
_STEPS_TO_NORM = 4  # a producer counts as "behind" a norm when the norm's input is at most this many steps after it


@dataclass
class Site:
    """One tensor a mask multiplies along ``axis``: ``index[i]`` is the position along that axis of the
    group's channel ``pos[i]``."""

    node: str            # node name (activation site) or get_attr target (weight site)
    axis: int
    size: int            # the axis' length
    index: np.ndarray
    pos: np.ndarray
    layer: str | None = None  # an activation site: the layer whose output it is (a norm or a producer)
    norm: bool = False        # ... and that layer is a normalisation
    folds: list[Site] = field(default_factory=list)  # ... and the tensors a mask there folds into


@dataclass
class GroupSites:
    group: int
    channels: int
    activations: list[Site] = field(default_factory=list)
    weights: list[Site] = field(default_factory=list)   # hard sites (get_attr targets)
    skipped: str | None = None                           # why no mask can act on this group

    @property
    def folds(self) -> list[Site]:
        """The tensors a mask folds into (``node`` = tensor name): every activation site's, each once (a norm or
        layer that runs at several sites, a detector's head shared by its levels, folds its mask once)."""
        seen: dict[tuple[str, int], Site] = {}
        for site in self.activations:
            for f in site.folds:
                seen.setdefault((f.node, f.axis), f)
        return list(seen.values())


def is_norm(node: fx.Node) -> bool:
    rec = RULES.get(node.target) if node.op == "call_function" else None
    return rec is not None and Role.NORM in rec.roles


def layer_of(attr: fx.Node) -> fx.Node | None:
    """The layer that uses a weight: its get_attr's user, past views (``t`` before ``addmm``)."""
    node = attr
    for _ in range(6):
        users = [u for u in node.users if u.op == "call_function" or _applies_mask(u)]
        if len(users) != 1:
            return None
        node = users[0]
        if node.target not in _VIEWS and not _applies_mask(node):
            return node
    return None


def producer_layers(group: Group, facts: GraphFacts) -> set[fx.Node]:
    """The layers (conv / linear / matmul nodes) that use the group's producer weights."""
    layers = {layer_of(a) for p in group.params if p.role == "producer" for a in facts.attrs.get(p.name, [])}
    layers.discard(None)
    return layers  # type: ignore[return-value]


def first_producer(group: Group, facts: GraphFacts) -> tuple[fx.Node, fx.Node | None] | None:
    """The group's first producing layer in graph order and that layer's input node (None when it is not a node),
    or None when no layer writes the group: a group written by a chain (a conv, then its depthwise conv, then
    squeeze-excite's scale) is decided where the chain starts."""
    layers = producer_layers(group, facts)
    if not layers:
        return None
    layer = first_layer(layers, facts)
    return layer, layer_input(layer)


def first_layer(layers: Iterable[fx.Node], facts: GraphFacts) -> fx.Node:
    """The first of ``layers`` in graph order: where a chain of layers writing one group starts."""
    return min(layers, key=lambda n: facts.order[n])


def layer_input(layer: fx.Node) -> fx.Node | None:
    """A conv / linear / matmul node's input (None when it is not a node of the graph)."""
    b = bind(layer)
    x = b.get("mat1") if "mat1" in b else b.get("input")  # addmm(bias, input, weight^T) names its input mat1
    return x if isinstance(x, fx.Node) else None


def _applies_mask(node: fx.Node) -> bool:
    """A masked graph's node that multiplies a tensor by a mask (seen through like a view)."""
    return node.op == "call_module" and str(node.target).startswith(SITES + ".")


def _tensor_output(node: fx.Node) -> fx.Node | None:
    """The node holding ``node``'s first tensor output: itself, or its ``getitem(node, 0)`` user."""
    if isinstance(node.meta.get("val"), torch.Tensor):
        return node
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)


def _activation_site(groups: ChannelGroups, node: fx.Node, gid: int) -> Site | None:
    """The axis of ``node``'s output that carries group ``gid``, with its positions."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    for axis in range(val.dim()):
        key = (node.name, 0, axis)
        if key not in groups.table.index:
            continue
        g, pos = groups.positions(key)
        hit = np.flatnonzero(g == gid)
        if len(hit):
            return Site(node.name, axis, int(val.shape[axis]), hit, pos[hit])
    return None


def _behind_norm(producer: fx.Node, norms: list[fx.Node]) -> bool:
    """Does ``producer``'s output reach one of ``norms``' input within a few single-input steps?"""
    for norm in norms:
        node = norm.args[0] if norm.args else None
        for _ in range(_STEPS_TO_NORM):
            if not isinstance(node, fx.Node):
                break
            if node is producer:
                return True
            node = next((a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"), None)
    return False


_AFFINE = ("weight", "bias")  # a norm's tensors a mask folds into (not its running statistics)


class GraphFacts:
    """What every group's site search reads from one graph, looked up once: get_attr nodes by target, the
    tensors by name, the tensors normalisations read, the node order."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.attrs: dict[str, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self.attrs.setdefault(n.target, []).append(n)
        self.state = named_tensors(gm)
        self.norm_tensors = {t for t, nodes in self.attrs.items() for n in nodes if any(is_norm(u) for u in n.users)}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}


def _layers(facts: GraphFacts, group: Group, role: str) -> dict[fx.Node, list[ParamSlot]]:
    """The nodes using the group's ``role`` tensors (norm ops for "norm", layers for "producer"), in graph
    order, each with the group's tensors a mask at its output folds into."""
    attrs = facts.attrs
    found: dict[fx.Node, list[ParamSlot]] = {}
    for p in group.params:
        if p.role != role:
            continue
        for attr in attrs.get(p.name, []):
            users = [u for u in attr.users if is_norm(u)] if role == "norm" else [layer_of(attr)]
            for u in users:
                if u is None:
                    continue
                slots = found.setdefault(u, [])
                affine = role != "norm" or any(bind(u).get(k) is attr for k in _AFFINE)
                if affine and p not in slots:
                    slots.append(p)
    return dict(sorted(found.items(), key=lambda kv: facts.order[kv[0]]))


def _tensor_site(groups: ChannelGroups, group: Group, p: ParamSlot, shape: torch.Size) -> Site | None:
    g, pos = groups.positions(p.key)
    hit = np.flatnonzero(g == group.id)
    return Site(p.name, p.axis, int(shape[p.axis]), hit, pos[hit]) if len(hit) else None


def _weight_sites(facts: GraphFacts, groups: ChannelGroups, group: Group) -> list[Site]:
    state = facts.state
    sites = []
    for p in group.params:
        if p.role in ("norm", DIRECTION) or p.name in facts.norm_tensors or p.name not in state:
            continue
        site = _tensor_site(groups, group, p, state[p.name].shape)
        if site is not None:
            sites.append(site)
    return sites


def find_sites(gm: fx.GraphModule, groups: ChannelGroups, group: Group, placement: str = "output",
               facts: GraphFacts | None = None) -> GroupSites:
    """Where group ``group``'s mask acts (see the module docstring). ``facts``: :class:`GraphFacts` of
    ``gm``, shared when searching many groups."""
    facts = facts or GraphFacts(gm)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    out = GroupSites(group.id, len(group))
    norms, producers = _layers(facts, group, "norm"), _layers(facts, group, "producer")
    behind = [p for p in producers if _behind_norm(p, list(norms))]
    if placement == "output":
        chosen = {**norms, **{p: slots for p, slots in producers.items() if p not in behind}}
        out.weights = _weight_sites(facts, groups, group)
    else:  # before the norms; a group without one (ViT heads, MLP units) at its producers' outputs
        chosen = {p: producers[p] for p in behind} or {**norms, **producers}
    state = facts.state
    for layer, slots in chosen.items():
        if not slots:
            out.skipped = f"normalisation {layer.name} has no affine parameters a mask could fold into"
            return out
        node = _tensor_output(layer)
        site = _activation_site(groups, node, group.id) if node is not None else None
        if site is None:
            continue
        site.layer, site.norm = layer.name, layer in norms
        site.folds = [f for f in (_tensor_site(groups, group, p, state[p.name].shape) for p in slots
                                  if p.name in state) if f is not None]
        out.activations.append(site)
    if not out.activations:
        out.skipped = "no layer output carries these channels"
    return out
