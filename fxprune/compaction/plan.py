"""The plan: for every parameter or buffer that shrinks, the kept indices per dimension.

Slicing is a pure function of (plan, tensor name, tensor), so a checkpoint can be compacted tensor
by tensor without the model in memory.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.reindex import Reindexing

from ..state import named_tensors

__all__ = ["Plan", "build_plan", "slice_tensor", "apply_plan", "add_aliases"]

Plan = dict[str, dict[int, list[int]]]


def build_plan(gm: fx.GraphModule, reindexing: Reindexing) -> Plan:
    """Kept indices for every get_attr tensor (parameter, buffer or constant) that loses positions."""
    plan: Plan = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        entry = {}
        for axis in range(node.meta["val"].dim()):
            kept = reindexing.kept_slot((node.name, 0, axis))
            if kept is not None:
                entry[axis] = kept.tolist()
        if entry:
            plan[node.target] = entry
    return plan


def slice_tensor(entry: dict[int, list[int]] | None, tensor: torch.Tensor) -> torch.Tensor:
    """The kept part of ``tensor`` (a new, contiguous tensor; ``tensor`` itself is untouched)."""
    out = tensor
    for dim, kept in sorted((entry or {}).items()):
        out = out.index_select(int(dim), torch.as_tensor(np.asarray(kept, dtype=np.int64), device=tensor.device))
    return out.contiguous() if out is not tensor else tensor.detach().clone()


def apply_plan(plan: Plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return slice_tensor(plan.get(name), tensor)


def add_aliases(plan: Plan, model: torch.nn.Module) -> Plan:
    """Tied weights: every name under which a planned tensor is reachable gets the same entry."""
    by_id: dict[int, list[str]] = {}
    for name, t in named_tensors(model).items():
        by_id.setdefault(id(t), []).append(name)
    out = dict(plan)
    for names in by_id.values():
        hit = next((n for n in names if n in plan), None)
        if hit is not None:
            for n in names:
                out.setdefault(n, plan[hit])
    return out
