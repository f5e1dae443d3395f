"""Insert channel masks into a traced graph: one small module per channel group, trainable in place.

``insert_masks(gm, groups, factory)`` returns a :class:`MaskedModel`: a new plain GraphModule (built by
compaction's emitter with nothing removed, so it owns copies of the tensors under the user's names and
its BatchNorm/dropout follow ``.train()``/``.eval()``) in which every chosen prunable group's channels
are multiplied by the output of ``factory(group)``:

- a mask module's ``forward()`` takes no input and returns one value per channel, shape (channels,);
  or, when the module has ``per_sample = True``, ``forward(x)`` takes the group's first masked
  activation (in graph order, before masking) and returns (batch, channels);
- where the mask acts is :mod:`fxprune.masking.sites` (``placement="output"`` or ``"prenorm"``);
- the contract (``tests/test_masking.py``, float64): all ones gives the original bit for bit; a zero on
  a channel (eval mode, ``placement="output"``) gives exactly the masked original with that channel
  pruned, so exactly the compacted model; any deterministic mask folds into the weights
  (:func:`fxprune.masking.fold.fold`) with the same outputs.

Mask modules live at ``fxprune_masks.g<group id>`` of the masked module, the modules applying them at
``fxprune_mask_sites.s<i>``; neither is in any compacted output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.edits.blocks import DEPTH_PREFIX, Block, depth_masks
from .sites import GroupSites, Site, find_sites

__all__ = ["insert_masks", "MaskedModel", "ApplyMasks", "MaskFactory", "MASKS", "SITES"]

MaskFactory = Callable[[Group], nn.Module]
MASKS, SITES = "fxprune_masks", "fxprune_mask_sites"


class ApplyMasks(nn.Module):
    """Multiplies a tensor along ``axis`` by the masks of the groups found there: position i gets
    ``masks[k][j]`` where ``index[i]`` points at channel j of mask k, and 1 where no group is.
    ``hard``: the weight sites, multiplied by ``mask != 0`` and only in eval mode."""

    def __init__(self, axis: int, index: torch.Tensor, hard: bool = False) -> None:
        super().__init__()
        self.axis, self.hard = axis, hard
        self.register_buffer("index", index, persistent=False)

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        if self.hard and self.training:
            return x
        per_sample = [m for m in masks if m.dim() == 2]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if per_sample:
            batch = per_sample[0].shape[0]
            parts = [m.to(dtype) if m.dim() == 2 else m.to(dtype).expand(batch, -1) for m in masks]
            table = torch.cat([torch.ones(batch, 1, dtype=dtype, device=x.device), *parts], dim=1)
            mult = table[:, self.index]
            shape = [batch] + [1] * (x.dim() - 1)
        else:
            table = torch.cat([torch.ones(1, dtype=dtype, device=x.device), *(m.to(dtype) for m in masks)])
            mult = table[self.index]
            shape = [1] * x.dim()
        shape[self.axis] = -1
        if self.hard:
            mult = (mult != 0).to(dtype)
        return x * mult.reshape(shape)


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
        out: dict[int, np.ndarray] = {}
        with torch.no_grad():
            for gid, m in self.masks.items():
                if getattr(m, "per_sample", False):
                    raise ValueError(f"group {gid}'s mask is per-sample: give fold() the values to use")
                was = m.training
                m.eval()
                try:
                    out[gid] = m().detach().double().cpu().numpy().reshape(-1)
                finally:
                    m.train(was)
        return out

    def depth_values(self) -> dict[str, float]:
        """Each depth mask's current value (eval mode), per block name."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for name, m in self.depth.items():
                was = m.training
                m.eval()
                try:
                    out[name] = float(m().detach().reshape(-1)[0])
                finally:
                    m.train(was)
        return out

    def fold(self, values: Mapping[int, np.ndarray] | None = None, *, threshold: float = 0.0) -> Any:
        """:func:`fxprune.masking.fold.fold` of this model: new full-size weights and the removal."""
        from .fold import fold

        return fold(self, values, threshold=threshold)

    def state(self) -> dict[str, torch.Tensor]:
        """The masked module's tensors under the user's names (masks and their sites left out)."""
        from fxprune.state import named_tensors

        return {k: v.detach() for k, v in named_tensors(self.module).items()
                if not k.startswith((MASKS + ".", SITES + ".", DEPTH_PREFIX + "."))}


def _index(size: int, entries: list[tuple[Site, int]]) -> torch.Tensor:
    """Per position of an axis: 0 (no group) or 1 + (offset of its group's mask in the table) + channel."""
    index = np.zeros(size, dtype=np.int64)
    for site, offset in entries:
        index[site.index] = 1 + offset + site.pos
    return torch.as_tensor(index)


def _by_target(chosen: dict[int, GroupSites], kind: str) -> dict[tuple[str, int], list[tuple[int, Site]]]:
    out: dict[tuple[str, int], list[tuple[int, Site]]] = {}
    for gid, gs in chosen.items():
        for site in getattr(gs, kind):
            out.setdefault((site.node, site.axis), []).append((gid, site))
    return out


class _Insert:
    """The graph edit (``fxprune.compaction.emit.GraphEdit``) that puts the masks in."""

    def __init__(self, chosen: dict[int, GroupSites], masks: dict[int, nn.Module]) -> None:
        self.chosen, self.masks = chosen, masks
        self.count = 0

    def __call__(self, graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        nodes = {n.name: n for n in graph.nodes}
        self.order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
        self.latest: dict[fx.Node, fx.Node] = {}  # a tensor masked on two axes: the second wraps the first
        device = next((t.device for t in tensors.values() if t.is_floating_point()), torch.device("cpu"))
        calls: dict[int, fx.Node] = {}
        # masks are computed after the inputs and tensors are read (the graph's prefix), before any op
        first = self.first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        for gid, mask in self.masks.items():
            modules[f"{MASKS}.g{gid}"] = mask.to(device)
            if not getattr(mask, "per_sample", False):
                with graph.inserting_before(first):
                    calls[gid] = graph.call_module(f"{MASKS}.g{gid}", ())
                self.order[calls[gid]] = self.order[first] - 0.5
        for (name, axis), entries in _by_target(self.chosen, "activations").items():
            node = nodes[name]
            for gid, _ in entries:  # a per-sample mask reads the first activation it masks, before masking
                if gid not in calls:
                    with graph.inserting_after(node):
                        calls[gid] = graph.call_module(f"{MASKS}.g{gid}", (node,))
                    self.order[calls[gid]] = self.order[node] + 0.5
            self._apply(graph, modules, node, axis, entries, calls, hard=False)
        for (target, axis), entries in _by_target(self.chosen, "weights").items():
            for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == target]:
                self._apply(graph, modules, node, axis, entries, calls, hard=True)

    def _apply(self, graph: fx.Graph, modules: dict[str, nn.Module], node: fx.Node, axis: int,
               entries: list[tuple[int, Site]], calls: dict[int, fx.Node], hard: bool) -> None:
        offsets, table, gids = 0, [], []
        for gid, site in entries:
            table.append((site, offsets))
            offsets += self.chosen[gid].channels
            gids.append(gid)
        path = f"{SITES}.s{self.count}"
        self.count += 1
        modules[path] = ApplyMasks(axis, _index(entries[0][1].size, table), hard)
        keep = {calls[g] for g in gids}
        src = self.latest.get(node, node)
        if hard:  # a weight: after the masks, before the first op
            with graph.inserting_before(self.first):
                applied = graph.call_module(path, (src, *(calls[g] for g in gids)))
        else:
            anchor = max(keep | {src}, key=self.order.__getitem__)
            with graph.inserting_after(anchor):
                applied = graph.call_module(path, (src, *(calls[g] for g in gids)))
        self.order[applied] = self.order[anchor] + 0.25 if not hard else self.order[self.first] - 0.25
        applied.meta = dict(node.meta)
        src.replace_all_uses_with(applied, delete_user_cb=lambda u: u is not applied and u not in keep)
        self.latest[node] = applied


def insert_masks(gm: fx.GraphModule, groups: ChannelGroups, factory: MaskFactory | None, *,
                 only: Iterable[int] | None = None, placement: str = "output",
                 weights: Mapping[str, torch.Tensor] | None = None, training: bool = False,
                 blocks: Sequence[Block] = (), depth: Callable[[Block], nn.Module] | None = None) -> MaskedModel:
    """Masks for the prunable groups (``only``: these group ids; ``factory=None``: none) of the traced
    ``gm`` (see the module docstring). ``weights``: full-size tensors by name that replace ``gm``'s in
    the masked module (e.g. a re-initialised copy's). Depth masks: ``depth(block)`` for each of
    ``blocks`` (``fxprune.edits.blocks.residual_blocks``) multiplies that block's branch output
    (``fxprune.edits.blocks.depth_masks``); they train and fold with the channel masks. ``gm`` and the
    user's tensors are never modified."""
    from fxprune.compaction.emit import emit
    from fxprune.compaction.resize import Reindexing

    wanted = set(only) if only is not None else None
    chosen: dict[int, GroupSites] = {}
    skipped: dict[int, str] = {}
    for group in groups.prunable if factory is not None else ():
        if wanted is not None and group.id not in wanted:
            continue
        sites = find_sites(gm, groups, group, placement)
        if sites.skipped:
            skipped[group.id] = sites.skipped
        else:
            chosen[group.id] = sites
    masks = {gid: factory(groups[gid]) for gid in chosen} if factory is not None else {}
    for gid, mask in masks.items():
        if getattr(mask, "per_sample", False):
            chosen[gid].weights = []  # a per-sample zero cannot zero weights shared by the batch
    if blocks and depth is None:
        raise ValueError("blocks given without depth=: a factory block -> depth mask module")
    edits = [depth_masks(blocks, depth)] if blocks else []  # first: channel sites are found by name after it
    edits.append(_Insert(chosen, masks))
    nothing = np.zeros(len(groups.comp_group), dtype=bool)
    module = emit(gm, Reindexing(groups, nothing), {}, training=training, weights=weights, edits=edits)
    live = {gid: module.get_submodule(f"{MASKS}.g{gid}") for gid in masks}
    deep = {b.name: module.get_submodule(f"{DEPTH_PREFIX}.{i}") for i, b in enumerate(blocks)}
    return MaskedModel(module, groups, live, chosen, placement, skipped, list(blocks), deep)
