"""Models that compute their own loss: a torchvision detector (``model(images, targets)`` returns a dict of losses in
training mode), a Hugging Face model (``model(**inputs, labels=...)`` returns an output with ``.loss``), most
detection code. Without a ``loss_fn``, the engine gives the batch's target to the forward parameter that takes
it (table :data:`TARGET_PARAMETERS`) and trains on what comes back: the sum of a dict of losses (each term is
logged), an output's ``.loss``, or a scalar tensor. A forward without such a parameter gets cross-entropy, as
before.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["TARGET_PARAMETERS", "target_parameter", "reduce_loss"]

# forward parameters that take the batch's target, in the order they are looked for
TARGET_PARAMETERS = ("targets", "target", "labels")


def target_parameter(module: nn.Module) -> str | None:
    """The parameter of ``module.forward`` that takes the batch's target (None: the model computes no loss)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (a C++ module)
        return None
    return next((name for name in TARGET_PARAMETERS if name in params), None)


def reduce_loss(output: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss a model returned, and its terms by name (a dict of losses: each one; otherwise none)."""
    if isinstance(output, Mapping) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        terms = {str(k): v for k, v in output.items()}
        if any(v.numel() != 1 for v in terms.values()):
            shapes = {k: tuple(v.shape) for k, v in terms.items() if v.numel() != 1}
            raise ValueError(f"the model returned a dict with non-scalar entries {shapes} when given its targets: "
                             "expected a dict of losses (or define loss(output, target) in the model file)")
        return sum(v.reshape(()) for v in terms.values()), {k: float(v.detach()) for k, v in terms.items()}
    loss = getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else output
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(()), {}
    raise ValueError(f"the model returned {type(output).__name__} when given its targets, not a loss: expected a "
                     "dict of losses, an output with .loss or a scalar tensor (or define loss(output, target) in the "
                     "model file)")
