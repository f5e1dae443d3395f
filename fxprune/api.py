"""The public entry point: ``fxprune.prune(model, example_inputs, method="l1", ratio=0.5)``.

A driver: its arguments become one :class:`~fxprune.pipeline.RunSpec`, and ``fxprune.pipeline.run`` runs the
stages in order (trace -> analyse -> score -> select -> compact -> recover). The user's model is never modified.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import pipeline
from .compaction.compact import Compacted, compact
from .passes.base import Pass
from .passes.registry import make_pass
from .pipeline import Budget, PruneResult, Recovery, RunSpec
from .pipeline.spec import RECOVERY, grouped
from .selection.diagnose import NothingToPruneError
from .state import callers_rng_kept

__all__ = ["prune", "PruneResult", "Budget", "Recovery", "compact", "Compacted", "RECOVERY", "NothingToPruneError"]


def prune(model: torch.nn.Module, example_inputs: Any, method: str | Pass = "l1", ratio: float | None = None, *,
          options: dict[str, Any] | None = None, budget: Budget | None = None, recovery: Recovery | None = None,
          target: str = "auto", dynamic_shapes: Any = None, allow_inexact: bool = False,
          require_prunable: bool = False, verify: bool = True, progress: Callable[[str], None] | None = None,
          **data: Any) -> PruneResult:
    """Prune ``model`` and return the compacted module with its plan.

    ``example_inputs``: a tuple of positional inputs, a tensor, or a dict of keyword inputs.
    ``method``: a registered pass name, ``"package.module:Class"``, or a Pass instance; ``options`` are its
    fields. ``ratio``: the fraction of channels removed (default 0.5; the budget's when ``budget`` is given);
    ``budget``: :class:`fxprune.Budget`, how much to remove and where (scope, per-layer ratios, protected
    layers, floors, rounding, or a MACs / parameter / latency target); ``recovery``: :class:`fxprune.Recovery`,
    how the pruned model trains after (epochs, mode, distillation; default: none). ``data``: ``train_loader=``,
    ``val_loader=``, ``loss=``, ``evaluate=`` (named like the model file's functions). ``target``: what
    compaction rewrites: ``"graph"`` (the traced graph, the default for a model torch.export traces whole),
    ``"modules"`` (the user's own modules resized in a copy, for models no static graph expresses: detectors;
    ``fxprune.compaction.modules``), or ``"auto"`` (graph when the model traces, modules when it does not;
    ``PruneResult.compaction`` says which and why). ``dynamic_shapes``: the input axes the pruned model must
    take at any size, in torch.export's format (default: every axis the model accepts at a second size, found
    by running it there; ``False``: none). ``progress(stage)`` is called as each stage starts.
    ``require_prunable=True``: a budget that asks for a removal on a model none of whose groups can shrink
    raises :class:`NothingToPruneError` right after the analysis (before any training), naming the largest
    frozen groups' reasons; otherwise that case warns. ``model`` is left bit-identical.

    The flat keywords of the previous release (``scope=``, ``target_macs=``, ``epochs=``, ``recover=``...)
    still work, with a DeprecationWarning; they go in ``budget=`` and ``recovery=``.
    """
    budget, recovery = grouped(ratio, budget, recovery, data, "fxprune.prune")
    with callers_rng_kept():  # a pass's sampling, a loader's shuffle: the caller's random stream reads as before
        spec = RunSpec(model, example_inputs, make_pass(method, options), budget, recovery, target, dynamic_shapes,
                       data, allow_inexact, require_prunable, verify)
        return pipeline.run(spec, progress)
