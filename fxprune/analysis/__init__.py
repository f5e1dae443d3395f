"""Dependency analysis: a traced graph -> groups of channels that must shrink together.

    slots.py   every axis of every tensor gets a range of element ids
    build.py   every node's rule run over the graph; channels as connected components of the links
    rules/     one small coupling function per op family, looked up by ATen op (the table)
    couple.py  what a rule may write: links, frozen axes, roles, exactness
    groups.py  connected components -> channels -> groups, and the printable table
    reindex.py a selection read per slot: the positions each tensor axis keeps (or repeats), new sizes
"""
from __future__ import annotations

import torch.fx as fx

from ..annotations import write_groups
from .build import components, couple_graph
from .couple import UnsupportedOpWarning
from .groups import ChannelGroups, Group, ParamSlot

__all__ = ["analyze", "couple_graph", "ChannelGroups", "Group", "ParamSlot", "UnsupportedOpWarning"]


def analyze(gm: fx.GraphModule, *, allow_inexact: bool = False) -> ChannelGroups:
    """Group the channels of a traced graph (from ``fxprune.tracing.tracer``) that must shrink together.

    ``allow_inexact``: also make prunable the groups where removing a channel is not the same as
    zeroing it (a LayerNorm, mean or softmax over the pruned axis). Off by default: every
    compaction is then exactly equivalent to the masked model.
    """
    coupler = couple_graph(gm)
    labels = components(coupler)
    coupler.edges_a, coupler.edges_b, coupler.same = [], [], []  # no reader after this: not kept with the groups
    groups = ChannelGroups(gm, coupler, labels, allow_inexact)
    write_groups(gm, groups.node_axes(), groups.frozen_reasons())
    return groups
