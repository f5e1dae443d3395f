"""Parameterised layers: convolutions (plain, grouped, depthwise, transposed), linear, matmul, embedding.

Their costs follow ``torch.utils.flop_counter.FlopCounterMode`` (MACs = its flops / 2), so the two agree."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind, set_arg
from . import Role, ops, rule

if TYPE_CHECKING:
    from . import Shape

PRODUCER, CONSUMER = "producer", "consumer"

_TRANSPOSED = set(ops("aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input"))


def _conv_args(node: fx.Node) -> tuple[Any, Any, Any, bool, int]:
    b = bind(node)
    transposed = node.target in _TRANSPOSED or bool(b.get("transposed", False))
    return b["input"], b["weight"], b.get("bias"), transposed, int(b.get("groups", 1) or 1)


def conv_layout(node: fx.Node) -> tuple[Any, int] | None:
    """A convolution node's weight argument and group count (any op the convolution rule couples); None for
    every other node."""
    from . import RULES

    record = RULES.get(node.target) if node.op == "call_function" else None
    if record is None or record.rule is not conv:
        return None
    _, w, _, _, groups = _conv_args(node)
    return w, groups


def _conv_rewrite(node: fx.Node, r: Any) -> None:
    x_arg, w_arg, _, transposed, groups = _conv_args(node)
    if groups == 1:
        return
    x = as_ref(x_arg)
    c = r.old_ndim(x) - (r.old_ndim(as_ref(w_arg)) - 2) - 1
    kept = r.kept(x, c)
    if kept is not None:  # the groups that keep input positions (all of them when pruned uniformly)
        per_group = r.old_shape(x)[c] // groups
        set_arg(node, "groups", len(np.unique(kept // per_group)) if per_group > 1 else len(kept))


def conv_macs(node: fx.Node, shape: Shape) -> int:
    x_arg, w_arg, _, transposed, _ = _conv_args(node)
    ws, xs, os = shape(as_ref(w_arg)), shape(as_ref(x_arg)), shape(TensorRef(node))
    nd = len(ws) - 2
    batch = xs[0] if len(xs) == nd + 2 else 1
    spatial = xs[-nd:] if transposed else os[-nd:]
    return batch * math.prod(ws) * math.prod(spatial)


def _grouped_uniform(coupler: Coupler, x: TensorRef, w: TensorRef, out: TensorRef, c: int, groups: int,
                     transposed: bool) -> None:
    """Position j of every conv group linked (inputs and outputs separately); the weight's per-group
    axis follows position j of group 0."""
    cin, cout = coupler.shape(x)[c], coupler.shape(out)[c]
    ipg, opg = cin // groups, cout // groups
    xe, oe = coupler.el(x, c), coupler.el(out, c)
    coupler.link(xe, xe[np.arange(cin) % ipg])
    coupler.link(oe, oe[np.arange(cout) % opg])
    full, per_group = (x, out) if transposed else (out, x)  # weight axis 0 spans all groups, axis 1 one group
    coupler.link_axes(full, c, w, 0)
    coupler.link(coupler.el(w, 1), coupler.el(per_group, c)[: coupler.shape(w)[1]])
    coupler.role(w, 0, CONSUMER if transposed else PRODUCER)
    coupler.role(w, 1, PRODUCER if transposed else CONSUMER)


@rule(*ops("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.conv1d.padding",
           "aten.conv2d.padding", "aten.conv3d.padding", "aten.convolution.default",
           "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input"),
      rewrite=_conv_rewrite, cost=conv_macs, roles={Role.KERNEL})
def conv(node: fx.Node, coupler: Coupler) -> None:
    x_arg, w_arg, b_arg, transposed, groups = _conv_args(node)
    x, w, out = as_ref(x_arg), as_ref(w_arg), TensorRef(node)
    nd = w.ndim - 2
    c = x.ndim - nd - 1  # channel axis (0 for unbatched input)
    if c == 1:
        coupler.link_axes(x, 0, out, 0)
    for s in range(c + 1, x.ndim):
        coupler.freeze(x, s, "convolved spatial axis")
        coupler.freeze(out, s, "convolved spatial axis")
    for s in range(2, w.ndim):
        coupler.freeze(w, s, "kernel axis")
    if groups == 1:
        w_in, w_out = (0, 1) if transposed else (1, 0)
        coupler.link_axes(x, c, w, w_in)
        coupler.role(w, w_in, CONSUMER)
        coupler.link_axes(out, c, w, w_out)
        coupler.role(w, w_out, PRODUCER)
    elif coupler.shape(x)[c] == groups:
        # Depthwise (one input per group, any depth multiplier): a conv group is the unit, its input
        # channel and its outputs go together.
        cin, cout = coupler.shape(x)[c], coupler.shape(out)[c]
        opg = cout // groups
        xe, oe = coupler.el(x, c), coupler.el(out, c)
        coupler.link(xe, oe[np.arange(cin) * opg])
        coupler.link(oe, oe[(np.arange(cout) // opg) * opg])
        coupler.freeze(w, 1, "per-group axis of a grouped convolution")
        coupler.link_axes(x if transposed else out, c, w, 0)
        coupler.role(w, 0, PRODUCER)
    else:
        # Grouped (ResNeXt, RegNet): the same position of every group is one channel, on the input
        # and on the output separately, so every group shrinks alike and the group count stays. At a
        # ratio r this removes r of the conv's input AND output widths (MACs x (1-r)^2, as a dense
        # conv), where removing whole groups would only remove r of the groups (MACs x (1-r)).
        _grouped_uniform(coupler, x, w, out, c, groups, transposed)
    if as_ref(b_arg) is not None:
        coupler.link_axes(out, c, b_arg, 0)
        coupler.role(b_arg, 0, PRODUCER)
    coupler.set_zero(out, c, True)


def linear_macs(node: fx.Node, shape: Shape) -> int:
    return math.prod(shape(TensorRef(node))) * shape(as_ref(bind(node)["input"]))[-1]


@rule(*ops("aten.linear.default"), cost=linear_macs, roles={Role.KERNEL})
def linear(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    x, w, out = as_ref(b["input"]), as_ref(b["weight"]), TensorRef(node)
    for a in range(x.ndim - 1):
        coupler.link_axes(x, a, out, a)
    coupler.link_axes(x, -1, w, 1)
    coupler.link_axes(out, -1, w, 0)
    coupler.role(w, 1, CONSUMER)
    coupler.role(w, 0, PRODUCER)
    if as_ref(b["bias"]) is not None:
        coupler.link_axes(out, -1, b["bias"], 0)
        coupler.role(b["bias"], 0, PRODUCER)
    coupler.set_zero(out, -1, True)


def _contract(coupler: Coupler, x: TensorRef, xa: int, y: TensorRef, ya: int, why: str) -> None:
    """Positions summed over by a product of two tensors: exact only if one side is zero there."""
    coupler.link_axes(x, xa, y, ya)
    if not (coupler.is_zero(x, xa) or coupler.is_zero(y, ya)):
        coupler.mark_inexact(x, xa, why)


def matmul_macs(node: fx.Node, shape: Shape) -> int:
    return math.prod(shape(TensorRef(node))) * shape(as_ref(node.args[0]))[-1]


@rule(*ops("aten.matmul.default", "aten.mm.default", "aten.bmm.default"), cost=matmul_macs)
def matmul(node: fx.Node, coupler: Coupler) -> None:
    x, y, out = as_ref(node.args[0]), as_ref(node.args[1]), TensorRef(node)
    if x.ndim < 2 or y.ndim < 2:
        coupler.unknown(node)
        return
    batch = out.ndim - 2
    for ref in (x, y):
        shift = batch - (ref.ndim - 2)
        for a in range(ref.ndim - 2):
            coupler.link_axes(ref, a, out, a + shift)
    coupler.link_axes(x, -2, out, -2)
    coupler.link_axes(y, -1, out, -1)
    _contract(coupler, x, -1, y, -2, "matmul sums over this axis")
    for ref, inner, outer in ((x, -1, -2), (y, -2, -1)):
        coupler.role(*_parameter_axis(ref, inner), CONSUMER)
        coupler.role(*_parameter_axis(ref, outer), PRODUCER)
    coupler.set_zero(out, -2, coupler.is_zero(x, -2))
    coupler.set_zero(out, -1, coupler.is_zero(y, -1))


_TRANSPOSES_2D = set(ops("aten.t.default", "aten.numpy_T.default", "aten.transpose.int", "aten.permute.default"))


def _parameter_axis(ref: TensorRef, axis: int) -> tuple[TensorRef, int]:
    """A matmul operand that is a transposed 2-d parameter (``x @ self.weight.T``: Falcon's linear layers) is
    that parameter, its axes swapped, so that it gets its producer/consumer roles; any other operand is itself."""
    n = ref.node
    src = as_ref(n.args[0]) if n.op == "call_function" and n.target in _TRANSPOSES_2D and n.args else None
    if src is not None and src.node.op == "get_attr" and src.ndim == 2 and ref.ndim == 2:
        return src, 1 - axis % 2
    return ref, axis


def addmm_macs(node: fx.Node, shape: Shape) -> int:
    return math.prod(shape(TensorRef(node))) * shape(as_ref(node.args[1]))[-1]


@rule(*ops("aten.addmm.default"), cost=addmm_macs)
def addmm(node: fx.Node, coupler: Coupler) -> None:
    bias, x, y, out = as_ref(node.args[0]), as_ref(node.args[1]), as_ref(node.args[2]), TensorRef(node)
    coupler.link_axes(x, 0, out, 0)
    coupler.link_axes(y, 1, out, 1)
    _contract(coupler, x, 1, y, 0, "matmul sums over this axis")
    coupler.role(y, 0, CONSUMER)
    coupler.role(y, 1, PRODUCER)
    shift = 2 - bias.ndim
    for a in range(bias.ndim):
        coupler.link_axes(bias, a, out, a + shift)
        coupler.role(bias, a, PRODUCER)
    coupler.set_zero(out, 1, coupler.is_zero(y, 1) and coupler.is_zero(bias, bias.ndim - 1))


@rule(*ops("aten.embedding.default"))
def embedding(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    w, idx, out = as_ref(b["weight"]), as_ref(b["indices"]), TensorRef(node)
    coupler.freeze(w, 0, "vocabulary axis of an embedding")
    coupler.link_axes(w, 1, out, -1)
    coupler.role(w, 1, PRODUCER)
    for a in range(idx.ndim):
        coupler.link_axes(idx, a, out, a)
    coupler.set_zero(out, -1, True)


def _einsum_operands(equation: str, n: int) -> tuple[list[str], str] | None:
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    return (terms, rhs) if len(terms) == n else None


def einsum_macs(node: fx.Node, shape: Shape) -> int:
    """The product of every letter's size (one multiply-add per combination)."""
    parsed = _einsum_operands(node.args[0], len(node.args[1]))
    if parsed is None:
        return 0
    sizes: dict[str, int] = {}
    for term, t in zip(parsed[0], node.args[1]):
        ref = as_ref(t)
        if ref is None:
            return 0
        sizes.update(zip(term, shape(ref)))
    return math.prod(sizes.values())


@rule(*ops("aten.einsum.default"), cost=einsum_macs)
def einsum(node: fx.Node, coupler: Coupler) -> None:
    """Axes sharing a letter are linked; letters missing from the output are contracted."""
    refs = [as_ref(t) for t in node.args[1]]
    parsed = _einsum_operands(node.args[0], len(refs))
    if parsed is None or any(r is None for r in refs):
        coupler.unknown(node)
        return
    terms, rhs = parsed
    out = TensorRef(node)
    seen: dict[str, tuple[TensorRef, int]] = {}
    for ref, term in zip(refs, terms):
        if len(set(term)) != len(term) or len(term) != ref.ndim:
            coupler.unknown(node)
            return
    for ref, term in zip(refs, terms):
        for a, letter in enumerate(term):
            if letter in seen:
                coupler.link_axes(*seen[letter], ref, a)
            else:
                seen[letter] = (ref, a)
            if letter in rhs:
                coupler.link_axes(ref, a, out, rhs.index(letter))
    for letter, (ref, a) in seen.items():
        holders = [(r, t.index(letter)) for r, t in zip(refs, terms) if letter in t]
        zero = any(coupler.is_zero(r, x) for r, x in holders)
        if letter not in rhs and not zero:
            coupler.mark_inexact(ref, a, "einsum sums over this axis")
        if letter in rhs:
            coupler.set_zero(out, rhs.index(letter), zero if len(holders) > 1 else coupler.is_zero(ref, a))
