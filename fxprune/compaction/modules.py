"""The second compaction target: the user's own modules, resized, for models no static graph expresses
(detectors: NMS, top-k, boolean masks, loops over boxes). The analysis runs on the record of one real run
(``fxprune.tracing.record.record_trace(..., analysis=True)``); compaction then slices every planned
parameter and buffer of a COPY of the model (the same pure ``slice_tensor`` as the graph target) and sets
the module attributes that hold sizes (table :data:`SIZE_ATTRIBUTES`), so the result keeps the user's
classes and Python control flow, runs on any input and trains.

A size that lives in the model's Python code (a literal in ``view(...)``, a split size, a computed width)
cannot be rewritten there: :func:`freeze_code_sizes` finds the groups whose removal would change such a
literal in the recorded graph (the graph target's own literal rewrites, run on a copy) and freezes them,
naming the op and the line. The literals a module attribute holds (a conv's ``groups``, GroupNorm's
``num_groups``, LayerNorm's ``normalized_shape``) are what the resizer updates, so they do not freeze.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelGroups
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.rules import ops

from .plan import Plan, slice_tensor

__all__ = ["resize_modules", "freeze_code_sizes", "SIZE_ATTRIBUTES", "ResizeError"]


class ResizeError(RuntimeError):
    """A module holds a planned tensor in a way the resizer cannot update (named, with what to do)."""


def _conv(m: nn.Module, old: dict[str, torch.Size]) -> None:
    """Channels from the sliced weight. A grouped convolution keeps its group count (the analysis shrinks
    every group alike, as the graph target does); a depthwise one (``groups == in_channels``) keeps one
    group per input channel."""
    w = m.weight
    depthwise = m.groups > 1 and m.groups == m.in_channels
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):  # (in, out / groups, ...)
        in_c = int(w.shape[0])
        groups = in_c if depthwise else m.groups
        out_c = int(w.shape[1]) * groups
    else:
        out_c = int(w.shape[0])
        groups = out_c // (m.out_channels // m.in_channels) if depthwise else m.groups
        in_c = groups if depthwise else int(w.shape[1]) * groups
    m.in_channels, m.out_channels, m.groups = in_c, out_c, groups


def _linear(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])


def _batch_norm(m: nn.Module, old: dict[str, torch.Size]) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    if t is not None and hasattr(m, "num_features"):
        m.num_features = int(t.shape[0])


def _group_norm(m: nn.Module, old: dict[str, torch.Size]) -> None:
    n = int(m.weight.shape[0]) if m.weight is not None else m.num_channels
    per = m.num_channels // m.num_groups
    m.num_channels, m.num_groups = n, n // per  # the analysis removes whole groups


def _layer_norm(m: nn.Module, old: dict[str, torch.Size]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _embedding(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.num_embeddings, m.embedding_dim = int(m.weight.shape[0]), int(m.weight.shape[1])


def _frozen_bn(m: nn.Module, old: dict[str, torch.Size]) -> None:
    if hasattr(m, "num_features"):
        m.num_features = int(m.weight.shape[0])


def _multihead(m: nn.Module, old: dict[str, torch.Size]) -> None:
    """``nn.MultiheadAttention``: the q/k/v width must stay ``embed_dim`` (its forward checks it), so heads
    never shrink here (the literal check freezes them); what can change is the embedding and k/v widths."""
    out_w = m.out_proj.weight
    e = int(out_w.shape[0])
    if m.in_proj_weight is not None:
        q_width, e_in = int(m.in_proj_weight.shape[0]) // 3, int(m.in_proj_weight.shape[1])
        m.kdim = m.vdim = e_in
    else:
        q_width = int(m.q_proj_weight.shape[0])
        m.kdim, m.vdim = int(m.k_proj_weight.shape[1]), int(m.v_proj_weight.shape[1])
    if q_width != e:
        raise ResizeError(f"MultiheadAttention: its q/k/v width ({q_width}) must equal embed_dim ({e}); heads "
                          "cannot be pruned inside nn.MultiheadAttention by resizing it")
    m.embed_dim, m.head_dim = e, e // m.num_heads


# module class (by name, so optional libraries need not be imported) -> how its size attributes follow its tensors
SIZE_ATTRIBUTES: dict[str, Callable[[nn.Module, dict[str, torch.Size]], None]] = {
    "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv, "ConvTranspose1d": _conv, "ConvTranspose2d": _conv,
    "ConvTranspose3d": _conv, "Linear": _linear, "BatchNorm1d": _batch_norm, "BatchNorm2d": _batch_norm,
    "BatchNorm3d": _batch_norm, "SyncBatchNorm": _batch_norm, "InstanceNorm1d": _batch_norm,
    "InstanceNorm2d": _batch_norm, "GroupNorm": _group_norm, "LayerNorm": _layer_norm, "Embedding": _embedding,
    "FrozenBatchNorm2d": _frozen_bn, "MultiheadAttention": _multihead}
_NO_SIZES = ("ReLU", "ReLU6", "SiLU", "GELU", "Sigmoid", "Hardswish", "Identity", "Dropout", "MaxPool2d",
             "AdaptiveAvgPool2d", "Sequential")


def _class_sizes(m: nn.Module) -> Callable[[nn.Module, dict[str, torch.Size]], None] | None:
    for cls in type(m).__mro__:
        if cls.__name__ in SIZE_ATTRIBUTES:
            return SIZE_ATTRIBUTES[cls.__name__]
    return None


def resize_modules(model: nn.Module, plan: Plan, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` with every planned parameter/buffer sliced by ``plan`` (after substituting
    ``weights``: a pass's new full-size tensors) and each touched module's size attributes updated.
    ``model`` is not modified. Raises :class:`ResizeError` for a planned tensor in a module the table
    does not know that has size-like attributes (``in_*``, ``out_*``, ``*_dim``, ``num_*``)."""
    out = copy.deepcopy(model)
    touched: dict[str, nn.Module] = {}
    with torch.no_grad():
        for path, module in out.named_modules():
            old: dict[str, torch.Size] = {}
            for local, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is None:
                    continue
                name = f"{path}.{local}" if path else local
                source = weights.get(name, t) if weights else t
                if name not in plan and source is t:
                    continue
                new = slice_tensor(plan.get(name), source.to(t.device, t.dtype))
                old[local] = t.shape
                if local in module._parameters:
                    module._parameters[local] = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    module._buffers[local] = new
            if any(name in plan for name in (f"{path}.{k}" if path else k for k in old)):
                touched[path] = module
                sizes = _class_sizes(module)
                if sizes is not None:
                    sizes(module, old)
                    if isinstance(module, nn.MultiheadAttention):
                        module._qkv_same_embed_dim = module.kdim == module.embed_dim == module.vdim
                elif type(module).__name__ not in _NO_SIZES and _size_like(module):
                    raise ResizeError(f"module {path!r} ({type(module).__name__}) holds pruned tensors and size "
                                      f"attributes ({', '.join(_size_like(module))}) the resizer does not know: "
                                      "add its class to fxprune.compaction.modules.SIZE_ATTRIBUTES, or protect it")
    return out


def _size_like(module: nn.Module) -> list[str]:
    return [k for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool)
            and (k.startswith(("in_", "out_", "num_")) or k.endswith(("_dim", "_size", "_features", "_channels")))]


# ops whose literal arguments a module attribute holds (the resizer updates the attribute instead)
_MODULE_LITERALS = frozenset(ops(
    "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default",
    "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input",
    "aten.group_norm.default", "aten.layer_norm.default", "aten.batch_norm.default", "aten.linear.default",
    "aten.embedding.default", "aten._native_batch_norm_legit_no_training.default"))


def _where(node: fx.Node) -> str:
    """The source line when the trace kept it, else the module the op ran in."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    if len(lines) >= 2:
        return lines[-2].strip()
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"{path or 'the top-level module'}.forward"


# module classes whose forward checks widths against an attribute that one tensor cannot change alone:
# their tensors' channel groups stay (name -> why)
_FIXED_WIDTHS = {"MultiheadAttention": "nn.MultiheadAttention checks its inputs' and q/k/v widths against embed_dim"}


def freeze_code_sizes(gm: fx.GraphModule, groups: ChannelGroups, model: nn.Module | None = None) -> dict[int, str]:
    """Freeze every prunable group whose removal would rewrite a literal of the recorded graph that no
    module attribute holds (a size in the model's Python code), and (with ``model``) every group of a
    module whose forward checks its widths against an attribute (``nn.MultiheadAttention``); returns
    {group id: reason} of those frozen."""
    from .emit import _copy_graph, _rewrite_ops

    frozen: dict[int, str] = {}
    fixed: dict[str, str] = {}
    for path, m in (model.named_modules() if model is not None else []):
        why = next((w for cls, w in _FIXED_WIDTHS.items() if cls in {c.__name__ for c in type(m).__mro__}), None)
        if why is not None:
            fixed.update({f"{path}.{n}" if path else n: why for n, _ in m.named_parameters()})
    for group in list(groups.prunable):
        hit = next((fixed[p.name] for p in group.params if p.name in fixed), None)
        if hit is not None:
            frozen[group.id] = f"{hit}: its channels stay"
    candidates = [g for g in groups.prunable if g.id not in frozen]
    while candidates:  # one rewrite of the graph with a channel of every candidate gone; the literals it
        removed = np.zeros(len(groups.comp_group), dtype=bool)  # changes name the groups around them
        for g in candidates:
            removed[g.channels[-1:]] = True  # one channel (one block of a blocked group)
        graph = _copy_graph(gm)
        before = {n.name: (n.args, n.kwargs) for n in graph.nodes}
        try:
            _rewrite_ops(graph, Reindexing(groups, removed))
        except Exception as exc:  # a rewrite that cannot apply: the groups around it cannot shrink in code either
            node = getattr(exc, "node", None)
            near = (groups.groups_near(node) if node else set()) & {g.id for g in candidates}
            if not near:
                near = {g.id for g in candidates}
            for gid in near:
                frozen[gid] = f"a size in the model's Python code depends on these channels ({exc})"
            candidates = [g for g in candidates if g.id not in near]
            continue
        ids = {g.id for g in candidates}
        for n in graph.nodes:
            if n.op == "call_function" and n.target not in _MODULE_LITERALS and (n.args, n.kwargs) != before[n.name]:
                for gid in groups.groups_near(n.name) & ids:
                    frozen.setdefault(gid, f"a size in the model's Python code depends on these channels ({n.target} "
                                           f"in {_where(n)}: a literal the module-resizing target cannot rewrite)")
        break
    for gid, reason in frozen.items():
        groups[gid].frozen = reason
    return frozen
