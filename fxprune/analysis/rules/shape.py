"""Shape ops: views, permutations, concat/split/slice, expand. Their literal sizes are rewritten at compaction."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..reshape import atoms, carrier_axis, reshape_chunks
from ..schema import bind, set_arg
from ..slots import size_hint
from . import ops, rule

# ---------------------------------------------------------------------------------------------
# rewrites shared by the shape family


def _is_literal(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scaled_symbol(node: fx.Node, entry: Any, old: int, new: int) -> Any:
    """A size computed as ``symbol * c`` (``batch * heads``): a new ``symbol * c'`` node with
    ``c' = c * new / old`` (the shared original node is left to the other ops that read it)."""
    if not isinstance(entry, fx.Node) or entry.target is not operator.mul or old == new:
        return entry
    sym, c = entry.args
    if isinstance(sym, int):
        sym, c = c, sym
    if not _is_literal(c) or (c * new) % old:
        raise ValueError(f"cannot rescale {entry.format_node()} from {old} to {new}")
    with node.graph.inserting_before(node):
        return node.graph.call_function(operator.mul, (sym, c * new // old))


def shape_arg(name: str, start: int = 0):
    """Rewrite: list argument ``name`` holds the output's sizes from axis ``start``; refresh its literals
    (and ``batch * c`` products whose concrete factor shrinks)."""
    def rewrite(node: fx.Node, r: Any) -> None:
        b = bind(node)
        old = list(b[name])
        before = r.old_shape(TensorRef(node))[start:start + len(old)]
        new = r.new_shape(TensorRef(node))[start:start + len(old)]
        set_arg(node, name, [n if _is_literal(o) and o != -1 else _scaled_symbol(node, o, p, n)
                             for o, p, n in zip(old, before, new)])
    return rewrite


def _unflatten_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    dim = b["dim"] % r.old_ndim(as_ref(b["self"]))
    shape_arg("sizes", dim)(node, r)


# ---------------------------------------------------------------------------------------------
# reshape: match input and output axes into chunks of equal product (the algebra: ..reshape)


def _transpose_dims(node: fx.Node, ndim: int) -> tuple[int, int]:
    b = bind(node)
    d0, d1 = (b["dim0"], b["dim1"]) if "dim0" in b else (b.get("axis0", 0), b.get("axis1", 1))
    return d0 % ndim, d1 % ndim


def _follow_axes(u: fx.Node, axes: list[int | None]) -> list[int | None] | None:
    """Where the original axes sit after a pure re-layout op ``u`` (None: not such an op)."""
    if u.target in _PERMUTE:
        return [axes[d % len(axes)] for d in bind(u)["dims"]]
    if u.target in _TRANSPOSE:
        d0, d1 = _transpose_dims(u, len(axes))
        nxt = list(axes)
        nxt[d0], nxt[d1] = nxt[d1], nxt[d0]
        return nxt
    if u.target in _CONTIGUOUS:
        return axes
    if u.target in _UNSQUEEZE:
        d = bind(u)["dim"] % (len(axes) + 1)
        return axes[:d] + [None] + axes[d:]
    if u.target in _SQUEEZE_DIM:
        d = bind(u)["dim"]
        dims = {x % len(axes) for x in ([d] if isinstance(d, int) else d)}
        shape = u.args[0].meta["val"].shape
        return [a for i, a in enumerate(axes) if not (i in dims and shape[i] == 1)]
    return None


def _selected_axes(node: fx.Node) -> set[int]:
    """Axes of ``node``'s output that some user picks apart (select/unbind/index) after pure re-layouts."""
    picked: set[int] = set()
    stack: list[tuple[fx.Node, list[int | None]]] = [(node, list(range(len(node.meta["val"].shape))))]
    while stack:
        n, axes = stack.pop()  # axes[i] = original axis now at position i
        for u in n.users:
            if u.target in _PICKERS:
                a = axes[bind(u).get("dim", 0) % len(axes)]
                if a is not None:
                    picked.add(a)
                continue
            nxt = _follow_axes(u, axes)
            if nxt is not None:
                stack.append((u, nxt))
    return picked


def _merged_back(node: fx.Node, split: list[int]) -> int | None:
    """If the axes ``split`` of ``node``'s output are merged again by a later reshape (after pure
    re-layouts, e.g. a channel shuffle's view -> transpose -> reshape), the one that merge will take
    as its carrier (its outermost real axis): both reshapes must agree, or every position freezes."""
    stack: list[tuple[fx.Node, list[int | None]]] = [(node, list(range(len(node.meta["val"].shape))))]
    while stack:
        n, axes = stack.pop()
        for u in n.users:
            if u.target in _RESHAPES and u.args[0] is n:
                a = [size_hint(s)[0] for s in n.meta["val"].shape]
                try:
                    chunks = reshape_chunks(a, [size_hint(s)[0] for s in u.meta["val"].shape])
                except ValueError:
                    continue
                for ia, jb in chunks:
                    real = [axes[i] for i in ia if a[i] > 1]
                    if len(jb) == 1 and len(real) > 1 and set(real) <= set(split):
                        return real[0]
                continue
            nxt = _follow_axes(u, axes)
            if nxt is not None:
                stack.append((u, nxt))
    return None


def _link_factorisation(coupler: Coupler, flat: TensorRef, flat_axis: int, multi: TensorRef, axes: list[int],
                        carrier: int | None, why: str) -> None:
    """flat axis == product of ``axes`` of ``multi``; positions follow the carrier axis in blocks."""
    sizes = coupler.shape(multi)
    for x in axes:
        if x != carrier:
            coupler.freeze(multi, x, why)
    if carrier is None:
        coupler.freeze(flat, flat_axis, why)
        return
    inner = math.prod(sizes[x] for x in axes if x > carrier)
    f = np.arange(coupler.shape(flat)[flat_axis])
    coupler.link(coupler.el(flat, flat_axis), coupler.el(multi, carrier)[(f // inner) % sizes[carrier]])


def _link_mixed(coupler: Coupler, x: TensorRef, ia: list[int], out: TensorRef, jb: list[int], avoid: set[int]) -> bool:
    """A chunk that splits and merges at once, e.g. ``(batch, heads * dim) -> (batch * heads, dim)``
    (nn.MultiheadAttention folds its heads into the batch). Cut the flat range into atoms (the
    common refinement of both shapes); each axis carries its channel on its outermost real atom that
    is not the batch; an input and an output axis with the same carrier atom are linked by that
    atom's value, every other axis is frozen. Exact by construction: a channel removes the same flat
    positions on both sides (those whose carrier-atom value it holds). False if the shapes do not nest."""
    a, b = [coupler.shape(x)[i] for i in ia], [coupler.shape(out)[j] for j in jb]
    points = atoms(a, b)
    if points is None:
        return False
    atom_size = {p: q // p for p, q in zip([1] + points, points)}  # atom = its inner stride -> its size

    def members(sizes: list[int], axes: list[int]) -> dict[int, tuple[int, list[int]]]:
        """axis -> (its inner stride, its atoms' inner strides, outermost first)."""
        found, stride = {}, 1
        for axis, n in reversed(list(zip(axes, sizes))):
            found[axis] = (stride, [p for p in sorted(atom_size, reverse=True) if stride <= p < stride * n])
            stride *= n
        return found

    def carrier(ref: TensorRef, axis: int, atoms: list[int]) -> int | None:
        """The axis's outermost real atom that is not the batch (None: it carries no channel here)."""
        if ref is out and axis in avoid:
            return None
        real = [p for p in atoms if atom_size[p] > 1 and p not in symbolic_atoms]
        return real[0] if real else None

    ins, outs = members(a, ia), members(b, jb)
    symbolic_atoms = {p for ref, axes in ((x, ins), (out, outs)) for axis, (_, atoms) in axes.items()
                      if coupler.symbolic(ref, axis) for p in atoms}
    in_carrier = {i: carrier(x, i, ins[i][1]) for i in ia}
    out_carrier = {j: carrier(out, j, outs[j][1]) for j in jb}
    linked_out: set[int] = set()
    for i, atom in in_carrier.items():
        j = next((j for j, c in out_carrier.items() if c is not None and c == atom), None)
        if atom is None or j is None:
            coupler.freeze(x, i, "reshape mixes axes")
            continue
        value = lambda n, stride, atom=atom: (np.arange(n) * stride // atom) % atom_size[atom]  # noqa: E731
        rep = coupler.el(out, j)[value(coupler.shape(out)[j], outs[j][0]) * (atom // outs[j][0])]
        coupler.link(coupler.el(x, i), coupler.el(out, j)[value(coupler.shape(x)[i], ins[i][0]) * (atom // outs[j][0])])
        coupler.link(coupler.el(out, j), rep)
        coupler.set_zero(out, j, coupler.is_zero(x, i))
        linked_out.add(j)
    for j in jb:
        if j not in linked_out:
            coupler.freeze(out, j, "reshape mixes axes")
    return True


def couple_reshape(node: fx.Node, coupler: Coupler, src: Any) -> None:
    x, out = as_ref(src), TensorRef(node)
    a, b = list(coupler.shape(x)), list(coupler.shape(out))
    try:
        chunks = reshape_chunks(a, b)
    except ValueError:
        coupler.freeze(x, None, "reshape with symbolic sizes")
        coupler.freeze(out, None, "reshape with symbolic sizes")
        return
    avoid = _selected_axes(node)
    batch_in = {i for i in range(len(a)) if coupler.symbolic(x, i)}  # the batch never carries a channel
    batch_out = {j for j in range(len(b)) if coupler.symbolic(out, j)}
    for ia, jb in chunks:
        if len(ia) == 1 and len(jb) == 1:
            coupler.link_axes(x, ia[0], out, jb[0])
            coupler.set_zero(out, jb[0], coupler.is_zero(x, ia[0]))
        elif len(jb) == 1 and ia:       # merge: in axes -> one out axis
            c = carrier_axis(a, ia, batch_in)
            _link_factorisation(coupler, out, jb[0], x, ia, c, "merged by a reshape (not the carrier)")
            coupler.set_zero(out, jb[0], c is not None and coupler.is_zero(x, c))
        elif len(ia) == 1 and jb:       # split: one in axis -> out axes
            c = carrier_axis(b, jb, avoid | batch_out, _merged_back(node, jb))
            _link_factorisation(coupler, x, ia[0], out, jb, c, "split by a reshape (not the carrier)")
            if c is not None:
                coupler.set_zero(out, c, coupler.is_zero(x, ia[0]))
        elif not _link_mixed(coupler, x, ia, out, jb, avoid):
            for i in ia:
                coupler.freeze(x, i, "reshape mixes axes")
            for j in jb:
                coupler.freeze(out, j, "reshape mixes axes")


def _view_size_rewrite(node: fx.Node, r: Any) -> None:
    # view names its argument "size", reshape "shape".
    shape_arg("size" if "size" in bind(node) else "shape")(node, r)


@rule(*ops("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"), rewrite=_view_size_rewrite)
def view(node: fx.Node, coupler: Coupler) -> None:
    couple_reshape(node, coupler, node.args[0])


@rule(*ops("aten.flatten.using_ints"))
def flatten(node: fx.Node, coupler: Coupler) -> None:
    couple_reshape(node, coupler, node.args[0])


@rule(*ops("aten.unflatten.int"), rewrite=_unflatten_rewrite)
def unflatten(node: fx.Node, coupler: Coupler) -> None:
    couple_reshape(node, coupler, node.args[0])


@rule(*ops("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.unsqueeze.default",
           "aten.squeeze_.dim", "aten.unsqueeze_.default"))
def squeeze(node: fx.Node, coupler: Coupler) -> None:
    couple_reshape(node, coupler, node.args[0])


# ---------------------------------------------------------------------------------------------
# permutations

_PERMUTE = set(ops("aten.permute.default"))
_TRANSPOSE = set(ops("aten.transpose.int", "aten.swapaxes.default"))
_CONTIGUOUS = set(ops("aten.contiguous.default", "aten.clone.default", "aten.alias.default"))
_PICKERS = set(ops("aten.select.int", "aten.unbind.int", "aten.index_select.default"))
_UNSQUEEZE = set(ops("aten.unsqueeze.default"))
_INDEX_SELECT = set(ops("aten.index_select.default"))
_ZEROS = set(ops("aten.zeros.default", "aten.new_zeros.default"))
_EXPAND_AS = set(ops("aten.expand_as.default"))
_SQUEEZE_DIM = set(ops("aten.squeeze.dim", "aten.squeeze.dims"))
_RESHAPES = set(ops("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                    "aten.flatten.using_ints"))


def _permute_link(coupler: Coupler, x: TensorRef, out: TensorRef, perm: list[int]) -> None:
    for i, p in enumerate(perm):
        coupler.link_axes(x, p, out, i)
        coupler.set_zero(out, i, coupler.is_zero(x, p))


@rule(*_PERMUTE)
def permute(node: fx.Node, coupler: Coupler) -> None:
    x = as_ref(node.args[0])
    _permute_link(coupler, x, TensorRef(node), [d % x.ndim for d in bind(node)["dims"]])


@rule(*ops("aten.numpy_T.default"))
def numpy_t(node: fx.Node, coupler: Coupler) -> None:
    """``x.T``: every axis reversed (Falcon reads its tied embedding this way)."""
    x = as_ref(node.args[0])
    _permute_link(coupler, x, TensorRef(node), list(range(x.ndim))[::-1])


@rule(*_TRANSPOSE, *ops("aten.t.default"))
def transpose(node: fx.Node, coupler: Coupler) -> None:
    x = as_ref(node.args[0])
    perm = list(range(x.ndim))
    if x.ndim >= 2:
        d0, d1 = _transpose_dims(node, x.ndim) if "dim0" in bind(node) or "axis0" in bind(node) else (0, 1)
        perm[d0], perm[d1] = perm[d1], perm[d0]
    _permute_link(coupler, x, TensorRef(node), perm)


# ---------------------------------------------------------------------------------------------
# expand / repeat


@rule(*ops("aten.expand.default"), rewrite=shape_arg("size"))
def expand(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    shift = out.ndim - x.ndim
    for a in range(x.ndim):
        if coupler.shape(x)[a] == coupler.shape(out)[a + shift]:
            coupler.link_axes(x, a, out, a + shift)
            coupler.set_zero(out, a + shift, coupler.is_zero(x, a))


@rule(*ops("aten.repeat.default"))
def repeat(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    reps = list(bind(node)["repeats"])
    shift = out.ndim - x.ndim
    for a in range(x.ndim):
        if reps[a + shift] == 1:
            coupler.link_axes(x, a, out, a + shift)
        else:
            coupler.freeze(x, a, "repeated axis")
    for j in range(out.ndim):
        if j < shift or reps[j] != 1:
            coupler.freeze(out, j, "repeated axis")


def _repeat_interleave_rewrite(node: fx.Node, r: Any) -> None:
    if bind(node).get("output_size") is not None:
        set_arg(node, "output_size", r.new_shape(TensorRef(node))[bind(node)["dim"] % r.old_ndim(TensorRef(node))])


@rule(*ops("aten.repeat_interleave.self_int"), rewrite=_repeat_interleave_rewrite)
def repeat_interleave(node: fx.Node, coupler: Coupler) -> None:
    """Each position of ``dim`` repeated ``repeats`` times in place (GQA's shared kv heads): block expansion."""
    b = bind(node)
    x, out = as_ref(b["self"]), TensorRef(node)
    reps = b["repeats"]
    if b["dim"] is None or not isinstance(reps, int) or x.ndim != out.ndim:
        coupler.unknown(node)
        return
    dim = b["dim"] % x.ndim
    for a in range(x.ndim):
        if a != dim:
            coupler.link_axes(x, a, out, a)
        coupler.set_zero(out, a, coupler.is_zero(x, a))
    coupler.link(coupler.el(out, dim), coupler.el(x, dim)[np.arange(coupler.shape(out)[dim]) // reps])


# ---------------------------------------------------------------------------------------------
# concat / stack / split / slice / select


@rule(*ops("aten.cat.default", "aten.concat.default"))
def cat(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    b = bind(node)
    dim = b["dim"] % out.ndim
    inputs = [r for r in (as_ref(t) for t in b["tensors"]) if r is not None and r.ndim == out.ndim]
    off = 0
    oe = coupler.el(out, dim)
    zero = True
    for ref in inputs:
        n = coupler.shape(ref)[dim]
        coupler.link(coupler.el(ref, dim), oe[off:off + n])
        zero = zero and coupler.is_zero(ref, dim)
        off += n
        for a in range(out.ndim):
            if a != dim:
                coupler.link_axes(ref, a, out, a)
    coupler.set_zero(out, dim, False)  # zero-ness differs per input range; conservative


@rule(*ops("aten.stack.default"))
def stack(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    b = bind(node)
    dim = b["dim"] % out.ndim
    coupler.freeze(out, dim, "stacked axis")
    for t in b["tensors"]:
        ref = as_ref(t)
        for a in range(ref.ndim):
            coupler.link_axes(ref, a, out, a if a < dim else a + 1)


def _split_rewrite(node: fx.Node, r: Any) -> None:
    import torch

    x = as_ref(node.args[0])
    dim = bind(node)["dim"] % r.old_ndim(x)
    if r.kept(x, dim) is None:
        return
    sizes = [r.new_shape(TensorRef(node, k))[dim] for k in range(len(node.meta["val"]))]
    node.target = torch.ops.aten.split_with_sizes.default
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


@rule(*ops("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
           "aten.tensor_split.sections", "aten.tensor_split.indices", "aten.split_with_sizes_copy.default"),
      rewrite=_split_rewrite)
def split(node: fx.Node, coupler: Coupler) -> None:
    x = as_ref(node.args[0])
    dim = bind(node).get("dim", 0) % x.ndim
    xe = coupler.el(x, dim)
    off = 0
    for k, val in enumerate(node.meta["val"]):
        part = TensorRef(node, k)
        n = int(val.shape[dim])
        coupler.link(coupler.el(part, dim), xe[off:off + n])
        off += n
        for a in range(x.ndim):
            coupler.set_zero(part, a, coupler.is_zero(x, a))
            if a != dim:
                coupler.link_axes(x, a, part, a)


@rule(*ops("aten.unbind.int"))
def unbind(node: fx.Node, coupler: Coupler) -> None:
    x = as_ref(node.args[0])
    dim = bind(node).get("dim", 0) % x.ndim
    coupler.freeze(x, dim, "unbind picks positions apart")
    for k in range(len(node.meta["val"])):
        part = TensorRef(node, k)
        for a in range(x.ndim):
            if a != dim:
                coupler.link_axes(x, a, part, a if a < dim else a - 1)
                coupler.set_zero(part, a if a < dim else a - 1, coupler.is_zero(x, a))


@rule(operator.getitem)
def getitem(node: fx.Node, coupler: Coupler) -> None:
    src, k = node.args[0], node.args[1]
    out = as_ref(node)
    if out is None or not isinstance(src, fx.Node) or not isinstance(k, int):
        coupler.unknown(node)
        return
    vals = src.meta.get("val")
    if not isinstance(vals, (list, tuple)):
        coupler.unknown(node)
        return
    part = TensorRef(src, k)
    for a in range(out.ndim):
        coupler.link_axes(part, a, out, a)
        coupler.set_zero(out, a, coupler.is_zero(part, a))


def _bound(v: Any, size: int, default: int) -> int | None:
    if v is None:
        return default
    if not _is_literal(v):
        return None
    v = v + size if v < 0 else v
    return max(0, min(v, size))


def _slice_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    x = as_ref(b["self"])
    dim = b["dim"] % r.old_ndim(x)
    kept = r.kept(x, dim)
    if kept is None:
        return
    size = r.old_shape(x)[dim]
    start, end = _bound(b["start"], size, 0), _bound(b["end"], size, size)
    # new positions whose source lies before the bound (kept is sorted when pruning, block-ordered when widening)
    set_arg(node, "start", int(np.count_nonzero(kept < start)))
    set_arg(node, "end", int(np.count_nonzero(kept < end)))


@rule(*ops("aten.slice.Tensor"), rewrite=_slice_rewrite)
def slice_(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    x, out = as_ref(b["self"]), TensorRef(node)
    dim = b["dim"] % x.ndim
    size = coupler.shape(x)[dim]
    start, end = _bound(b["start"], size, 0), _bound(b["end"], size, size)
    for a in range(x.ndim):
        coupler.set_zero(out, a, coupler.is_zero(x, a))
        if a != dim:
            coupler.link_axes(x, a, out, a)
    if start is None or end is None or b["step"] != 1 or end - start != coupler.shape(out)[dim]:
        coupler.freeze(x, dim, "slice with a step or symbolic bounds")
        coupler.freeze(out, dim, "slice with a step or symbolic bounds")
        return
    coupler.link(coupler.el(x, dim)[start:end], coupler.el(out, dim))


@rule(*ops("aten.select.int", "aten.index_select.default"))
def select(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    x, out = as_ref(b["self"]), TensorRef(node)
    dim = b["dim"] % x.ndim
    coupler.freeze(x, dim, f"{node.target} picks positions")
    keep_axis = node.target in _INDEX_SELECT  # index_select keeps the axis (its size changes); select drops it
    for a in range(x.ndim):
        if a == dim:
            if keep_axis:
                coupler.freeze(out, a, "indexed axis")
            continue
        j = a if (a < dim or keep_axis) else a - 1
        coupler.link_axes(x, a, out, j)
        coupler.set_zero(out, j, coupler.is_zero(x, a))


# ---------------------------------------------------------------------------------------------
# factories: constant-valued tensors whose sizes are literal arguments


@rule(*ops("aten.zeros.default", "aten.ones.default", "aten.full.default", "aten.empty.memory_format",
           "aten.new_zeros.default", "aten.new_ones.default", "aten.new_full.default", "aten.new_empty.default"),
      rewrite=shape_arg("size"))
def factory(node: fx.Node, coupler: Coupler) -> None:
    """zeros(size) / x.new_ones(size)...: the output links to nothing; its size argument is rewritten."""
    out = TensorRef(node)
    for a in range(out.ndim):
        coupler.set_zero(out, a, node.target in _ZEROS)


@rule(*ops("aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.randn.default",
           "aten.rand.default", "aten.linspace.default", "aten.eye.default", "aten.tril.default", "aten.triu.default"))
def frozen_factory(node: fx.Node, coupler: Coupler) -> None:
    coupler.freeze(TensorRef(node), None, f"values of {node.target} depend on position")
    for arg in node.all_input_nodes:
        coupler.freeze(arg, None, f"values of {node.target} depend on position")


@rule(*ops("aten.index.Tensor"))
def index(node: fx.Node, coupler: Coupler) -> None:
    """x[..., i, j, ...] with adjacent index tensors (advanced indexing): the indexed axes are frozen, their
    broadcast index shape takes their place in the output, the other axes pass through. Index tensors link
    to the output axes they span (right-aligned, as they broadcast); a boolean mask spans as many axes of x as
    it has, and its output axis counts the positions it picked (frozen, as the mask). Non-adjacent index
    tensors (whose broadcast axes NumPy moves to the front) have no rule."""
    x, out = as_ref(node.args[0]), TensorRef(node)
    indices = list(node.args[1])
    tensors = [i for i, t in enumerate(indices) if t is not None]
    if not tensors or tensors != list(range(tensors[0], tensors[-1] + 1)):
        coupler.unknown(node)
        return
    masks = {i for i in tensors if _is_mask(indices[i])}
    if masks and len(tensors) > 1:
        coupler.unknown(node)
        return
    p = tensors[0]
    k = as_ref(indices[p]).ndim if masks else len(tensors)  # the axes of x the index tensors consume
    width = out.ndim - (x.ndim - k)  # axes of the broadcast index shape
    for a in range(p, p + k):
        coupler.freeze(x, a, "indexed axis")
    for a in range(x.ndim):
        if a < p:
            coupler.link_axes(x, a, out, a)
        elif a >= p + k:
            coupler.link_axes(x, a, out, a - k + width)
    if masks:
        coupler.freeze(as_ref(indices[p]), None, "a boolean mask picks positions")
        coupler.freeze(out, p, "positions a boolean mask picked")
        return
    for i in tensors:
        idx = as_ref(indices[i])
        if idx is None:
            continue
        offset = p + width - idx.ndim
        for a in range(idx.ndim):
            if coupler.shape(idx)[a] == coupler.shape(out)[offset + a]:  # a size-1 axis broadcasts: no link
                coupler.link_axes(idx, a, out, offset + a)


def _is_mask(arg: Any) -> bool:
    """A boolean (or uint8) index tensor: it picks positions across as many axes as it has."""
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return getattr(val, "dtype", None) in (torch.bool, torch.uint8)


@rule(*ops("aten.gather.default"))
def gather(node: fx.Node, coupler: Coupler) -> None:
    """out[i][j] = x[index[i][j]][j] along ``dim``: out follows the index's shape; ``dim`` is frozen."""
    b = bind(node)
    x, idx, out = as_ref(b["self"]), as_ref(b["index"]), TensorRef(node)
    dim = b["dim"] % x.ndim
    coupler.freeze(x, dim, "gathered axis")
    coupler.freeze(out, dim, "gathered axis")
    for a in range(out.ndim):
        coupler.link_axes(idx, a, out, a)
        if a != dim and coupler.shape(x)[a] == coupler.shape(out)[a]:
            coupler.link_axes(x, a, out, a)


@rule(*ops("aten.diff.default"))
def diff(node: fx.Node, coupler: Coupler) -> None:
    """Differences along ``dim`` mix neighbours there; other axes pass through."""
    b = bind(node)
    x, out = as_ref(b["self"]), TensorRef(node)
    dim = b["dim"] % x.ndim
    for a in range(x.ndim):
        if a == dim:
            coupler.freeze(x, a, "differenced axis")
            coupler.freeze(out, a, "differenced axis")
        else:
            coupler.link_axes(x, a, out, a)
    for extra in ("prepend", "append"):
        ref = as_ref(b.get(extra))
        if ref is not None:
            coupler.freeze(ref, None, "prepended to a differenced axis")


@rule(*ops("aten.reshape_as.default", "aten.view_as.default", "aten.expand_as.default"))
def as_other(node: fx.Node, coupler: Coupler) -> None:
    """x.reshape_as(other): the output takes other's shape at run time, so other's axes shrink with it."""
    other, out = as_ref(node.args[1]), TensorRef(node)
    if node.target in _EXPAND_AS:
        expand(node, coupler)
    else:
        couple_reshape(node, coupler, node.args[0])
    for a in range(out.ndim):
        coupler.link_axes(other, a, out, a)
