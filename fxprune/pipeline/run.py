"""The whole pipeline for one :class:`~fxprune.pipeline.spec.RunSpec`, top to bottom like a list."""
from __future__ import annotations

import warnings
from collections.abc import Callable

from .result import PruneResult
from .spec import RunSpec
from .stages import analyse, check_prunable, compact, input_shapes, recover, score, select

__all__ = ["run"]


def run(spec: RunSpec, progress: Callable[[str], None] | None = None) -> PruneResult:
    """trace -> analyse -> score -> select -> compact -> recover; ``progress(stage)`` is told as each starts. The
    user's model is left bit-identical."""
    stage = progress or (lambda name: None)
    selection, (which, resource) = spec.selection, spec.budget.resource
    analysed = analyse(spec.model, spec.example_inputs, spec.the_pass, target=spec.target,
                       dynamic_shapes=spec.dynamic_shapes, allow_inexact=spec.allow_inexact, selection=selection,
                       which=which, progress=stage)
    if spec.needs_scores:
        check_prunable(analysed, spec.require_prunable)
    stage("score")
    scored = score(spec.the_pass, analysed, spec.model, spec.data, selection, which, resource, spec.needs_scores)
    stage("select")
    selected = select(scored)
    stage("compact")
    done = compact(scored, selected, spec.example_inputs, spec.verify)
    out, rec = done.compacted, spec.recovery
    if rec.mode is not None:
        stage("recover")
    log = recover(out.module, rec, spec.model, spec.data, analysed.before, done.after)
    shapes = input_shapes(out.module, analysed.gm)
    if shapes.fixed:
        warnings.warn(shapes.warning(type(spec.model).__name__), stacklevel=3)  # the line that called prune()
    decision, latency = scored.decision, analysed.latency
    module, extras = out.module, dict(decision.extras)
    if decision.product is not None:  # the method's product is another module: the compacted one is its static
        module, extras["static"] = decision.product, out.module
    return PruneResult(module, out.plan, scored.ctx.groups, out.removed, decision.scores, analysed.before,
                       done.after, selected.selection, log, done.weights, scored.base if scored.prepared else None,
                       dict(decision.report), dict(decision.artifacts), extras, analysed.target,
                       latency.summary(out.removed) if latency is not None else None, shapes)
