"""Which sizes of the inputs stay free: the axes the ORIGINAL model accepts at another size, found by running
it there, and what a traced graph kept of them.

A pruned model must take every input size its original takes (any batch, any prompt length, any image size),
or say which it does not. Nobody lists those axes by hand:

* ``find_axes``: every axis of every tensor input (size 2 or more) is tried at a second size (``probe_size``),
  all axes of one example size together, then one position at a time where that fails; the model runs there
  for real (on the meta device for a model there). The axes where it runs are the model's dynamic axes
  (``Axis``); a batch of one that the model would take at two is reported as fixed (torch specialises sizes
  0 and 1).
* ``from_spec``: the same from a user's torch.export ``dynamic_shapes`` (the model file's
  ``dynamic_shapes()``), which then replaces the probe.
* ``export_spec``: those axes as torch.export's ``dynamic_shapes`` (``Dim.AUTO`` each);
  ``static_axes``: which of them a traced graph holds at a constant anyway.
* ``resized``: the example inputs at other sizes (tiled along the axis, so token ids and masks keep their
  values' range), for the probe and for compaction's check at a second size.
* ``read_sizes_from_inputs``: a graph's reads of a dynamic size (``sym_size``) taken from the input that
  carries it, not from whichever tensor the forward asked: a residual block's size read is then no edge out
  of the block (block analysis, removal) and nothing keeps a removed tensor alive for its size.
* ``InputShapes``: what tracing records on the graph (``gm.meta[INPUT_SHAPES]``): the dynamic axes, and the
  fixed ones with why (the user's line that read a size as a Python int, when torch says where).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import compat

__all__ = ["Axis", "Fixed", "InputShapes", "find_axes", "from_spec", "export_spec", "static_axes", "resized",
           "at_probe", "probe_size", "leaf_names", "read_sizes_from_inputs", "INPUT_SHAPES"]

INPUT_SHAPES = "fxprune.input_shapes"  # gm.meta: the InputShapes the graph was traced with (written by the tracer)


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor input: ``leaf`` indexes the flattened inputs (pytree leaves of (args, kwargs)),
    ``input`` names it (the forward's parameter, then positions and keys), ``size`` is the example's and
    ``probe`` the second size it is checked at; axes of one ``group`` change size together."""

    leaf: int
    input: str
    dim: int
    size: int
    probe: int
    group: int = 0

    def __str__(self) -> str:
        return f"{self.input} axis {self.dim}"


@dataclass(frozen=True)
class Fixed:
    """An axis the original model accepts at other sizes but the traced graph (and so the pruned model) holds at
    ``axis.size``, and why."""

    axis: Axis
    why: str

    def __str__(self) -> str:
        return f"{self.axis} fixed at {self.axis.size}: {self.why}"


@dataclass(frozen=True)
class InputShapes:
    """The input axes a traced graph keeps symbolic, and those it fixes that the original model does not."""

    dynamic: tuple[Axis, ...] = ()
    fixed: tuple[Fixed, ...] = ()

    def groups(self) -> list[list[Axis]]:
        """The dynamic axes by group (those that change size together), in order."""
        out: dict[int, list[Axis]] = {}
        for a in self.dynamic:
            out.setdefault(a.group, []).append(a)
        return list(out.values())

    def report(self) -> dict[str, Any]:
        """For report.json and ``fxprune inspect``: each dynamic axis with its example and checked sizes, each
        fixed one with its size and why."""
        return {"dynamic": [{"input": a.input, "axis": a.dim, "example": a.size, "checked_at": a.probe}
                            for a in self.dynamic],
                "fixed": [{"input": f.axis.input, "axis": f.axis.dim, "size": f.axis.size, "why": f.why}
                          for f in self.fixed]}

    def fixed_by_code(self) -> list[Fixed]:
        """The fixed axes the model's code fixes (not a size of 1 in the example, which the example fixes)."""
        return [f for f in self.fixed if f.axis.size > 1]

    def warning(self, model_name: str) -> str:
        """One line for a run whose pruned model fixes axes the original takes at other sizes."""
        hint = (" To keep such an axis free, read its size as a tensor's (x.shape[0], x.size(0)) where a line reads "
                "it as a Python number (len(x), int(...), math.sqrt(...)), or avoid a Python loop over it."
                if self.fixed_by_code() else "")
        return (f"fxprune: {model_name} takes other sizes than the example's where the pruned model will not: "
                + "; ".join(str(f) for f in self.fixed) + "." + hint)

    def ones_free(self) -> InputShapes:
        """The example's axes of size 1 that the model runs at 2 (fixed: torch specialises them), dynamic instead,
        each a group of its own: for a model whose own code runs after pruning (the modules target), not a graph
        torch traced."""
        ones = [f for f in self.fixed if f.axis.size == 1]
        first = max((a.group for a in self.dynamic), default=-1) + 1
        freed = tuple(dataclasses.replace(f.axis, group=first + k) for k, f in enumerate(ones))
        return InputShapes(self.dynamic + freed, tuple(f for f in self.fixed if f.axis.size != 1))

    def with_fixed(self, fixed: dict[Axis, str]) -> InputShapes:
        """These axes moved from dynamic to fixed, with why."""
        return InputShapes(tuple(a for a in self.dynamic if a not in fixed),
                           self.fixed + tuple(Fixed(a, why) for a, why in fixed.items()))


def probe_size(n: int) -> int:
    """The second size an axis of size ``n`` is tried at: ``n`` plus its lowest set bit (8 -> 16, 6 -> 8,
    224 -> 256, 1 -> 2), so a size that must stay a multiple of a stride (a U-Net's 32) still is one."""
    return n + (n & -n)


def leaf_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """A readable name per flattened input leaf: the forward's parameter name, then ``[i]`` / ``['key']`` into
    nested tuples, lists and dicts (``input{i}`` where torch's pytree flattens a type of its own)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for i, value in enumerate(args):
        names.extend(_walk(value, params[i] if i < len(params) else f"args[{i}]"))
    for key, value in kwargs.items():
        names.extend(_walk(value, key))
    leaves = compat.tree_leaves((args, kwargs))
    return names if len(names) == len(leaves) else [f"input{i}" for i in range(len(leaves))]


def _walk(value: Any, name: str) -> Iterator[str]:
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{name}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{name}[{k!r}]")
    else:
        yield name


def at_probe(group: Sequence[Axis]) -> tuple[dict[tuple[int, int], int], str]:
    """A group of axes at its second size: ``{(leaf, dim): probe size}`` for ``resized``, and how to say it
    ("x axis 0 at 5, ...")."""
    return {(a.leaf, a.dim): a.probe for a in group}, ", ".join(f"{a} at {a.probe}" for a in group)


def resized(args: tuple, kwargs: dict, sizes: dict[tuple[int, int], int]) -> tuple[tuple, dict]:
    """The inputs with axis ``dim`` of leaf ``leaf`` at ``sizes[(leaf, dim)]``: the example tiled (or cut)
    along that axis, so values keep their range (token ids below the vocabulary, masks of 0 and 1)."""
    count = iter(range(1 << 30))

    def one(x: Any) -> Any:
        i = next(count)
        if not isinstance(x, torch.Tensor):
            return x
        for (leaf, dim), size in sizes.items():
            if leaf == i and x.shape[dim] != size:
                index = torch.arange(size, device=x.device) % x.shape[dim]
                x = x.index_select(dim, index)
        return x

    return compat.tree_map(one, (args, kwargs))


Runner = Callable[[tuple, dict], bool]  # whether the model runs on these inputs


def find_axes(run: Runner, names: list[str], args: tuple, kwargs: dict) -> tuple[list[Axis], list[Fixed]]:
    """The axes the model accepts at another size, by trying them (``run(args, kwargs)``: whether the model ran),
    and the batches of one it would take at two.
    Axes of one example size are tried together first (a batch shared by several inputs, height and width of a
    square image); where that fails, each axis position alone."""
    leaves = compat.tree_leaves((args, kwargs))
    candidates: dict[int, list[tuple[int, int]]] = {}
    ones: list[tuple[int, int]] = []
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            for dim, n in enumerate(x.shape):
                if n >= 2:
                    candidates.setdefault(int(n), []).append((i, dim))
                elif n == 1 and dim == 0 and x.dim() > 1:
                    ones.append((i, dim))
    accepted: list[list[tuple[int, int]]] = []
    for size, slots in candidates.items():
        dims = sorted({d for _, d in slots})
        if run(*resized(args, kwargs, {s: probe_size(size) for s in slots})):
            accepted.append(slots)
        elif len(dims) > 1:
            for dim in dims:
                part = [s for s in slots if s[1] == dim]
                if run(*resized(args, kwargs, {s: probe_size(size) for s in part})):
                    accepted.append(part)
    axes = [Axis(i, names[i], d, int(leaves[i].shape[d]), probe_size(int(leaves[i].shape[d])), group)
            for group, part in enumerate(accepted) for i, d in part]
    fixed = [Fixed(Axis(i, names[i], d, 1, 2), "the example inputs have size 1 there, which torch fixes (it "
                   "specialises sizes 0 and 1): give example inputs of 2 or more to keep it free")
             for i, d in ones if run(*resized(args, kwargs, {(i, d): 2}))]
    return axes, fixed


def from_spec(spec: Any, names: list[str], args: tuple, kwargs: dict) -> list[Axis]:
    """The axes a torch.export ``dynamic_shapes`` value marks (a dict or tuple per tensor, ``None`` for static;
    positional inputs as a tuple, or everything as a dict by parameter name), with the second size of each
    inside its ``Dim``'s range."""
    leaves = compat.tree_leaves((args, kwargs))
    marked = _spec_leaves(spec, names, args, kwargs)
    out = []
    for i, dims in enumerate(marked):
        x = leaves[i]
        if not isinstance(x, torch.Tensor) or not dims:
            continue
        for dim, d in dims.items():
            n = int(x.shape[dim])
            probe = probe_size(n)
            low, high = getattr(d, "min", None), getattr(d, "max", None)
            if isinstance(high, int) and probe > high:
                probe = n - 1 if n - 1 >= max(2, low if isinstance(low, int) else 2) else n
            out.append(Axis(i, names[i], dim % x.dim(), n, probe, group=len(out)))
    return out


def _spec_leaves(spec: Any, names: list[str], args: tuple, kwargs: dict) -> list[dict[int, Any]]:
    """The user's spec per flattened input leaf: {dim: Dim} (empty for static). As torch.export reads it: a
    dict by the forward's parameter names, or a tuple over the inputs in order (positional, then keyword)."""
    params = list(dict.fromkeys(n.split("[")[0] for n in names))  # top-level names, in input order
    inputs = list(args) + list(kwargs.values())
    if isinstance(spec, dict):
        tops = [spec.get(params[k]) if k < len(params) else None for k in range(len(inputs))]
    else:
        tops = list(spec or ()) + [None] * len(inputs)
    out: list[dict[int, Any]] = []

    def walk(value: Any, s: Any) -> None:
        if isinstance(value, (tuple, list)):
            for k, v in enumerate(value):
                walk(v, s[k] if isinstance(s, (tuple, list)) and k < len(s) else None)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, s.get(k) if isinstance(s, dict) else None)
        elif isinstance(value, torch.Tensor) and isinstance(s, dict):
            out.append({int(k): v for k, v in s.items() if _free(v)})
        elif isinstance(value, torch.Tensor) and isinstance(s, (tuple, list)):
            out.append({k: v for k, v in enumerate(s) if _free(v)})
        else:
            out.append({})

    for value, s in zip(inputs, tops):
        walk(value, s)
    return out


def _free(d: Any) -> bool:
    """A spec entry that lets the axis vary (a Dim, Dim.AUTO or Dim.DYNAMIC; not None or Dim.STATIC)."""
    from torch.export import Dim

    return d is not None and d is not Dim.STATIC


def export_spec(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis]) -> Any:
    """torch.export's ``dynamic_shapes`` with ``Dim.AUTO`` on each axis: a tuple over positional inputs, or a
    dict by parameter name when there are keyword inputs."""
    from torch.export import Dim

    wanted: dict[int, dict[int, Any]] = {}
    for a in axes:
        wanted.setdefault(a.leaf, {})[a.dim] = Dim.AUTO
    count = iter(range(1 << 30))

    def spec(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return wanted.get(next(count)) if isinstance(x, torch.Tensor) else _skip(next(count))

    positional = tuple(spec(a) for a in args)
    if not kwargs:
        return positional
    params = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(params, positional)), **{k: spec(v) for k, v in kwargs.items()}}


def _skip(_: int) -> None:
    return None


def static_axes(graph_inputs: list[Any], axes: list[Axis]) -> list[Axis]:
    """The axes a traced graph holds at a constant: its input placeholders' values (``meta["val"]``, in leaf
    order) have a plain int there."""
    out = []
    for a in axes:
        val = graph_inputs[a.leaf] if a.leaf < len(graph_inputs) else None
        if isinstance(val, torch.Tensor) and _constant(val.shape[a.dim]):
            out.append(a)
    return out


def _constant(size: Any) -> bool:
    """An int, or a SymInt the trace fixed (its expression, after torch's replacements, is a number)."""
    return not isinstance(size, torch.SymInt) or bool(getattr(size.node.expr, "is_number", False))


def read_sizes_from_inputs(gm: fx.GraphModule) -> None:
    """Rewrite each ``sym_size(t, d)`` whose value is one input axis's own size into ``sym_size(input, axis)``,
    read right after the inputs (one node per input axis). The graph computes the same values."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    source: dict[Any, tuple[fx.Node, int]] = {}
    for ph in placeholders:
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    source.setdefault(size.node.expr, (ph, d))
    reads: dict[tuple[fx.Node, int], fx.Node] = {}
    changed = False
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.target is not torch.ops.aten.sym_size.int or not isinstance(val, torch.SymInt):
            continue
        found = source.get(val.node.expr)
        if found is None or (node.args[0] is found[0] and node.args[1] == found[1]):
            continue
        if found not in reads:
            with graph.inserting_after(placeholders[-1]):
                reads[found] = graph.call_function(torch.ops.aten.sym_size.int, found)
            reads[found].meta = dict(node.meta)
        node.replace_all_uses_with(reads[found])
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
