"""Device- and dtype-portable graphs. ``torch.export`` records the trace device as a literal in factory
calls and ``.to(device)`` (Hugging Face rotary embeddings, position ids, masks). Those literals are
replaced by the device of the module's first parameter, read at run time, so ``module.cuda()`` (or
``.to("meta")``) moves the whole computation.

It also records ``dtype=weight.dtype`` as the literal float32 of the trace (timm's
PositionalEncodingFourier: ``pos.to(dtype)`` before a conv; an LSTM's zero state). A floating dtype
literal equal to the parameters' dtype is replaced by the dtype of a parameter read at run time
WHERE THE VALUE FEEDS AN OP THAT READS A PARAMETER of that dtype, so ``.half()``/``.double()`` works
there. Other literals (a deliberate float32 upcast for a softmax or a mask) are kept: the trace
cannot tell them from ``x.dtype``, and they are right in the traced dtype."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["device_of", "dtype_of", "make_device_portable", "make_dtype_portable"]


def device_of(t: torch.Tensor) -> torch.device:
    """Graph helper: the device a tensor lives on (what the literal device arguments become)."""
    return t.device


def dtype_of(t: torch.Tensor) -> torch.dtype:
    """Graph helper: a tensor's dtype (what ``dtype=weight.dtype`` literals become)."""
    return t.dtype


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


def _param_of(node: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """A floating parameter of ``dtype`` read directly by ``node``, if any."""
    return next((a for a in node.all_input_nodes if a.op == "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
                 and a.meta["val"].dtype == dtype), None)


def make_dtype_portable(graph: fx.Graph) -> None:
    """Replace a literal floating dtype equal to the parameters' dtype by ``dtype_of(<parameter>)`` on
    nodes whose value goes straight into an op reading a parameter of that dtype."""
    dtypes = {n.meta["val"].dtype for n in graph.nodes if n.op == "get_attr"
              and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n.op != "call_function" or not any(v is dtype for v in (*n.args, *n.kwargs.values())):
            continue
        anchor = next((p for u in n.users if (p := _param_of(u, dtype)) is not None and order[p] < order[n]), None)
        if anchor is None:
            continue
        with graph.inserting_before(n):
            follow = graph.call_function(dtype_of, (anchor,))
        n.args = tuple(follow if v is dtype else v for v in n.args)
        n.kwargs = {k: (follow if v is dtype else v) for k, v in n.kwargs.items()}
