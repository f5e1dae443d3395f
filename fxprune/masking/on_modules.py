"""Channel masks on the user's own modules: the masks of models compacted by resizing their modules (detectors,
anything one recorded run analyses; ``fxprune.compaction.modules``), where no traced graph runs.

``insert_module_masks(model, gm, groups, factory)`` returns a :class:`~fxprune.masking.insert.MaskedModel` whose
``module`` is a COPY of the user's model (its classes, its Python control flow, its training-mode outputs such as
a detector's dict of losses), with the same contract as the graph masks (``fxprune.masking.insert``): all ones
is the original, a zero (eval mode) is exactly the pruned channel, any deterministic mask folds into the weights
(``fold``). The sites are the graph masks' own (``fxprune.masking.sites``, found on the recording); a mask acts
through parametrizations (``torch.nn.utils.parametrize``) of the tensors the sites fold into:

- an activation site (a normalisation's output, a producer's output) multiplies the tensors it folds into: the
  norm's affine weight and bias, or the producer's rows and bias (the same product as multiplying the output,
  without a pass over the activation; what the graph masks do for a producer and a BatchNorm);
- a hard site (the channel's other weights: a consumer's columns, a frozen norm's buffers) is multiplied by
  ``mask != 0`` in eval mode only.

Each mask is computed once per forward of the model (a pre-hook on the copy starts the forward's table of
values; the parametrizations read it), so a sampled mask is one sample per forward, as in the graph.

Refused here (the group is skipped, with why): per-sample masks (they multiply activations, per sample),
transform masks, masks that read a layer's input, a site whose tensors are not a module's (a tensor made in
forward), tensors shared by several modules (a parametrization would change one of them). Depth masks and graph
edits need the graph target.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.state import load_tensors, named_tensors, user_tensors

from .apply import ApplyMasks
from .insert import Entries, MaskedModel, index_of
from .sites import MASKS, GraphFacts, GroupSites, find_sites

__all__ = ["insert_module_masks", "ModuleMasked"]


class _Values:
    """The masks' values of the current forward, each computed on first use from the mask module at
    ``fxprune_masks.g<id>`` (a mask set there later is the one used); a pre-hook of the model clears them when a
    forward starts (and a hook when it ends, so no autograd graph outlives its step)."""

    def __init__(self, holder: nn.Module) -> None:
        self.holder, self.now = holder, {}

    def __call__(self, gid: int) -> torch.Tensor:
        if gid not in self.now:
            self.now[gid] = self.holder.get_submodule(f"g{gid}")()
        return self.now[gid]

    def clear(self, *_: Any) -> None:
        self.now = {}


class _Times(nn.Module):
    """A parametrization: the tensor times its groups' masks along ``axis`` (``ApplyMasks``: ``hard`` ones as
    ``mask != 0``, in eval mode only)."""

    def __init__(self, apply: ApplyMasks, gids: list[int], values: _Values) -> None:
        super().__init__()
        self.times, self.gids = apply, gids
        object.__setattr__(self, "values", values)  # not a submodule: the masks live at fxprune_masks only

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.times(t, *(self.values(gid) for gid in self.gids))


class ModuleMasked(MaskedModel):
    """A :class:`MaskedModel` whose module is a parametrized copy of the user's model: its ``state()`` is the
    tensors under the user's names (the parametrized ones' originals; the masks, inside a parametrization,
    left out)."""

    def state(self) -> dict[str, torch.Tensor]:
        return user_tensors(self.module)


def _why_not(gs: GroupSites, mask: nn.Module, state: Mapping[str, torch.Tensor], shared: set[str]) -> str | None:
    """Why a group's mask cannot act on the modules (None: it can)."""
    if getattr(mask, "per_sample", False) or getattr(mask, "transform", False) or getattr(mask, "reads_input", False):
        return "a per-sample, transform or input-reading mask acts on activations: it needs the graph target"
    for site in gs.activations:
        if not site.folds:
            return f"its mask acts on {site.node}, an output whose channels no module's tensors scale"
    for t in [*gs.folds, *gs.weights]:
        if t.node not in state:
            return f"{t.node} is not a tensor of the model's modules"
        if t.node in shared:
            return f"{t.node} is shared by several modules: a parametrization would change one of them"
    return None


def insert_module_masks(model: nn.Module, gm: fx.GraphModule, groups: ChannelGroups,
                        factory: Callable[[Group], nn.Module] | None, *, only: Iterable[int] | None = None,
                        weights: Mapping[str, torch.Tensor] | None = None, training: bool = False) -> ModuleMasked:
    """Masks for the prunable groups (``only``: these ids) of ``model``, analysed on its recording ``gm``, on a
    copy of ``model`` (see the module docstring). ``weights``: full-size tensors by name loaded into the copy
    first. ``model`` is never modified."""
    module = copy.deepcopy(model)
    state = named_tensors(module)
    load_tensors(state, weights or {})
    names: dict[int, list[str]] = {}
    for name, t in state.items():
        names.setdefault(id(t), []).append(name)
    shared = {n for group in names.values() if len(group) > 1 for n in group}
    wanted = set(only) if only is not None else None
    facts = GraphFacts(gm)
    chosen: dict[int, GroupSites] = {}
    masks: dict[int, nn.Module] = {}
    skipped: dict[int, str] = {}
    for group in groups.prunable if factory is not None else ():
        if wanted is not None and group.id not in wanted:
            continue
        gs = find_sites(gm, groups, group, "output", facts)
        mask = factory(group) if not gs.skipped else None
        why = gs.skipped or _why_not(gs, mask, state, shared)
        if why is not None:
            skipped[group.id] = why
            continue
        chosen[group.id], masks[group.id] = gs, mask
    device = next((t.device for t in state.values() if t.is_floating_point()), torch.device("cpu"))
    holder = nn.Module()
    for gid, mask in masks.items():
        holder.add_module(f"g{gid}", mask.to(device))
    values = _Values(holder)
    first = _parametrize(module, chosen, values)
    if first is not None:  # the masks follow the copy's .to() and .train() as a child of its first
        first.add_module(MASKS, holder)  # parametrization (a child of the model could join a Sequential's forward)
    module.register_forward_pre_hook(values.clear)
    module.register_forward_hook(values.clear)
    module.train(training)
    live = {gid: holder.get_submodule(f"g{gid}") for gid in masks}
    return ModuleMasked(module, groups, live, chosen, "output", skipped)


def _parametrize(module: nn.Module, chosen: Mapping[int, GroupSites], values: _Values) -> nn.Module | None:
    """One parametrization per (tensor, axis, soft or hard) multiplying it by its groups' masks; returns the
    first (None: none)."""
    table: dict[tuple[str, int, bool], Entries] = {}
    for gid, gs in chosen.items():
        for site in gs.folds:
            table.setdefault((site.node, site.axis, False), []).append((gid, site))
        for site in gs.weights:
            table.setdefault((site.node, site.axis, True), []).append((gid, site))
    sizes = {gid: gs.channels for gid, gs in chosen.items()}
    first = None
    for (name, axis, hard), entries in table.items():
        path, _, local = name.rpartition(".")
        owner = module.get_submodule(path)
        times = _Times(ApplyMasks(axis, index_of(entries, sizes), hard), [gid for gid, _ in entries], values)
        parametrize.register_parametrization(owner, local, times.to(getattr(owner, local).device), unsafe=True)
        first = first if first is not None else times
    return first
