"""Reductions, softmax, pooling and other spatial ops."""
from __future__ import annotations

import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind
from . import ops, rule
from .elementwise import flat_args

_CUMPROD = set(ops("aten.cumprod.default"))
_CONSTANT_PAD = set(ops("aten.constant_pad_nd.default"))

# A reduction over an axis with pruned positions (zeros in the masked model) is exact only if dropping
# those zeros leaves its value unchanged. The table says when that holds:
#   ZERO    the input is zero there (sums, counts of nonzeros, any, Lp norms with p > 0)
#   NONNEG  the input is zero there and non-negative everywhere (the max of non-negative values)
#   NEVER   the value depends on how many entries there are or where they sit (means, variances,
#           products, minima, medians, log-sum-exp, argmax and the indices of max/min)
ZERO, NONNEG, NEVER = "zero", "nonneg", "never"
EXACT_WHEN: dict[object, str] = {
    **dict.fromkeys(ops("aten.sum.dim_IntList", "aten.sum.default", "aten.nansum.default",
                        "aten.count_nonzero.dim_IntList", "aten.count_nonzero.default", "aten.any.dim",
                        "aten.any.dims", "aten.any.default"), ZERO),
    **dict.fromkeys(ops("aten.amax.default", "aten.max.default"), NONNEG),
    **dict.fromkeys(ops(
        "aten.mean.dim", "aten.mean.default", "aten.amin.default", "aten.min.default", "aten.var.correction",
        "aten.var.dim", "aten.std.correction", "aten.std.dim", "aten.var_mean.correction", "aten.var_mean.dim",
        "aten.std_mean.correction", "aten.std_mean.dim", "aten.logsumexp.default", "aten.prod.dim_int",
        "aten.argmax.default", "aten.argmin.default", "aten.all.dim", "aten.all.dims", "aten.max.dim",
        "aten.min.dim", "aten.median.dim"), NEVER),
}
# Lp norms: exact over zeros for p > 0 (and p = inf, the largest |x|); p <= 0 counts or inverts entries.
NORMS = set(ops("aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim", "aten.norm.Scalar"))
# f(all zeros) is not zero: the output is not zero where the input was.
_NONZERO_OF_ZEROS = set(ops("aten.logsumexp.default", "aten.argmax.default", "aten.argmin.default",
                            "aten.max.dim", "aten.min.dim", "aten.median.dim"))

# Non-negative outputs, whatever the input; and ops whose output is non-negative when every input is.
_NONNEG_OUT = set(ops(
    "aten.relu.default", "aten.relu_.default", "aten.relu6.default", "aten.abs.default", "aten.square.default",
    "aten.sigmoid.default", "aten.sigmoid_.default", "aten.exp.default", "aten.softmax.int", "aten._softmax.default",
    "aten.hardsigmoid.default", "aten.hardsigmoid_.default", "aten.sqrt.default", "aten.rsqrt.default",
    "aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim", "aten.norm.Scalar",
))
_NONNEG_IF_INPUTS = set(ops(
    "aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default",
    "aten.dropout.default", "aten._to_copy.default", "aten.view.default", "aten.reshape.default",
    "aten._unsafe_view.default", "aten.permute.default", "aten.transpose.int", "aten.flatten.using_ints",
    "aten.unflatten.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default",
    "aten.slice.Tensor", "aten.select.int", "aten.cat.default", "aten.max_pool2d.default",
    "aten.max_pool1d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
    "aten.adaptive_max_pool2d.default", "aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default",
    "aten.mul.Tensor", "aten.add.Tensor", "aten.maximum.default", "aten.clamp_min.default",
))


def is_nonneg(x: fx.Node, coupler: Coupler) -> bool:
    """Is every value of ``x`` >= 0? Proven from the ops that produced it (memoised per graph)."""
    known = coupler.facts.setdefault("nonneg", {})
    if x.name not in known:
        known[x.name] = False  # a cycle cannot happen in a graph, but a deep chain is walked once
        if x.op == "call_function" and x.target in _NONNEG_OUT:
            known[x.name] = True
        elif x.op == "call_function" and x.target in _NONNEG_IF_INPUTS:
            scalars = [a for a in flat_args(x) if isinstance(a, (int, float)) and not isinstance(a, bool)]
            shape_op = x.target not in _ARITHMETIC
            known[x.name] = all(is_nonneg(a, coupler) for a in x.all_input_nodes) and \
                (shape_op or min(scalars, default=0) >= 0)
    return known[x.name]


_ARITHMETIC = set(ops("aten.mul.Tensor", "aten.add.Tensor", "aten.maximum.default", "aten.clamp_min.default"))


def _exact_when(node: fx.Node) -> str:
    if node.target in NORMS:
        b = bind(node)
        p = b.get("ord", b.get("p"))
        p = 2.0 if p is None else float(p)
        return ZERO if p > 0 else NEVER
    return EXACT_WHEN[node.target]


def _reduced_axes(node: fx.Node, ndim: int) -> tuple[set[int], bool]:
    b = bind(node)
    dims = b.get("dim")
    if dims is None:
        return set(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return set(range(ndim)), bool(b.get("keepdim", False))
    return {d % ndim for d in dims}, bool(b.get("keepdim", False))


def _reduction_is_exact(node: fx.Node, coupler: Coupler, x: TensorRef, axis: int) -> bool:
    when = _exact_when(node)
    if when == NEVER or not coupler.is_zero(x, axis):
        return False
    try:
        return when == ZERO or is_nonneg(x.node, coupler)
    except RecursionError:  # a chain deeper than Python's stack: not proven
        return False


@rule(*EXACT_WHEN, *NORMS)
def reduction(node: fx.Node, coupler: Coupler) -> None:
    x = as_ref(node.args[0])
    reduced, keepdim = _reduced_axes(node, x.ndim)
    outs = [TensorRef(node, k) for k, v in enumerate(node.meta["val"])] if isinstance(node.meta["val"], (list, tuple)) \
        else [TensorRef(node)]
    for a in sorted(reduced):
        if not _reduction_is_exact(node, coupler, x, a):
            coupler.mark_inexact(x, a, f"{node.target} reduces over this axis")
    j = 0
    for a in range(x.ndim):
        if a in reduced and not keepdim:
            continue
        for out in outs:
            if a not in reduced and out.ndim > j:
                coupler.link_axes(x, a, out, j)
                coupler.set_zero(out, j, node.target not in _NONZERO_OF_ZEROS and coupler.is_zero(x, a))
        j += 1


@rule(*ops("aten.cumsum.default", "aten.cumprod.default"))
def cumulative(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    dim = bind(node)["dim"] % x.ndim
    for a in range(x.ndim):
        coupler.link_axes(x, a, out, a)
    if node.target in _CUMPROD or not coupler.is_zero(x, dim):
        coupler.mark_inexact(x, dim, f"{node.target} accumulates along this axis")


@rule(*ops("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
           "aten._safe_softmax.default"))
def softmax(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    dim = bind(node)["dim"] % x.ndim
    for a in range(x.ndim):
        coupler.link_axes(x, a, out, a)
    coupler.mark_inexact(x, dim, f"{node.target} normalises over this axis")


# ---------------------------------------------------------------------------------------------
# spatial ops: the last ``nd`` axes are spatial (frozen), the channel and batch axes pass through

def _spatial(nd: int, zero_ok: bool = True):
    def couple(node: fx.Node, coupler: Coupler) -> None:
        x = as_ref(node.args[0])
        outs = [TensorRef(node, k) for k in range(len(node.meta["val"]))] \
            if isinstance(node.meta["val"], (list, tuple)) else [TensorRef(node)]
        for out in outs:
            for a in range(x.ndim):
                if a >= x.ndim - nd:
                    coupler.freeze(x, a, f"spatial axis of {node.target}")
                    coupler.freeze(out, a, f"spatial axis of {node.target}")
                else:
                    coupler.link_axes(x, a, out, a)
                    coupler.set_zero(out, a, zero_ok and coupler.is_zero(x, a))
    return couple


for _nd in (1, 2, 3):
    _names = [f"aten.max_pool{_nd}d.default", f"aten.avg_pool{_nd}d.default", f"aten.adaptive_avg_pool{_nd}d.default",
              f"aten.adaptive_max_pool{_nd}d.default", f"aten.max_pool{_nd}d_with_indices.default",
              f"aten._adaptive_avg_pool{_nd}d.default", f"aten.lp_pool{_nd}d.default"]
    rule(*ops(*_names))(_spatial(_nd))
rule(*ops("aten.upsample_nearest1d.vec", "aten.upsample_linear1d.vec"))(_spatial(1))
rule(*ops("aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec", "aten.upsample_bicubic2d.vec",
          "aten._upsample_bilinear2d_aa.vec", "aten._upsample_nearest_exact2d.vec", "aten.upsample_nearest2d.default",
          "aten.upsample_bilinear2d.default", "aten.grid_sampler_2d.default"))(_spatial(2))
rule(*ops("aten.upsample_nearest3d.vec", "aten.upsample_trilinear3d.vec"))(_spatial(3))


def _dims_frozen(arg: str):
    """roll / flip: the named axes move positions around; every other axis passes through."""
    def couple(node: fx.Node, coupler: Coupler) -> None:
        x, out = as_ref(node.args[0]), TensorRef(node)
        dims = bind(node).get(arg) or []
        dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)} if dims else set(range(x.ndim))
        for a in range(x.ndim):
            if a in dims:
                coupler.freeze(x, a, f"{node.target} moves positions along this axis")
                coupler.freeze(out, a, f"{node.target} moves positions along this axis")
            else:
                coupler.link_axes(x, a, out, a)
                coupler.set_zero(out, a, coupler.is_zero(x, a))
    return couple


rule(*ops("aten.roll.default"))(_dims_frozen("dims"))
rule(*ops("aten.flip.default"))(_dims_frozen("dims"))


@rule(*ops("aten.constant_pad_nd.default", "aten.pad.default", "aten.reflection_pad2d.default",
           "aten.replication_pad2d.default", "aten.reflection_pad1d.default", "aten.replication_pad1d.default"))
def pad(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    b = bind(node)
    padded = len(b.get("pad") or b.get("padding") or []) // 2
    value = b.get("value", 0) or 0
    for a in range(x.ndim):
        if a >= x.ndim - padded:
            coupler.freeze(x, a, "padded axis")
            coupler.freeze(out, a, "padded axis")
        else:
            coupler.link_axes(x, a, out, a)
            coupler.set_zero(out, a, value == 0 and node.target in _CONSTANT_PAD and coupler.is_zero(x, a))


@rule(*ops("aten.pixel_shuffle.default", "aten.pixel_unshuffle.default", "aten.channel_shuffle.default",
           "aten.native_channel_shuffle.default"))
def channel_mixing(node: fx.Node, coupler: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    coupler.freeze(x, None, f"{node.target} reorders channels")
    coupler.freeze(out, None, f"{node.target} reorders channels")
