"""Mask kinds every method can start from; method-specific kinds (Bayesian, hard-concrete, per-sample
saliency) live with their passes. A kind is any ``nn.Module`` whose ``forward()`` returns one value per
channel (or, with ``per_sample = True``, ``forward(x)`` returns (batch, channels))."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Scale", "Fixed"]


class Scale(nn.Module):
    """A learned scale per channel, initialised to ``init`` (slimming's scales, scratch's gates)."""

    def __init__(self, channels: int, init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self) -> torch.Tensor:
        return self.weight


class Fixed(nn.Module):
    """Given values (a buffer, not trained): deterministic masks for tests and for folding."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", torch.as_tensor(values, dtype=torch.float32).clone())

    def forward(self) -> torch.Tensor:
        return self.value
