"""Which compaction target a model gets, and the modules target's steps (used by ``fxprune.prune``):

- ``trace_for``: ``"graph"`` traces as before; ``"modules"`` records one real run for the analysis
  (``record_trace(analysis=True)``); ``"auto"`` traces, and falls back to the recording when the model
  cannot be traced whole, saying why (a failed export's page of partial graph is dropped then);
- ``for_modules``: what the modules target needs before scoring: a pass that does not run the graph
  (``Pass.runs_graph``), and the groups whose sizes the model's code holds frozen (``freeze_code_sizes``);
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
from fxprune.annotations import write_selection
from fxprune.tracing.quiet import ThreadHeldStream
from fxprune.tracing.tracer import TraceError, trace

from .emit import CompactionError, GraphEdit
from .modules import freeze_code_sizes, resize_modules
from .plan import add_aliases, build_plan
from .resize import Reindexing

__all__ = ["TARGETS", "trace_for", "analysis_trace", "for_modules", "resize"]


TARGETS = ("auto", "graph", "modules")


def trace_for(model: torch.nn.Module, example_inputs: Any, target: str) -> tuple[fx.GraphModule, dict[str, str]]:
    """The graph the analysis reads, and which compaction target follows from it (with why)."""
    if target == "graph":
        return trace(model, example_inputs), {"target": "graph", "why": "asked for (target='graph')"}
    if target == "modules":
        return analysis_trace(model, example_inputs), {"target": "modules", "why": "asked for (target='modules')"}
    held = ThreadHeldStream(sys.stderr, threading.get_ident())  # torch.export prints its partial graph on failure
    sys.stderr = held
    try:
        return trace(model, example_inputs), {"target": "graph", "why": "the model traces as a whole"}
    except TraceError as exc:
        try:
            gm = analysis_trace(model, example_inputs)
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


def analysis_trace(model: torch.nn.Module, example_inputs: Any) -> fx.GraphModule:
    """The record of one real run, data-dependent parts included (``record_trace(analysis=True)``)."""
    from fxprune.tracing.makefx import Unsupported
    from fxprune.tracing.record import record_trace
    from fxprune.tracing.tracer import META_INPUTS, normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    was = model.training
    model.eval()
    try:
        gm = record_trace(model, args, kwargs, analysis=True)
    except Unsupported as exc:
        raise TraceError(f"fxprune could not record {type(model).__name__} for analysis: {exc}") from None
    finally:
        model.train(was)
    gm.meta[META_INPUTS] = (args, kwargs)
    gm.train(was)
    return gm


def for_modules(the_pass: Any, gm: fx.GraphModule, groups: ChannelGroups, model: torch.nn.Module | None = None) -> None:
    """What the modules target needs: a pass that does not run the graph, and groups whose sizes no line
    of the model's Python code holds (``freeze_code_sizes``)."""
    from fxprune.passes.registry import PassError

    if getattr(the_pass, "runs_graph", True):
        raise PassError(f"pass {the_pass.name!r} trains or calibrates in the traced graph, and this model has no "
                        "graph that runs on other inputs (it is compacted by resizing its modules): use a pass "
                        "that reads the weights only, such as l1")
    freeze_code_sizes(gm, groups, model)


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
        args, kwargs = normalize_inputs(example_inputs)
        with torch.no_grad():
            was = module.training
            module.eval()
            try:
                module(*args, **kwargs)
            except Exception as exc:
                raise CompactionError(f"the resized {type(base).__name__} does not run on the example inputs: "
                                      f"{exc}") from exc
            finally:
                module.train(was)
    write_selection(gm, groups, removed)
    return module, plan, removed
