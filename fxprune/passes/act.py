"""act: activation-based importance on calibration data (Minitron: Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"; NVIDIA ModelOpt's estimator).

A channel's score is how strongly it is active where the next layer reads it: the magnitude of the group's
consumer layers' input at that channel, on the calibration data. That is Minitron's three estimators in one
rule: an MLP neuron is the down projection's input, an attention head the output projection's input over its
positions (heads and their key/value groups are channel groups of the analysis), an embedding channel the
normalised input of every layer reading the residual stream. Per sample the magnitudes are aggregated over
the sequence (``seq``: mean |x| or the root mean square), then over the samples (``batch``: L2 or mean); the
defaults are the combination the paper reports working best (mean over the sequence, L2 over the batch). A
group no hook can see (no Linear / Conv consumer) is scored by l1 and named in the report.

Calibration data: ``ctx.calibrate`` where the driver provides it (a Hugging Face folder streamed layer by layer
from disk: ``fxprune run DIR --pass act --calib FILE.txt``), else ``calib_batches`` batches of the model file's
``train_loader`` run through the user's model with forward hooks. The pass only scores: kept weights are
unchanged, so the pruned model equals the masked original.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fxprune.analysis.groups import Group, ParamSlot
from fxprune.measure import to_device

from ._calibrate import calibration
from .base import Decision, Pass, PassContext, PassError
from .l1 import producer_l1

__all__ = ["Activation", "input_axis"]

# module class -> the axis of its weight that reads input channels, and the input's channel dim
_READS: list[tuple[type, int, int]] = [(nn.Linear, 1, -1), (nn.Conv1d, 1, 1), (nn.Conv2d, 1, 1), (nn.Conv3d, 1, 1)]


def input_axis(module: nn.Module) -> tuple[int, int] | None:
    """(weight axis of the input channels, channel dim of the input) for a layer whose input act can read;
    transformers' ``Conv1D`` (GPT-2) stores its weight transposed; grouped convolutions are not read."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 0, -1
    for cls, axis, dim in _READS:
        if isinstance(module, cls) and getattr(module, "groups", 1) == 1:
            return axis, dim
    return None


class _Magnitudes:
    """One layer's input channels: per sample the sequence-aggregated |x|, summed over samples and squared."""

    def __init__(self, dim: int, seq: str) -> None:
        self.dim, self.seq = dim, seq
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.samples = 0

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        x = args[0].detach().movedim(self.dim, -1)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (samples, positions, channels)
        v = (x.abs().mean(1) if self.seq == "mean" else x.float().pow(2).mean(1).sqrt()).double()
        s, q = v.sum(0).cpu(), v.pow(2).sum(0).cpu()
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.samples += v.shape[0]

    def per_channel(self, batch: str) -> np.ndarray | None:
        if self.total is None:
            return None
        return (self.squares.sqrt() if batch == "l2" else self.total / self.samples).numpy()


@dataclass(frozen=True)
class Activation(Pass):
    name = "act"
    description = "activation magnitude at each channel's consumers on calibration data (Minitron); no training"
    scope = "group"
    needs: ClassVar[tuple[str, ...]] = ("train_loader",)
    graph_only = None  # forward hooks on the user's modules: runs on the modules target too
    calibrates: ClassVar[bool] = True  # a Hugging Face folder runs it with --calib, streamed layer by layer

    seq: str = "mean"           # per sample, over positions: "mean" (of |x|) or "rms"
    batch: str = "l2"           # over samples: "l2" or "mean"
    calib_batches: int = 16     # train_loader batches, for a model in memory

    def __post_init__(self) -> None:
        if self.seq not in ("mean", "rms") or self.batch not in ("l2", "mean"):
            raise PassError(f"act: seq must be 'mean' or 'rms' and batch 'l2' or 'mean' (got seq={self.seq!r}, "
                            f"batch={self.batch!r})")

    def score(self, ctx: PassContext) -> Decision:
        reads = _consumers(ctx)
        wanted = _by_group(ctx, reads)
        layers = sorted({layer for slots in wanted.values() for layer in slots})
        stats = {layer: _Magnitudes(reads[layer][1], self.seq) for layer in layers}
        _run(ctx, stats, self.calib_batches)
        per_layer = {layer: s.per_channel(self.batch) for layer, s in stats.items()}
        scores, by_l1 = {}, []
        for group in self.prunable(ctx):
            slots = [(p, per_layer.get(_layer(p))) for p in wanted.get(group.id, {}).values()]
            if not slots or any(v is None for _, v in slots):
                scores[group.id] = producer_l1(ctx.groups, group, ctx.tensor)
                by_l1.append(group.id)
                continue
            scores[group.id] = sum(ctx.groups.channel_sum(group, p, v) for p, v in slots)
        return Decision(scores, report={"calibration_samples": max((s.samples for s in stats.values()), default=0),
                                        "scored_by_l1": by_l1, "seq": self.seq, "batch": self.batch})


def _layer(p: ParamSlot) -> str:
    return p.name.rpartition(".")[0]


def _consumers(ctx: PassContext) -> dict[str, tuple[int, int]]:
    """Module name -> (weight input axis, input channel dim) of every layer act can read."""
    out = {}
    for name, m in ctx.model.named_modules():
        reads = input_axis(m)
        if reads is not None:
            out[name] = reads
    return out


def _by_group(ctx: PassContext, reads: dict[str, tuple[int, int]]) -> dict[int, dict[str, ParamSlot]]:
    """Prunable group id -> {consumer layer: its weight's input slot}; a group with any consumer slot on a
    layer act cannot read is left out (scored by l1): its scores would miss a reader."""
    out: dict[int, dict[str, ParamSlot]] = {}
    for group in ctx.groups.prunable:
        found, ok = {}, True
        for p in _consumer_slots(group):
            layer = _layer(p)
            if p.name.endswith(".weight") and layer in reads and reads[layer][0] == p.axis:
                found[layer] = p
            else:
                ok = False
        if ok and found:
            out[group.id] = found
    return out


def _consumer_slots(group: Group) -> list[ParamSlot]:
    return [p for p in group.params if p.role == "consumer"]


def _run(ctx: PassContext, stats: dict[str, Callable], batches: int) -> None:
    """The calibration data through the model with ``stats`` as forward hooks: the driver's (a folder, streamed
    from disk) or ``batches`` train_loader batches through the user's model."""
    if ctx.calibrate is not None:
        ctx.calibrate(stats)
        return
    try:
        data = calibration(ctx, "train", batches)
    except ValueError:
        raise PassError("act needs calibration data: a model file with train_loader() (or train_loader= in "
                        "fxprune.prune), or --calib FILE.txt for a Hugging Face folder") from None
    model = ctx.model
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in stats.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in data:
                model(to_device(x, device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
