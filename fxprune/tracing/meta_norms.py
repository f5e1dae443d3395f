"""Normalisations on the meta device, shaped instead of run.

Their meta kernels run Python reference code, slow next to a shape rule, so a recording on meta copies of the
weights (``fxprune.tracing.record``) and the verifier that follows it on meta (``fxprune.compaction.verify``)
make the output (the input's shape and dtype) after the shape checks the kernel would make.
Only public torch imports: compaction uses this without importing the tracing front ends.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["META_ON_META", "SHAPE_OF_INPUT", "norm_output"]

META_ON_META = "fxprune.recorded_on_meta"  # GraphModule.meta: True when recorded on meta copies of real weights

aten = torch.ops.aten

# op -> positions of its weight-like (per-channel) arguments
SHAPE_OF_INPUT = {aten.batch_norm.default: (1, 2, 3, 4), aten.instance_norm.default: (1, 2, 3, 4),
                  aten.group_norm.default: (2, 3), aten.layer_norm.default: (2, 3)}


def norm_output(func: Any, args: tuple) -> torch.Tensor:
    """The output of a normalisation in ``SHAPE_OF_INPUT`` on meta tensors, after the shape checks its
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
    for i in SHAPE_OF_INPUT[func]:
        w = args[i] if i < len(args) else None
        if isinstance(w, torch.Tensor) and tuple(w.shape) != want and w.numel() != (x.shape[1] if len(want) == 1 else -1):
            raise RuntimeError(f"{func}: a per-channel tensor of shape {tuple(w.shape)} for {want}")
    return torch.empty_like(x)
