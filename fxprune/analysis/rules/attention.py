"""scaled_dot_product_attention: heads couple q, k, v and the output; grouped-query attention maps
each query head to its shared key/value head."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.fx as fx

from ..couple import Coupler, TensorRef, as_ref
from ..schema import bind, set_arg
from . import ops, rule

if TYPE_CHECKING:
    from . import Shape


def _sdpa_rewrite(node: fx.Node, r: Any) -> None:
    b = bind(node)
    q = as_ref(b["query"])
    old_e, new_e = r.old_shape(q)[-1], r.new_shape(q)[-1]
    if old_e != new_e and b.get("scale") is None:
        # The default scale is 1/sqrt(E): keep the original one when head dims shrink.
        set_arg(node, "scale", 1.0 / math.sqrt(old_e))


def sdpa_macs(node: fx.Node, shape: Shape) -> int:
    """q @ k^T and the weights @ v (as ``FlopCounterMode`` counts it, MACs = its flops / 2)."""
    b = bind(node)
    q, k, v = (shape(as_ref(b[n])) for n in ("query", "key", "value"))
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


@rule(*ops("aten.scaled_dot_product_attention.default"), rewrite=_sdpa_rewrite, cost=sdpa_macs)
def sdpa(node: fx.Node, coupler: Coupler) -> None:
    b = bind(node)
    q, k, v, out = as_ref(b["query"]), as_ref(b["key"]), as_ref(b["value"]), TensorRef(node)
    nd = q.ndim
    for a in range(nd - 3):
        for ref in (k, v, out):
            coupler.link_axes(q, a, ref, a)
    if nd >= 3:
        h, hk = coupler.shape(q)[-3], coupler.shape(k)[-3]
        coupler.link_axes(q, -3, out, -3)
        coupler.link_axes(k, -3, v, -3)
        if h == hk:
            coupler.link_axes(q, -3, k, -3)
        elif hk and h % hk == 0:
            coupler.link(coupler.el(q, -3), coupler.el(k, -3)[np.arange(h) // (h // hk)])
        else:
            coupler.freeze(q, -3, "query heads do not divide key heads")
    coupler.link_axes(q, -2, out, -2)
    coupler.link_axes(k, -2, v, -2)
    coupler.mark_inexact(k, -2, "attention softmax over keys")
    coupler.link_axes(q, -1, k, -1)
    if not (coupler.is_zero(q, -1) or coupler.is_zero(k, -1)):
        coupler.mark_inexact(q, -1, "attention scores sum over this axis")
    coupler.link_axes(v, -1, out, -1)
    coupler.set_zero(out, -1, coupler.is_zero(v, -1))
    mask = as_ref(b.get("attn_mask"))
    if mask is not None:
        full = list(coupler.shape(out)[:-1]) + [coupler.shape(k)[-2]]
        refs = [(q, a) for a in range(nd - 1)] + [(k, nd - 2)]
        shift = len(full) - mask.ndim
        for a in range(mask.ndim):
            ref, ra = refs[a + shift]
            if coupler.shape(mask)[a] == full[a + shift]:
                coupler.link_axes(mask, a, ref, ra)
