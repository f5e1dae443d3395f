"""Coupling rules as a table: ``RULES[op] = Rule(couple, rewrite)``.

``couple(node, ctx)`` says how positions on the node's input axes map to its output axes (see
``fxprune.analysis.couple.Coupler``). ``rewrite(node, r)`` runs at compaction and fixes the node's
literal arguments (shapes, split sizes, slice bounds, group counts) from the new sizes; ``r`` is a
``fxprune.compaction.resize.Resizer``. An op missing from the table freezes every axis it touches.

Add support for an op: write a small function in the module of its family and register it with
``@rule(aten.op.overload, ...)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "RULES", "rule", "IGNORED"]


@dataclass(frozen=True)
class Rule:
    couple: Callable[..., None]
    rewrite: Callable[..., None] | None = None


RULES: dict[Any, Rule] = {}

# Ops with no tensor output that carry no channels (assertions, symbolic-size bookkeeping).
IGNORED: set[Any] = set()


def rule(*targets: Any, rewrite: Callable[..., None] | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``fn`` as the coupling rule of every op in ``targets``."""
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        for t in targets:
            if t is None:
                continue
            RULES[t] = Rule(fn, rewrite)
        return fn
    return deco


def ops(*names: str) -> list[Any]:
    """Resolve 'aten.name.overload' strings to OpOverloads, skipping ones this torch version lacks."""
    import torch

    out = []
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        target = getattr(packet, overload, None) if packet is not None else None
        if target is not None:
            out.append(target)
    return out


def _load() -> None:
    # Importing the families fills RULES.
    from . import attention, elementwise, layers, norm, reduce, shape  # noqa: F401


_load()
