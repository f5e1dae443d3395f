"""Channel positions as integers: every axis of every tensor in the graph gets a block of element ids.

A *slot* is one axis of one tensor value: ``(node name, output index, axis)``. Its elements are the
positions along that axis. Coupling rules link elements of different slots ("these positions must
be removed together"); the connected components of that relation are the removable *channels*.
Working element-wise (and not axis-wise) is what lets one mechanism express concat offsets,
split ranges, per-head blocks, grouped convolutions and permutations exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

__all__ = ["SlotKey", "SlotTable", "tensor_values", "size_hint", "concrete_factor", "index_dtype"]

SlotKey = tuple[str, int, int]  # (node name, output index, axis)


def index_dtype(n: int) -> type:
    """The narrowest integer type for ids below ``n``: int32 halves every per-element array of the
    analysis (a graph's elements are counted in the hundreds of thousands, rarely billions)."""
    return np.int32 if n < 2**31 else np.int64


def size_hint(s: Any) -> tuple[int, bool]:
    """(concrete size, is_symbolic) for an int or SymInt dimension."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint if s.node.has_hint() else None
        return (int(hint) if hint is not None else 1), True
    return int(s), False


def concrete_factor(s: Any) -> int:
    """For a size ``c * s0`` (an integer times one symbol, e.g. ``batch * heads`` when a model folds
    its heads into the batch axis): ``c``. 1 for a plain symbol or any other expression, and for ints
    the int itself."""
    if not isinstance(s, torch.SymInt):
        return int(s)
    import sympy

    expr = s.node.expr
    if isinstance(expr, sympy.Mul) and len(expr.free_symbols) == 1:
        coeff, rest = expr.as_coeff_Mul()
        if isinstance(rest, sympy.Symbol) and coeff.is_Integer and int(coeff) > 1:
            return int(coeff)
    return 1


def tensor_values(node: fx.Node) -> list[Any]:
    """The tensor outputs of a node, by output index (a non-tensor output is None)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return []


@dataclass
class SlotTable:
    """Element-id ranges for all slots of a graph, plus per-slot flags written by the rules."""

    keys: list[SlotKey] = field(default_factory=list)
    index: dict[SlotKey, int] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    symbolic: list[bool] = field(default_factory=list)  # a symbolic size with no concrete factor: frozen
    total: int = 0

    @classmethod
    def build(cls, graph: fx.Graph) -> "SlotTable":
        table = cls()
        for node in graph.nodes:
            for k, val in enumerate(tensor_values(node)):
                if val is None:
                    continue
                for axis, dim in enumerate(val.shape):
                    hint, symbolic = size_hint(dim)
                    # batch * heads keeps its head factor prunable (the reshape rules never carry
                    # channels on the symbolic factor); any other symbolic size is frozen
                    table._add((node.name, k, axis), hint, symbolic and concrete_factor(dim) == 1)
        return table

    def _add(self, key: SlotKey, size: int, symbolic: bool) -> None:
        self.index[key] = len(self.keys)
        self.keys.append(key)
        self.offsets.append(self.total)
        self.sizes.append(size)
        self.symbolic.append(symbolic)
        self.total += size

    def has(self, key: SlotKey) -> bool:
        return key in self.index

    def elements(self, key: SlotKey) -> np.ndarray:
        i = self.index[key]
        return np.arange(self.offsets[i], self.offsets[i] + self.sizes[i], dtype=np.int64)

    def size(self, key: SlotKey) -> int:
        return self.sizes[self.index[key]]

    def slot_of_elements(self) -> np.ndarray:
        """For each element id, the index of its slot."""
        return np.repeat(np.arange(len(self.keys), dtype=index_dtype(len(self.keys))), self.sizes)
