"""Give train/eval behaviour back to an exported graph.

``torch.export`` freezes BatchNorm and dropout in the mode they were traced in (we trace in eval
mode). Here each such op becomes a call to a real ``nn.BatchNorm*d`` / ``nn.Dropout`` module that
owns the (already sliced) tensors, so ``.train()`` / ``.eval()`` switch them as on any module and
the state-dict names stay those of the user's model (``layer1.0.bn1.weight``...).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.schema import bind

__all__ = ["make_trainable", "module_batch_norm"]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _module_path(*targets: object, fallback: str) -> str:
    for t in targets:
        if isinstance(t, fx.Node) and t.op == "get_attr" and "." in t.target:
            return t.target.rsplit(".", 1)[0]
    return fallback


def module_batch_norm(node: fx.Node) -> dict[str, Any] | None:
    """The bound arguments of an ``aten.batch_norm`` whose weight, bias and statistics are all a module's
    own tensors (``get_attr``) or absent, i.e. one a BatchNorm module can compute; None otherwise
    (computed statistics or weights: the functional op stays)."""
    if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
        return None
    b = bind(node)
    parts = [b["weight"], b["bias"], b["running_mean"], b["running_var"]]
    if any(p is not None and not (isinstance(p, fx.Node) and p.op == "get_attr") for p in parts):
        return None
    return b


def _batch_norm(node: fx.Node, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> str | None:
    b = module_batch_norm(node)
    if b is None:
        return None
    parts = [b["weight"], b["bias"], b["running_mean"], b["running_var"]]
    x = b["input"].meta["val"]
    path = _module_path(*parts, fallback=f"bn_{node.name}")
    if path in modules:
        return path
    w, bias, rm, rv = (tensors[p.target] if p is not None else None for p in parts)
    ref = next(t for t in (w, rm) if t is not None) if (w is not None or rm is not None) else None
    if ref is None:
        return None
    # built empty (no tensors to allocate and initialise), then given the sliced ones
    bn = _BN.get(x.dim(), nn.BatchNorm2d)(ref.shape[0], eps=b["eps"], momentum=b["momentum"],
                                          affine=False, track_running_stats=False)
    bn.affine, bn.track_running_stats = w is not None, rm is not None
    if w is not None:
        bn.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w)
    if bias is not None:
        bn.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    if rm is not None:
        bn.running_mean, bn.running_var = rm, rv
        nbt = tensors.get(f"{path}.num_batches_tracked")
        bn.num_batches_tracked = nbt if nbt is not None else torch.tensor(0, dtype=torch.long, device=rm.device)
    modules[path] = bn
    return path


def _dropout(node: fx.Node, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> str | None:
    b = bind(node)
    stack = node.meta.get("nn_module_stack") or {}
    path = None
    for _, (p, typ) in reversed(list(stack.items())):
        if "Dropout" in str(typ):
            path = p
            break
    path = path or f"dropout_{node.name}"
    modules.setdefault(path, nn.Dropout(p=float(b["p"])))
    return path


_UNLOWER: dict[object, Callable[..., str | None]] = {
    torch.ops.aten.batch_norm.default: _batch_norm,
    torch.ops.aten.dropout.default: _dropout,
}


def make_trainable(graph: fx.Graph, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Rewrite BatchNorm / dropout calls in ``graph`` to ``call_module``; return the modules by path."""
    modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        make = _UNLOWER.get(node.target) if node.op == "call_function" else None
        path = make(node, tensors, modules) if make else None
        if path is None:
            continue
        x = bind(node)["input"]
        with graph.inserting_before(node):
            call = graph.call_module(path, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    return modules
