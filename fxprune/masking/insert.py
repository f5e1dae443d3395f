"""Insert channel masks into a traced graph: one small module per channel group, trainable in place.

``insert_masks(gm, groups, factory)`` returns a :class:`MaskedModel`: a new plain GraphModule (built by
compaction's emitter with nothing removed, so it owns copies of the tensors under the user's names and
its BatchNorm/dropout follow ``.train()``/``.eval()``) in which every chosen prunable group's channels
are multiplied by the output of ``factory(group)``:

- a mask module's ``forward()`` takes no input and returns one value per channel, shape (channels,);
  or, when the module has ``per_sample = True``, ``forward(x)`` takes the group's first masked
  activation (in graph order, before masking) and returns (batch, channels); or, when it has
  ``transform = True``, ``forward()`` returns a (channels, channels) map of the group's channels (in
  training; ``y_j = sum_k x_k M[k, j]``, :class:`~fxprune.masking.apply.ApplyTransform`) or (channels,)
  (a plain value, in eval mode), acting on activations only, on groups whose every masked tensor holds
  each channel once; a per-sample mask with ``reads_input = True`` reads the input of the group's first
  producing layer (in graph order) instead (SANP's saliency modules decide from what the layer is about to
  compute on);
- where the mask acts is :mod:`fxprune.masking.sites` (``placement="output"`` or ``"prenorm"``); how,
  :mod:`fxprune.masking.apply`: a per-channel mask on a producer's output multiplies its rows and bias
  (the same product on a weight-sized tensor), one on a BatchNorm's output multiplies its affine
  parameters before it normalises (``MaskedBatchNorm``), anything else (and every per-sample mask)
  multiplies the activation; a masked resnet50 training step costs ~1.1x the unmasked graph's
  (``benchmarks/masks.py``);
- the contract (``tests/test_masking.py``, float64): all ones gives the original bit for bit; a zero on
  a channel (eval mode, ``placement="output"``) gives exactly the masked original with that channel
  pruned, so exactly the compacted model; any deterministic mask folds into the weights
  (:func:`fxprune.masking.fold.fold`) with the same outputs.

Mask modules live at ``fxprune_masks.g<group id>`` of the masked module, the modules applying them at
``fxprune_mask_sites.s<i>`` (a fused BatchNorm at its own path), depth masks at ``fxprune_depth.<i>``;
none of them is in any compacted output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.compaction.trainable import module_batch_norm
from fxprune.edits.blocks import DEPTH_PREFIX, Block, depth_masks

from .apply import ApplyMasks, ApplyTransform, MaskedBatchNorm, Multiplier
from .fold import Folded, fold
from .sites import MASKS, SITES, GraphFacts, GroupSites, Site, find_sites, first_producer

if TYPE_CHECKING:
    from fxprune.compaction.emit import GraphEdit

__all__ = ["insert_masks", "MaskedModel", "MaskFactory", "MASKS", "SITES"]

MaskFactory = Callable[[Group], nn.Module]


@dataclass
class MaskedModel:
    """A traced model with channel masks in its graph (see the module docstring)."""

    module: fx.GraphModule
    groups: ChannelGroups                    # the analysis of the unmasked graph the masks follow
    masks: dict[int, nn.Module]              # group id -> its mask module (inside ``module``)
    sites: dict[int, GroupSites]             # group id -> where its mask acts
    placement: str = "output"
    skipped: dict[int, str] = field(default_factory=dict)  # group id -> why it got no mask
    blocks: list[Block] = field(default_factory=list)       # residual blocks with a depth mask
    depth: dict[str, nn.Module] = field(default_factory=dict)  # block name -> its depth mask (inside ``module``)

    def mask_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the channel and depth masks."""
        seen: dict[int, nn.Parameter] = {}
        for m in [*self.masks.values(), *self.depth.values()]:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the masked module that is not a mask's."""
        ids = {id(p) for p in self.mask_parameters()}
        return [p for p in self.module.parameters() if id(p) not in ids]

    def values(self) -> dict[int, np.ndarray]:
        """Each per-channel mask's current value (the module in eval mode), per group id."""
        for gid, m in self.masks.items():
            if getattr(m, "per_sample", False):
                raise ValueError(f"group {gid}'s mask is per-sample: give fold() the values to use")
        return {gid: _evaluated(m).double().cpu().numpy().reshape(-1) for gid, m in self.masks.items()}

    def depth_values(self) -> dict[str, float]:
        """Each depth mask's current value (eval mode), per block name."""
        return {name: float(_evaluated(m).reshape(-1)[0]) for name, m in self.depth.items()}

    def fold(self, values: Mapping[int, np.ndarray] | None = None, *, threshold: float = 0.0) -> Folded:
        """:func:`fxprune.masking.fold.fold` of this model: new full-size weights and the removal."""
        return fold(self, values, threshold=threshold)

    def state(self) -> dict[str, torch.Tensor]:
        """The masked module's own tensors under the user's names (masks and their sites left out; tied names
        share one tensor)."""
        from fxprune.state import named_tensors

        return {k: v for k, v in named_tensors(self.module).items()
                if not k.startswith((MASKS + ".", SITES + ".", DEPTH_PREFIX + "."))}


def _evaluated(mask: nn.Module) -> torch.Tensor:
    """A mask module's output in eval mode (its deterministic value), without gradient; its mode is kept."""
    was = mask.training
    mask.eval()
    try:
        with torch.no_grad():
            return mask().detach()
    finally:
        mask.train(was)


Entries = list[tuple[int, Site]]  # (group id, where on this tensor's axis)


def index_of(entries: Entries, sizes: Mapping[int, int]) -> torch.Tensor:
    """Per position of the axis ``entries`` share: 0 (no group) or 1 + (offset of its group's mask in the
    concatenation of the entries' masks, ``sizes[gid]`` channels each) + channel."""
    index, offset = np.zeros(entries[0][1].size, dtype=np.int64), 0
    for gid, site in entries:
        index[site.index] = 1 + offset + site.pos
        offset += sizes[gid]
    return torch.as_tensor(index)


def _batch_norm(node: fx.Node) -> dict | None:
    """The arguments of a batch norm a BatchNorm module computes (``module_batch_norm``) with an affine
    weight under a module path: fusable with its mask as a MaskedBatchNorm at that path; else None."""
    b = module_batch_norm(node)
    weight = b["weight"] if b is not None else None
    return b if weight is not None and "." in weight.target else None


class _Insert:
    """The graph edit (``fxprune.compaction.emit.GraphEdit``) that puts the masks in. Per-channel masks act
    where they are cheapest and exact: on a producer's rows and bias (a weight-sized product), inside a
    BatchNorm's affine parameters (:class:`MaskedBatchNorm`), else on the activation; per-sample masks on
    the activation."""

    def __init__(self, chosen: dict[int, GroupSites], masks: dict[int, nn.Module],
                 reads: dict[int, str] | None = None) -> None:
        self.chosen, self.masks = chosen, masks
        self.reads = reads or {}  # group id -> the node a per-sample mask reads instead of its first activation
        self.count = 0

    def __call__(self, graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        self.graph, self.tensors, self.modules = graph, tensors, modules
        self.nodes = {n.name: n for n in graph.nodes}
        self.attrs: dict[str, list[fx.Node]] = {}  # get_attr nodes by target, looked up once
        for n in graph.nodes:
            if n.op == "get_attr":
                self.attrs.setdefault(n.target, []).append(n)
        self.order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
        self.latest: dict[fx.Node, fx.Node] = {}  # a tensor masked twice (two axes): the second wraps the first
        # masks are computed after the inputs and tensors are read (the graph's prefix), before any op
        self.first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        self.calls = self._mask_calls(tensors, modules)
        activations, norms, soft, hard, transforms = self._route()
        for gid, site in transforms:
            self._transform(gid, site)
        for (name, axis), entries in activations.items():
            node = self.nodes[name]
            for gid, _ in entries:  # a per-sample mask reads the first activation it masks, before masking
                if gid not in self.calls:  # (or, ``reads_input``, its producing layer's input)
                    source = self.nodes[self.reads[gid]] if gid in self.reads else node
                    with graph.inserting_after(source):
                        self.calls[gid] = graph.call_module(f"{MASKS}.g{gid}", (source,))
                    self.order[self.calls[gid]] = self.order[source] + 0.5
            self._apply(node, axis, entries, hard=False)
        for (name, _axis), entries in norms.items():
            self._fuse_norm(self.nodes[name], entries)
        for kind, table in (("soft", soft), ("hard", hard)):
            for (target, axis), entries in table.items():
                for node in self.attrs.get(target, []):
                    self._apply(node, axis, entries, hard=kind == "hard")

    def _mask_calls(self, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[int, fx.Node]:
        device = next((t.device for t in tensors.values() if t.is_floating_point()), torch.device("cpu"))
        calls: dict[int, fx.Node] = {}
        for gid, mask in self.masks.items():
            modules[f"{MASKS}.g{gid}"] = mask.to(device)
            if not getattr(mask, "per_sample", False):
                with self.graph.inserting_before(self.first):
                    calls[gid] = self.graph.call_module(f"{MASKS}.g{gid}", ())
                self.order[calls[gid]] = self.order[self.first] - 0.5
        return calls

    def _route(self) -> tuple[Any, ...]:
        """Each site's entries by where they act: activations, BatchNorms, weights (soft), weights (hard),
        and the activation sites of transform masks."""
        activations: dict[tuple[str, int], Entries] = {}
        norms: dict[tuple[str, int], Entries] = {}
        soft: dict[tuple[str, int], Entries] = {}
        hard: dict[tuple[str, int], Entries] = {}
        transforms: Entries = []
        for gid, gs in self.chosen.items():
            per_sample = getattr(self.masks[gid], "per_sample", False)
            for site in gs.activations:
                layer = self.nodes.get(site.layer) if site.layer else None
                if getattr(self.masks[gid], "transform", False):
                    transforms.append((gid, site))
                elif not per_sample and layer is not None and _batch_norm(layer) is not None:
                    norms.setdefault((layer.name, site.axis), []).append((gid, site))
                elif not per_sample and site.folds and not site.norm and \
                        all(f.node in self.tensors and isinstance(self.tensors[f.node], nn.Parameter)
                            for f in site.folds):
                    for f in site.folds:
                        soft.setdefault((f.node, f.axis), []).append((gid, f))
                else:
                    activations.setdefault((site.node, site.axis), []).append((gid, site))
            for site in gs.weights:
                hard.setdefault((site.node, site.axis), []).append((gid, site))
        return activations, norms, soft, hard, transforms

    def _transform(self, gid: int, site: Site) -> None:
        """A transform mask's value applied to the group's channels of one activation."""
        node = self.nodes[site.node]
        path = self._path()
        positions = torch.as_tensor(site.index[np.argsort(site.pos)])
        self.modules[path] = ApplyTransform(site.axis, positions, site.size)
        src, call = self.latest.get(node, node), self.calls[gid]
        anchor = max((src, call), key=self.order.__getitem__)
        with self.graph.inserting_after(anchor):
            applied = self.graph.call_module(path, (src, call))
        self.order[applied] = self.order[anchor] + 0.25
        applied.meta = dict(node.meta)
        src.replace_all_uses_with(applied, delete_user_cb=lambda u: u is not applied and u is not call)
        self.latest[node] = applied

    def _index(self, entries: Entries) -> torch.Tensor:
        return index_of(entries, {gid: self.chosen[gid].channels for gid, _ in entries})

    def _path(self) -> str:
        self.count += 1
        return f"{SITES}.s{self.count - 1}"

    def _apply(self, node: fx.Node, axis: int, entries: Entries, hard: bool) -> None:
        graph, gids = self.graph, [gid for gid, _ in entries]
        path = self._path()
        self.modules[path] = ApplyMasks(axis, self._index(entries), hard)
        keep = {self.calls[g] for g in gids}
        src = self.latest.get(node, node)
        if node.op == "get_attr":  # a weight: after the masks, before the first op
            with graph.inserting_before(self.first):
                applied = graph.call_module(path, (src, *(self.calls[g] for g in gids)))
            self.order[applied] = self.order[self.first] - 0.25
        else:
            anchor = max(keep | {src}, key=self.order.__getitem__)
            with graph.inserting_after(anchor):
                applied = graph.call_module(path, (src, *(self.calls[g] for g in gids)))
            self.order[applied] = self.order[anchor] + 0.25
        applied.meta = dict(node.meta)
        src.replace_all_uses_with(applied, delete_user_cb=lambda u: u is not applied and u not in keep)
        self.latest[node] = applied

    def _fuse_norm(self, node: fx.Node, entries: Entries) -> None:
        """``batch_norm(x, ...)`` -> ``MaskedBatchNorm(x, multiplier(masks))`` at the BatchNorm's path."""
        b = _batch_norm(node)
        assert b is not None
        graph, gids = self.graph, [gid for gid, _ in entries]
        bn = b["weight"].target.rsplit(".", 1)[0]
        if bn not in self.modules:
            w, bias, rm, rv = (self.tensors[p.target] if p is not None else None
                               for p in (b["weight"], b["bias"], b["running_mean"], b["running_var"]))
            self.modules[bn] = MaskedBatchNorm(w, bias, rm, rv, self.tensors.get(f"{bn}.num_batches_tracked"),
                                               float(b["eps"]), float(b["momentum"]))
        path = self._path()
        self.modules[path] = Multiplier(self._index(entries))
        with graph.inserting_before(node):
            mult = graph.call_module(path, tuple(self.calls[g] for g in gids))
            fused = graph.call_module(bn, (b["input"], mult))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def _each_channel_once(site: Site, channels: int) -> bool:
    return len(site.pos) == channels and len(np.unique(site.pos)) == channels


def insert_masks(gm: fx.GraphModule, groups: ChannelGroups, factory: MaskFactory | None, *,
                 only: Iterable[int] | None = None, placement: str = "output",
                 weights: Mapping[str, torch.Tensor] | None = None, training: bool = False,
                 blocks: Sequence[Block] = (), depth: Callable[[Block], nn.Module] | None = None,
                 edits: Sequence[GraphEdit] = ()) -> MaskedModel:
    """Masks for the prunable groups (``only``: these group ids; ``factory=None``: none) of the traced
    ``gm`` (see the module docstring). ``weights``: full-size tensors by name that replace ``gm``'s in
    the masked module (e.g. a re-initialised copy's). Depth masks: ``depth(block)`` for each of
    ``blocks`` (``fxprune.edits.blocks.residual_blocks``) multiplies that block's branch output
    (``fxprune.edits.blocks.depth_masks``); they train and fold with the channel masks. ``gm`` and the
    user's tensors are never modified. ``edits``: more graph edits (``fxprune.compaction.emit.GraphEdit``),
    applied first (e.g. ``fxprune.edits.blocks.mix_exits``, TAS's depth mixture); modules they register under
    ``fxprune_depth.`` stay out of :meth:`MaskedModel.state`."""
    from fxprune.analysis.reindex import Reindexing
    from fxprune.compaction.emit import emit

    wanted = set(only) if only is not None else None
    chosen: dict[int, GroupSites] = {}
    skipped: dict[int, str] = {}
    facts = GraphFacts(gm)
    for group in groups.prunable if factory is not None else ():
        if wanted is not None and group.id not in wanted:
            continue
        sites = find_sites(gm, groups, group, placement, facts)
        if sites.skipped:
            skipped[group.id] = sites.skipped
        else:
            chosen[group.id] = sites
    masks = {gid: factory(groups[gid]) for gid in chosen} if factory is not None else {}
    reads: dict[int, str] = {}  # group id -> the producer's input a ``reads_input`` mask reads
    for gid, mask in list(masks.items()):
        why = None
        if getattr(mask, "transform", False) and not all(_each_channel_once(s, chosen[gid].channels)
                                                         for s in chosen[gid].activations):
            why = "a channel map needs every masked tensor to hold each channel once (not heads)"
        elif getattr(mask, "reads_input", False):
            first = first_producer(groups[gid], facts)
            if first is None or first[1] is None:
                why = "a mask that reads the layer's input needs a producing layer"
            else:
                reads[gid] = first[1].name
        if why is not None:
            skipped[gid] = why
            del masks[gid], chosen[gid]
        elif getattr(mask, "per_sample", False):
            chosen[gid].weights = []  # a per-sample zero cannot zero weights shared by the batch
    if blocks and depth is None:
        raise ValueError("blocks given without depth=: a factory block -> depth mask module")
    edits = [*edits, *([depth_masks(blocks, depth)] if blocks else [])]  # first: channel sites are found by name
    edits.append(_Insert(chosen, masks, reads))
    nothing = np.zeros(len(groups.comp_group), dtype=bool)
    module = emit(gm, Reindexing(groups, nothing), {}, training=training, weights=weights, edits=edits)
    live = {gid: module.get_submodule(f"{MASKS}.g{gid}") for gid in masks}
    deep = {b.name: module.get_submodule(f"{DEPTH_PREFIX}.{i}") for i, b in enumerate(blocks)}
    return MaskedModel(module, groups, live, chosen, placement, skipped, list(blocks), deep)
