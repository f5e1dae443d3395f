"""A model's tensors by name: the dotted-name lookup and the parameters-and-buffers view every stage uses.

Torch-free at import (it only calls methods of the objects it is given), so any module may import it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["attribute", "named_tensors", "device_of_module"]


def attribute(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path`` ``"a.b.c"`` (``root`` itself for ``""``): a submodule, a parameter, a
    buffer, a plain tensor attribute, or any object's attribute. Raises AttributeError where a part is missing."""
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by state-dict name, a tied tensor under each of its
    names (parameters first, then buffers). The values are the module's own tensors, not copies."""
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


def device_of_module(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    import torch

    return next((t.device for t in module.parameters()), torch.device("cpu"))
