"""Compaction: a selection of channels to remove -> the plan and an exactly equivalent smaller module.

    plan.py       kept indices per parameter (pure slicing: works tensor by tensor)
    compact.py    the stage as one call: a removal -> the module, its plan, the removal applied
    emit.py       copy, slice, rewrite literal arguments, verify
    trainable.py  BatchNorm/dropout back as modules so .train()/.eval() work
    verify.py     fake-tensor shape check of every node against the plan
    widen.py      the inverse: every prunable group wider (scratch's expand), same rewrites

What a selection means per tensor axis (``Reindexing``) is the analysis' (``fxprune.analysis.reindex``): selection
counts costs with it too.
"""
from fxprune.analysis.reindex import Reindexing

from .compact import Compacted, compact
from .emit import CompactionError, as_trainable, emit
from .plan import Plan, add_aliases, apply_plan, build_plan, slice_tensor

__all__ = ["compact", "Compacted", "emit", "as_trainable", "CompactionError", "Plan", "build_plan", "slice_tensor",
           "apply_plan", "add_aliases", "Reindexing"]
