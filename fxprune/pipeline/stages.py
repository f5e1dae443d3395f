"""The pipeline's stages, in order: trace -> analyse -> score -> select -> compact -> recover. Each is a function
of plain values that returns one; ``fxprune.pipeline.run`` calls them for a ``RunSpec`` (see the package's
docstring).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis import ChannelGroups, analyze
from fxprune.annotations import write_masks, write_scores, write_selection
from fxprune.compaction.compact import Compacted
from fxprune.compaction.compact import compact as compact_graph
from fxprune.compaction.emit import GraphEdit
from fxprune.compaction.modules import freeze_code_sizes
from fxprune.compaction.targets import resize, trace_for
from fxprune.passes.base import Pass, PassContext, Scores, require_modules_support
from fxprune.passes.decision import Decision, as_decision
from fxprune.selection.budget import Selection, SelectionError, Selector
from fxprune.selection.cost import Cost, CostCounter
from fxprune.selection.diagnose import NothingToPruneError, nothing_prunable
from fxprune.tracing.dynamic import INPUT_SHAPES, InputShapes
from fxprune.tracing.tracer import trace

from .spec import Recovery

__all__ = ["Analysed", "Scored", "Selected", "Compacted", "analyse", "score", "select", "compact", "recover",
           "latency_model", "input_shapes"]


# ---- helpers of the stages --------------------------------------------------------------------------------
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


def latency_model(gm: fx.GraphModule, groups: ChannelGroups, target: str, sel: Selection) -> Any:
    """The measured latency model a ``target_latency`` budget searches with (``fxprune.selection.latency``),
    calibrated at ratio 0.5 under the selection's own rules (its rounding and floors)."""
    from fxprune.selection.budget import select
    from fxprune.selection.latency import LatencyModel

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


def _prunable_channels(groups: ChannelGroups) -> int:
    return sum(len(g) for g in groups.prunable)


def input_shapes(module: torch.nn.Module, gm: fx.GraphModule) -> InputShapes:
    """The compacted graph's record (its verification may have fixed an axis), else the trace's."""
    own = module.meta.get(INPUT_SHAPES) if isinstance(module, fx.GraphModule) else None
    return own or gm.meta.get(INPUT_SHAPES, InputShapes())


# ---- the stages -----------------------------------------------------------------------------------------
@dataclass
class Analysed:
    """The trace and its channel groups: what every later stage reads."""

    gm: fx.GraphModule
    groups: ChannelGroups
    target: dict[str, str]          # {"target": "graph" or "modules", "why": ...} (``PruneResult.compaction``)
    counter: CostCounter
    before: Cost
    latency: Any = None             # the measured latency model of a ``target_latency`` budget


def analyse(model: torch.nn.Module, example_inputs: Any, the_pass: Pass, *, target: str, dynamic_shapes: Any,
            allow_inexact: bool, selection: Selection, which: str | None,
            progress: Callable[[str], None] = lambda stage: None) -> Analysed:
    """Trace (the target's front end) and group the channels; the cost before pruning, and the latency model
    a latency budget searches with. ``progress`` is told as the trace and the analysis start."""
    with _gc_frozen():
        progress("trace")
        gm, used = trace_for(model, example_inputs, target, dynamic_shapes,
                             modules_ok=not getattr(the_pass, "runs_graph", True))
        progress("analyze")
        groups = analyze(gm, allow_inexact=allow_inexact)
        if used["target"] == "graph" and dynamic_shapes is None:
            gm, groups = _unfrozen(model, example_inputs, gm, groups, allow_inexact)
        if used["target"] == "modules":
            require_modules_support(the_pass)
            freeze_code_sizes(gm, groups, model)
        counter = CostCounter(groups)
        before = counter()
        latency = latency_model(gm, groups, used["target"], selection) if which == "latency" else None
    return Analysed(gm, groups, used, counter, before, latency)


def check_prunable(analysed: Analysed, required: bool) -> None:
    """A removal asked of a model none of whose groups can shrink: an error naming why (``required``), else a
    warning."""
    if analysed.groups.prunable:
        return
    why = nothing_prunable(analysed.groups)
    if required:
        used = analysed.target
        where = f" (analysed from one real run: {used['why']})" if used["target"] == "modules" else ""
        raise NothingToPruneError(why + where)
    warnings.warn(f"fxprune: {why}", stacklevel=4)  # the line that called fxprune.prune (through run)


@dataclass
class Scored:
    """The pass's decision and what it was made on: its context (its own model when it prepared one), the budget
    that selects from its scores and the model compaction slices."""

    ctx: PassContext
    decision: Decision
    budget: Selector
    counter: CostCounter
    base: torch.nn.Module
    prepared: bool
    target: dict[str, str]

    @property
    def scores(self) -> Scores:
        return self.decision.scores


def score(the_pass: Pass, analysed: Analysed, model: torch.nn.Module, data: Mapping[str, Any],
          selection: Selection, which: str | None, resource: float | None, needs_scores: bool,
          source: Callable[[str], torch.Tensor] | None = None,
          calibrate: Callable[[Mapping[str, Callable]], None] | None = None) -> Scored:
    """Run the pass (``prepare`` and ``score``) under the run's budget; the scores (and any masks) are written
    onto the graph (``fxprune.annotations``). ``source``: where the pass reads tensors when the graph holds none
    (a checkpoint folder, traced on meta); ``calibrate``: how the pass runs calibration data through it (a folder's
    text, streamed layer by layer)."""
    ctx = PassContext(analysed.gm, analysed.groups, model, data, selection,
                      target=(which, float(resource)) if resource is not None else None, source=source,
                      compaction=analysed.target["target"], calibrate=calibrate)
    prepared = the_pass.prepare(ctx) if needs_scores else None
    counter = analysed.counter
    if prepared is not None:  # the pass prunes its own model (e.g. a wider copy): budgets stay the user's
        ctx, counter = prepared, CostCounter(prepared.groups)
        if analysed.latency is not None:
            raise SelectionError(f"{the_pass.name} prunes its own copy of the model, whose latency fxprune has not "
                                 "measured: give target_macs instead of target_latency")
    latency = analysed.latency
    measure, full = (latency, latency()) if latency is not None else (counter, analysed.before)
    budget = Selector(ctx.groups, selection, measure, full, which, resource, getattr(the_pass, "tolerance", 0.01))
    ctx = dataclasses.replace(ctx, select=budget.removal)
    decision = as_decision(the_pass.score(ctx), the_pass.name) if needs_scores else Decision({})
    write_scores(ctx.gm, the_pass.name, decision.scores)
    if decision.masks:
        write_masks(ctx.gm, the_pass.name, decision.masks)
    return Scored(ctx, decision, budget, counter, ctx.model, prepared is not None, analysed.target)


@dataclass
class Selected:
    removed: np.ndarray             # a bool per channel component
    selection: Selection            # the budget as it ended (a resource target's ratio found by search)


def select(scored: Scored) -> Selected:
    """The budget applied to the scores; written onto the graph."""
    removed, sel = scored.budget(scored.scores)
    write_selection(scored.ctx.gm, scored.ctx.groups, removed)
    return Selected(removed, sel)


@dataclass
class Done:
    """The compacted module and what compaction used: the pass's new weights and graph edits, and the cost."""

    compacted: Compacted
    weights: dict[str, torch.Tensor]
    edits: list[GraphEdit]
    after: Cost


def compact(scored: Scored, selected: Selected, example_inputs: Any, verify: bool) -> Done:
    """The pass's weights and edits for the removal (``Decision.finished``), then the target's compaction (graph
    or modules)."""
    ctx, removed, base, decision = scored.ctx, selected.removed, scored.base, scored.decision
    gm, groups = ctx.gm, ctx.groups
    weights, edits = decision.finished(removed)
    graph = scored.target["target"] == "graph"
    if not graph:
        out = Compacted(*resize(gm, groups, removed, base, weights, edits, example_inputs, verify))
    else:
        out = compact_graph(gm, groups, None, base, verify=verify, weights=weights or None, edits=edits)
    if graph and (weights or edits) and (out.removed != removed).any():  # a group kept whole: redo
        weights, edits = decision.finished(out.removed)
        out = compact_graph(gm, groups, None, base, verify=verify, weights=weights or None, edits=edits)
    after = scored.counter(out.removed)
    if edits:  # blocks removed or layers merged: the graph's counter does not see them, the compacted module does
        from fxprune.measure import count_macs, count_params

        after = Cost(count_macs(out.module, example_inputs), count_params(out.module))
    return Done(out, dict(weights), list(edits), after)


def recover(module: torch.nn.Module, recovery: Recovery, original: torch.nn.Module, data: Mapping[str, Any],
            before: Cost, after: Cost) -> list[dict[str, Any]]:
    """Train the compacted module (``fxprune.recovery.modes.recover``) as ``recovery`` says; no mode: nothing,
    an empty log."""
    if recovery.mode is None:
        return []
    from fxprune.recovery.modes import recover as run_recovery

    return run_recovery(module, original=original, train_loader=data["train_loader"], loss=data.get("loss"),
                        evaluate=data.get("evaluate"), macs_full=before.macs, macs_pruned=after.macs,
                        **recovery.options())
