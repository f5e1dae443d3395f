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

``compensate=true``: FLAP's bias compensation (An et al., AAAI 2024): a removed channel's mean input on the
calibration data, times its weight column, is folded into the consumer's bias (``b += W[:, removed] @
mean(x[removed])``), so that the pruned model equals the original with each removed channel held at its mean
instead of zeroed. A consumer without a bias gets one: on a Hugging Face folder the config flag that adds it
(``mlp_bias``, ``attention_bias``) is set and the other new biases written as zeros; in memory a layer without a
bias keeps none, and a warning names it (as does a folder whose config has no such flag: Qwen2's output
projection).
"""
from __future__ import annotations

import warnings
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
from .decision import Finish
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
        self.sums: torch.Tensor | None = None   # of x itself, over every position of every sample
        self.samples = self.positions = 0

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        x = args[0].detach().movedim(self.dim, -1)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (samples, positions, channels)
        v = (x.abs().mean(1) if self.seq == "mean" else x.float().pow(2).mean(1).sqrt()).double()
        s, q = v.sum(0).cpu(), v.pow(2).sum(0).cpu()
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.samples += v.shape[0]
        m = x.reshape(-1, x.shape[-1]).double().sum(0).cpu()
        self.sums = m if self.sums is None else self.sums + m
        self.positions += x.shape[0] * x.shape[1]

    def mean(self) -> torch.Tensor | None:
        return None if self.sums is None else self.sums / max(self.positions, 1)

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
    compensate: bool = False    # FLAP's bias compensation: removed channels' mean input folded into the next bias

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
        means = {layer: s.mean() for layer, s in stats.items()}
        finish = (lambda removed: compensation(ctx, wanted, means, removed)) if self.compensate else None
        return Decision(scores, report={"calibration_samples": max((s.samples for s in stats.values()), default=0),
                                        "scored_by_l1": by_l1, "seq": self.seq, "batch": self.batch,
                                        "compensate": self.compensate}, finish=finish)


def compensation(ctx: PassContext, wanted: dict[int, dict[str, ParamSlot]], means: dict[str, torch.Tensor | None],
                 removed: np.ndarray) -> Finish:
    """FLAP's bias compensation for ``removed``: per consumer layer, its bias plus ``W[:, gone] @ mean[gone]``
    over the input channels removed (a full-size tensor by the bias's name; a new one where the layer has none
    and the driver can add it: ``ctx.model`` on the meta device, a Hugging Face folder)."""
    gone: dict[str, tuple[ParamSlot, list[int]]] = {}
    for gid, slots in wanted.items():
        group = ctx.groups[gid]
        cut = removed[group.channels]
        for layer, p in slots.items():
            g, pos = ctx.groups.positions(p.key)
            hit = np.flatnonzero((g == gid) & cut[np.maximum(pos, 0)])
            if len(hit):
                gone.setdefault(layer, (p, []))[1].extend(hit.tolist())
    weights, without = {}, []
    for layer, (p, idx) in sorted(gone.items()):
        mean, w = means.get(layer), ctx.tensor(p.name)
        if mean is None or w.dim() != 2:
            continue
        at = torch.as_tensor(sorted(idx))
        delta = (w.double().movedim(p.axis, -1)[:, at] @ mean[at]).to(w.dtype)
        module = ctx.model.get_submodule(layer)
        if getattr(module, "bias", None) is not None:
            weights[f"{layer}.bias"] = ctx.tensor(f"{layer}.bias") + delta
        elif ctx.source is not None:  # a folder: the driver adds the bias with the config flag that makes it
            weights[f"{layer}.bias"] = delta
        else:
            without.append(layer)
    if without:
        warnings.warn(f"fxprune: act compensate: {len(without)} layers have no bias to carry the removed channels' "
                      f"mean into ({', '.join(without[:3])}{'...' if len(without) > 3 else ''}); they are pruned "
                      "without compensation (on a Hugging Face folder fxprune adds the biases)", stacklevel=2)
    return Finish(weights)


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
        raise PassError("act needs calibration data: a model file with calib_loader() or train_loader() (or "
                        "calib_loader= / train_loader= in fxprune.prune), or --calib FILE.txt for a Hugging Face "
                        "folder") from None
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
