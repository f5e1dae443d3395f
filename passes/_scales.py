"""Shared machinery of the passes that score a channel by a scale learned on the BatchNorms of a trained
copy of the user's eager model, under one global threshold (slimming: |gamma|; scratch: its gates).

:class:`LearnedScales` holds what they have in common: their selection defaults (global scope, no
normalisation: the scales are comparable across layers), the training data they need, handing the
trained copy to compaction, and the fallback for a group without a BatchNorm (the L1 norm of its
producing filters, rescaled to the model's mean scale so it competes under the same threshold
without dominating or vanishing; fxprune's choice, not the papers').
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.tracing.compat import batch_norm_types
from .base import Pass, PassContext
from .l1 import producer_l1

__all__ = ["LearnedScales", "BN", "mean_scale", "rescaled_l1"]

BN = batch_norm_types()


def mean_scale(values: dict[Any, np.ndarray]) -> float:
    """The mean over every channel of ``values`` (one array per BatchNorm or group); 1 when there is none."""
    return float(np.mean(np.concatenate(list(values.values())))) if values else 1.0


def rescaled_l1(groups: ChannelGroups, group: Group, tensor: Callable[[str], torch.Tensor], mean: float) -> np.ndarray:
    """The fallback score of a group without a BatchNorm: the L1 norm of its producing filters
    (``producer_l1``), rescaled so that the group's mean is ``mean``."""
    total = producer_l1(groups, group, tensor)
    return total * mean / max(float(total.mean()), 1e-12)


@dataclass(frozen=True)
class LearnedScales(Pass):
    """Base of slimming and scratch (see the module docstring)."""

    scope = "global"
    normalize = "none"
    needs = ("train_loader",)

    def train_loader(self, ctx: PassContext, purpose: str) -> Any:
        """The user's ``train_loader``; an error saying what the pass needs it ``purpose`` for when absent."""
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError(f"{self.name} needs train_loader= {purpose}")
        return loader

    @staticmethod
    def hand_over(ctx: PassContext, work: nn.Module, changes: dict[str, torch.Tensor] | None = None,
                  evaluate: bool = True) -> None:
        """The trained copy ``work``'s whole state (``changes`` loaded over it) goes to compaction
        through ``ctx.weights``: the pruned model is the trained network, not the user's. With
        ``evaluate`` and the user's ``evaluate``, its metrics are reported (``trained_metrics``: the
        bar pruning is held to)."""
        state = {k: v.detach().clone() for k, v in work.state_dict().items()}
        if changes:
            state.update(changes)
            work.load_state_dict(state)
        ctx.weights.update(state)
        if evaluate and ctx.data.get("evaluate") is not None:
            ctx.report["trained_metrics"] = ctx.data["evaluate"](work)
