"""The pass interface every scoring method implements, built-in or third-party.

A pass is a frozen dataclass whose fields are its options (``--opt key=value`` on the command line).
It must ``score`` every prunable group: one float per channel, higher = keep (``-inf`` must go,
``+inf`` must stay). Passes that train or insert gates extend this in later stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx

from .analyze.groups import ChannelGroups, Group

__all__ = ["Pass", "PassContext", "Scores"]

Scores = dict[int, np.ndarray]  # group id -> one score per channel


@dataclass
class PassContext:
    """What a pass may read: the traced graph, its groups, the model's tensors and the user's data."""

    gm: fx.GraphModule
    groups: ChannelGroups
    model: torch.nn.Module
    data: dict[str, Any] = field(default_factory=dict)  # train_loader, val_loader, loss, evaluate

    def tensor(self, name: str) -> torch.Tensor:
        obj: Any = self.gm
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


@dataclass(frozen=True)
class Pass:
    """Base class: subclass as a frozen dataclass; set ``name`` and ``description``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    scope: ClassVar[str] = "group"  # the paper's default selection scope: "group" or "global"
    needs: ClassVar[tuple[str, ...]] = ()  # model-file functions / data keywords it reads, e.g. ("train_loader",)

    def score(self, ctx: PassContext) -> Scores:
        raise NotImplementedError

    @staticmethod
    def prunable(ctx: PassContext) -> list[Group]:
        return ctx.groups.prunable
