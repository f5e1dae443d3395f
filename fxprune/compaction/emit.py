"""Emit the compacted module: the only stage that rewrites the graph.

1. copy the traced graph;
2. slice every parameter/buffer by the plan (new tensors; the user's model is never touched);
3. run each op's rewrite (literal shapes, split sizes, slice bounds, group counts, heads);
4. drop export-only guards, give BatchNorm/dropout back their train/eval switch, make device
   literals follow the module's device;
5. lint, recompile, and verify every node's shape against the expected compacted shape.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.rules import IGNORED, RULES
from fxprune.analysis.slots import tensor_values
from fxprune.tracing.lazy_module import lazy_graph_module

from ..state import attribute, named_tensors
from .plan import Plan, slice_tensor
from .portable import make_device_portable, make_dtype_portable
from .trainable import make_trainable
from .verify import verify_shapes

__all__ = ["emit", "as_trainable", "CompactionError", "GraphEdit"]


class CompactionError(RuntimeError):
    """A rewrite failed or produced shapes that disagree with the plan; ``node`` names the culprit."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


# A graph edit runs after the per-op rewrites, on the copied graph, the (sliced) tensors by name and the
# submodules by path: it may rewire nodes, add tensors (registered as parameters/buffers under their
# names) and add modules (targets of call_module nodes it inserts). Methods plug in here without
# touching the rest: remove a residual block (fxprune.edits.blocks), insert channel masks
# (fxprune.masking), replace a linear by a factorised pair (fxprune.edits.factorize).
GraphEdit = Callable[[fx.Graph, dict[str, torch.Tensor], dict[str, nn.Module]], None]


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def _sliced_tensors(gm: fx.GraphModule, plan: Plan,
                    weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every get_attr target, sliced (or cloned), as a Parameter where the original was one.

    ``weights`` replaces original full-size tensors before slicing: reconstructed next-layer weights
    (ThiNet, LASSO) or folded scales (ANP) go through the same plan as everything else."""
    out: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
    alive: list[object] = []  # replacement Parameters stay referenced, so their ids are never reused
    replaced: dict[int, torch.Tensor] = {}  # id of a replacement -> the tensor made of it
    params = dict(gm.named_parameters(remove_duplicate=False))
    state = named_tensors(gm)  # one walk, not one per name
    # Nodes that are read first: export reads a tied weight under one name and leaves the other dead.
    attrs = sorted((n for n in gm.graph.nodes if n.op == "get_attr"), key=lambda n: not n.users)
    for node in attrs:
        if node.target in out:
            continue
        orig = state[node.target] if node.target in state else attribute(gm, node.target)
        if weights and node.target in weights:
            new = weights[node.target]
            if not isinstance(orig, torch.Tensor) or new.shape != orig.shape:
                raise CompactionError(f"replacement weight {node.target} must keep shape "
                                      f"{tuple(getattr(orig, 'shape', ()))}, got {tuple(new.shape)}", node.name)
            if id(new) in replaced:  # one replacement for tied names: they stay one tensor
                orig = replaced[id(new)]
            else:
                orig = nn.Parameter(new.detach(), requires_grad=orig.requires_grad) \
                    if isinstance(orig, nn.Parameter) else new.detach()
                replaced[id(new)] = orig
            alive.append(orig)
        if not isinstance(orig, torch.Tensor):
            continue
        t = by_id.get(id(orig))
        if t is None:
            t = slice_tensor(plan.get(node.target), orig.detach())
            if node.target in params:
                t = nn.Parameter(t, requires_grad=orig.requires_grad)
            by_id[id(orig)] = t
        elif node.users and plan.get(node.target) != plan.get(next(k for k, v in out.items() if v is t)):
            raise CompactionError(f"tied tensor {node.target} is read with two different plans")
        out[node.target] = t
    for name, buf in gm.named_buffers():  # e.g. num_batches_tracked, read by nothing in the graph
        if name not in out and name.endswith("num_batches_tracked"):
            out[name] = buf.detach().clone()
    return out


def _rewrite_ops(graph: fx.Graph, reindexing: Reindexing) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in IGNORED and not tensor_values(node) and node.target is not operator.getitem:
            if not node.users:
                graph.erase_node(node)  # shape assertions of the traced sizes
            continue
        rule = RULES.get(node.target)
        if rule is not None and rule.rewrite is not None and \
                reindexing.touches(node.name, [a.name for a in node.all_input_nodes]):
            try:
                rule.rewrite(node, reindexing)
            except Exception as exc:  # noqa: BLE001 - named, then re-raised
                raise CompactionError(f"rewriting {node.format_node()} failed: {exc!r}", node.name) from exc


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that owns ``path`` under ``root`` (created empty where missing), and the leaf name."""
    mod = root
    *parents, leaf = path.split(".")
    for p in parents:
        child = mod._modules.get(p)
        if child is None:
            child = nn.Module()
            mod.add_module(p, child)
        mod = child
    return mod, leaf


def _own(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Register each tensor under its state name, unless a module there already owns one."""
    for name, t in tensors.items():
        parent, leaf = _parent_of(root, name)
        if leaf in parent._parameters or leaf in parent._buffers:
            continue  # already owned by an un-lowered module
        if isinstance(t, nn.Parameter):
            parent.register_parameter(leaf, t)
        else:
            parent.register_buffer(leaf, t)


def _build_root(tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> nn.Module:
    root = nn.Module()
    for path, m in sorted(modules.items(), key=lambda kv: kv[0].count(".")):
        parent, leaf = _parent_of(root, path)
        parent.add_module(leaf, m)
    _own(root, tensors)
    return root


def _assemble(gm: fx.GraphModule, graph: fx.Graph, tensors: dict[str, torch.Tensor],
              training: bool = False, added: Mapping[str, nn.Module] | None = None) -> fx.GraphModule:
    """Tensors + graph -> a plain trainable GraphModule that keeps ``gm``'s input/output structure;
    ``added``: modules graph edits inserted (call_module targets)."""
    modules = make_trainable(graph, tensors)
    modules.update(added or {})
    make_device_portable(graph)
    make_dtype_portable(graph)
    root = _build_root(tensors, modules)
    # dead code goes before the GraphModule compiles the graph (once): BatchNorm/dropout modules are pure
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_module" and n.is_impure())
    out = lazy_graph_module(root, graph, class_name="CompactedModule")
    _own(out, tensors)  # the GraphModule copied only what the graph reads: tied names and unread buffers too
    out.graph.lint()
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    out.meta.update(gm.meta)
    return out.train(training)


def emit(gm: fx.GraphModule, reindexing: Reindexing, plan: Plan, *, verify: bool = True, training: bool = False,
         weights: Mapping[str, torch.Tensor] | None = None, edits: Sequence[GraphEdit] = ()) -> fx.GraphModule:
    """A new trainable GraphModule with the plan applied (in mode ``training``); ``gm`` is untouched."""
    graph = _copy_graph(gm)
    _rewrite_ops(graph, reindexing)
    tensors = _sliced_tensors(gm, plan, weights)
    added: dict[str, nn.Module] = {}
    for edit in edits:
        edit(graph, tensors, added)
    out = _assemble(gm, graph, tensors, training, added)
    if verify:
        verify_shapes(out, reindexing, CompactionError)
    return out


def as_trainable(gm: fx.GraphModule) -> fx.GraphModule:
    """An exported module (e.g. ``torch.export.load(path).module()``) as a trainable GraphModule, in eval
    mode: own copies of its tensors, BatchNorm/dropout that follow ``.train()``/``.eval()``, guards dropped."""
    graph = _copy_graph(gm)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return _assemble(gm, graph, _sliced_tensors(gm, {}))
