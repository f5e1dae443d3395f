"""Device-portable graphs: ``torch.export`` records the trace device as a literal in factory calls and
``.to(device)`` (Hugging Face rotary embeddings, position ids, masks). Those literals are replaced by
the device of the module's first parameter, read at run time, so ``module.cuda()`` (or ``.to("meta")``)
moves the whole computation."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["device_of", "make_device_portable"]


def device_of(t: torch.Tensor) -> torch.device:
    """Graph helper: the device a tensor lives on (what the literal device arguments become)."""
    return t.device


def _has_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_device(v) for v in value)
    return False


def _swap(value: Any, node: fx.Node) -> Any:
    if isinstance(value, torch.device):
        return node
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, node) for v in value)
    return value


def make_device_portable(graph: fx.Graph) -> None:
    """Replace every literal ``torch.device`` argument by ``device_of(<first parameter or input>)``."""
    users = [n for n in graph.nodes if n.op == "call_function"
             and (any(_has_device(a) for a in n.args) or any(_has_device(v) for v in n.kwargs.values()))]
    if not users:
        return
    anchor = next((n for n in graph.nodes if n.op == "get_attr"), None) or \
        next(n for n in graph.nodes if n.op == "placeholder")
    first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(first):
        device = graph.call_function(device_of, (anchor,))
    for n in users:
        n.args = tuple(_swap(a, device) for a in n.args)
        n.kwargs = {k: _swap(v, device) for k, v in n.kwargs.items()}
