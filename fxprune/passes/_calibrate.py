"""Shared machinery of the data-driven passes (thinet, lasso): their common options and outline
(:class:`Calibrated`), calibration batches, the consumers of a group (the NEXT layer: a Conv2d with
groups=1 or a Linear reading the group's channels), sampled inputs and outputs of those layers, each
channel's contribution to them, masking a working copy, and sequential least-squares reconstruction
of the consumers' weights.

Activations come from forward hooks on eager copies of the user's model (its parameter names are the
traced graph's, so a group's consumer slot ``"conv2.weight"`` is the module ``conv2``). Sampling is
seeded per (layer, batch), so the original and the pruned copy are sampled at the same locations.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.groups import ChannelGroups, ParamSlot
from fxprune.measure import to_device
from fxprune.state import named_tensors

from .base import Decision, Finish, Pass, PassContext, Scores
from .l1 import L1Norm

__all__ = ["Calibrated", "Consumer", "Sampler", "attr_order", "consumers", "calibration", "sample_layers", "mask_",
           "reconstruct", "reconstruct_into", "reconstruct_removed", "contributions", "group_contributions",
           "live_outputs", "Solver"]


@dataclass
class Consumer:
    layer: str              # module path, e.g. "conv2"
    module: nn.Module       # in the user's model (read only)
    slot: ParamSlot         # its weight's input-axis slot
    units: np.ndarray       # per input index: group id (-1: none) and channel position, shape (2, C)
    order: int              # position of its first use in the graph


def _usable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros"


def attr_order(ctx: PassContext) -> dict[str, int]:
    """Each parameter's position among the graph's ``get_attr`` nodes (graph order of first use)."""
    return {n.target: i for i, n in enumerate(ctx.gm.graph.nodes) if n.op == "get_attr"}


def consumers(ctx: PassContext) -> dict[int, list[Consumer]]:
    """Prunable group id -> its consumer layers; a group with any consumer we cannot model is absent."""
    order = attr_order(ctx)
    out: dict[int, list[Consumer]] = {}
    for group in ctx.groups.prunable:
        found: list[Consumer] = []
        ok = True
        for p in group.params:
            if p.role != "consumer":
                continue
            layer, _, leaf = p.name.rpartition(".")
            try:
                m = ctx.model.get_submodule(layer)
            except AttributeError:
                m = None
            if m is None or leaf != "weight" or p.axis != 1 or not _usable(m):
                ok = False
                break
            found.append(Consumer(layer, m, p, ctx.groups.positions(p.key), order.get(p.name, 0)))
        if ok and found:
            out[group.id] = found
    return out


def calibration(ctx: PassContext, source: str, batches: int) -> list[Any]:
    """Up to ``batches`` input batches from ``calib_loader`` when given (the model file's calibration data: a
    language model's text), else ``train_loader`` or ``val_loader`` (``source`` first, the other as fallback)."""
    names = ["train_loader", "val_loader"] if source == "train" else ["val_loader", "train_loader"]
    loader = next((ctx.data[n] for n in ["calib_loader", *names] if ctx.data.get(n) is not None), None)
    if loader is None:
        raise ValueError("this pass needs calibration data: give calib_loader=, train_loader= or val_loader=")
    if callable(loader) and not isinstance(loader, Iterable):
        loader = loader()
    out = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return out


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs as (N, C, K, L): K kernel taps, L output locations (Linear: K = L = 1, leading dims folded)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1, 1)
    u = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    return u.reshape(x.shape[0], m.in_channels, -1, u.shape[-1])


class Sampler:
    """Forward hooks that sample layers at ``per_batch`` (image, location) pairs per call of the layer per batch:
    ``samples()`` gives {layer: (inputs (S, C, K), outputs (S, O))}, float64. Sampling is seeded by (layer, batch,
    call), so another copy of the model is sampled at the same places. ``step`` is the batch being run; with
    ``streamed`` each call of a layer is the next batch (a model run one layer at a time over all batches)."""

    class Stop(Exception):
        """Raised by the ``stop_after`` layer's hook once it ran as often as in the first batch."""

    def __init__(self, layers: Iterable[str], per_batch: int, streamed: bool = False) -> None:
        self.got: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
        self.per_batch, self.streamed = per_batch, streamed
        self.step = 0
        self.calls: dict[str, int] = {}  # calls per layer: in the current batch, or (streamed) so far
        self.stop_after: str | None = None
        self.stop_at = 0  # calls of stop_after per batch (0: not known yet, the first batch runs whole)

    def hook(self, name: str) -> Callable:
        def fn(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            call = self.calls[name] = self.calls.get(name, 0) + 1
            step, call = (call - 1, 1) if self.streamed else (self.step, call)
            u = _patches(m, args[0].detach()).double()
            y = out.detach().double()
            y = y.reshape(-1, y.shape[-1]) if isinstance(m, nn.Linear) else y.flatten(2)  # (N, O) / (N, O, L)
            # zlib.crc32, not hash(): str hashes are salted per process, and runs must be reproducible
            key = f"{name}/{step}" + (f"/{call - 1}" if call > 1 else "")
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            n = torch.randint(u.shape[0], (self.per_batch,), generator=gen)
            loc = torch.randint(u.shape[-1], (self.per_batch,), generator=gen)
            ys = y[n] if y.dim() == 2 else y[n, :, loc]
            self.got[name].append((u[n, :, :, loc].cpu(), ys.cpu()))
            if name == self.stop_after and call == self.stop_at:
                raise Sampler.Stop

        return fn

    def hooks(self) -> dict[str, Callable]:
        return {name: self.hook(name) for name in self.got}

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in self.got.items() if v}


def sample_layers(model: nn.Module, layers: list[str], batches: list[Any], per_batch: int,
                  stop_after: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``batches`` through ``model`` and sample each layer (:class:`Sampler`). A layer that runs several
    times per forward (a detector's head shared by its levels) is sampled at every call. ``stop_after``: the
    forward of a batch stops once that layer ran as often as it did in the first batch's whole forward."""
    sampler = Sampler(layers, per_batch)
    sampler.stop_after = stop_after
    handles = [model.get_submodule(name).register_forward_hook(fn) for name, fn in sampler.hooks().items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i, x in enumerate(batches):
                sampler.step = i
                sampler.calls.clear()
                try:
                    model(to_device(x, device))
                except Sampler.Stop:
                    pass
                if stop_after is not None and not sampler.stop_at:
                    sampler.stop_at = sampler.calls.get(stop_after, 0)
    finally:
        for h in handles:
            h.remove()
    return sampler.samples()


def mask_(model: nn.Module, groups: ChannelGroups, removed: np.ndarray, only: set[int] | None = None) -> None:
    """Zero, in place on a working copy, every slot position of every removed channel (of ``only`` groups)."""
    state = named_tensors(model)
    with torch.no_grad():
        for group in groups.prunable:
            if only is not None and group.id not in only:
                continue
            gone = removed[group.channels]
            if not gone.any():
                continue
            for p in group.params:
                if p.name not in state:
                    continue
                gid, pos = groups.positions(p.key)
                idx = np.nonzero((gid == group.id) & gone[np.clip(pos, 0, len(group) - 1)])[0]
                if len(idx):
                    state[p.name].index_fill_(p.axis, torch.as_tensor(idx, device=state[p.name].device), 0.0)


def unit_matrix(c: Consumer, removed: np.ndarray, groups: ChannelGroups) -> tuple[np.ndarray, np.ndarray]:
    """Per input index of a consumer: its unit (a channel of a group, or the index alone) and whether it is removed."""
    gid, pos = c.units
    keys = [(int(g), int(q)) if g >= 0 else (-1, i) for i, (g, q) in enumerate(zip(gid, pos))]
    ids = {k: j for j, k in enumerate(dict.fromkeys(keys))}
    unit = np.array([ids[k] for k in keys])
    gone = np.array([g >= 0 and bool(removed[groups[int(g)].channels[int(q)]]) for g, q in zip(gid, pos)])
    return unit, gone


Solver = Callable[[Consumer, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray],
                  dict[str, torch.Tensor]]


def reconstruct_removed(ctx: PassContext, removed: np.ndarray, solve: Solver, source: str, n_batches: int,
                        per_batch: int) -> dict[str, torch.Tensor]:
    """New weights for every next layer that lost input channels (thinet's and lasso's ``Decision.finish``)."""
    todo = {c.layer: c for gid, cs in consumers(ctx).items() if removed[ctx.groups[gid].channels].any() for c in cs}
    if not todo:
        return {}
    return reconstruct(ctx, removed, list(todo.values()), solve, calibration(ctx, source, n_batches), per_batch)


def reconstruct(ctx: PassContext, removed: np.ndarray, todo: list[Consumer], solve: Solver, batches: list[Any],
                per_batch: int) -> dict[str, torch.Tensor]:
    """Sequential reconstruction, in graph order: each consumer's targets Y come from the original model,
    its inputs X from the working copy already pruned (masked) and reconstructed up to it, so errors
    do not accumulate. ``solve(consumer, X, Y, W, unit, gone)`` returns the consumer's new tensors."""
    target = sample_layers(ctx.model, [c.layer for c in todo], batches, per_batch)
    work = copy.deepcopy(ctx.model).eval()
    mask_(work, ctx.groups, removed)
    return reconstruct_into(work, ctx, removed, todo, solve, batches, per_batch, target)


def reconstruct_into(work: nn.Module, ctx: PassContext, removed: np.ndarray, todo: list[Consumer], solve: Solver,
                     batches: list[Any], per_batch: int,
                     target: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The loop of :func:`reconstruct` on a working copy (already masked), which it updates in place."""
    todo = sorted(todo, key=lambda c: c.order)
    new: dict[str, torch.Tensor] = {}
    state = named_tensors(work)
    for c in todo:
        if c.layer not in target:
            continue
        x, _ = sample_layers(work, [c.layer], batches, per_batch, stop_after=c.layer)[c.layer]
        unit, gone = unit_matrix(c, removed, ctx.groups)
        w = state[c.slot.name].detach().double().cpu()
        tensors = solve(c, x, target[c.layer][1], w, unit, gone)
        with torch.no_grad():
            for name, t in tensors.items():
                state[name].copy_(t.to(state[name].dtype))
        new.update({name: t.to(state[name].dtype) for name, t in tensors.items()})
    return new


def contributions(x: torch.Tensor, w: torch.Tensor, unit: np.ndarray, n_units: int) -> torch.Tensor:
    """(S, O, U): each unit's contribution to each output at each sampled location."""
    wk = w.reshape(w.shape[0], w.shape[1], -1)                        # (O, C, K)
    per_index = torch.einsum("ock,sck->soc", wk, x)                   # (S, O, C)
    p = torch.zeros(w.shape[1], n_units, dtype=per_index.dtype)
    p[torch.arange(w.shape[1]), torch.as_tensor(unit)] = 1.0
    return per_index @ p


def live_outputs(w: torch.Tensor) -> torch.Tensor:
    """Per output of a consumer's weight ``w``: whether it is live (not masked away to all zeros)."""
    return w.reshape(w.shape[0], -1).abs().sum(1) > 0


def group_contributions(c: Consumer, x: torch.Tensor, w: torch.Tensor, gid: int, size: int) -> torch.Tensor:
    """(S, O', size + 1): at each sample, to each live output of consumer ``c`` (weight ``w``), the
    contribution of each of the ``size`` channels of group ``gid``, and last that of all its other
    inputs together."""
    g, pos = c.units
    unit = np.where(g == gid, pos, size)
    return contributions(x, w, unit, size + 1)[:, live_outputs(w)]


@dataclass(frozen=True)
class Calibrated(Pass):
    """Base of the passes that judge a group by what its consumers compute on calibration batches and
    reconstruct those consumers after selection (thinet, lasso): their shared options, the l1 fallback
    for groups whose consumers cannot be modelled, and the decision's new weights through :meth:`solver`."""

    scope = "group"
    normalize = "max"
    needs = ("train_loader",)

    batches: int = 8           # calibration batches
    per_batch: int = 64        # sampled (image, location) pairs per batch and layer
    rows: int = 8000           # (location, output) rows kept for the search
    calibration: str = "train"  # "train": train_loader (val_loader as fallback); "val": the other way round
    seed: int = 0              # the row subsampling

    def score(self, ctx: PassContext) -> Decision:
        scores = L1Norm().score(ctx)  # the fallback
        cons = consumers(ctx)
        if cons and ctx.calibrate is not None:  # a folder's text, one decoder layer at a time
            scores.update(self.score_streamed(ctx, cons))
        elif cons:
            batches = calibration(ctx, self.calibration, self.batches)
            layers = sorted({c.layer for cs in cons.values() for c in cs})
            samples = sample_layers(ctx.model, layers, batches, self.per_batch)
            scores.update(self.score_consumed(ctx, cons, batches, samples, np.random.default_rng(self.seed)))
        return Decision(scores, finish=functools.partial(self.reconstructed, ctx))

    def score_consumed(self, ctx: PassContext, cons: dict[int, list[Consumer]], batches: list[Any],
                       samples: dict[str, tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator) -> Scores:
        """The scores of the groups in ``cons`` (those whose every consumer can be modelled), from the
        calibration ``batches`` and the original model's ``samples`` of every consumer layer."""
        raise NotImplementedError

    def subsample(self, rng: np.random.Generator, n: int) -> np.ndarray | slice:
        """Which of ``n`` rows to keep: all of them, or ``rows`` drawn without replacement."""
        return rng.choice(n, self.rows, replace=False) if n > self.rows else slice(None)

    def solver(self) -> Solver:
        """How a consumer's new tensors are solved from the kept inputs (see :func:`reconstruct`)."""
        raise NotImplementedError

    def score_streamed(self, ctx: PassContext, cons: dict[int, list[Consumer]]) -> Scores:
        """``score_consumed`` on a folder's calibration text, run one decoder layer at a time: each group is scored
        as soon as its consumers' layer has run (its tensors loaded), and their samples let go. A group read by
        layers of several decoder layers (the residual stream, with allow_inexact) keeps its l1 score."""
        sampler = Sampler(sorted({c.layer for cs in cons.values() for c in cs}), self.per_batch, streamed=True)
        rng, pending, scores = np.random.default_rng(self.seed), dict(cons), {}

        def after_layer(prefix: str, layer: nn.Module) -> None:
            ready = {gid: [bound(c, layer, prefix) for c in cs] for gid, cs in pending.items()
                     if all(under(c.layer, prefix) for c in cs)}
            if ready:
                scores.update(self.score_consumed(ctx, ready, [], sampler.samples(), rng))
            for gid in ready:
                del pending[gid]
            for name in [n for n in sampler.got if under(n, prefix)]:
                sampler.got[name] = []

        assert ctx.calibrate is not None
        ctx.calibrate(sampler.hooks(), after_layer=after_layer)
        return scores

    def reconstructed(self, ctx: PassContext, removed: np.ndarray) -> Finish:
        """The consumers of the removed channels, solved again from the kept inputs (the decision's finish)."""
        if ctx.calibrate is not None:
            return Finish(reconstruct_streamed(ctx, removed, self.solver(), self.per_batch))
        return Finish(reconstruct_removed(ctx, removed, self.solver(), self.calibration, self.batches,
                                          self.per_batch))


def bound(c: Consumer, layer: nn.Module, prefix: str) -> Consumer:
    """``c`` with its module taken from ``layer`` (a decoder layer loaded from disk, at ``prefix``)."""
    return dataclasses.replace(c, module=layer.get_submodule(c.layer[len(prefix) + 1:]))


def under(name: str, prefix: str) -> bool:
    """Is module ``name`` inside the module at ``prefix``?"""
    return name.startswith(prefix + ".")


def solve_in_layer(run: Any, ctx: PassContext, removed: np.ndarray, todo: list[Consumer], solve: Solver,
                   per_batch: int, target: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The loop of :func:`reconstruct_into` inside one loaded decoder layer of a folder's rewrite (``run``, a
    ``fxprune.checkpoints.stream.LayerRun``): each consumer in turn, its inputs sampled on the rewritten model's
    hidden states with the consumers before it already solved; the layer's tensors changed in place."""
    state, new = named_tensors(run.root), {}
    for c in todo:
        inputs = Sampler([c.layer], per_batch, streamed=True)
        run.rewritten(inputs.hooks())
        unit, gone = unit_matrix(c, removed, ctx.groups)
        w = state[c.slot.name].detach().double().cpu()
        tensors = solve(dataclasses.replace(c, module=run.root.get_submodule(c.layer)), inputs.samples()[c.layer][0],
                        target[c.layer][1], w, unit, gone)
        with torch.no_grad():
            for name, t in tensors.items():
                state[name].copy_(t.to(state[name].dtype))
        new.update(tensors)
    return new


def reconstruct_streamed(ctx: PassContext, removed: np.ndarray, solve: Solver, per_batch: int) \
        -> Mapping[str, torch.Tensor]:
    """:func:`reconstruct` on a folder, one decoder layer at a time: each layer's removed channels zeroed, then
    its consumers of removed channels solved in graph order, the targets Y from the original model's hidden
    states, the inputs X from the model rewritten so far. The new tensors come back from disk on access."""
    todo = {c.layer: c for gid, cs in consumers(ctx).items() if removed[ctx.groups[gid].channels].any() for c in cs}
    assert ctx.calibrate is not None

    def edit(run: Any) -> dict[str, torch.Tensor]:
        mine = sorted((c for c in todo.values() if under(c.layer, run.prefix)), key=lambda c: c.order)
        target = Sampler([c.layer for c in mine], per_batch, streamed=True)
        if mine:
            run.original(target.hooks())
        mask_(run.root, ctx.groups, removed)  # the loaded layer's removed rows and columns (the rest is on meta)
        return solve_in_layer(run, ctx, removed, mine, solve, per_batch, target.samples())

    return ctx.calibrate.rewrite(edit)
