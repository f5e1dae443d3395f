"""Fold deterministic masks into the weights: new full-size tensors + the removal, for compaction.

``fold(masked)`` reads the masked module's CURRENT tensors (trained or not) and each group's mask value
(``values=`` overrides them, e.g. a per-sample mask's average, or a method's deterministic point):

- every tensor a mask site folds into is multiplied along its channel axis by the value (a norm's
  ``weight`` and ``bias``, or a producer's rows and bias; ``fxprune.masking.sites``), so the unmasked
  graph with these tensors computes exactly what the masked graph computes;
- ``removed``: the channels whose value is 0 (``threshold``: values with ``|v| <= threshold`` count as
  0 and are folded as 0), one bool per channel component as compaction takes it;
- ``placement="prenorm"``: a removed channel does not emit zero but its normalisation's constant
  (``beta - gamma * mean / sqrt(var + eps)`` through whatever follows); nor does one whose mask multiplies
  an activation with no hard site zeroing its other weights (a per-sample mask: ANP's) when ``f(0) != 0``
  follows it (a sigmoid). The constant each consumer reads is measured on the example inputs (the
  masked module in eval mode) and carried into that consumer: its bias gains ``W[:, c] * constant`` (summed over
  the kernel), or, when it has no bias
  and a BatchNorm follows it, that BatchNorm's running mean loses it. The result equals the masked
  model exactly away from zero-padded borders: at a border a convolution reads padding zeros
  where the pruned channel held its constant, which the bias cannot know. A consumer that is
  grouped, or has neither a bias nor a BatchNorm after it, cannot take the constant: a warning names
  it. ``tests/test_masking.py`` checks interior equality.

Depth masks (a scalar per residual block) fold into ``Folded.edits``: a block at 0 is removed, one at 1
stays, another value scales its branch by that number.

``compact(gm, groups, folded.removed, model, weights=folded.weights, edits=folded.edits)`` then gives the
compacted model.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.schema import bind
from fxprune.compaction.emit import GraphEdit
from fxprune.edits.blocks import remove_where
from fxprune.tracing.compat import tree_leaves
from fxprune.tracing.tracer import META_INPUTS

from .kinds import Fixed
from .sites import MASKS, SITES, Site, is_norm, layer_of

if TYPE_CHECKING:
    from .insert import MaskedModel

__all__ = ["fold", "Folded"]


@dataclass
class Folded:
    weights: dict[str, torch.Tensor]   # full-size tensors by the user's names (every tensor of the model)
    removed: np.ndarray                # bool per channel component: the channels whose mask is 0
    values: dict[int, np.ndarray]      # the mask values folded, per group id
    depth: dict[str, float] = field(default_factory=dict)  # depth mask values, per block name
    edits: list[GraphEdit] = field(default_factory=list)   # for compaction's edits=: blocks at 0 removed,
    #                                                        others' branches scaled by their value


def _multiplier(site: Site, value: np.ndarray) -> torch.Tensor:
    mult = torch.ones(site.size, dtype=torch.float64)
    mult[torch.as_tensor(site.index)] = torch.as_tensor(value[site.pos], dtype=torch.float64)
    return mult


def _scale(t: torch.Tensor, axis: int, mult: torch.Tensor) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[axis] = -1
    return t * mult.to(t.dtype).to(t.device).reshape(shape)


def fold(masked: MaskedModel, values: Mapping[int, np.ndarray] | None = None, *, threshold: float = 0.0,
         depth: Mapping[str, float] | None = None) -> Folded:
    """See the module docstring. Depth masks (``depth``: values per block name, default their current
    ones; ``threshold`` applies too) fold into ``Folded.edits``."""
    vals = {gid: np.asarray(v, dtype=np.float64).reshape(-1).copy()
            for gid, v in (values if values is not None else masked.values()).items() if gid in masked.masks}
    for v in vals.values():
        v[np.abs(v) <= threshold] = 0.0
    clones: dict[int, torch.Tensor] = {}  # tied names keep one tensor
    weights: dict[str, torch.Tensor] = {}
    for k, v in masked.state().items():
        if id(v) not in clones:
            clones[id(v)] = v.detach().clone()
        weights[k] = clones[id(v)]
    removed = np.zeros(len(masked.groups.comp_group), dtype=bool)
    for gid, v in vals.items():
        sites = masked.sites[gid]
        if len(v) != sites.channels:
            raise ValueError(f"group {gid} has {sites.channels} channels, its mask value has {len(v)}")
        for site in sites.folds:
            weights[site.node] = _scale(weights[site.node], site.axis, _multiplier(site, v))
        removed[masked.groups[gid].channels[v == 0]] = True
    carried = {gid: v for gid, v in vals.items() if not masked.sites[gid].weights and (v == 0).any()}
    if carried:  # removed channels no hard site zeroes (prenorm, per-sample masks) may emit a constant
        _carry_constants(masked, vals, carried, weights)
    deep = dict(depth if depth is not None else masked.depth_values())
    deep = {k: (0.0 if abs(v) <= threshold else float(v)) for k, v in deep.items()}
    edits = [remove_where(masked.blocks, deep)] if masked.blocks else []
    return Folded(weights, removed, vals, deep, edits)


def _with_values(masked: MaskedModel, vals: dict[int, np.ndarray]) -> fx.GraphModule:
    """A copy of the masked module whose masks are these fixed values, in eval mode."""
    module = copy.deepcopy(masked.module).eval()
    holder = module.get_submodule(MASKS)
    device = next(module.parameters()).device
    for gid, v in vals.items():
        setattr(holder, f"g{gid}", Fixed(torch.as_tensor(v)).to(device))
    return module


class _Inputs(fx.Interpreter):
    """Runs the module and keeps the inputs of the named layers."""

    def __init__(self, module: fx.GraphModule, layers: set[str]) -> None:
        super().__init__(module)
        self.layers, self.seen = layers, {}

    def run_node(self, n: fx.Node) -> object:
        if n.name in self.layers:
            x = self.env[bind(n)["input"]]
            self.seen[n.name] = x.detach()
        return super().run_node(n)


def _constant(x: torch.Tensor, channels: np.ndarray, conv: bool) -> torch.Tensor:
    """The value channel ``channels`` of activation ``x`` holds (read at an interior position)."""
    idx = torch.as_tensor(channels, device=x.device)
    if conv:
        centre = tuple(s // 2 for s in x.shape[2:])
        return x[(0, idx, *centre)]
    flat = x.reshape(-1, x.shape[-1])
    return flat[flat.shape[0] // 2, idx]


def _carry_constants(masked: MaskedModel, vals: dict[int, np.ndarray], carried: dict[int, np.ndarray],
                     weights: dict[str, torch.Tensor]) -> None:
    module = _with_values(masked, vals)
    graph = module.graph
    attrs = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    todo: list[tuple[fx.Node, str, np.ndarray]] = []  # (consumer layer, its weight, removed input positions)
    for gid, v in carried.items():
        group = masked.groups[gid]
        for p in group.params:
            if p.role != "consumer" or p.name not in attrs:
                continue
            layer = layer_of(attrs[p.name])
            g, pos = masked.groups.positions(p.key)
            gone = np.flatnonzero((g == gid) & (v[np.maximum(pos, 0)] == 0))
            if layer is not None and len(gone):
                todo.append((layer, p.name, gone))
    if not todo:
        return
    run = _Inputs(module, {layer.name for layer, _, _ in todo})
    with torch.no_grad():
        run.run(*tree_leaves(module.meta[META_INPUTS]))
    for layer, wname, gone in todo:
        _carry_into(module, layer, wname, gone, run.seen[layer.name], weights)


def _carry_into(module: fx.GraphModule, layer: fx.Node, wname: str, gone: np.ndarray, x: torch.Tensor,
                weights: dict[str, torch.Tensor]) -> None:
    b = bind(layer)
    w = weights[wname]
    conv = w.dim() > 2
    const = _constant(x, gone, conv).to(w.dtype)
    if not bool(const.any()):  # the channels emit zero (a ReLU after the mask): nothing to carry
        return
    if int(b.get("groups", 1) or 1) != 1:
        warnings.warn(f"fxprune: a pruned channel's constant cannot be carried into grouped layer {layer.name}; "
                      "the compacted model differs there", stacklevel=3)
        return
    cols = w[:, torch.as_tensor(gone, device=w.device)]
    delta = (cols.sum(dim=tuple(range(2, w.dim()))) if conv else cols) @ const
    bias = b.get("bias")
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        weights[bias.target] = weights[bias.target] + delta
        return
    users = list(layer.users)
    while len(users) == 1 and users[0].op == "call_module" and users[0].target.startswith(SITES + "."):
        users = list(users[0].users)  # past a prenorm mask on the layer's own output
    if len(users) == 1 and users[0].op == "call_module":
        bn = module.get_submodule(users[0].target)
        name = f"{users[0].target}.running_mean"
        if getattr(bn, "running_mean", None) is not None and name in weights:
            weights[name] = weights[name] - delta
            return
    if len(users) == 1 and is_norm(users[0]):
        rm = bind(users[0]).get("running_mean")
        if isinstance(rm, fx.Node) and rm.op == "get_attr":
            weights[rm.target] = weights[rm.target] - delta
            return
    warnings.warn(f"fxprune: layer {layer.name} has no bias and no BatchNorm after it to take a pruned channel's "
                  "constant; the compacted model differs there", stacklevel=3)
