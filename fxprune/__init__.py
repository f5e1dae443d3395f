"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

    trace (trace.py) -> analyze (analyze/) -> score (passes/) -> select (select.py) -> compact (compact/)
"""
from __future__ import annotations

from .analyze import ChannelGroups, Group, analyze
from .api import PruneResult, compact, prune
from .compact import CompactionError, Plan, apply_plan, slice_tensor
from .pass_api import Pass, PassContext
from .registry import available_passes
from .trace import TraceError, trace

__all__ = ["prune", "trace", "analyze", "compact", "PruneResult", "ChannelGroups", "Group", "Pass", "PassContext",
           "Plan", "apply_plan", "slice_tensor", "available_passes", "TraceError", "CompactionError"]
__version__ = "0.1.0"
