"""Mask kinds every method can start from; method-specific kinds (Bayesian, hard-concrete, per-sample
saliency) live with their passes. A kind is any ``nn.Module`` whose ``forward()`` returns one value per
channel (or, with ``per_sample = True``, ``forward(x)`` returns (batch, channels))."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Scale", "Fixed"]


class Scale(nn.Module):
    """A learned scale per channel (scratch's gates, slimming's scales where no BatchNorm is). The
    parameter starts at ``magnitude`` and the mask is ``weight / magnitude``, so it starts at 1 (the
    original model) while the parameter lives on whatever scale it must be compared with (slimming:
    the model's mean |gamma|, so one threshold and one L1 strength serve BatchNorm scales and these)."""

    def __init__(self, channels: int, magnitude: float = 1.0) -> None:
        super().__init__()
        if not magnitude > 0:
            raise ValueError(f"Scale: magnitude must be > 0, got {magnitude}")
        self.magnitude = float(magnitude)
        self.weight = nn.Parameter(torch.full((channels,), self.magnitude))

    def forward(self) -> torch.Tensor:
        return self.weight if self.magnitude == 1.0 else self.weight / self.magnitude


class Fixed(nn.Module):
    """Given values (a buffer, not trained): deterministic masks for tests and for folding."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", torch.as_tensor(values, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:  # x: where it replaces a per-sample mask
        return self.value
