"""Normalisation layers. Per-channel statistics (BatchNorm, InstanceNorm, whole GroupNorm groups) are
exact under removal; statistics over a pruned axis are not, and say so: LayerNorm and RMSNorm over
their normalised axes, batch norm from the batch (training mode, or weight standardisation, which
normalises each filter over its input channels), instance and group norm over the axes past the
channels. A weight norm's L2 norm is exact over the zeroed positions of its direction ``v``.

A batch or instance norm that computes its statistics (``statistics_computed``) is its own case of the
op's record: the general rule is the per-channel one."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind, set_arg
from . import Role, ops, rule

NORM = "norm"
DIRECTION = "direction"  # v of a weight norm: its scale g carries a removed slice's zero


def _per_channel(node: fx.Node, coupler: Coupler, x: TensorRef, out: TensorRef, params: list[Any]) -> None:
    """``params``: weight, bias, then the running statistics (mean first) where the op has them."""
    c = 1 if x.ndim > 1 else 0
    for a in range(x.ndim):
        coupler.link_axes(x, a, out, a)
    for p in params:
        if as_ref(p) is not None:
            coupler.link_axes(out, c, p, 0)
            coupler.role(p, 0, NORM)
    coupler.set_zero(out, c, _zero_out(coupler, x, c, *params[:3]))


def _zero_out(coupler: Coupler, x: TensorRef, c: int, weight: Any, bias: Any, mean: Any = None) -> bool:
    """A removed channel's output is zero in the masked model: its bias is zero, and either its scale is
    zero or its input is zero and so is the mean subtracted from it (a running mean that is zeroed too,
    or statistics computed from the channel itself: a whole GroupNorm group is one channel)."""
    def zero(t: Any, axis: int = 0) -> bool:
        return as_ref(t) is None or coupler.is_zero(t, axis)

    scaled_out = as_ref(weight) is not None and coupler.is_zero(weight, 0)
    return zero(bias) and (scaled_out or (coupler.is_zero(x, c) and zero(mean)))


def _statistics_over(coupler: Coupler, x: TensorRef, axes: Iterable[int], why: str) -> None:
    """Statistics computed over ``axes`` (a mean and a variance): a pruned position there changes them."""
    for a in axes:
        coupler.mark_inexact(x, a, why)


def statistics_computed(node: fx.Node) -> bool:
    """A batch or instance norm that computes its statistics from its input (training mode,
    ``use_input_stats``, or no running statistics to read) instead of reading running ones."""
    b = bind(node)
    return bool(b.get("training", b.get("use_input_stats", False))) or as_ref(b.get("running_mean")) is None


_NATIVE_BATCH_NORMS = ops("aten._native_batch_norm_legit_no_training.default", "aten._native_batch_norm_legit.default",
                          "aten._native_batch_norm_legit.no_stats", "aten.native_batch_norm.default")
_BATCH_NORMS = ops("aten.batch_norm.default") + _NATIVE_BATCH_NORMS


@rule(*ops("aten.batch_norm.default"), roles={Role.NORM, Role.STATE_UPDATE, Role.SHAPE_OF_INPUT})
@rule(*_NATIVE_BATCH_NORMS, roles={Role.NORM})
def batch_norm(node: fx.Node, coupler: Coupler) -> None:
    """With running statistics: per channel, exact."""
    b = bind(node)
    _per_channel(node, coupler, as_ref(b["input"]), TensorRef(node, 0),
                 [b["weight"], b["bias"], b.get("running_mean"), b.get("running_var")])
    if isinstance(node.meta["val"], (tuple, list)):  # the native forms also return statistics
        for k in range(1, len(node.meta["val"])):
            coupler.freeze(TensorRef(node, k), None, "batch-norm statistics output")


@rule(*_BATCH_NORMS, when=statistics_computed)
def batch_norm_from_the_batch(node: fx.Node, coupler: Coupler) -> None:
    """Statistics from the batch reduce every axis but the channel axis: over the batch in training
    mode, and over a weight's input channels in weight standardisation (``F.batch_norm(w.reshape(1,
    out, -1), None, None, training=True)``)."""
    batch_norm(node, coupler)
    x = as_ref(bind(node)["input"])
    c = 1 if x.ndim > 1 else 0
    _statistics_over(coupler, x, [a for a in range(x.ndim) if a != c], "batch-norm statistics over this axis")


@rule(*ops("aten.instance_norm.default"), roles={Role.NORM, Role.STATE_UPDATE, Role.SHAPE_OF_INPUT})
def instance_norm(node: fx.Node, coupler: Coupler) -> None:
    """With running statistics (``use_input_stats=False``): per channel, exact."""
    b = bind(node)
    _per_channel(node, coupler, as_ref(b["input"]), TensorRef(node),
                 [b["weight"], b["bias"], b["running_mean"], b["running_var"]])


@rule(*ops("aten.instance_norm.default"), when=statistics_computed)
def instance_norm_from_the_input(node: fx.Node, coupler: Coupler) -> None:
    """Statistics of each sample's channel, over the axes past the channels."""
    instance_norm(node, coupler)
    x = as_ref(bind(node)["input"])
    _statistics_over(coupler, x, range(2, x.ndim), "instance-norm statistics over this axis")


def _group_norm_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    x = as_ref(b["input"])
    old, new = r.old_shape(x)[1], r.new_shape(x)[1]
    if old != new:
        set_arg(node, "num_groups", b["num_groups"] * new // old)


@rule(*ops("aten.group_norm.default"), rewrite=_group_norm_rewrite, roles={Role.NORM, Role.SHAPE_OF_INPUT})
def group_norm(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    x, out = as_ref(b["input"]), TensorRef(node)
    _per_channel(node, coupler, x, out, [b["weight"], b["bias"]])
    # A whole group of channels shares statistics: it is removed as one unit, which stays exact.
    cpg = coupler.shape(x)[1] // int(b["num_groups"])
    xe = coupler.el(x, 1)
    coupler.link(xe, xe[(np.arange(len(xe)) // cpg) * cpg])
    _statistics_over(coupler, x, range(2, x.ndim), "group-norm statistics over this axis")


def _normalized_shape_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    x = as_ref(b["input"])
    k = len(b["normalized_shape"])
    set_arg(node, "normalized_shape", list(r.new_shape(x)[r.old_ndim(x) - k:]))


def _normalised_shape(node: fx.Node, coupler: Coupler, weights: list[Any]) -> None:
    b = bind(node)
    x, out = as_ref(b["input"]), TensorRef(node, 0)
    k = len(b["normalized_shape"])
    for a in range(x.ndim):
        coupler.link_axes(x, a, out, a)
    for i in range(k):
        a = x.ndim - k + i
        coupler.mark_inexact(x, a, f"{node.target.__name__} normalises over this axis")
        for p in weights:
            if as_ref(p) is not None:
                coupler.link_axes(out, a, p, i)
                coupler.role(p, i, NORM)
        coupler.set_zero(out, a, as_ref(b["weight"]) is not None)


@rule(*ops("aten.layer_norm.default"), rewrite=_normalized_shape_rewrite, roles={Role.NORM, Role.SHAPE_OF_INPUT})
def layer_norm(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    _normalised_shape(node, coupler, [b["weight"], b["bias"]])


@rule(*ops("aten.native_layer_norm.default"), rewrite=_normalized_shape_rewrite, roles={Role.NORM})
def native_layer_norm(node: fx.Node, coupler: Coupler) -> None:
    """``layer_norm`` that also returns each row's mean and 1/std (the input's leading axes, size 1 on the
    normalised ones): a row's statistics go with the row."""
    b = bind(node)
    _normalised_shape(node, coupler, [b["weight"], b["bias"]])
    x, k = as_ref(b["input"]), len(b["normalized_shape"])
    for stat in (TensorRef(node, 1), TensorRef(node, 2)):
        for a in range(x.ndim - k):
            coupler.link_axes(x, a, stat, a)


@rule(*ops("aten.rms_norm.default"), rewrite=_normalized_shape_rewrite, roles={Role.NORM})
def rms_norm(node: fx.Node, coupler: Coupler) -> None:
    _normalised_shape(node, coupler, [bind(node)["weight"]])


@rule(*ops("aten._weight_norm.default"))
def weight_norm(node: fx.Node, coupler: Coupler) -> None:
    """``v * g / ||v||`` with the norm over every axis but ``dim`` (every axis when ``dim`` is -1): an L2
    norm, so exact over positions where ``v`` is zero, as a parameter's pruned positions are."""
    b = bind(node)
    v, g, out = as_ref(b["v"]), as_ref(b["g"]), TensorRef(node)
    dim = int(b["dim"])
    kept = dim % v.ndim if dim != -1 else None
    for a in range(v.ndim):
        coupler.link_axes(v, a, out, a)
        if a == kept:
            coupler.link_axes(g, a, out, a)
            coupler.role(v, a, DIRECTION)
            coupler.role(g, a, NORM)
            coupler.set_zero(out, a, coupler.is_zero(v, a) or coupler.is_zero(g, a))
            continue
        if not coupler.is_zero(v, a):
            coupler.mark_inexact(v, a, "weight norm over this axis")
        coupler.set_zero(out, a, coupler.is_zero(v, a))
