"""What every stage decides, written onto the traced graph: the one module that defines the ``fxprune.*``
metadata keys and the one writer of each.

On every node (``node.meta``), for the channel groups that touch its outputs:

    fxprune.groups     {(output, axis): (group ids,)}         analysis   (write_groups)
    fxprune.frozen     {group id: why it cannot shrink}       analysis   (write_groups)
    fxprune.scores     {pass name: {group id: score per channel}}   the score stage (write_scores)
    fxprune.masks      {pass name: {group id: mask per channel}}    a pass that learns masks (write_masks)
    fxprune.selection  {group id: kept channel positions}     the select stage, then compaction (write_selection)

On the graph (``gm.meta``), written by tracing: ``fxprune.example_inputs``, ``fxprune.frontend``,
``fxprune.recorded_on_meta``.

Compaction reads the selection back from the graph (``read_selection``), so what a node shows is what was
applied. ``dump(gm)`` prints every node with its annotations (``fxprune inspect MODEL --graph``); a pass
author can read any key from ``ctx.gm`` (the graph they score) or ``result.groups.gm`` after a run.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.fx as fx

if TYPE_CHECKING:
    from .analysis.groups import ChannelGroups

__all__ = ["GROUPS", "FROZEN", "SCORES", "MASKS", "SELECTION", "EXAMPLE_INPUTS", "FRONTEND", "RECORDED_ON_META",
           "write_groups", "write_scores", "write_masks", "write_selection", "read_selection", "dump"]

GROUPS = "fxprune.groups"
FROZEN = "fxprune.frozen"
SCORES = "fxprune.scores"
MASKS = "fxprune.masks"
SELECTION = "fxprune.selection"
EXAMPLE_INPUTS = "fxprune.example_inputs"    # gm.meta: the example inputs the graph was traced with
FRONTEND = "fxprune.frontend"                # gm.meta: which front end traced it
RECORDED_ON_META = "fxprune.recorded_on_meta"  # gm.meta: True when recorded on meta copies of real weights
NODE_KEYS = (GROUPS, FROZEN, SCORES, MASKS, SELECTION)


def write_groups(gm: fx.GraphModule, axes: Mapping[str, dict[tuple[int, int], tuple[int, ...]]],
                 frozen: Mapping[int, str]) -> None:
    """Analysis: each node's ``{(output, axis): (group ids,)}`` and the reasons of the frozen groups among
    them. Clears what earlier runs decided on this graph (scores, masks, selection belong to one analysis)."""
    for node in gm.graph.nodes:
        found = dict(axes.get(node.name, {}))
        for key in NODE_KEYS:
            node.meta.pop(key, None)
        node.meta[GROUPS] = found
        node.meta[FROZEN] = {g: frozen[g] for g in _groups_of(node) if g in frozen}


def _groups_of(node: fx.Node) -> list[int]:
    return sorted({g for ids in node.meta.get(GROUPS, {}).values() for g in ids})


def _per_node(gm: fx.GraphModule, key: str, values: Mapping[int, Any], label: str | None) -> None:
    for node in gm.graph.nodes:
        mine = {g: values[g] for g in _groups_of(node) if g in values}
        if label is None:
            node.meta[key] = mine
        elif mine:
            node.meta.setdefault(key, {})[label] = mine


def write_scores(gm: fx.GraphModule, pass_name: str, scores: Mapping[int, np.ndarray]) -> None:
    """The score stage: one pass's scores, per channel of every group it scored."""
    _per_node(gm, SCORES, {g: np.asarray(s, dtype=np.float64) for g, s in scores.items()}, pass_name)


def write_masks(gm: fx.GraphModule, pass_name: str, masks: Mapping[int, np.ndarray]) -> None:
    """A pass that learns a mask per channel (gates): its final values, per group."""
    _per_node(gm, MASKS, {g: np.asarray(m, dtype=np.float64) for g, m in masks.items()}, pass_name)


def write_selection(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray) -> None:
    """The select stage (and compaction, when it had to keep a group whole): the kept channel positions of
    every prunable group, on every node the group touches."""
    kept = {g.id: np.flatnonzero(~removed[g.channels]) for g in groups.prunable}
    _per_node(gm, SELECTION, kept, None)


def read_selection(gm: fx.GraphModule, groups: ChannelGroups) -> np.ndarray:
    """The removal written on the graph, as a bool per channel (what compaction applies)."""
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    seen: set[int] = set()
    for node in gm.graph.nodes:
        for g, kept in node.meta.get(SELECTION, {}).items():
            if g in seen:
                continue
            seen.add(g)
            drop = np.ones(len(groups[g]), dtype=bool)
            drop[kept] = False
            removed[groups[g].channels[drop]] = True
    return removed


def dump(gm: fx.GraphModule, *, width: int = 8) -> str:
    """Every node with what the stages decided there: groups per axis, frozen reasons, scores, masks, kept."""
    lines = []
    for node in gm.graph.nodes:
        groups = node.meta.get(GROUPS, {})
        if not groups:
            continue
        axes = ", ".join(f"{f'out{k}.' if k else ''}axis{a}->{'+'.join(f'g{g}' for g in ids)}"
                         for (k, a), ids in sorted(groups.items()))
        lines.append(f"{node.name} ({_target(node)}): {axes}")
        for g, why in node.meta.get(FROZEN, {}).items():
            lines.append(f"    g{g} frozen: {why}")
        for name, per_group in node.meta.get(SCORES, {}).items():
            lines.extend(f"    g{g} {name} scores: {_short(s, width)}" for g, s in per_group.items())
        for name, per_group in node.meta.get(MASKS, {}).items():
            lines.extend(f"    g{g} {name} mask: {_short(m, width)}" for g, m in per_group.items())
        for g, kept in node.meta.get(SELECTION, {}).items():
            lines.append(f"    g{g} kept: {_short(kept, width, '{:d}')}")
    return "\n".join(lines)


def _target(node: fx.Node) -> str:
    t = node.target
    return str(t) if node.op == "call_function" else f"{node.op} {t}"


def _short(values: Any, width: int, fmt: str = "{:.3g}") -> str:
    v = list(np.asarray(values).tolist())
    text = ", ".join(fmt.format(x) for x in v[:width])
    return f"[{text}{', ...' if len(v) > width else ''}] ({len(v)})"
