"""The op registry: ``RULES[op]`` is an ``OpRecord``, everything fxprune knows about one ATen op.

- ``couple(node, coupler)``: how positions on the node's input axes map to its output axes, which axes
  it freezes, where removal is not zeroing (``fxprune.analysis.couple.Coupler``);
- ``rewrite(node, r)``: at compaction (and widening), fix the node's literal arguments (shapes, split
  sizes, slice bounds, group counts) from the new sizes; ``r`` is a
  ``fxprune.analysis.reindex.Reindexing``;
- ``cost(node, shape)``: its multiply-adds, ``shape`` giving the (new) shape of any tensor of the graph
  (``fxprune.selection.cost``); no cost: free;
- ``roles``: what other stages need to know about its arguments (``Role`` below: a kernel, a
  normalisation, a state update...);
- ``cases``: a more specific coupling rule for some calls of the op (``@rule(op, when=...)``), tried
  before the general one: a batch norm in training mode, or on a weight, reduces over the batch.

An op missing from the table freezes every axis it touches. Add support for an op: one ``@rule(...)``
on its coupling function, in the module of its family, with everything else about it::

    @rule(*ops("aten.conv2d.default"), rewrite=_conv_rewrite, cost=conv_macs, roles={Role.KERNEL})
    def conv(node, coupler): ...

Importing this package imports the families and ``fxprune.analysis`` (numpy, scipy, torch.fx), never a
tracing front end; the tracing modules that read roles look them up on first use, not on import.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.fx as fx

    from fxprune.analysis.reindex import Reindexing

    from ..couple import Coupler, TensorRef

    Shape = Callable[[TensorRef], tuple[int, ...]]  # a tensor's shape under the selection a cost is counted for
    Couple = Callable[[fx.Node, Coupler], None]
    Rewrite = Callable[[fx.Node, Reindexing], None]
    Cost = Callable[[fx.Node, Shape], int]

__all__ = ["OpRecord", "Role", "RULES", "rule", "ops", "ops_with_role", "IGNORED"]


class Role(str, Enum):
    """Facts about an op's arguments that stages other than the analysis read."""

    KERNEL = "kernel"  # ``weight`` is a conv/linear kernel (kaiming init), ``bias`` takes 1/sqrt(fan_in) (recovery)
    NORM = "norm"  # ``weight``/``bias`` are a normalisation's scale and shift, ``running_*`` its statistics (recovery)
    SLOPE = "slope"  # argument 1 is a PReLU's learned negative slope (recovery)
    STATE_UPDATE = "state update"  # writes ``running_mean``/``running_var`` when its ``training`` (or
    #   ``use_input_stats``) flag is set, though its schema does not say so: the recording front end refuses it then
    SHAPE_OF_INPUT = "shape of input"  # a normalisation whose output has its input's shape and dtype: shaped on
    #   meta, not run (its meta kernel is Python), after checking ``weight``/``bias``/``running_*`` (tracing.meta_norms)


@dataclass(frozen=True)
class Case:
    """A coupling rule for the calls of an op where ``when(node)`` holds."""

    when: Callable[[fx.Node], bool]
    couple: Couple


@dataclass(frozen=True)
class OpRecord:
    """What fxprune knows about one op: see the module docstring."""

    rule: Couple
    rewrite: Rewrite | None = None
    cost: Cost | None = None
    roles: frozenset[Role] = frozenset()
    cases: tuple[Case, ...] = ()

    def couple(self, node: fx.Node, coupler: Coupler) -> None:
        """Run the first case that matches the node, else the general rule."""
        for case in self.cases:
            if case.when(node):
                case.couple(node, coupler)
                return
        self.rule(node, coupler)


RULES: dict[Any, OpRecord] = {}

# Ops with no tensor output that carry no channels (assertions, symbolic-size bookkeeping).
IGNORED: set[Any] = set()


def rule(*targets: Any, rewrite: Rewrite | None = None, cost: Cost | None = None, roles: Iterable[Role] = (),
         when: Callable[[fx.Node], bool] | None = None) -> Callable[[Couple], Couple]:
    """Register ``fn`` as the coupling rule of every op in ``targets``, with the op's rewrite, cost and
    roles. With ``when``: ``fn`` couples only the calls where ``when(node)`` holds, as a case of the
    op's record (registered before it, with everything else)."""
    roles = frozenset(Role(r) for r in roles)
    if when is not None and (rewrite is not None or cost is not None or roles):
        raise ValueError("a case (when=...) only couples: rewrite, cost and roles belong to the op's record")

    def deco(fn: Couple) -> Couple:
        for t in targets:
            if t is None:
                continue
            if when is None:
                RULES[t] = OpRecord(fn, rewrite, cost, roles)
            elif t not in RULES:
                raise KeyError(f"{t}: register its record before a case of it")
            else:
                RULES[t] = replace(RULES[t], cases=RULES[t].cases + (Case(when, fn),))
        return fn
    return deco


def ops_with_role(role: Role) -> frozenset[Any]:
    """Every registered op that has ``role``."""
    role = Role(role)
    return frozenset(op for op, record in RULES.items() if role in record.roles)


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
