"""The training engine: one loop for recovery (fine-tuning the compacted model) and for passes that train.

SGD with momentum and weight decay, a cosine learning-rate schedule over epochs. Everything else a
method needs plugs in through :class:`Hook` objects: an extra loss term (sparsity, distillation),
code after each optimiser step (clamping, multiplier ascent), and progress reporting — the command
line's progress bar is itself a hook, so the engine never imports a UI library.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train", "finetune", "Hook", "TrainState", "LossFn"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class TrainState:
    """What hooks see: updated before every hook call."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    batches: int | None                  # batches per epoch, when the loader has a length
    epoch: int = 0                       # 0-based
    batch: int = 0                       # 0-based index within the epoch
    step: int = 0                        # optimiser steps taken so far
    loss: float = math.nan               # the last batch's total loss
    log: list[dict[str, float]] = field(default_factory=list)  # one record per finished epoch


class Hook:
    """Override only what you need; every method is a no-op here."""

    def before_epoch(self, state: TrainState) -> None:
        pass

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        """An extra term added to the objective for this batch (None: nothing)."""
        return None

    def after_step(self, state: TrainState) -> None:
        pass

    def after_epoch(self, state: TrainState) -> None:
        pass


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _forward(module: nn.Module, inputs: Any) -> Any:
    """A batch's inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _epoch(state: TrainState, loader: Iterable[Any], loss_fn: LossFn, hooks: Sequence[Hook],
           device: torch.device) -> float:
    """One pass over ``loader``; returns the mean batch loss."""
    total, count = 0.0, 0
    for state.batch, batch in enumerate(loader):
        inputs, target = _to(batch, device)
        output = _forward(state.module, inputs)
        loss = loss_fn(output, target)
        for hook in hooks:
            extra = hook.loss(state, output, target)
            if extra is not None:
                loss = loss + extra
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        state.loss = float(loss.detach())
        total, count = total + state.loss, count + 1
        for hook in hooks:
            hook.after_step(state)
    if count == 0:
        raise ValueError("the training loader yielded no batches")
    return total / count


def train(module: nn.Module, train_loader: Iterable[Any], loss_fn: LossFn | None = None, epochs: int = 1,
          lr: float = 0.01, device: str | torch.device = "cpu", progress: Hook | None = None, *,
          momentum: float = 0.9, weight_decay: float = 5e-4, hooks: Sequence[Hook] = ()) -> list[dict[str, float]]:
    """Train ``module`` in place for ``epochs`` epochs; returns one log record per epoch.

    ``train_loader`` yields ``(inputs, target)`` batches; ``loss_fn(output, target)`` defaults to
    cross-entropy. The module ends on ``device`` in the train/eval mode it started in.
    """
    device = torch.device(device)
    loss_fn = loss_fn or F.cross_entropy
    hooks = [*hooks, *([progress] if progress is not None else [])]
    was_training = module.training
    module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    state = TrainState(module, optimizer, epochs, _length(train_loader))
    try:
        for state.epoch in range(epochs):
            for hook in hooks:
                hook.before_epoch(state)
            start, rate = time.perf_counter(), optimizer.param_groups[0]["lr"]
            mean = _epoch(state, train_loader, loss_fn, hooks, device)
            schedule.step()
            state.log.append({"epoch": state.epoch + 1, "loss": mean, "lr": rate,
                              "seconds": time.perf_counter() - start})
            for hook in hooks:
                hook.after_epoch(state)
    finally:
        module.train(was_training)
    return state.log


def finetune(module: nn.Module, train_loader: Iterable[Any], loss_fn: LossFn | None = None, epochs: int = 1,
             lr: float = 0.01, device: str | torch.device = "cpu", progress: Hook | None = None,
             **options: Any) -> list[dict[str, float]]:
    """Recovery with inherited weights: train the compacted module itself, at its compacted size
    (never a masked full-size copy, which would cost the speed-up). Same options as :func:`train`."""
    return train(module, train_loader, loss_fn, epochs, lr, device, progress, **options)
