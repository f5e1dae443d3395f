"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

One folder per stage of the pipeline, in order:

    tracing/      model + example inputs -> an ATen-level GraphModule with shapes (three front ends)
    analysis/     the graph -> groups of channels that must shrink together (rules/: one table per op family)
    passes/       scoring passes: the Pass interface (a read-only PassContext -> a Decision), the registry, l1...
    masking/      trainable channel masks in the traced graph for the passes that learn per channel; folding them
    edits/        graph edits beyond slicing: residual blocks (find, remove, depth masks), factorised linears
    selection/    scores + a budget -> which channels go; the cost model; why a budget falls short
    compaction/   the selection -> a plan and an exactly equivalent smaller module
    checkpoints/  Hugging Face model folders pruned from disk, streamed shard by shard (no model in memory); language
                  models calibrated and measured on text one decoder layer at a time
    recovery/     the training engine: fine-tune / scratch-e / scratch-b, distillation, checkpoints, DDP
    pipeline/     a run as one value (RunSpec: the pass, Budget, Recovery...) and the stages in order (run)
    cli/          the command line around them: pipeline, output folder, report, bench, measurement

``api.py`` is the driver ``prune`` (its arguments -> a RunSpec -> ``pipeline.run``); ``testing.py`` holds the
equivalence check; ``robustness.py`` the PGD attack and layer vulnerability (``fxprune eval``); ``state.py`` looks
a model's tensors up by name (the dotted-name getter, the parameters-and-buffers view) for every stage.
"""
from __future__ import annotations

import importlib
import typing
from typing import Any

if typing.TYPE_CHECKING:
    from .analysis import ChannelGroups, Group, analyze
    from .api import prune
    from .artifacts import load
    from .checkpoints import prune_checkpoint
    from .compaction import CompactionError, Plan, apply_plan, compact, slice_tensor
    from .passes.base import Pass, PassContext
    from .passes.decision import Decision, Finish
    from .passes.registry import available_passes
    from .pipeline import Budget, PruneResult, Recovery
    from .tracing.tracer import TraceError, trace

# Public name -> the submodule that defines it. Imported on first use, so that importing fxprune (and
# `fxprune --help`) does not pay for importing torch. No submodule shares a public name, so a plain
# module __getattr__ serves them.
_EXPORTS = {
    "analyze": "analysis", "ChannelGroups": "analysis", "Group": "analysis",
    "prune": "api", "compact": "compaction", "PruneResult": "pipeline", "Budget": "pipeline", "Recovery": "pipeline",
    "load": "artifacts", "prune_checkpoint": "checkpoints",
    "CompactionError": "compaction", "Plan": "compaction", "apply_plan": "compaction", "slice_tensor": "compaction",
    "Pass": "passes.base", "PassContext": "passes.base", "Decision": "passes.decision", "Finish": "passes.decision",
    "available_passes": "passes.registry",
    "trace": "tracing.tracer", "TraceError": "tracing.tracer",
}

__all__ = ["prune", "Budget", "Recovery", "trace", "analyze", "compact", "PruneResult", "ChannelGroups", "Group",
           "Pass", "PassContext", "Decision", "Finish", "Plan", "apply_plan", "slice_tensor", "available_passes",
           "TraceError", "CompactionError", "load", "prune_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
