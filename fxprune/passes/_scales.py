"""Shared machinery of the passes that score a channel by a learned scale under one global threshold
(slimming: |gamma|, or a learned scale where a group has no BatchNorm; scratch: its gates).

:class:`LearnedScales` holds what they have in common: their selection defaults (global scope, no
normalisation: the scales are comparable across layers), the training data they need, and the
fallback for a group no scale can act on (the L1 norm of its producing filters, rescaled to the
model's mean scale so it competes under the same threshold without dominating or vanishing;
fxprune's choice, not the papers').
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.analysis.rules import ops
from fxprune.tracing.compat import batch_norm_types

from .base import Pass, PassContext
from .l1 import producer_l1

__all__ = ["LearnedScales", "BN", "mean_scale", "rescaled_l1", "residual_stream"]

BN = batch_norm_types()


_ADDS = frozenset(ops("aten.add.Tensor", "aten.add_.Tensor", "aten.sub.Tensor"))


def _roots(node: fx.Node, inside: set[str]) -> set[str]:
    """The group's nodes upstream of ``node`` (through the group's own nodes) that nothing in it feeds."""
    found, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        ups = [a for a in n.all_input_nodes if a.name in inside]
        if not ups:
            found.add(n.name)
        stack.extend(ups)
    return found


def residual_stream(groups: ChannelGroups, group: Group) -> bool:
    """Does the group add up the outputs of different layers (a residual stream: a ResNet's block outputs,
    a transformer's hidden states)? Not: several producers multiplied (SwiGLU's gate and up), the q/k/v
    rows of attention heads, or a tensor added to a function of itself (RoPE's ``q cos + rot(q) sin``)."""
    inside = set(group.nodes)
    nodes = {n.name: n for n in groups.gm.graph.nodes if n.name in inside}
    for node in nodes.values():
        if node.op != "call_function" or node.target not in _ADDS:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.name in inside]
        if len(operands) == 2:
            left, right = (_roots(a, inside) for a in operands)
            if left and right and not left & right:
                return True
    return False


def mean_scale(values: dict[Any, np.ndarray]) -> float:
    """The mean over every channel of ``values`` (one array per BatchNorm or group); 1 when there is none."""
    return float(np.mean(np.concatenate(list(values.values())))) if values else 1.0


def rescaled_l1(groups: ChannelGroups, group: Group, tensor: Callable[[str], torch.Tensor], mean: float) -> np.ndarray:
    """The fallback score of a group without a BatchNorm: the L1 norm of its producing filters
    (``producer_l1``), rescaled so that the group's mean is ``mean``."""
    total = producer_l1(groups, group, tensor)
    return total * mean / max(float(total.mean()), 1e-12)


@dataclass(frozen=True)
class LearnedScales(Pass):
    """Base of slimming and scratch (see the module docstring)."""

    scope = "global"
    normalize = "none"
    needs = ("train_loader",)

    def train_loader(self, ctx: PassContext, purpose: str) -> Any:
        """The user's ``train_loader``; an error saying what the pass needs it ``purpose`` for when absent."""
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError(f"{self.name} needs train_loader= {purpose}")
        return loader
