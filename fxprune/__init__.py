"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

    trace (trace.py) -> analyze (analyze/) -> score (passes/) -> select (select.py) -> compact (compact/)
"""
from __future__ import annotations

import importlib
import types
import typing
from typing import Any

if typing.TYPE_CHECKING:
    from .analyze import ChannelGroups, Group, analyze
    from .api import PruneResult, compact, prune
    from .artifacts import load
    from .compact import CompactionError, Plan, apply_plan, slice_tensor
    from .pass_api import Pass, PassContext
    from .registry import available_passes
    from .trace import TraceError, trace

# Public name -> the submodule that defines it. Imported on first use, so that importing fxprune (and
# `fxprune --help`) does not pay for importing torch.
_EXPORTS = {
    "analyze": "analyze", "ChannelGroups": "analyze", "Group": "analyze",
    "prune": "api", "compact": "api", "PruneResult": "api",
    "load": "artifacts",
    "CompactionError": "compact", "Plan": "compact", "apply_plan": "compact", "slice_tensor": "compact",
    "Pass": "pass_api", "PassContext": "pass_api",
    "available_passes": "registry",
    "trace": "trace", "TraceError": "trace",
}

__all__ = ["prune", "trace", "analyze", "compact", "PruneResult", "ChannelGroups", "Group", "Pass", "PassContext",
           "Plan", "apply_plan", "slice_tensor", "available_passes", "TraceError", "CompactionError", "load"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """The public names always mean the API objects: importing the submodules ``fxprune.trace``,
    ``fxprune.analyze`` or ``fxprune.compact`` binds a module attribute of the same name, and
    ``fxprune.trace(...)`` must still be the function."""

    def __getattribute__(self, name: str) -> Any:
        if name in _EXPORTS:
            module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
            return module.__dict__[name]
        return super().__getattribute__(name)


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


import sys as _sys  # noqa: E402 - the class swap needs the module object, which exists only now

_sys.modules[__name__].__class__ = _Package
