"""Normalisations on the meta device, shaped instead of run.

Their meta kernels run Python reference code, slow next to a shape rule, so a recording on meta copies of the
weights (``fxprune.tracing.record``) and the verifier that follows it on meta (``fxprune.compaction.verify``)
make the output (the input's shape and dtype) after the shape checks the kernel would make. Which ops: those
with the ``SHAPE_OF_INPUT`` role in the op registry (``fxprune.analysis.rules``).
No tracing front end is imported here: compaction uses this without them.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from fxprune.annotations import RECORDED_ON_META

from .compat import op_schema

__all__ = ["META_ON_META", "shaped_on_meta", "norm_output"]

META_ON_META = RECORDED_ON_META  # GraphModule.meta: True when recorded on meta copies of real weights

aten = torch.ops.aten

# the per-channel arguments a normalisation's kernel checks against its input
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def shaped_on_meta() -> frozenset[Any]:
    """The normalisations shaped on meta: the registry's ``SHAPE_OF_INPUT`` ops. Read it once per
    recording or run: the registry is imported here on first use, not when tracing is imported."""
    from fxprune.analysis.rules import Role, ops_with_role

    return ops_with_role(Role.SHAPE_OF_INPUT)


@functools.cache
def _per_channel_positions(func: Any) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(op_schema(func).arguments) if a.name in _PER_CHANNEL)


def norm_output(func: Any, args: tuple) -> torch.Tensor:
    """The output of a normalisation in ``shaped_on_meta()`` on meta tensors, after the shape checks its
    kernel makes: per-channel tensors match axis 1 (layer norm: the normalised trailing shape)."""
    x = args[0]
    if func is aten.layer_norm.default:
        want = tuple(args[1])
        if tuple(x.shape[x.dim() - len(want):]) != want:
            raise RuntimeError(f"layer_norm over {want} of an input of shape {tuple(x.shape)}")
    else:
        want = (x.shape[1],)
        if func is aten.group_norm.default and x.shape[1] % args[1]:
            raise RuntimeError(f"group_norm: {x.shape[1]} channels in {args[1]} groups")
    for i in _per_channel_positions(func):
        w = args[i] if i < len(args) else None
        if (isinstance(w, torch.Tensor) and tuple(w.shape) != want
                and w.numel() != (x.shape[1] if len(want) == 1 else -1)):
            raise RuntimeError(f"{func}: a per-channel tensor of shape {tuple(w.shape)} for {want}")
    return torch.empty_like(x)
