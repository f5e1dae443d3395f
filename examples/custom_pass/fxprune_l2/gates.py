"""gates: a learned-mask pass (a third-party example). A sigmoid gate per channel of every prunable group
is inserted into the traced graph, trained with the weights under an L1 penalty on the gates, and the
gates are the scores; the trained network, gates folded into its weights, is what gets compacted.

``fxprune run model.py --pass gates --ratio 0.5 --opt epochs=2``
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fxprune.masking.train import train_masked
from fxprune.passes.base import Decision, Pass, PassContext
from fxprune.recovery.engine import Hook


class Gate(nn.Module):
    """sigmoid(logit) per channel; starts near 1 (logit 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.full((channels,), 3.0))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


class Penalty(Hook):
    """lam * the sum of every gate: pushes the unneeded ones toward 0."""

    def __init__(self, gates: list[Gate], lam: float) -> None:
        self.gates, self.lam = gates, lam

    def loss(self, state, output, target) -> torch.Tensor:
        return self.lam * sum(g().sum() for g in self.gates)


@dataclass(frozen=True)
class SigmoidGates(Pass):
    name = "gates"
    description = "sigmoid channel gates learned with an L1 penalty (example learned-mask pass)"
    scope = "global"        # gates are comparable across layers: one threshold
    normalize = "none"
    needs = ("train_loader",)

    epochs: int = 1
    lr: float = 0.05        # the gates' own learning rate (Adam)
    weight_lr: float = 0.01  # the weights' (SGD); 0 trains the gates alone
    lam: float = 1e-3

    def score(self, ctx: PassContext) -> Decision:
        masked = ctx.insert_masks(lambda group: Gate(len(group)))
        gates = list(masked.masks.values())
        train_masked(masked, ctx.data, epochs=self.epochs, lr=self.weight_lr, mask_lr=self.lr, mask_optimizer="adamw",
                     weights=None if self.weight_lr > 0 else [], hooks=[Penalty(gates, self.lam)])
        values = masked.values()                    # group id -> gate per channel
        scores = {g.id: values.get(g.id, np.full(len(g), np.inf)) for g in self.prunable(ctx)}
        return Decision(scores,
                        weights=masked.fold(values).weights,  # the trained network, gates folded in
                        masks=values)                         # shown by `fxprune inspect --graph`
