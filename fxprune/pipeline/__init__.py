"""The pipeline: trace -> analyse -> score -> select -> compact -> recover.

A run is one value, :class:`RunSpec` (``spec.py``: the model, the pass, the :class:`Budget`, the
:class:`Recovery`, the compaction target, the data), built once by a driver; ``run(spec)`` (``run.py``) calls the
stages (``stages.py``) in order, each a function of plain values that returns one, and returns the
:class:`PruneResult` (``result.py``) made of their values:

    analysed = analyse(model, example_inputs, the_pass, target=..., dynamic_shapes=..., ...)   # trace + groups
    scored   = score(the_pass, analysed, model, data, selection, which, resource, ...)         # the pass's Decision
    selected = select(scored)                                                                  # the budget
    done     = compact(scored, selected, example_inputs, verify)                               # the module
    log      = recover(done.compacted.module, ...)                                             # training

The drivers: ``fxprune.prune`` (``fxprune/api.py``), the command line (``fxprune/cli/pipeline.py``, through
``fxprune.prune``) and ``fxprune.prune_checkpoint`` (``fxprune/checkpoints/prune.py``: its own analysis of a
folder on meta and its own output, with the same ``score`` and ``select`` between them).
"""
from .result import PruneResult
from .run import run
from .spec import Budget, Recovery, RunSpec
from .stages import (
    Analysed,
    Done,
    Scored,
    Selected,
    analyse,
    check_prunable,
    compact,
    input_shapes,
    latency_model,
    recover,
    score,
    select,
)

__all__ = ["run", "RunSpec", "Budget", "Recovery", "PruneResult", "Analysed", "Scored", "Selected", "Done",
           "analyse", "check_prunable", "score", "select", "compact", "recover", "input_shapes", "latency_model"]
