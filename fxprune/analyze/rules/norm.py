"""Normalisation layers. Per-channel statistics (BatchNorm, InstanceNorm, whole GroupNorm groups) are
exact under removal; statistics over a pruned axis (LayerNorm, RMSNorm) are not, and say so."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind, set_arg
from . import ops, rule

NORM = "norm"


def _per_channel(node: fx.Node, ctx: Coupler, x: TensorRef, out: TensorRef, params: list[Any], weight: Any) -> None:
    c = 1 if x.ndim > 1 else 0
    for a in range(x.ndim):
        ctx.link_axes(x, a, out, a)
    for p in params:
        if as_ref(p) is not None:
            ctx.link_axes(out, c, p, 0)
            ctx.role(p, 0, NORM)
    ctx.set_zero(out, c, as_ref(weight) is not None)


@rule(*ops("aten.batch_norm.default", "aten.instance_norm.default"))
def batch_norm(node: fx.Node, ctx: Coupler) -> None:
    b = bind(node)
    _per_channel(node, ctx, as_ref(b["input"]), TensorRef(node),
                 [b["weight"], b["bias"], b["running_mean"], b["running_var"]], b["weight"])


@rule(*ops("aten._native_batch_norm_legit_no_training.default"))
def batch_norm_legit(node: fx.Node, ctx: Coupler) -> None:
    b = bind(node)
    _per_channel(node, ctx, as_ref(b["input"]), TensorRef(node, 0),
                 [b["weight"], b["bias"], b["running_mean"], b["running_var"]], b["weight"])
    for k in range(1, len(node.meta["val"])):
        ctx.freeze(TensorRef(node, k), None, "batch-norm statistics output")


def _group_norm_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    x = as_ref(b["input"])
    old, new = r.old_shape(x)[1], r.new_shape(x)[1]
    if old != new:
        set_arg(node, "num_groups", b["num_groups"] * new // old)


@rule(*ops("aten.group_norm.default"), rewrite=_group_norm_rewrite)
def group_norm(node: fx.Node, ctx: Coupler) -> None:
    b = bind(node)
    x, out = as_ref(b["input"]), TensorRef(node)
    _per_channel(node, ctx, x, out, [b["weight"], b["bias"]], b["weight"])
    # A whole group of channels shares statistics: it is removed as one unit, which stays exact.
    cpg = ctx.shape(x)[1] // int(b["num_groups"])
    xe = ctx.el(x, 1)
    ctx.link(xe, xe[(np.arange(len(xe)) // cpg) * cpg])


def _normalized_shape_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    x = as_ref(b["input"])
    k = len(b["normalized_shape"])
    set_arg(node, "normalized_shape", list(r.new_shape(x)[r.old_ndim(x) - k:]))


def _normalised_shape(node: fx.Node, ctx: Coupler, weights: list[Any]) -> None:
    b = bind(node)
    x, out = as_ref(b["input"]), TensorRef(node)
    k = len(b["normalized_shape"])
    for a in range(x.ndim):
        ctx.link_axes(x, a, out, a)
    for i in range(k):
        a = x.ndim - k + i
        ctx.mark_inexact(x, a, f"{node.target.__name__} normalises over this axis")
        for p in weights:
            if as_ref(p) is not None:
                ctx.link_axes(out, a, p, i)
                ctx.role(p, i, NORM)
        ctx.set_zero(out, a, as_ref(b["weight"]) is not None)


@rule(*ops("aten.layer_norm.default"), rewrite=_normalized_shape_rewrite)
def layer_norm(node: fx.Node, ctx: Coupler) -> None:
    b = bind(node)
    _normalised_shape(node, ctx, [b["weight"], b["bias"]])


@rule(*ops("aten.rms_norm.default"), rewrite=_normalized_shape_rewrite)
def rms_norm(node: fx.Node, ctx: Coupler) -> None:
    _normalised_shape(node, ctx, [bind(node)["weight"]])
