"""The public entry point: ``fxprune.prune(model, example_inputs, method="l1", ratio=0.5)``.

trace -> analyze -> score (the pass) -> select -> compact. The user's model is never modified.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .analysis import ChannelGroups, analyze
from .annotations import write_masks, write_scores, write_selection
from .compaction import Plan
from .compaction.compact import Compacted, compact
from .compaction.targets import TARGETS, for_modules, resize, trace_for
from .passes.base import Pass, PassContext, PassError
from .passes.registry import make_pass
from .selection.budget import Budget, Selection, SelectionError, default_group_width, resource_target
from .selection.cost import Cost, CostCounter
from .selection.diagnose import NothingToPruneError, nothing_prunable
from .state import callers_rng_kept, device_of_module
from .tracing.dynamic import INPUT_SHAPES, InputShapes
from .tracing.tracer import trace

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
    report: dict[str, Any] = field(default_factory=dict)  # what the pass reported (PassContext.report), JSON-able
    # files the pass adds to an output folder (PassContext.artifacts): name -> writer(folder); sanp's "dynamic"
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


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Objects that exist before the trace (torch's own, the model) are left out of garbage collection
    while the trace and the analysis run (``gc.freeze``), and put back after. They allocate enough
    long-lived objects to trigger full collections, and each walks every object in the process (with
    torch imported, a sizeable share of pruning a small network). Only around fxprune's own work: the pass
    (which may train, reading the
    user's loaders) and recovery run with collection as usual. ``gc.freeze`` is process-wide, but it
    only postpones, for those objects, the collection of cycles: it changes no thread's results.
    Skipped when the caller froze objects itself or turned collection off."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _latency_model(gm: fx.GraphModule, groups: ChannelGroups, target: str, sel: Selection) -> Any:
    """The measured latency model a ``target_latency`` budget searches with (``fxprune.selection.latency``),
    calibrated at ratio 0.5 under the selection's own rules (its rounding and floors)."""
    import dataclasses

    from .selection.budget import select
    from .selection.latency import LatencyModel

    if target == "modules":
        raise SelectionError("target_latency needs a model torch.export traces whole (this one is pruned through its "
                             "modules, from one recorded run, which fxprune cannot time op by op): give target_macs")
    order = {g.id: np.arange(len(g), dtype=np.float64) for g in groups.prunable}  # the first half goes
    probe = select(groups, order, dataclasses.replace(sel, ratio=0.5, scope="group", ratio_for={}))
    return LatencyModel.measure(gm, groups, probe=probe)


def _unfrozen(model: torch.nn.Module, example_inputs: Any, gm: fx.GraphModule, groups: ChannelGroups,
              allow_inexact: bool) -> tuple[fx.GraphModule, ChannelGroups]:
    """Where a free input axis freezes channels (a reshape merges them with a spatial size: ``x.view(-1, 512)``
    of a CNN whose head then takes four times the batch), the graph with the axes other than the batch's fixed,
    when that frees more channels to prune; the fixed axes say why."""
    shapes: InputShapes = gm.meta.get(INPUT_SHAPES, InputShapes())
    if not any(g.frozen and "symbolic" in g.frozen and g.params for g in groups):
        return gm, groups
    batch = {a.group for a in shapes.dynamic if a.dim == 0}
    fix = [a for a in shapes.dynamic if a.group not in batch]
    if not fix:
        return gm, groups
    kept = InputShapes(tuple(a for a in shapes.dynamic if a.group in batch), shapes.fixed)
    static = trace(model, example_inputs, dynamic_shapes=kept)
    again = analyze(static, allow_inexact=allow_inexact)
    if _prunable_channels(again) <= _prunable_channels(groups):
        return gm, groups
    more = _prunable_channels(again) - _prunable_channels(groups)
    static.meta[INPUT_SHAPES] = static.meta[INPUT_SHAPES].with_fixed(dict.fromkeys(
        fix, f"free, it would freeze the {more} channels a reshape merges with it; fixed, they prune"))
    return static, again


def _reads_weights_only(the_pass: Pass) -> None:
    """The modules target has no graph to train or calibrate in: refuse a pass that runs one."""
    if getattr(the_pass, "runs_graph", True):
        raise PassError(f"pass {the_pass.name!r} trains or calibrates in the traced graph, and this model has no "
                        "graph that runs on other inputs (it is compacted by resizing its modules): use a pass "
                        "that reads the weights only, such as l1")


def _prunable_channels(groups: ChannelGroups) -> int:
    return sum(len(g) for g in groups.prunable)


def _input_shapes(module: torch.nn.Module, gm: fx.GraphModule) -> InputShapes:
    """The compacted graph's record (its verification may have fixed an axis), else the trace's."""
    own = module.meta.get(INPUT_SHAPES) if isinstance(module, fx.GraphModule) else None
    return own or gm.meta.get(INPUT_SHAPES, InputShapes())


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
        with _gc_frozen():
            stage("trace")
            gm, used = trace_for(model, example_inputs, target, dynamic_shapes,
                                 modules_ok=not getattr(the_pass, "runs_graph", True))
            stage("analyze")
            groups = analyze(gm, allow_inexact=allow_inexact)
            if used["target"] == "graph" and dynamic_shapes is None:
                gm, groups = _unfrozen(model, example_inputs, gm, groups, allow_inexact)
            if used["target"] == "modules":
                _reads_weights_only(the_pass)
                for_modules(gm, groups, model)
            counter = CostCounter(groups)
            before = counter()
            latency = _latency_model(gm, groups, used["target"], sel) if which == "latency" else None
        needs_scores = ratio > 0 or resource is not None or any(ratio_for.values() if ratio_for else ()) or \
            getattr(the_pass, "self_pruning", False)
        if needs_scores and not groups.prunable:
            if require_prunable:
                why = f" (analysed from one real run: {used['why']})" if used["target"] == "modules" else ""
                raise NothingToPruneError(nothing_prunable(groups) + why)
            warnings.warn(f"fxprune: {nothing_prunable(groups)}", stacklevel=2)
        stage("score")
        ctx = PassContext(gm, groups, model, data, sel,
                          target=(which, float(resource)) if resource is not None else None)
        prepared = the_pass.prepare(ctx) if needs_scores else None
        if prepared is not None:  # the pass prunes its own model (e.g. a wider copy): budgets stay the user's
            ctx = prepared
            gm, groups, counter = ctx.gm, ctx.groups, CostCounter(ctx.groups)
            if latency is not None:
                raise SelectionError(f"{the_pass.name} prunes its own copy of the model, whose latency fxprune has not "
                                     "measured: give target_macs instead of target_latency")
        measure, full = (latency, latency()) if latency is not None else (counter, before)
        budget = Budget(groups, sel, measure, full, which, resource, getattr(the_pass, "tolerance", 0.01))
        ctx.select = budget.removal
        base = ctx.model
        scores = the_pass.score(ctx) if needs_scores else {}
        write_scores(gm, the_pass.name, scores)
        if ctx.masks:
            write_masks(gm, the_pass.name, ctx.masks)
        stage("select")
        removed, sel = budget(scores)
        write_selection(gm, groups, removed)
        stage("compact")
        weights = the_pass.weights(ctx, removed) if needs_scores else {}
        edits = the_pass.edits(ctx, removed) if needs_scores else []
        if used["target"] == "modules":
            out = Compacted(*resize(gm, groups, removed, base, weights, edits, example_inputs, verify))
        else:
            out = compact(gm, groups, None, base, verify=verify, weights=weights or None, edits=edits)  # the selection
        if used["target"] == "graph" and (weights or edits) and (out.removed != removed).any():  # kept whole: redo
            weights = the_pass.weights(ctx, out.removed)
            edits = the_pass.edits(ctx, out.removed)
            out = compact(gm, groups, None, base, verify=verify, weights=weights or None, edits=edits)
        after = counter(out.removed)
        if edits:  # blocks removed or layers merged: the graph's counter does not see them, the compacted module does
            from .measure import count_macs, count_params

            after = Cost(count_macs(out.module, example_inputs), count_params(out.module))
        log: list[dict[str, Any]] = []
        if recover is not None:
            stage("recover")
            from .recovery.modes import recover as run_recovery

            log = run_recovery(out.module, mode=recover, original=model, train_loader=data["train_loader"],
                               loss=data.get("loss"), epochs=epochs, evaluate=data.get("evaluate"), distill=distill,
                               macs_full=before.macs, macs_pruned=after.macs)
        shapes = _input_shapes(out.module, gm)
        if shapes.fixed:
            warnings.warn(shapes.warning(type(model).__name__), stacklevel=2)
        return PruneResult(out.module, out.plan, groups, out.removed, scores, before, after, sel, log, weights,
                           base if prepared is not None else None, ctx.report, dict(ctx.artifacts),
                           dict(ctx.state.get("extras", {})), used,
                           latency.summary(out.removed) if latency is not None else None, shapes)
