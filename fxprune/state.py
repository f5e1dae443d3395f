"""A model's tensors by name: the dotted-name lookup and the parameters-and-buffers view every stage uses.

Torch-free at import (it only calls methods of the objects it is given), so any module may import it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["attribute", "named_tensors", "user_tensors", "load_tensors", "device_of_module", "callers_rng_kept",
           "seeded"]


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


def user_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``named_tensors`` with a parametrized tensor under its own name (``a.weight``, not
    ``a.parametrizations.weight.original``): the unparametrized value, as the user's model holds it. The
    parametrizations' own tensors are left out."""
    named = {_unparametrized(k): v for k, v in named_tensors(module).items()}
    return {k: v for k, v in named.items() if k is not None}


def load_tensors(state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy each of ``tensors`` into the tensor of the same name in ``state`` (a ``named_tensors`` view of a
    module), in place and without autograd; names ``state`` lacks are skipped."""
    import torch

    with torch.no_grad():
        for name, t in tensors.items():
            if name in state:
                state[name].copy_(t)


def _unparametrized(name: str) -> str | None:
    head, sep, tail = ("." + name).rpartition(".parametrizations.")
    if not sep:
        return name
    if not tail.endswith(".original") or tail.count(".") != 1:
        return None  # a tensor of a parametrization module
    return f"{head}.{tail[:-len('.original')]}".lstrip(".")


def device_of_module(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    import torch

    return next((t.device for t in module.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def callers_rng_kept() -> Iterator[None]:
    """Run the block on a fork of the random state (the CPU generator's, and every CUDA device's once CUDA is
    initialised) and put the caller's back after it: pruning draws random numbers (a pass's sampling, a
    loader's shuffle, dropout), and the caller's own random stream must read the same after ``fxprune.prune``
    as before it. Inside, the stream continues from the caller's state, so seeding before a call still
    makes it reproducible."""
    import torch

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` for the block only: a pass's own seed, with the caller's random state put
    back after (``callers_rng_kept``)."""
    import torch

    with callers_rng_kept():
        torch.manual_seed(seed)
        yield
