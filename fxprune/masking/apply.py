"""The modules that put mask values where they act (inside the masked graph only, never in an output).

- :class:`Multiplier`: the masks of the groups on one axis gathered into one multiplier per position
  (1 where no group is): shape (positions,), or (batch, positions) when a mask is per sample.
- :class:`ApplyMasks`: a tensor times that multiplier along its axis: an activation, or a weight
  (a producer's rows and bias: the same product, on a tensor the size of the layer, not of the batch;
  ``hard``: the other weights of the channels, times ``mask != 0`` in eval mode only).
- :class:`ApplyTransform`: one group's channels of a tensor mapped by a (channels, channels) matrix
  (``y_j = sum_k x_k M[k, j]``; a *transform* mask's value in training, e.g. TAS's prefix widths mixed by
  channel-wise interpolation), or multiplied by a (channels,) value like any mask (its value in eval mode).
- :class:`MaskedBatchNorm`: a BatchNorm whose affine parameters are multiplied by the multiplier before
  it normalises (``gamma * m``, ``beta * m``: the same as multiplying its output, without a pass over
  the activation), with ``nn.BatchNorm``'s train/eval behaviour and running statistics, registered at
  the BatchNorm's own path so every tensor keeps the user's name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Multiplier", "ApplyMasks", "ApplyTransform", "MaskedBatchNorm"]


class Multiplier(nn.Module):
    """Position i of an axis gets ``masks[k][j]`` where ``index[i]`` points at channel j of mask k
    (0: no group, multiplier 1). ``hard``: ``mask != 0`` instead of the mask."""

    def __init__(self, index: torch.Tensor, hard: bool = False) -> None:
        super().__init__()
        self.hard = hard
        self.register_buffer("index", index, persistent=False)

    def forward(self, *masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        per_sample = [m for m in masks if m.dim() == 2]
        device = masks[0].device
        if per_sample:
            batch = per_sample[0].shape[0]
            parts = [m.to(dtype) if m.dim() == 2 else m.to(dtype).expand(batch, -1) for m in masks]
            table = torch.cat([torch.ones(batch, 1, dtype=dtype, device=device), *parts], dim=1)
            mult = table[:, self.index]
        else:
            table = torch.cat([torch.ones(1, dtype=dtype, device=device), *(m.to(dtype) for m in masks)])
            mult = table[self.index]
        return (mult != 0).to(dtype) if self.hard else mult


class ApplyMasks(Multiplier):
    """``x`` times the multiplier along ``axis`` (batch first for a per-sample one). A ``hard`` one is
    the identity in training mode."""

    def __init__(self, axis: int, index: torch.Tensor, hard: bool = False) -> None:
        super().__init__(index, hard)
        self.axis = axis

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.hard and self.training:
            return x
        mult = super().forward(*masks, dtype=x.dtype if x.is_floating_point() else torch.float32)
        shape = [mult.shape[0] if mult.dim() == 2 else 1] + [1] * (x.dim() - 1)
        shape[self.axis] = -1
        return x * mult.reshape(shape)


class ApplyTransform(nn.Module):
    """``x`` with the channels of one group (at ``positions`` along ``axis``, in channel order) replaced by
    ``channels @ M`` for a (C, C) value ``M``, or multiplied by a (C,) value."""

    def __init__(self, axis: int, positions: torch.Tensor, size: int) -> None:
        super().__init__()
        self.axis = axis
        self.whole = bool(len(positions) == size and torch.equal(positions, torch.arange(size)))
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        value = value.to(x.dtype)
        if value.dim() == 1:
            mult = torch.ones(x.shape[self.axis], dtype=x.dtype, device=x.device).index_copy(0, self.positions, value)
            shape = [1] * x.dim()
            shape[self.axis] = -1
            return x * mult.reshape(shape)
        part = x if self.whole else x.index_select(self.axis, self.positions)
        mapped = torch.movedim(torch.movedim(part, self.axis, -1) @ value, -1, self.axis)
        if x.is_contiguous():  # the matmul leaves the channels last: a 4-D activation would turn every later
            mapped = mapped.contiguous()  # convolution channels-last (oneDNN's 1x1 strided backward overruns there)
        return mapped if self.whole else x.index_copy(self.axis, self.positions, mapped)


class MaskedBatchNorm(nn.Module):
    """``batch_norm(x, gamma * m, beta * m)`` with ``nn.BatchNorm``'s running statistics and modes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                 running_var: torch.Tensor | None, num_batches_tracked: torch.Tensor | None, eps: float,
                 momentum: float | None) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)
        if running_mean is not None and num_batches_tracked is None:
            num_batches_tracked = torch.tensor(0, dtype=torch.long, device=running_mean.device)
        self.register_buffer("num_batches_tracked", num_batches_tracked)

    def forward(self, x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        factor = 0.0
        tracking = self.running_mean is not None
        if self.training and tracking:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mult = mult.to(self.weight.dtype)
        bias = self.bias * mult if self.bias is not None else None
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight * mult, bias,
                            self.training or not tracking, factor, self.eps)
