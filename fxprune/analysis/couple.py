"""The context a coupling rule writes into: links between elements, frozen slots, roles, exactness.

A rule is a plain function ``rule(node, coupler)``. It may
- ``link`` element ids of two slots (positions removed together),
- ``freeze`` a slot (its positions can never be removed) with a reason,
- mark a slot ``inexact`` (zeroing its pruned positions is not the same as removing them: a mean,
  softmax or normalisation over that axis),
- give a parameter slot a ``role`` (producer / consumer / norm), which scoring passes read,
- say whether pruned positions of an output slot are exactly zero in the masked model (``set_zero``),
  so that contractions over them (matmul, sum) can be proven exact.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.tracing.compat import is_op_overload

from .slots import SlotKey, SlotTable, tensor_values

__all__ = ["Coupler", "TensorRef", "UnsupportedOpWarning"]


class UnsupportedOpWarning(UserWarning):
    """An op without a coupling rule: the channels it touches are frozen."""


@dataclass(frozen=True)
class TensorRef:
    """One tensor value in the graph: a node and which of its outputs."""

    node: fx.Node
    k: int = 0

    @property
    def val(self) -> torch.Tensor:
        v = self.node.meta.get("val")
        if self.k == 0 and isinstance(v, torch.Tensor):  # the common case, without building a list
            return v
        return tensor_values(self.node)[self.k]

    @property
    def ndim(self) -> int:
        return self.val.dim()

    def key(self, axis: int) -> SlotKey:
        return (self.node.name, self.k, axis % max(self.ndim, 1))


def as_ref(x: Any) -> TensorRef | None:
    """A TensorRef for a node argument that holds a tensor, else None."""
    if isinstance(x, TensorRef):
        return x
    if isinstance(x, fx.Node):
        vals = tensor_values(x)
        if len(vals) == 1 and vals[0] is not None and isinstance(x.meta.get("val"), torch.Tensor):
            return TensorRef(x, 0)
    return None


@dataclass
class Coupler:
    table: SlotTable
    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    # whole-axis identity links (slot index pairs of equal size): nine in ten links of a typical graph,
    # kept as pairs and contracted before the element-level components (no element arrays for them)
    same: list[tuple[int, int]] = field(default_factory=list)
    frozen: dict[SlotKey, str] = field(default_factory=dict)
    frozen_elements: list[tuple[np.ndarray, str]] = field(default_factory=list)
    inexact: dict[SlotKey, str] = field(default_factory=dict)
    roles: dict[SlotKey, str] = field(default_factory=dict)
    zero: dict[SlotKey, bool] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)  # op -> first node
    facts: dict[str, dict[str, bool]] = field(default_factory=dict)  # memoised value facts (e.g. "nonneg")
    node: fx.Node | None = None  # the node whose rule is running (for messages)

    # ---- reading ---------------------------------------------------------------------------
    def shape(self, x: Any) -> tuple[int, ...]:
        ref = as_ref(x)
        if ref is None:
            return ()
        t, name, k = self.table, ref.node.name, ref.k
        return tuple(t.sizes[t.index[(name, k, a)]] for a in range(ref.ndim))

    def el(self, x: Any, axis: int) -> np.ndarray:
        ref = as_ref(x)
        return self.table.elements(ref.key(axis))

    def symbolic(self, x: Any, axis: int) -> bool:
        """Is this axis a plain symbolic size (the batch)? Such an axis never carries a channel."""
        ref = as_ref(x)
        return ref is not None and self.table.symbolic[self.table.index[ref.key(axis)]]

    def is_zero(self, x: Any, axis: int) -> bool:
        ref = as_ref(x)
        return ref is not None and self.zero.get(ref.key(axis), False)

    # ---- writing ---------------------------------------------------------------------------
    def link(self, a: np.ndarray, b: np.ndarray) -> None:
        assert len(a) == len(b), (self.node, len(a), len(b))
        if len(a):
            self.edges_a.append(a)
            self.edges_b.append(b)

    def link_axes(self, x: Any, ax: int, y: Any, ay: int) -> None:
        """Identity link between two axes; if their sizes differ (e.g. broadcasting) freeze both."""
        rx, ry = as_ref(x), as_ref(y)
        if rx is None or ry is None:
            return
        kx, ky = rx.key(ax), ry.key(ay)
        sx, sy = self.table.size(kx), self.table.size(ky)
        if sx == sy:
            if sx:
                self.same.append((self.table.index[kx], self.table.index[ky]))
        elif sx != 1 and sy != 1:
            self.freeze(rx, ax, "size mismatch")
            self.freeze(ry, ay, "size mismatch")

    def freeze(self, x: Any, axis: int | None = None, reason: str = "") -> None:
        ref = as_ref(x)
        if ref is None:
            return
        axes = range(ref.ndim) if axis is None else [axis]
        for a in axes:
            self.frozen.setdefault(ref.key(a), reason or f"{_op_name(self.node)} cannot shrink this axis")

    def freeze_elements(self, ids: np.ndarray, reason: str) -> None:
        self.frozen_elements.append((ids, reason))

    def mark_inexact(self, x: Any, axis: int, reason: str) -> None:
        ref = as_ref(x)
        if ref is not None:
            self.inexact.setdefault(ref.key(axis), reason)

    def role(self, x: Any, axis: int, role: str) -> None:
        ref = as_ref(x)
        if ref is not None and ref.node.op == "get_attr":
            self.roles.setdefault(ref.key(axis), role)

    def set_zero(self, x: Any, axis: int, value: bool) -> None:
        ref = as_ref(x)
        if ref is not None:
            self.zero[ref.key(axis)] = bool(value)

    def unknown(self, node: fx.Node) -> None:
        """No rule for this op: freeze every axis it touches and warn once per op."""
        name = _op_name(node)
        if name not in self.unsupported:
            self.unsupported[name] = node.name
            warnings.warn(
                f"fxprune: no coupling rule for {name} (first at node {node.format_node()}); "
                "the channels it touches are frozen",
                UnsupportedOpWarning, stacklevel=2,
            )
        reason = f"no rule for {name}"
        for arg in node.all_input_nodes:
            self.freeze(arg, None, reason)
        for k, v in enumerate(tensor_values(node)):
            if v is not None:
                self.freeze(TensorRef(node, k), None, reason)


def _op_name(node: fx.Node | None) -> str:
    if node is None:
        return "?"
    t = node.target
    return str(t) if is_op_overload(t) else getattr(t, "__name__", str(t))
