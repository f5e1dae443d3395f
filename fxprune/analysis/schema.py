"""Read and write an ATen node's arguments by schema name (positional or keyword alike)."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxprune.tracing.compat import is_op_overload

__all__ = ["bind", "set_arg"]

_NAMES: dict[Any, list[tuple[str, Any, bool]]] = {}


def _schema(target: Any) -> list[tuple[str, Any, bool]]:
    names = _NAMES.get(target)
    if names is None:
        names = []
        if is_op_overload(target):
            for a in target._schema.arguments:
                default = a.default_value if a.has_default_value() else None
                names.append((a.name, default, a.kwarg_only))
        _NAMES[target] = names
    return names


def bind(node: fx.Node) -> dict[str, Any]:
    """Map every schema argument of ``node`` to its value (defaults filled in)."""
    out: dict[str, Any] = {}
    for i, (name, default, _) in enumerate(_schema(node.target)):
        if i < len(node.args):
            out[name] = node.args[i]
        else:
            out[name] = node.kwargs.get(name, default)
    return out


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Replace one argument, wherever it was written (positionally or as a keyword)."""
    for i, (n, _, _kw_only) in enumerate(_schema(node.target)):
        if n != name:
            continue
        if i < len(node.args):
            args = list(node.args)
            args[i] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}
        return
    raise KeyError(f"{node.target} has no argument {name!r}")
