"""Factorise a linear map into a rank-r pair, so that its rank becomes one more channel group.

``factorize(gm, {"fc1": 16, "conv2": (U, V)})`` returns a NEW trainable GraphModule (``gm`` is never
modified) in which each named layer's ``op(x, W, b)`` becomes ``op(op(x, V), U, b)``:

- ``linear(x, W, b)`` -> ``linear(linear(x, V), U, b)``, ``V``: (r, in), ``U``: (out, r);
- ``addmm(b, x, W)`` with ``W`` (in, out) a parameter (Hugging Face's GPT-2 ``Conv1D``) ->
  ``addmm(b, mm(x, V^T), U^T)``: the same factors stored transposed, ``weight_v`` (in, r) and
  ``weight_u`` (r, out), so every tensor keeps its layer's layout;
- a 1x1 convolution (``conv1d``/``conv2d``/``conv3d``, every kernel size 1, ``groups=1``)
  -> ``conv(conv(x, V, None, stride, padding, dilation), U, b)`` with 1x1 kernels ``V``: (r, in, 1, ..)
  and ``U``: (out, r, 1, ..). Stride and padding go on the first factor; that is exact because a 1x1
  kernel commutes with subsampling, and a padded zero stays zero through ``V`` (which has no bias)
  so ``U`` maps it to ``b`` exactly as ``W`` did. A grouped or larger-kernel convolution is refused.

New tensors: ``<path>.weight_v`` (the first factor, whose rows are the rank axis) and
``<path>.weight_u`` (the second, whose columns are the rank axis), both ``nn.Parameter`` with the
dtype and device of ``W``; ``<path>.weight`` is gone, the bias keeps its name.

What is exact: explicit factors ``(U, V)`` give exactly ``W`` replaced by ``U @ V`` (up to the order of
floating-point summation). A rank ``r`` takes the truncated SVD, ``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T``
(computed in float64 on the CPU, then cast to ``W``'s dtype): the best rank-r approximation of ``W`` in
Frobenius and spectral norm (Eckart-Young), so full rank ``min(out, in)`` reproduces the layer up
to float64 round-off, and a smaller rank changes the model's function by design.

Compaction to a smaller rank needs nothing special: re-traced and analysed
(:func:`factorized_graph`), the rank axis is an ordinary channel group (producer: the rows of
``weight_v``; consumer: the columns of ``weight_u``), so a rank mask (FLOP's diagonal L0 mask
``U diag(z) V``) is a channel mask on that group, and removing k of its channels with
``fxprune.compact`` leaves ``weight_v`` with r - k rows and ``weight_u`` with r - k columns, exactly
equivalent to the masked model. Every pass, budget and cost count treats it like any other group.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import ChannelGroups, analyze
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.schema import bind
from fxprune.annotations import FRONTEND
from fxprune.compaction.emit import GraphEdit, emit
from fxprune.state import named_tensors
from fxprune.tracing.tracer import INPUT_SHAPES, META_INPUTS, trace

__all__ = ["factorize", "factorized_graph", "factorizable", "Layer", "Factor", "merge_unprofitable", "pair_pays"]

aten = torch.ops.aten
LINEAR = aten.linear.default
ADDMM, MM = aten.addmm.default, aten.mm.default
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)

# A rank (truncated SVD) or explicit factors (U: (out, r), V: (r, in)).
Factor = int | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _Pair:
    """The factors of one layer, shaped for its op (2-D for linear, 1x1 kernels for a convolution)."""

    path: str
    u: torch.Tensor
    v: torch.Tensor
    requires_grad: bool


def _weight_nodes(graph: fx.Graph, name: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "get_attr" and n.target == name]


def _is_layer_use(user: fx.Node, weight: fx.Node) -> bool:
    if user.op != "call_function":
        return False
    if user.target is ADDMM:  # addmm(bias, x, W): W (in, out), Conv1D's layout
        return len(user.args) == 3 and user.args[2] is weight and user.args[1] is not weight and not user.kwargs
    return (user.target is LINEAR or user.target in CONVS) \
        and bind(user).get("weight") is weight and bind(user).get("input") is not weight


def _transposed(gm: fx.GraphModule, path: str) -> bool:
    """Is layer ``path``'s weight stored (in, out), read by ``addmm``?"""
    return any(u.target is ADDMM for n in _weight_nodes(gm.graph, f"{path}.weight") for u in n.users)


def _candidates(gm: fx.GraphModule, limit: int = 5) -> str:
    """A few layer paths that could be factorised, for error messages."""
    names = [n.target.removesuffix(".weight") for n in gm.graph.nodes if n.op == "get_attr"
             and n.target.endswith(".weight") and n.users and all(_is_layer_use(u, n) for u in n.users)]
    more = ", ..." if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more if names else "none"


def _check_use(path: str, user: fx.Node, weight: fx.Node) -> None:
    """``user`` must read the weight as a linear layer or a 1x1, ungrouped convolution."""
    if not _is_layer_use(user, weight):
        raise ValueError(f"cannot factorise {path!r}: its weight is read by {user.format_node()}, not only as "
                         f"the weight of aten.linear or aten.conv1d/2d/3d (a tied weight?); factorise linear "
                         f"layers and 1x1 convolutions only")
    if user.target in CONVS:
        b = bind(user)
        kernel = tuple(weight.meta["val"].shape[2:])
        if any(k != 1 for k in kernel):
            raise ValueError(f"cannot factorise {path!r}: a convolution with kernel {kernel} is not a linear map of "
                             f"the channels; only 1x1 convolutions can be factorised (leave {path!r} out)")
        if b["groups"] != 1:
            raise ValueError(f"cannot factorise {path!r}: a grouped convolution (groups={b['groups']}) is block-"
                             f"diagonal, not one linear map; only groups=1 can be factorised (leave {path!r} out)")


@dataclass(frozen=True)
class Layer:
    """A layer :func:`factorize` accepts: its map's output and input sizes and the op that reads it."""

    out: int
    inp: int
    op: str  # "linear", "addmm" (weight stored (in, out)) or "conv" (1x1, ungrouped)


def factorizable(gm: fx.GraphModule) -> dict[str, Layer]:
    """Module path -> :class:`Layer` of every floating-point parameter ``<path>.weight`` of ``gm`` that
    every reader uses as a linear map :func:`factorize` takes (the checks of its errors, as a query)."""
    params = dict(gm.named_parameters())
    readers: dict[str, list[tuple[fx.Node, fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.endswith(".weight") and n.target in params:
            readers.setdefault(n.target, []).extend((u, n) for u in n.users)
    out: dict[str, Layer] = {}
    for name, uses in readers.items():
        path, w = name.removesuffix(".weight"), params[name]
        ops = {"addmm" if u.target is ADDMM else "linear" if u.target is LINEAR else "conv" for u, _ in uses}
        if not uses or not w.is_floating_point() or len(ops) != 1:
            continue
        try:
            for user, node in uses:
                _check_use(path, user, node)
        except ValueError:
            continue
        op = ops.pop()
        rows, cols = w.shape[:2]
        out[path] = Layer(cols, rows, op) if op == "addmm" else Layer(rows, cols, op)
    return out


def _check_layer(gm: fx.GraphModule, path: str) -> torch.Tensor:
    """The weight of layer ``path``, after checking every read of it; ValueError naming what is wrong."""
    name = f"{path}.weight"
    nodes = [n for n in _weight_nodes(gm.graph, name) if n.users]
    if not nodes:
        hint = f" (give the module path {path.removesuffix('.weight')!r}, not the weight)" \
            if path.endswith(".weight") else ""
        raise ValueError(f"cannot factorise {path!r}: no linear layer or convolution of the traced graph reads "
                         f"{name!r}{hint}; keys are module paths of linear layers or 1x1 convolutions, e.g. "
                         f"{_candidates(gm)}")
    for node in nodes:
        for user in node.users:
            _check_use(path, user, node)
    weight = named_tensors(gm).get(name)
    if weight is None or not weight.is_floating_point():
        raise ValueError(f"cannot factorise {path!r}: {name!r} is not a floating-point parameter or buffer")
    return weight


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(out, in, 1, ..) -> (out, in); a 2-D tensor unchanged."""
    if t.dim() > 2 and all(s == 1 for s in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    return t


def _check_rank(path: str, r: int, w: torch.Tensor) -> None:
    out, inp = w.shape[:2]
    if not 1 <= r <= min(out, inp):
        raise ValueError(f"cannot factorise {path!r} to rank {r}: its weight is {out} x {inp}, so the rank must "
                         f"be between 1 and {min(out, inp)}; a larger rank costs more than the layer itself")


def _svd(path: str, w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U_r sqrt(S_r)``, ``sqrt(S_r) V_r^T`` of ``W`` (float64 on the CPU)."""
    _check_rank(path, r, w)
    u, s, vh = torch.linalg.svd(_as_matrix(w.detach()).to("cpu", torch.float64), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def _explicit(path: str, w: torch.Tensor, u: Any, v: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)):
        raise ValueError(f"cannot factorise {path!r}: give a rank (int) or a pair of tensors (U, V), "
                         f"got {type(u).__name__} and {type(v).__name__}")
    u, v = _as_matrix(u.detach()), _as_matrix(v.detach())
    out, inp = w.shape[:2]
    r = u.shape[-1] if u.dim() == 2 else -1
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != out or v.shape != (r, inp):
        raise ValueError(f"cannot factorise {path!r}: its weight is {out} x {inp}, so U must be ({out}, r) and "
                         f"V (r, {inp}); got U {tuple(u.shape)} and V {tuple(v.shape)}")
    _check_rank(path, r, w)
    return u, v


def _pair(path: str, w: torch.Tensor, value: Factor, transposed: bool = False) -> _Pair:
    """The factors of ``W`` (out, in); ``transposed``: ``W`` is stored (in, out) and so are its factors."""
    w = w.t() if transposed else w
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        u, v = _svd(path, w, int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        u, v = _explicit(path, w, *value)
    else:
        raise ValueError(f"cannot factorise {path!r}: give a rank (int) or a pair of tensors (U, V), got {value!r}")
    if transposed:  # addmm(b, mm(x, V^T), U^T): weight_v = V^T (in, r), weight_u = U^T (r, out)
        first, second = v.t(), u.t()
        return _Pair(path, u=second.to(w.device, w.dtype).contiguous(), v=first.to(w.device, w.dtype).contiguous(),
                     requires_grad=w.requires_grad)
    kernel = (1,) * (w.dim() - 2)
    u = u.to(w.device, w.dtype).reshape(*u.shape, *kernel).contiguous()
    v = v.to(w.device, w.dtype).reshape(*v.shape, *kernel).contiguous()
    return _Pair(path, u, v, w.requires_grad)


def _split_use(graph: fx.Graph, user: fx.Node, v: fx.Node, u: fx.Node) -> None:
    """``op(x, W, b, ...)`` -> ``op(op(x, V, None, ...), U, b)``; ``user`` keeps its name and value."""
    if user.target is ADDMM:
        bias, x, _ = user.args
        with graph.inserting_before(user):
            first = graph.call_function(MM, (x, v))
        user.args = (bias, first, u)
        return
    b = bind(user)
    with graph.inserting_before(user):
        if user.target is LINEAR:
            first = graph.call_function(LINEAR, (b["input"], v))
        else:
            first = graph.call_function(user.target, (b["input"], v, None, b["stride"], b["padding"],
                                                      b["dilation"], 1))
    user.args, user.kwargs = (first, u, b["bias"]), {}


def _attr(graph: fx.Graph, name: str, t: torch.Tensor) -> fx.Node:
    node = graph.get_attr(name)
    node.meta["val"] = torch.empty_like(t, device="meta")  # dtype for compaction's dtype portability
    return node


def _edit(pairs: list[_Pair]) -> GraphEdit:
    """The graph edit that swaps each layer's weight for its pair of factors."""

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        for p in pairs:
            v_name, u_name = f"{p.path}.weight_v", f"{p.path}.weight_u"
            for w in _weight_nodes(graph, f"{p.path}.weight"):
                for user in list(w.users):
                    with graph.inserting_before(user):
                        v, u = _attr(graph, v_name, p.v), _attr(graph, u_name, p.u)
                    _split_use(graph, user, v, u)
                graph.erase_node(w)
            tensors.pop(f"{p.path}.weight", None)
            tensors[v_name] = nn.Parameter(p.v.clone(), requires_grad=p.requires_grad)
            tensors[u_name] = nn.Parameter(p.u.clone(), requires_grad=p.requires_grad)

    return edit


def factorize(gm: fx.GraphModule, factors: Mapping[str, Factor], *, groups: ChannelGroups | None = None,
              training: bool = False) -> fx.GraphModule:
    """A new trainable GraphModule where each layer ``path`` of ``factors`` (a linear layer or a 1x1
    convolution of the traced graph ``gm``, found by its weight ``<path>.weight``) is a rank-r pair:
    a rank ``r`` (truncated SVD) or explicit factors ``(U, V)``, U: (out, r), V: (r, in).

    ``gm`` comes from ``fxprune.trace`` and is not modified; ``groups`` (its analysis) saves analysing
    it again. ValueError, naming the layer and what to do, for an unknown path, a convolution that is
    not 1x1 or is grouped, a weight read by anything else, or a rank outside 1..min(out, in)."""
    pairs = [_pair(path, _check_layer(gm, path), value, _transposed(gm, path)) for path, value in factors.items()]
    groups = groups if groups is not None else analyze(gm)
    nothing = np.zeros(len(groups.comp_group), dtype=bool)
    return emit(gm, Reindexing(groups, nothing), {}, training=training, edits=[_edit(pairs)])


def _traced(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """``model`` itself when it is already fxprune's traced graph and no inputs are given, else its trace."""
    if example_inputs is None:
        if isinstance(model, fx.GraphModule) and FRONTEND in model.meta:
            return model
        raise ValueError("example_inputs are needed to trace a model that fxprune.trace did not produce")
    return trace(model, example_inputs)


def _inputs(gm: fx.GraphModule) -> Any:
    """The example inputs ``gm`` was traced on, in the form ``fxprune.trace`` takes."""
    args, kwargs = gm.meta[META_INPUTS]
    if args and kwargs:
        raise ValueError("the graph was traced on positional and keyword inputs; pass example_inputs explicitly")
    return dict(kwargs) if kwargs else tuple(args)


def factorized_graph(model_or_gm: nn.Module, example_inputs: Any,
                     factors: Mapping[str, Factor]) -> tuple[fx.GraphModule, ChannelGroups]:
    """Factorise, re-trace and analyse: the factorised model's traced graph and its channel groups, in
    which each factorised layer's rank axis is one more group (producer: rows of ``<path>.weight_v``;
    consumer: columns of ``<path>.weight_u``). ``model_or_gm``: a model (traced here on
    ``example_inputs``) or a graph from ``fxprune.trace`` (``example_inputs=None``: the inputs it was
    traced on). The returned graph runs as the factorised model and shares its parameters, so it is also
    the model to compact against: ``fxprune.compact(gm, groups, removed, gm)``."""
    gm = _traced(model_or_gm, example_inputs)
    inputs = example_inputs if example_inputs is not None else _inputs(gm)
    module = factorize(gm, factors)
    new_gm = trace(module, inputs, dynamic_shapes=gm.meta.get(INPUT_SHAPES))  # the axes the first trace kept
    return new_gm, analyze(new_gm)


def pair_pays(rank: int, out: int, inp: int) -> bool:
    """Is a rank-``rank`` pair smaller than the dense ``out x in`` layer: ``rank (in + out) < in * out``?"""
    return rank * (inp + out) < inp * out


def merge_unprofitable(paths: Iterable[str]) -> GraphEdit:
    """A compaction edit: each factorised layer of ``paths`` whose kept rank no longer pays
    (:func:`pair_pays`, on the compacted factors) becomes one dense layer again,
    ``op(op(x, V), U, b)`` -> ``op(x, U @ V, b)`` (the first op's stride/padding kept), under its original
    weight name ``<path>.weight``; a pair that pays is left as it is. Exact up to float summation order."""
    paths = list(paths)

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        for path in paths:
            u, v = tensors.get(f"{path}.weight_u"), tensors.get(f"{path}.weight_v")
            if u is None or v is None:
                continue
            seconds = [n for n in graph.nodes if n.op == "get_attr" and n.target == f"{path}.weight_u"]
            addmm = any(user.target is ADDMM for n in seconds for user in n.users)
            out, rank, inp = (u.shape[1], u.shape[0], v.shape[0]) if addmm else (u.shape[0], u.shape[1], v.shape[1])
            if pair_pays(rank, out, inp):
                continue
            first_factor, second_factor = (v, u) if addmm else (u, v)  # (in, r) @ (r, out), or (out, r) @ (r, in)
            dense = (_as_matrix(first_factor).double() @ _as_matrix(second_factor).double()).to(u.dtype)
            dense = dense.reshape(*dense.shape, *u.shape[2:]).contiguous()
            for second in seconds:
                for user in list(second.users):
                    with graph.inserting_before(user):
                        w = _attr(graph, f"{path}.weight", dense)
                    if user.target is ADDMM:
                        bias, first, _ = user.args
                        user.args = (bias, first.args[0], w)
                        if not first.users:
                            graph.erase_node(first)
                        continue
                    b = bind(user)
                    first = b["input"]
                    fb = bind(first)
                    if user.target is LINEAR:
                        user.args, user.kwargs = (fb["input"], w, b["bias"]), {}
                    else:
                        user.args, user.kwargs = (fb["input"], w, b["bias"], fb["stride"], fb["padding"],
                                                  fb["dilation"], 1), {}
                    if not first.users:
                        graph.erase_node(first)
            for node in [n for n in graph.nodes if n.op == "get_attr" and n.target in
                         (f"{path}.weight_u", f"{path}.weight_v") and not n.users]:
                graph.erase_node(node)
            tensors.pop(f"{path}.weight_u")
            tensors.pop(f"{path}.weight_v")
            tensors[f"{path}.weight"] = nn.Parameter(dense, requires_grad=u.requires_grad)

    return edit

