"""Building the coupling: every node's rule run over the traced graph (``couple_graph``), then the channels as
connected components of the links (``components``), identity links contracted per slot first."""
from __future__ import annotations

import warnings

import numpy as np
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..state import named_tensors
from .couple import Coupler, TensorRef, UnsupportedOpWarning, as_ref
from .rules import IGNORED, RULES
from .slots import SlotTable, index_dtype, tensor_values

__all__ = ["couple_graph", "components"]


def _original_names(gm: fx.GraphModule) -> set[str]:
    return set(named_tensors(gm))


def _flatten_output(args: object) -> list[fx.Node]:
    out: list[fx.Node] = []
    stack = [args]
    while stack:
        a = stack.pop()
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return out


def couple_graph(gm: fx.GraphModule) -> Coupler:
    """Run every node's coupling rule; the unknown and the failing freeze what they touch."""
    coupler = Coupler(SlotTable.build(gm.graph))
    state = _original_names(gm)
    first_attr: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        coupler.node = node
        if node.op == "placeholder":
            coupler.freeze(node, None, "model input")
            for k in range(1, len(tensor_values(node))):
                coupler.freeze(TensorRef(node, k), None, "model input")
        elif node.op == "get_attr":
            ref = as_ref(node)
            if ref is None:
                continue
            for a in range(ref.ndim):
                coupler.set_zero(ref, a, node.target in state)
            twin = first_attr.setdefault(node.target, node)
            if twin is not node:  # one parameter read twice: the same positions
                for a in range(ref.ndim):
                    coupler.link_axes(twin, a, node, a)
        elif node.op == "output":
            for n in _flatten_output(node.args):
                for k, v in enumerate(tensor_values(n)):
                    if v is not None:
                        coupler.freeze(TensorRef(n, k), None, "model output")
        elif node.op == "call_function" and node.target in IGNORED:
            continue
        elif node.op == "call_function" and node.target in RULES:
            try:
                RULES[node.target].couple(node, coupler)
            except Exception as exc:  # noqa: BLE001 - a rule bug must cost channels, never correctness
                warnings.warn(f"fxprune: coupling rule for {node.target} failed on {node.format_node()}: {exc!r}; "
                              "its channels are frozen", UnsupportedOpWarning, stacklevel=2)
                coupler.unknown(node)
        elif tensor_values(node):
            coupler.unknown(node)
    coupler.node = None
    return coupler


def components(coupler: Coupler) -> np.ndarray:
    """The component (channel) label of every element id.

    Whole-axis identity links (``coupler.same``) are contracted first, per slot: each class of identical
    slots is represented by its first slot, so only the other links are expanded to element pairs, on
    the representatives' elements. Same labels as linking every element, at a tenth of the edges."""
    t = coupler.table
    nslots = len(t.keys)
    offsets = np.asarray(t.offsets, dtype=np.int64)
    sizes = np.asarray(t.sizes, dtype=np.int64)
    rep = _first_of_class(nslots, coupler.same)
    is_rep = rep == np.arange(nslots)
    rep_sizes = np.where(is_rep, sizes, 0)
    compact_off = np.cumsum(rep_sizes) - rep_sizes
    shift = compact_off[rep] - offsets  # element e of slot s -> e + shift[s] among the representatives'
    n = int(rep_sizes.sum())
    if coupler.edges_a:
        a = np.concatenate(coupler.edges_a)
        b = np.concatenate(coupler.edges_b)
        a += shift[np.searchsorted(offsets, a, side="right") - 1]
        b += shift[np.searchsorted(offsets, b, side="right") - 1]
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
        del a, b
        _, small = connected_components(graph, directed=False)
    else:
        small = np.arange(n)
    ids = index_dtype(max(t.total, n))
    where = np.repeat(shift.astype(ids), sizes)  # element -> its position among the representatives' elements
    where += np.arange(t.total, dtype=ids)
    return small.astype(index_dtype(n), copy=False)[where]


def _first_of_class(nslots: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """For each slot, the lowest slot index it is identity-linked to (itself when none)."""
    if not pairs:
        return np.arange(nslots, dtype=np.int64)
    p = np.asarray(pairs, dtype=np.int64)
    graph = coo_matrix((np.ones(len(p), dtype=np.int8), (p[:, 0], p[:, 1])), shape=(nslots, nslots)).tocsr()
    _, cls = connected_components(graph, directed=False)
    first = np.full(int(cls.max()) + 1, nslots, dtype=np.int64)
    np.minimum.at(first, cls, np.arange(nslots, dtype=np.int64))
    return first[cls]
