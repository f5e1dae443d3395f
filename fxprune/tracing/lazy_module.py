"""GraphModules that compile their Python code on first use (torch's ``_LazyGraphModule``).

Compiling a graph's generated code holds about 8 KB per node while it runs (xcit_nano's 1000 nodes:
8 MB), more than the rest of its compaction; an analysis, a plan or the weights never need it. The
lazy class is private and optional (``fxprune.tracing.compat``): without it GraphModules compile their code
at once. Compaction and export depend on this module, not on the tracing front ends.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .compat import lazy_graph_module_class

__all__ = ["lazy_graph_module", "compiled"]


def lazy_graph_module(root: Any, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule over ``root`` (a module or a dict of attributes) that compiles its ``forward`` on first use."""
    return (lazy_graph_module_class() or fx.GraphModule)(root, graph, class_name=class_name)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, with its ``forward`` compiled now if it is a lazy GraphModule, whose ``forward`` is a
    generic ``(*args, **kwargs)`` until first use: tracing and export read the real signature."""
    lazy = lazy_graph_module_class()
    if lazy is not None and isinstance(model, lazy):
        model.real_recompile()
    return model
