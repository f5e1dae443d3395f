"""Helpers to check a pruning result: the masked model and the central equivalence assertion."""
from __future__ import annotations

import copy
from typing import Any

import torch

from .analysis.rules.norm import DIRECTION
from .compaction.plan import Plan
from .state import attribute, load_tensors, named_tensors
from .tracing.compat import tree_leaves
from .tracing.dynamic import at_probe, resized
from .tracing.tracer import normalize_inputs

__all__ = ["masked_model", "with_weights", "assert_equivalent", "second_sizes"]


def masked_model(model: torch.nn.Module, plan: Plan, groups: Any = None) -> torch.nn.Module:
    """A copy of ``model`` with every pruned position of every planned tensor set to zero.

    With ``groups`` (the analysis of ``model``), a weight-normalised direction (``v`` of ``g * v / ||v||``)
    keeps its pruned output slices: zeroing one would make ``0 / 0``; the zeroed ``g`` zeroes that output."""
    masked = copy.deepcopy(model)
    state = named_tensors(masked)
    directions = _directions(groups)
    with torch.no_grad():
        for name, entry in plan.items():
            t = state[name] if name in state else _attribute(masked, name)  # a plain tensor attribute
            if t is None:  # a constant made in forward (torch.tensor(...)): the analysis never took it as zero
                continue
            for dim, kept in entry.items():
                if (name, dim) in directions:
                    continue
                drop = torch.ones(t.shape[dim], dtype=torch.bool, device=t.device)
                drop[torch.as_tensor(kept, dtype=torch.long, device=t.device)] = False
                index = [slice(None)] * t.dim()
                index[dim] = drop
                t[tuple(index)] = 0
    return masked.eval()


def _directions(groups: Any) -> set[tuple[str, int]]:
    if groups is None:
        return set()
    return {(p.name, p.axis) for g in groups for p in g.params if p.role == DIRECTION}


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A copy of ``model`` with the full-size tensors a pass handed to compaction loaded by name (no copy
    when there are none): the reference a weight-changing pass (slimming, ThiNet, LASSO) is checked against."""
    if not weights:
        return model
    model = copy.deepcopy(model)
    load_tensors(named_tensors(model), weights)
    return model


def _attribute(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The plain tensor attribute ``name`` of ``module``, or None where there is none."""
    try:
        obj = attribute(module, name)
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def _run(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return module(*args, **kwargs)


def assert_equivalent(model: torch.nn.Module, result: Any, example_inputs: Any, *, tol: float | None = None,
                      dtype: torch.dtype | None = torch.float64) -> None:
    """The compacted module equals the masked original on ``example_inputs``; when the pass changed
    weights (``result.weights``), the masked original carries them (see :func:`with_weights`).

    Both run in float64 by default, so the tolerance measures the rewrite, not float32 summation
    order. ``tol`` is relative to each output's largest magnitude (default 1e-6 in float64, 1e-4 in
    float32: random-weight models produce outputs in the thousands). float32 is the fast choice for
    models full of depthwise convolutions, whose float64 kernels are far slower on CPU.
    """
    base = getattr(result, "base", None)  # a pass that pruned its own model (scratch's wider copy)
    masked = masked_model(with_weights(base if base is not None else model, getattr(result, "weights", None)),
                          result.plan, getattr(result, "groups", None))
    compacted = copy.deepcopy(getattr(result, "compacted", result.module)).eval()  # a PruneResult or a Compacted
    inputs = normalize_inputs(example_inputs)
    if dtype is not None:
        masked, compacted = masked.to(dtype), compacted.to(dtype)
        inputs = _cast(inputs, dtype)
    if tol is None:
        tol = 1e-6 if dtype == torch.float64 else 1e-4
    for args, kwargs in [inputs, *second_sizes(result, *inputs)]:
        ref = _plain(_run(masked, args, kwargs))
        got = _plain(_run(compacted, args, kwargs))
        _close_per_output(got, ref, tol)


def _close_per_output(got: Any, ref: Any, tol: float, where: str = "output") -> None:
    """Each floating-point output against its own scale (its largest magnitude, at least 1): a small output
    beside a large one is checked as closely as if it were alone. Anything else compares exactly, and a
    different structure fails."""
    if isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.is_floating_point():
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, msg=lambda text: f"{where}: {text}")
    elif isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)) and len(ref) == len(got):
        for i, (g, r) in enumerate(zip(got, ref)):
            _close_per_output(g, r, tol, f"{where}[{i}]")
    elif isinstance(ref, dict) and isinstance(got, dict) and list(ref) == list(got):
        for k in ref:
            _close_per_output(got[k], ref[k], tol, f"{where}[{k!r}]")
    else:
        torch.testing.assert_close(got, ref, msg=lambda text: f"{where}: {text}")


def second_sizes(result: Any, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The inputs (args, kwargs) with each group of the result's dynamic input axes (``result.shapes``) at its
    second size, where they have the traced structure and sizes: the pruned model must equal the masked
    original there too (a size fixed in the graph would compute with the example's)."""
    shapes = getattr(result, "shapes", None)
    if shapes is None:
        return []
    leaves = tree_leaves((args, kwargs))
    return [resized(args, kwargs, at_probe(group)[0]) for group in shapes.groups()
            if all(a.leaf < len(leaves) and isinstance(leaves[a.leaf], torch.Tensor) and leaves[a.leaf].dim() > a.dim
                   and leaves[a.leaf].shape[a.dim] == a.size for a in group)]


def _tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) output, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def _plain(x: Any) -> Any:
    """ModelOutput and other mappings compare as plain dicts."""
    if hasattr(x, "to_tuple") and hasattr(x, "keys"):
        return {k: _plain(x[k]) for k in x.keys()}
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x
