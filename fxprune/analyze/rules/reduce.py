"""Reductions, softmax, pooling and other spatial ops."""
from __future__ import annotations


import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind
from . import ops, rule

_CUMPROD = set(ops("aten.cumprod.default"))
_CONSTANT_PAD = set(ops("aten.constant_pad_nd.default"))
# Reductions whose result changes when zero positions are dropped (count, max, statistics).
_NOT_SUM = set(ops(
    "aten.mean.dim", "aten.mean.default", "aten.amax.default", "aten.amin.default", "aten.var.correction",
    "aten.var.dim", "aten.std.correction", "aten.std.dim", "aten.logsumexp.default", "aten.prod.dim_int",
    "aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim", "aten.argmax.default", "aten.argmin.default",
    "aten.any.dim", "aten.all.dim", "aten.max.dim", "aten.min.dim", "aten.var_mean.correction",
    "aten.max.default", "aten.min.default", "aten.median.dim",
))
_SUM = set(ops("aten.sum.dim_IntList", "aten.sum.default", "aten.nansum.default", "aten.count_nonzero.dim_IntList"))


def _reduced_axes(node: fx.Node, ndim: int) -> tuple[set[int], bool]:
    b = bind(node)
    dims = b.get("dim")
    if dims is None:
        return set(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return set(range(ndim)), bool(b.get("keepdim", False))
    return {d % ndim for d in dims}, bool(b.get("keepdim", False))


@rule(*_NOT_SUM, *_SUM)
def reduction(node: fx.Node, ctx: Coupler) -> None:
    x = as_ref(node.args[0])
    reduced, keepdim = _reduced_axes(node, x.ndim)
    outs = [TensorRef(node, k) for k, v in enumerate(node.meta["val"])] if isinstance(node.meta["val"], (list, tuple)) \
        else [TensorRef(node)]
    for a in sorted(reduced):
        if node.target in _NOT_SUM or not ctx.is_zero(x, a):
            ctx.mark_inexact(x, a, f"{node.target} reduces over this axis")
    j = 0
    for a in range(x.ndim):
        if a in reduced and not keepdim:
            continue
        for out in outs:
            if a not in reduced and out.ndim > j:
                ctx.link_axes(x, a, out, j)
                ctx.set_zero(out, j, node.target in _SUM and ctx.is_zero(x, a))
        j += 1


@rule(*ops("aten.cumsum.default", "aten.cumprod.default"))
def cumulative(node: fx.Node, ctx: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    dim = bind(node)["dim"] % x.ndim
    for a in range(x.ndim):
        ctx.link_axes(x, a, out, a)
    if node.target in _CUMPROD or not ctx.is_zero(x, dim):
        ctx.mark_inexact(x, dim, f"{node.target} accumulates along this axis")


@rule(*ops("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
           "aten._safe_softmax.default"))
def softmax(node: fx.Node, ctx: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    dim = bind(node)["dim"] % x.ndim
    for a in range(x.ndim):
        ctx.link_axes(x, a, out, a)
    ctx.mark_inexact(x, dim, f"{node.target} normalises over this axis")


# ---------------------------------------------------------------------------------------------
# spatial ops: the last ``nd`` axes are spatial (frozen), the channel and batch axes pass through

def _spatial(nd: int, zero_ok: bool = True):
    def couple(node: fx.Node, ctx: Coupler) -> None:
        x = as_ref(node.args[0])
        outs = [TensorRef(node, k) for k in range(len(node.meta["val"]))] \
            if isinstance(node.meta["val"], (list, tuple)) else [TensorRef(node)]
        for out in outs:
            for a in range(x.ndim):
                if a >= x.ndim - nd:
                    ctx.freeze(x, a, f"spatial axis of {node.target}")
                    ctx.freeze(out, a, f"spatial axis of {node.target}")
                else:
                    ctx.link_axes(x, a, out, a)
                    ctx.set_zero(out, a, zero_ok and ctx.is_zero(x, a))
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
    def couple(node: fx.Node, ctx: Coupler) -> None:
        x, out = as_ref(node.args[0]), TensorRef(node)
        dims = bind(node).get(arg) or []
        dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)} if dims else set(range(x.ndim))
        for a in range(x.ndim):
            if a in dims:
                ctx.freeze(x, a, f"{node.target} moves positions along this axis")
                ctx.freeze(out, a, f"{node.target} moves positions along this axis")
            else:
                ctx.link_axes(x, a, out, a)
                ctx.set_zero(out, a, ctx.is_zero(x, a))
    return couple


rule(*ops("aten.roll.default"))(_dims_frozen("dims"))
rule(*ops("aten.flip.default"))(_dims_frozen("dims"))


@rule(*ops("aten.constant_pad_nd.default", "aten.pad.default", "aten.reflection_pad2d.default",
           "aten.replication_pad2d.default", "aten.reflection_pad1d.default", "aten.replication_pad1d.default"))
def pad(node: fx.Node, ctx: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    b = bind(node)
    padded = len(b.get("pad") or b.get("padding") or []) // 2
    value = b.get("value", 0) or 0
    for a in range(x.ndim):
        if a >= x.ndim - padded:
            ctx.freeze(x, a, "padded axis")
            ctx.freeze(out, a, "padded axis")
        else:
            ctx.link_axes(x, a, out, a)
            ctx.set_zero(out, a, value == 0 and node.target in _CONSTANT_PAD and ctx.is_zero(x, a))


@rule(*ops("aten.pixel_shuffle.default", "aten.pixel_unshuffle.default", "aten.channel_shuffle.default",
           "aten.native_channel_shuffle.default"))
def channel_mixing(node: fx.Node, ctx: Coupler) -> None:
    x, out = as_ref(node.args[0]), TensorRef(node)
    ctx.freeze(x, None, f"{node.target} reorders channels")
    ctx.freeze(out, None, f"{node.target} reorders channels")
