"""The public entry point: ``fxprune.prune(model, example_inputs, method="l1", ratio=0.5)``.

A driver: its keywords become the pass, the selection and the recovery, then ``fxprune.pipeline``'s stages run
in order (trace -> analyse -> score -> select -> compact -> recover). The user's model is never modified.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from . import pipeline
from .analysis import ChannelGroups
from .compaction import Plan
from .compaction.compact import Compacted, compact
from .compaction.targets import TARGETS
from .passes.base import Pass
from .passes.registry import make_pass
from .selection.budget import Selection, SelectionError, default_group_width, resource_target
from .selection.cost import Cost
from .selection.diagnose import NothingToPruneError
from .state import callers_rng_kept, device_of_module
from .tracing.dynamic import InputShapes

__all__ = ["prune", "PruneResult", "compact", "Compacted", "RECOVERY", "NothingToPruneError"]

RECOVERY = ("finetune", "scratch-e", "scratch-b")


@dataclass
class PruneResult:
    module: fx.GraphModule                 # the compacted, trainable model (same train/eval mode as the input)
    plan: Plan                             # original parameter/buffer name -> {dim: kept indices} (of `base` if set)
    groups: ChannelGroups                  # the analysis it was planned on
    removed: np.ndarray                    # bool per channel component
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    cost_before: Cost | None = None        # MACs (on the example inputs) and parameters, counted on the graph
    cost_after: Cost | None = None
    selection: Selection | None = None     # the budget as applied (after a target search: the ratio found)
    log: list[dict[str, Any]] = field(default_factory=list)  # recovery training log, one record per epoch
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # new full-size tensors the pass gave compaction
    base: torch.nn.Module | None = None    # the model the plan refers to when a pass pruned another model than
    #                                        the user's (Pass.prepare, e.g. scratch's wider copy); None: the user's
    report: dict[str, Any] = field(default_factory=dict)  # what the pass reported (Decision.report), JSON-able
    # files the pass adds to an output folder (Decision.artifacts): name -> writer(folder); sanp's "dynamic"
    artifacts: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # objects the pass built besides the module (sanp: "dynamic")
    # what compaction rewrote: {"target": "graph" (the traced graph) or "modules" (the user's modules, resized), "why"}
    compaction: dict[str, str] = field(default_factory=lambda: {"target": "graph", "why": ""})
    # with target_latency: the latency model's measured full and predicted pruned milliseconds, per class of op
    # (``fxprune.selection.latency.LatencyModel.summary``); None otherwise
    latency: dict[str, Any] | None = None
    # the input axes the module takes at any size, and those it fixes that the original does not (with why)
    shapes: InputShapes = field(default_factory=InputShapes)

    def summary(self) -> list[dict[str, Any]]:
        """Kept/total channels per prunable group."""
        rows = []
        for g in self.groups.prunable:
            rows.append({"group": g.id, "kept": int((~self.removed[g.channels]).sum()), "total": len(g),
                         "producers": g.layers("producer")})
        return rows


def prune(model: torch.nn.Module, example_inputs: Any, method: str | Pass = "l1", ratio: float = 0.5, *,
          options: dict[str, Any] | None = None, scope: str | None = None,
          ratio_for: Mapping[str, float] | None = None, protect: Sequence[str] = (), min_channels: int = 1,
          min_keep: float | None = None, round_to: int = 1, group_width_to: int | None = None,
          target_macs: float | None = None, target_params: float | None = None,
          target_latency: float | None = None, allow_inexact: bool = False, require_prunable: bool = False,
          verify: bool = True,
          progress: Callable[[str], None] | None = None,
          recover: str | None = None, epochs: int = 0, distill: bool | None = None, target: str = "auto",
          uniform_across_layers: bool = False, dynamic_shapes: Any = None, **data: Any) -> PruneResult:
    """Prune ``model`` and return the compacted module with its plan.

    ``example_inputs``: a tuple of positional inputs, a tensor, or a dict of keyword inputs.
    ``method``: a registered pass name, ``"package.module:Class"``, or a Pass instance; ``options``
    are its fields. Budget: ``ratio`` (fraction of channels removed) in ``scope`` "group" (same
    fraction per group) or "global" (one threshold; default: the pass's paper default), with
    ``ratio_for={"layer4.*": 0.7}`` overrides, ``protect=["fc", "layer1.*"]`` patterns,
    ``min_channels``, ``uniform_across_layers`` (every layer keeps the same count of each kind
    of group: one width per kind, what a Hugging Face config describes), ``min_keep`` (a per-group floor: the
    fraction of every group always kept; default:
    the pass's, e.g. slimming's 0.1), ``round_to`` and ``group_width_to`` (a grouped convolution's group width kept a
    multiple of it; default: the device's, ``fxprune.selection.budget.GROUP_WIDTH_BY_DEVICE``, 8 on CPU); or a
    resource target ``target_macs`` / ``target_params`` /
    ``target_latency`` (the fraction to KEEP; latency: of one forward on the example inputs, on their device, as
    predicted by a model measured there, ``fxprune.selection.latency``), reached by binary search to within the
    pass's ``tolerance`` (default 0.01). ``recover``: "finetune", "scratch-e" or
    "scratch-b" for ``epochs`` epochs (default with ``epochs > 0``: the pass's own, else "finetune";
    ``distill=True`` adds knowledge distillation from ``model``; default: the pass's own, tas's on).
    ``data``: ``train_loader=``, ``val_loader=``, ``loss=``, ``evaluate=`` (named like the model
    file's functions). ``target``: what compaction rewrites: ``"graph"`` (the traced graph, the default
    for a model torch.export traces whole), ``"modules"`` (the user's own modules resized in a copy, for
    models no static graph expresses: detectors; ``fxprune.compaction.modules``), or ``"auto"`` (graph when
    the model traces, modules when it does not; ``PruneResult.compaction`` says which and why).
    ``dynamic_shapes``: the input axes the pruned model must take at any size, in torch.export's format (default:
    every axis the model accepts at a second size, found by running it there; ``False``: none).
    ``progress(stage)`` is called as each stage starts. ``model`` is left
    bit-identical. ``require_prunable=True``: a budget that asks for a removal on a model none of whose
    groups can shrink raises :class:`NothingToPruneError` right after the analysis (before any training),
    naming the largest frozen groups' reasons; otherwise that case warns.
    """
    with callers_rng_kept():  # a pass's sampling, a loader's shuffle: the caller's random stream reads as before
        the_pass = make_pass(method, options)
        if recover is None and epochs > 0:  # the pass's own recovery (scratch: scratch-b; tas: scratch-e + KD)
            recover = getattr(the_pass, "default_recovery", None) or "finetune"
        distill = bool(getattr(the_pass, "default_distill", False)) if distill is None else distill
        sel = Selection.for_pass(the_pass, ratio, scope=scope, min_keep=min_keep, ratio_for=dict(ratio_for or {}),
                                 protect=tuple(protect), min_channels=min_channels, round_to=round_to,
                                 group_width_to=(default_group_width(device_of_module(model)) if group_width_to is None
                                                 else group_width_to),
                                 uniform_across_layers=uniform_across_layers)
        which, resource = resource_target(macs=target_macs, params=target_params, latency=target_latency)
        if recover is not None and recover not in RECOVERY:
            raise SelectionError(f"recover must be one of {RECOVERY}, got {recover!r}")
        if recover is not None and data.get("train_loader") is None:
            raise SelectionError(f"recover={recover!r} needs train_loader=")
        if target not in TARGETS:
            raise SelectionError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        stage = progress or (lambda name: None)
        analysed = pipeline.analyse(model, example_inputs, the_pass, target=target, dynamic_shapes=dynamic_shapes,
                                    allow_inexact=allow_inexact, selection=sel, which=which, progress=stage)
        needs_scores = ratio > 0 or resource is not None or any(ratio_for.values() if ratio_for else ()) or \
            getattr(the_pass, "self_pruning", False)
        if needs_scores:
            pipeline.check_prunable(analysed, require_prunable)
        stage("score")
        scored = pipeline.score(the_pass, analysed, model, data, sel, which, resource, needs_scores)
        stage("select")
        selected = pipeline.select(scored)
        stage("compact")
        done = pipeline.compact(scored, selected, example_inputs, verify)
        if recover is not None:
            stage("recover")
        out, ctx, decision = done.compacted, scored.ctx, scored.decision
        log = pipeline.recover(out.module, recover, model, data, epochs, distill, analysed.before, done.after)
        shapes = pipeline.input_shapes(out.module, analysed.gm)
        if shapes.fixed:
            warnings.warn(shapes.warning(type(model).__name__), stacklevel=2)
        latency = analysed.latency
        return PruneResult(out.module, out.plan, ctx.groups, out.removed, scored.scores, analysed.before, done.after,
                           selected.selection, log, done.weights, scored.base if scored.prepared else None,
                           dict(decision.report), dict(decision.artifacts), dict(decision.extras), analysed.target,
                           latency.summary(out.removed) if latency is not None else None, shapes)
