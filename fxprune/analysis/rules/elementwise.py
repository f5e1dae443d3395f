"""Elementwise ops: broadcasting identity maps; exact-zero propagation for pruned positions."""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind
from . import IGNORED, Role, ops, rule

# f(0) == 0: a pruned (zeroed) position stays zero.
ZERO_PRESERVING = ops(
    "aten.relu.default", "aten.relu_.default", "aten.gelu.default", "aten.gelu_.default",
    "aten.silu.default", "aten.silu_.default", "aten.tanh.default", "aten.tanh_.default",
    "aten.hardswish.default", "aten.hardswish_.default", "aten.leaky_relu.default", "aten.leaky_relu_.default",
    "aten.elu.default", "aten.elu_.default", "aten.mish.default", "aten.mish_.default", "aten.neg.default",
    "aten.abs.default", "aten.sqrt.default", "aten.square.default", "aten.sin.default", "aten.erf.default",
    "aten.sign.default", "aten.selu.default", "aten.celu.default",
    "aten.dropout.default", "aten.dropout_.default", "aten.feature_dropout.default", "aten.alpha_dropout.default",
    "aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default",
    "aten.detach_.default", "aten.lift_fresh_copy.default", "aten._to_copy.default", "aten.to.dtype",
    "aten.to.dtype_layout",
    "aten.to.device", "aten.to.other", "aten.type_as.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.relu6.default", "aten.floor.default", "aten.ceil.default", "aten.round.default", "aten.trunc.default",
    "aten.zeros_like.default",
)
# f(0) != 0 (or unknown): a pruned position becomes a nonzero constant.
NOT_ZERO_PRESERVING = ops(
    "aten.sigmoid.default", "aten.sigmoid_.default", "aten.exp.default", "aten.cos.default",
    "aten.hardsigmoid.default", "aten.hardsigmoid_.default", "aten.rsqrt.default", "aten.reciprocal.default",
    "aten.log.default", "aten.softplus.default", "aten.erfc.default", "aten.logical_not.default",
    "aten.bitwise_not.default", "aten.isnan.default", "aten.log1p.default", "aten.expm1.default",
    "aten.ones_like.default", "aten.full_like.default", "aten.empty_like.default", "aten.rand_like.default",
    "aten.randn_like.default", "aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default",
    "aten.pow.Tensor_Scalar", "aten.nan_to_num.default", "aten.fill_.Tensor", "aten.fill_.Scalar",
    "aten.fill.Scalar", "aten.fill.Tensor", "aten.copy_.default", "aten.copy.default", "aten.zero_.default",
)
SUM_LIKE = ops("aten.add.Tensor", "aten.add_.Tensor", "aten.sub.Tensor", "aten.sub_.Tensor",
               "aten.maximum.default", "aten.minimum.default", "aten.max.other", "aten.min.other", "aten.where.self")
PRODUCT_LIKE = ops("aten.mul.Tensor", "aten.mul_.Tensor")
QUOTIENT_LIKE = ops("aten.div.Tensor", "aten.div_.Tensor", "aten.div.Tensor_mode")
_WHERE = ops("aten.where.self")
OTHER_BROADCAST = ops(
    "aten.eq.Tensor", "aten.ne.Tensor", "aten.lt.Tensor", "aten.le.Tensor", "aten.gt.Tensor", "aten.ge.Tensor",
    "aten.eq.Scalar", "aten.ne.Scalar", "aten.lt.Scalar", "aten.le.Scalar", "aten.gt.Scalar", "aten.ge.Scalar",
    "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.masked_fill_.Scalar", "aten.pow.Tensor_Tensor",
    "aten.remainder.Tensor", "aten.remainder.Scalar", "aten.fmod.Tensor", "aten.__and__.Tensor",
    "aten.__or__.Tensor", "aten.bitwise_and.Tensor", "aten.bitwise_or.Tensor", "aten.logical_and.default",
    "aten.logical_or.default", "aten.floor_divide.default", "aten.rsub.Scalar", "aten.rsub.Tensor",
    "aten.clamp.Tensor", "aten.clamp_min.Tensor", "aten.clamp_max.Tensor",
    "aten.atan2.default", "aten.lerp.Scalar", "aten.lerp.Tensor", "aten.addcmul.default", "aten.addcdiv.default",
    "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar", "aten.xlogy.Tensor",
    "aten.bitwise_xor.Tensor", "aten.logical_xor.default", "aten.__xor__.Tensor",
)

IGNORED.update(ops(
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten._assert_async.msg",
    "aten.sym_constrain_range_for_size.default", "aten.sym_constrain_range.default",
    "aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int", "aten._functional_assert_async.msg",
))
IGNORED.update({operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.mod,
                operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge})


def broadcast_link(node: fx.Node, coupler: Coupler) -> list[TensorRef]:
    """Link every tensor input to the output along right-aligned axes of equal size."""
    out = TensorRef(node)
    inputs = [r for r in (as_ref(a) for a in flat_args(node)) if r is not None]
    for ref in inputs:
        shift = out.ndim - ref.ndim
        if shift < 0:
            coupler.freeze(ref, None, f"{node.target} reduces rank")
            continue
        for a in range(ref.ndim):
            coupler.link_axes(ref, a, out, a + shift)
    return inputs


def flat_args(node: fx.Node) -> list[Any]:
    """A node's arguments, positional then keyword, with one level of lists and tuples opened."""
    flat: list[Any] = []
    for a in list(node.args) + list(node.kwargs.values()):
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return flat


def _full_inputs_on(coupler: Coupler, out: TensorRef, inputs: list[TensorRef],
                    axis: int) -> list[tuple[TensorRef, int]]:
    """Inputs that carry output axis ``axis`` at full size (not broadcast)."""
    found = []
    for ref in inputs:
        a = axis - (out.ndim - ref.ndim)
        if 0 <= a < ref.ndim and coupler.shape(ref)[a] == coupler.shape(out)[axis]:
            found.append((ref, a))
    return found


def _scalars(node: fx.Node) -> list[Any]:
    return [a for a in flat_args(node) if isinstance(a, (int, float, bool))]


@rule(*ZERO_PRESERVING)
def unary_zero(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    inputs = broadcast_link(node, coupler)
    src = inputs[0] if inputs else None
    for a in range(out.ndim):
        coupler.set_zero(out, a, src is not None and src.ndim == out.ndim and coupler.is_zero(src, a))


@rule(*NOT_ZERO_PRESERVING, *OTHER_BROADCAST)
def unary_other(node: fx.Node, coupler: Coupler) -> None:
    broadcast_link(node, coupler)


@rule(*SUM_LIKE)
def sum_like(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    inputs = broadcast_link(node, coupler)
    if node.target in _WHERE and len(inputs) == 3:
        inputs = inputs[1:]  # the condition does not carry values
    for a in range(out.ndim):
        carriers = _full_inputs_on(coupler, out, inputs, a)
        coupler.set_zero(out, a, bool(carriers) and not _has_scalar_operand(node)
                         and all(coupler.is_zero(r, x) for r, x in carriers))


def _has_scalar_operand(node: fx.Node) -> bool:
    """add(x, 3.0) shifts zeros; alpha alone does not."""
    b = bind(node)
    for name in ("other", "self", "input"):
        v = b.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0:
            return True
    return False


@rule(*PRODUCT_LIKE)
def product_like(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    inputs = broadcast_link(node, coupler)
    zero_scalar = any(isinstance(s, (int, float)) and s == 0 for s in _scalars(node))
    for a in range(out.ndim):
        carriers = _full_inputs_on(coupler, out, inputs, a)
        coupler.set_zero(out, a, zero_scalar or any(coupler.is_zero(r, x) for r, x in carriers))


@rule(*QUOTIENT_LIKE)
def quotient_like(node: fx.Node, coupler: Coupler) -> None:
    out = TensorRef(node)
    broadcast_link(node, coupler)
    num = as_ref(node.args[0])
    for a in range(out.ndim):
        ax = a - (out.ndim - num.ndim) if num is not None else -1
        coupler.set_zero(out, a, num is not None and 0 <= ax < num.ndim
                     and coupler.shape(num)[ax] == coupler.shape(out)[a] and coupler.is_zero(num, ax))


@rule(*ops("aten.prelu.default", "aten._prelu_kernel.default"), roles={Role.SLOPE})
def prelu(node: fx.Node, coupler: Coupler) -> None:
    """PReLU's weight is per channel (axis 1, or 0 for 1-D input), not right-aligned like broadcasting."""
    x, w, out = as_ref(node.args[0]), as_ref(node.args[1]), TensorRef(node)
    for a in range(x.ndim):
        coupler.link_axes(x, a, out, a)
        coupler.set_zero(out, a, coupler.is_zero(x, a))
    if w is not None and w.ndim == 1:
        coupler.link_axes(w, 0, out, 1 if x.ndim >= 2 else 0)  # a single shared slope (size 1) links nothing
    elif w is not None:
        coupler.freeze(w, None, "prelu weight of unusual rank")
        coupler.freeze(out, None, "prelu weight of unusual rank")
