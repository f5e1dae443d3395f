"""Which compaction target a model gets, and the modules target's steps (used by ``fxprune.prune``):

- ``trace_for``: ``"graph"`` traces as before; ``"modules"`` records one real run for the analysis
  (``record_trace(analysis=True)``); ``"auto"`` traces, and falls back to the recording when the model
  cannot be traced whole, saying why (a failed export's page of partial graph is dropped then);
- ``resize``: the user's modules resized in a copy by the plan (``resize_modules``), run once on the
  example inputs as the check.
"""
from __future__ import annotations

import io
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing
from fxprune.annotations import write_selection
from fxprune.tracing.dynamic import INPUT_SHAPES, InputShapes, at_probe, resized
from fxprune.tracing.quiet import ThreadHeldStream
from fxprune.tracing.tracer import TraceError, trace

from .emit import CompactionError, GraphEdit
from .modules import resize_modules
from .plan import add_aliases, build_plan

__all__ = ["TARGETS", "trace_for", "analysis_trace", "resize"]


TARGETS = ("auto", "graph", "modules")


def trace_for(model: torch.nn.Module, example_inputs: Any, target: str, dynamic_shapes: Any = None,
              modules_ok: bool = False) -> tuple[fx.GraphModule, dict[str, str]]:
    """The graph the analysis reads, and which compaction target follows from it (with why). With ``"auto"`` and
    ``modules_ok`` (the pass reads weights only), a graph that would fix an input axis the model's code takes at
    other sizes (a Python loop over the batch) gives way to the modules target, which keeps that code."""
    if target == "auto" and modules_ok:
        gm, used = trace_for(model, example_inputs, "auto", dynamic_shapes)
        fixed = gm.meta[INPUT_SHAPES].fixed_by_code() if used["target"] == "graph" else []
        if not fixed:
            return gm, used
        try:
            recorded = analysis_trace(model, example_inputs, dynamic_shapes)
        except TraceError:
            return gm, used
        axes = ", ".join(str(f.axis) for f in fixed)
        return recorded, {"target": "modules", "why": f"a graph would fix {axes} ({fixed[0].why}): its own "
                                                     "modules are resized, which keep its code"}
    if target == "graph":
        return trace(model, example_inputs, dynamic_shapes=dynamic_shapes), \
            {"target": "graph", "why": "asked for (target='graph')"}
    if target == "modules":
        return analysis_trace(model, example_inputs, dynamic_shapes), \
            {"target": "modules", "why": "asked for (target='modules')"}
    held = ThreadHeldStream(sys.stderr, threading.get_ident())  # torch.export prints its partial graph on failure
    sys.stderr = held
    try:
        return trace(model, example_inputs, dynamic_shapes=dynamic_shapes, fallback=True), \
            {"target": "graph", "why": "the model traces as a whole"}
    except TraceError as exc:
        try:  # the axes the failed trace found stand, and its recording: the model is not run again for them
            gm = analysis_trace(model, example_inputs, dynamic_shapes if exc.input_shapes is None else exc.input_shapes,
                                exc.recorded)
        except Exception:  # the model does not even run under the recording: the trace's own error says most
            held.stream.write(held.buffer.getvalue())
            raise exc from None
        held.buffer = io.StringIO()  # the fallback worked: the failed export's page of graph is noise
        lines = str(exc).splitlines()
        reason = lines[0][:300] + "".join(f"; {ln.strip()}" for ln in lines[1:2] if ln.strip().startswith("at "))
        return gm, {"target": "modules", "why": f"no static graph expresses it ({reason}): its own modules are resized"}
    finally:
        held.owner = None
        if sys.stderr is held:
            sys.stderr = held.stream
        held.stream.write(held.buffer.getvalue())


def analysis_trace(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None,
                   recorded: fx.GraphModule | None = None) -> fx.GraphModule:
    """The record of one real run, data-dependent parts included (``record_trace(analysis=True)``). The resized
    modules keep the model's own code, so the input axes it accepts at other sizes (``input_shapes``) stay free.
    ``dynamic_shapes``: torch.export's spec, or the ``InputShapes`` a failed trace already found; ``recorded``: the
    recording a failed trace already made (``TraceError.recorded``)."""
    from fxprune.tracing.makefx import Unsupported
    from fxprune.tracing.record import record_trace
    from fxprune.tracing.tracer import INPUT_SHAPES, META_INPUTS, input_shapes, normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    was = model.training
    model.eval()
    try:
        gm = recorded if recorded is not None else record_trace(model, args, kwargs, analysis=True)
        shapes = input_shapes(model, args, kwargs, dynamic_shapes).ones_free()  # the resized modules keep the
        # model's code, so a batch of one it runs at two stays free (checked at two after resizing)
    except Unsupported as exc:
        raise TraceError(f"fxprune could not record {type(model).__name__} for analysis: {exc}") from None
    finally:
        model.train(was)
    gm.meta[META_INPUTS] = (args, kwargs)
    gm.meta[INPUT_SHAPES] = shapes
    gm.train(was)
    return gm


def resize(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray, base: torch.nn.Module,
           weights: dict[str, torch.Tensor], edits: Sequence[GraphEdit], example_inputs: Any,
           verify: bool) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """The modules target: the user's modules resized in a copy by the plan, run once on the example
    inputs as the check (the graph target's shape verifier has no graph to check here); returns the
    module, its plan and the removal (what ``fxprune.compact`` returns for the graph target)."""
    from fxprune.tracing.tracer import normalize_inputs

    if edits:
        raise CompactionError("graph edits (block removal, factorised layers) need the graph target")
    plan = add_aliases(build_plan(gm, Reindexing(groups, removed)), base)
    module = resize_modules(base, plan, weights or None)
    if verify:
        _check_runs(module, type(base).__name__, *normalize_inputs(example_inputs), gm.meta.get(INPUT_SHAPES))
    write_selection(gm, groups, removed)
    return module, plan, removed


def _check_runs(module: torch.nn.Module, name: str, args: tuple, kwargs: dict, shapes: InputShapes | None) -> None:
    """The resized module runs on the example inputs, and with each group of dynamic axes at its second size."""
    runs = [("the example inputs", (args, kwargs))]
    for group in (shapes.groups() if shapes is not None else []):
        sizes, at = at_probe(group)
        runs.append((f"the example inputs with {at}", resized(args, kwargs, sizes)))
    was = module.training
    module.eval()
    try:
        for what, (a, k) in runs:
            try:
                with torch.no_grad():
                    module(*a, **k)
            except Exception as exc:
                raise CompactionError(f"the resized {name} does not run on {what}: {exc}") from exc
    finally:
        module.train(was)
