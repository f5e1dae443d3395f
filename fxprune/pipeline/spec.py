"""What a run is, as one value built once: :class:`RunSpec` (the model and its inputs, the pass, the budget, the
recovery, the compaction target, the user's data), with the two option groups of ``fxprune.prune``:
:class:`Budget` (what to remove, and where) and :class:`Recovery` (how the pruned model trains after).

A pass's paper defaults are resolved here, once: the selection's (scope, normalisation, per-group floor) by
``Budget.selection`` through ``Selection.for_pass``, the recovery's (mode, distillation) by ``Recovery.for_pass``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fxprune.compaction.targets import TARGETS
from fxprune.passes.base import Pass
from fxprune.selection.budget import Selection, SelectionError, default_group_width, resource_target
from fxprune.state import device_of_module

__all__ = ["Budget", "Recovery", "RunSpec", "RECOVERY"]

RECOVERY = ("finetune", "scratch-e", "scratch-b")


@dataclass(frozen=True)
class Budget:
    """How much to remove, and where.

    ``ratio``: the fraction of channels removed, in ``scope`` "group" (the same fraction in every group) or
    "global" (one threshold; None: the pass's paper default), with ``ratio_for={"layer4.*": 0.7}`` overrides,
    ``protect=["fc", "layer1.*"]`` layers never pruned, ``min_channels`` kept in every group, ``min_keep`` a
    per-group floor (the fraction always kept; None: the pass's, e.g. slimming's 0.1), ``round_to`` (kept counts
    a multiple of it) and ``group_width_to`` (a grouped convolution's group width kept a multiple of it; None: the
    device's, ``fxprune.selection.budget.GROUP_WIDTH_BY_DEVICE``, 8 on CPU); ``uniform_across_layers``: every
    layer keeps the same count of each kind of group (one width per kind, what a Hugging Face config describes;
    None: the driver's default, off for a model, on for a checkpoint folder). Or a resource target, the
    fraction to KEEP: ``target_macs``, ``target_params`` or ``target_latency`` (of one forward on the example
    inputs, on their device, predicted by a model measured there), reached by binary search to within the
    pass's ``tolerance``; one at most. Checked when built: a budget that makes no sense is a ``SelectionError``.
    """

    ratio: float = 0.5
    scope: str | None = None
    ratio_for: Mapping[str, float] = field(default_factory=dict)
    protect: Sequence[str] = ()
    min_channels: int = 1
    min_keep: float | None = None
    round_to: int = 1
    group_width_to: int | None = None
    uniform_across_layers: bool | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio_for", dict(self.ratio_for))
        object.__setattr__(self, "protect", tuple(self.protect))
        self.resource  # noqa: B018 (one target at most, each a fraction in (0, 1])
        Selection(ratio=self.ratio, scope=self.scope or "group", ratio_for=self.ratio_for, protect=self.protect,
                  min_channels=self.min_channels, round_to=self.round_to, min_keep=self.min_keep or 0.0,
                  group_width_to=self.group_width_to or 1)

    @property
    def resource(self) -> tuple[str, float | None]:
        """The resource target: its kind ("macs", "params", "latency") and the fraction to keep (None: none)."""
        return resource_target(macs=self.target_macs, params=self.target_params, latency=self.target_latency)

    @property
    def asks_removal(self) -> bool:
        """Whether anything is to be removed (a ratio, a ratio for some layers, or a resource target)."""
        return self.ratio > 0 or self.resource[1] is not None or any(self.ratio_for.values())

    def selection(self, the_pass: Pass, device: Any = None, *, uniform: bool = False) -> Selection:
        """The selection ``the_pass`` runs with on ``device``: the pass's paper defaults where this budget gives
        none (``Selection.for_pass``), the device's group width, and ``uniform`` where this budget does not say
        ``uniform_across_layers``."""
        return Selection.for_pass(
            the_pass, self.ratio, scope=self.scope, min_keep=self.min_keep, ratio_for=dict(self.ratio_for),
            protect=tuple(self.protect), min_channels=self.min_channels, round_to=self.round_to,
            group_width_to=default_group_width(device) if self.group_width_to is None else self.group_width_to,
            uniform_across_layers=uniform if self.uniform_across_layers is None else self.uniform_across_layers)


FINETUNE_CLIP = 5.0  # the gradient norm fine-tuning clips at by default (Recovery.max_grad_norm)


@dataclass(frozen=True)
class Recovery:
    """How the pruned model trains after compaction: ``epochs`` (0: not at all) in ``mode`` "finetune",
    "scratch-e" or "scratch-b" (None: the pass's own, e.g. scratch's scratch-b, tas's scratch-e, else
    finetune), with knowledge distillation from the unpruned model when ``distill`` (None: the pass's own,
    tas's on).

    The engine's SGD with a cosine schedule runs at ``lr``; the modes that train from scratch at ``scratch_lr``
    when given (Liu et al. 2019 train from scratch at 0.1 and fine-tune at 1e-3: one option each; the defaults
    stay one rate for both). ``scratch_b_cap``: Scratch-B trains the full model's compute budget, ``epochs`` x
    the MACs removed, at most ``scratch_b_cap`` x ``epochs`` (None: no cap). Distillation's loss is
    ``(1 - kd_alpha) * task + kd_alpha * T^2 * KL`` at temperature ``kd_temperature`` (Hinton et al.: 0.9, 4).
    ``max_grad_norm``: the total gradient norm is clipped to it before every step; 0: never; None (the default):
    5 when fine-tuning, never when the weights are re-initialised. Fine-tuning inherits weights that a
    least-squares reconstruction (lasso, thinet) can leave so that the first SGD steps undo it (a ViT pruned by
    lasso fell from 94% to 22% in its first epoch unclipped; 97.5% clipped at 5); training from scratch with
    distillation has large gradients by design, and clipping them slows it (tas's ViT: 90% clipped, 94% not).
    ``shard``: under ``torchrun``, the pruned model (and the teacher) trains sharded with PyTorch's FSDP2 instead of
    replicated with DDP, so a model that does not fit one device recovers on several (not resumable).
    """

    epochs: int = 0
    mode: str | None = None
    distill: bool | None = None
    lr: float = 0.01
    scratch_lr: float | None = None
    scratch_b_cap: float | None = None
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    max_grad_norm: float | None = None
    shard: bool = False     # under torchrun: FSDP2 (each process holds 1/world of the model) instead of DDP

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in RECOVERY:
            raise SelectionError(f"recover must be one of {RECOVERY}, got {self.mode!r}")
        if self.epochs < 0:
            raise SelectionError(f"recovery epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or (self.scratch_lr is not None and self.scratch_lr <= 0):
            raise SelectionError(f"recovery learning rates must be > 0, got lr={self.lr}, scratch_lr={self.scratch_lr}")
        if self.scratch_b_cap is not None and self.scratch_b_cap < 1:
            raise SelectionError(f"scratch_b_cap is the most Scratch-B's epochs grow (a factor >= 1), got "
                                 f"{self.scratch_b_cap}")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature <= 0:
            raise SelectionError(f"kd_alpha must be in [0, 1] and kd_temperature > 0, got {self.kd_alpha}, "
                                 f"{self.kd_temperature}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise SelectionError(f"max_grad_norm must be >= 0 (0: never clip; None: the mode's default), got "
                                 f"{self.max_grad_norm}")

    def for_pass(self, the_pass: Pass) -> Recovery:
        """This recovery with the pass's defaults filled in: a mode whenever it trains, and distillation."""
        mode = self.mode
        if mode is None and self.epochs > 0:
            mode = the_pass.own_recovery() or "finetune"
        distill = the_pass.own_distill() if self.distill is None else self.distill
        return replace(self, mode=mode, distill=distill)

    @property
    def rate(self) -> float:
        """The learning rate of this recovery's mode."""
        return self.scratch_lr if self.scratch_lr is not None and self.mode in ("scratch-e", "scratch-b") else self.lr

    @property
    def clip(self) -> float | None:
        """The gradient norm this recovery's mode clips at (None: no clipping)."""
        if self.max_grad_norm is None:
            return FINETUNE_CLIP if self.mode == "finetune" else None
        return self.max_grad_norm or None

    def options(self) -> dict[str, Any]:
        """What ``fxprune.recovery.modes.recover`` takes from this recovery besides the model and data."""
        return {"mode": self.mode, "epochs": self.epochs, "distill": bool(self.distill), "lr": self.rate,
                "alpha": self.kd_alpha, "temperature": self.kd_temperature, "max_budget_factor": self.scratch_b_cap,
                "max_grad_norm": self.clip, "shard": self.shard}


@dataclass(frozen=True)
class RunSpec:
    """One run of the pipeline: what every stage reads, built once by a driver (``fxprune.prune``; the command
    line through it). ``recovery`` is resolved for the pass when built; ``data``: ``train_loader``, ``val_loader``,
    ``loss``, ``evaluate``."""

    model: torch.nn.Module
    example_inputs: Any
    the_pass: Pass
    budget: Budget = field(default_factory=Budget)
    recovery: Recovery = field(default_factory=Recovery)
    target: str = "auto"            # what compaction rewrites: "graph", "modules" or "auto"
    dynamic_shapes: Any = None      # the free input axes (torch.export's format); None: found; False: none
    data: Mapping[str, Any] = field(default_factory=dict)
    allow_inexact: bool = False
    require_prunable: bool = False  # an asked removal on a model with nothing prunable raises, else warns
    verify: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "recovery", self.recovery.for_pass(self.the_pass))
        if self.recovery.mode is not None and self.data.get("train_loader") is None:
            raise SelectionError(f"recover={self.recovery.mode!r} needs train_loader=")
        if self.target not in TARGETS:
            raise SelectionError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    @property
    def selection(self) -> Selection:
        """The budget as the selection stage applies it, on the model's device."""
        return self.budget.selection(self.the_pass, device_of_module(self.model))

    @property
    def needs_scores(self) -> bool:
        """Whether the pass runs: a removal is asked, or the pass removes channels itself (anp)."""
        return self.budget.asks_removal or bool(getattr(self.the_pass, "self_pruning", False))


BUDGET_KEYWORDS = tuple(f for f in Budget.__dataclass_fields__ if f != "ratio")
RECOVERY_KEYWORDS = {"recover": "mode", "epochs": "epochs", "distill": "distill"}  # the flat name -> Recovery's


def grouped(ratio: float | None, budget: Budget | None, recovery: Recovery | None, flat: dict[str, Any],
            who: str, *, stacklevel: int = 3) -> tuple[Budget, Recovery]:
    """The budget and recovery of a driver's call: ``budget=`` / ``recovery=``, with ``ratio`` (when given) as
    the budget's ratio. The flat keywords of earlier releases (``target_macs=``, ``epochs=``...) are taken out of
    ``flat`` (the call's other keywords) and still work for this release, with a DeprecationWarning naming the
    grouped form; given beside ``budget=`` or ``recovery=``, they are an error."""
    names = [k for k in flat if k in BUDGET_KEYWORDS or k in RECOVERY_KEYWORDS]  # in the caller's order
    old_budget = {k: flat.pop(k) for k in names if k in BUDGET_KEYWORDS}
    old_recovery = {RECOVERY_KEYWORDS[k]: flat.pop(k) for k in names if k in RECOVERY_KEYWORDS}
    for old, group, given in ((old_budget, "budget=fxprune.Budget", budget),
                              (old_recovery, "recovery=fxprune.Recovery", recovery)):
        if old and given is not None:
            raise SelectionError(f"{who}: {', '.join(old)} and {group.split('=')[0]}= given together: put them "
                                 f"in {group}(...)")
    if old_budget or old_recovery:
        import warnings

        warnings.warn(f"{who}: the keywords {', '.join(names)} are deprecated and will be removed in the next "
                      f"release: give budget=fxprune.Budget(...) and recovery=fxprune.Recovery(epochs=, mode=, "
                      "distill=)", DeprecationWarning, stacklevel=stacklevel)
    budget = budget if budget is not None else Budget(**old_budget)
    if ratio is not None:
        budget = replace(budget, ratio=ratio)
    return budget, recovery if recovery is not None else Recovery(**old_recovery)
