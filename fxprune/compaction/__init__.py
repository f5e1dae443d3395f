"""Compaction: a selection of channels to remove -> the plan and an exactly equivalent smaller module.

    resize.py     Reindexing: the original positions each tensor axis keeps (or repeats), new sizes
    plan.py       kept indices per parameter (pure slicing: works tensor by tensor)
    emit.py       copy, slice, rewrite literal arguments, verify
    trainable.py  BatchNorm/dropout back as modules so .train()/.eval() work
    verify.py     fake-tensor shape check of every node against the plan
    widen.py      the inverse: every prunable group wider (scratch's expand), same rewrites
"""
from .emit import CompactionError, as_trainable, emit
from .plan import Plan, add_aliases, apply_plan, build_plan, slice_tensor
from .resize import Reindexing

__all__ = ["emit", "as_trainable", "CompactionError", "Plan", "build_plan", "slice_tensor", "apply_plan", "add_aliases",
           "Reindexing"]
