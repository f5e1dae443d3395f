"""The learned passes' one recipe around their masks: train the masked copy with the one engine, the weights and
the masks each in an optimiser of their own (jointly on the same batches, or alternating on a loader of the
masks' own), leave it in eval mode, and evaluate the network it trained. What stays each pass's own is its
method: the kind of mask (``fxprune.masking.kinds``, or any module), the loss terms and schedules (hooks), the
optimisers' settings, and what it reads from the trained masks afterwards (scores, folded weights)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from fxprune.recovery.engine import Hook, LossFn, MaskTraining, train

from .insert import MaskedModel

__all__ = ["train_masked", "trained_metrics"]


def train_masked(masked: MaskedModel, data: Mapping[str, Any], *, epochs: int, lr: float, optimizer: str = "sgd",
                 mask_lr: float, mask_optimizer: str = "adam", mask_weight_decay: float | None = None,
                 mask_betas: tuple[float, float] | None = None, mask_loader: Iterable[Any] | None = None,
                 masks: Sequence[nn.Parameter] | None = None, weights: Sequence[nn.Parameter] | None = None,
                 loader: Iterable[Any] | None = None, loss: LossFn | None = None, module: nn.Module | None = None,
                 hooks: Sequence[Hook] = (), **engine: Any) -> list[dict[str, Any]]:
    """Train ``masked`` (``fxprune.masking.insert_masks``'s copy) with ``fxprune.recovery.train``; returns the
    engine's log (empty when ``epochs`` is 0: nothing trains). The copy ends in eval mode.

    - the weights: ``weights`` (default: every weight of the copy; ``[]`` leaves them as they are) with
      ``optimizer`` at ``lr``, on ``loader`` (default: ``data["train_loader"]``) with ``loss`` (default:
      ``data["loss"]``, else cross-entropy);
    - the masks: ``masks`` (default: every mask parameter of the copy; a pass whose masks are other tensors,
      such as slimming's BatchNorm scales, names them) with ``mask_optimizer`` at ``mask_lr`` (and
      ``mask_weight_decay``, ``mask_betas``), on ``mask_loader`` when given (alternating with the weights'
      steps), else on the weights' batches;
    - ``module``: what runs, when it wraps the masked module (anp's adversarial training); ``hooks``: the
      method's loss terms and schedules; ``engine``: any other option of ``train`` (``schedule``,
      ``weight_decay``, ``nesterov``...)."""
    log: list[dict[str, Any]] = []
    if epochs > 0:
        device = next(iter(masked.module.parameters())).device
        trained = list(masked.mask_parameters() if masks is None else masks)
        own = {k: v for k, v in (("weight_decay", mask_weight_decay), ("betas", mask_betas), ("loader", mask_loader))
               if v is not None}
        log = train(module if module is not None else masked.module,
                    loader if loader is not None else data["train_loader"],
                    loss if loss is not None else data.get("loss"), epochs, lr, device, optimizer=optimizer,
                    parameters=masked.weight_parameters() if weights is None else weights, hooks=hooks,
                    masks=MaskTraining(trained, lr=mask_lr, optimizer=mask_optimizer, **own) if trained else None,
                    **engine)
    masked.module.eval()
    return log


def trained_metrics(masked: MaskedModel, data: Mapping[str, Any]) -> dict[str, float] | None:
    """``evaluate()`` of the network the pass trained (the report's ``trained_metrics``), or None without one."""
    evaluate = data.get("evaluate")
    return evaluate(masked.module) if evaluate is not None else None
