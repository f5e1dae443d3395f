"""Mixture-of-experts language model folders: routed experts removed by how often the router picks them on
calibration text, or every expert's FFN narrowed by its neurons' activations on the tokens routed to it; streamed
from disk one decoder layer at a time.

    find      per decoder layer, its experts module (transformers' stacked expert tensors: ``gate_up_proj``
              [experts, 2 x width, hidden] and ``down_proj`` [experts, hidden, width]) and its router (the module
              beside it whose weight has one row per expert)
    count     on the calibration text, per layer: how many tokens the router sends to each expert (its top-k
              picks) and the routing weight they carry; per expert neuron, the root mean square over those tokens
              of its activation times the routing weight (the neuron's share of the layer's output)
    choose    ``experts``: per layer the k least picked (``by=frequency``) or least weighted (``by=weight``), k the
              same in every layer (config.json holds one count); ``neurons``: per expert its weakest neurons,
              the same number in every expert (one width); an expert no token reached ranks its neurons by weight
              magnitude
    write     the kept experts renumbered 0..k-1, their tensors sliced, the router's rows of the removed experts
              left out; the expert count or width of config.json rewritten, then checked: the new config builds
              (on meta) exactly the tensors written

Removing an expert equals the original model with that expert's router logit at minus infinity (no token is
sent to it, and the softmax over the others is the one the pruned router computes); removing neurons equals
the original with their rows and columns zeroed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architecture import Fused, written_mismatches
from .calibration import Calibration, TextData
from .folder import Checkpoint, CheckpointError
from .stream import DecoderStream
from .units import kept, removal_count

__all__ = ["UNITS", "RANKINGS", "MoeLayer", "moe_layers", "ExpertStats", "expert_stats", "ExpertPlan",
           "expert_plan", "plan_removal", "ExpertsResult", "drop_experts"]

UNITS = ("experts", "neurons")
RANKINGS = ("frequency", "weight")
EXPERT_COUNT = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # config fields, in order
EXPERT_WIDTH = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
NEURON_DIM = {"gate_up_proj": 1, "up_proj": 1, "down_proj": 2}  # the stacked tensor's dim over an expert's neurons


@dataclass(frozen=True)
class MoeLayer:
    """One decoder layer's routed experts: the module holding their stacked tensors and the router."""

    index: int
    experts: str                       # model path of the experts module
    router: str                        # model path of the router
    count: int                         # experts
    width: int                         # each expert's FFN neurons
    tensors: tuple[str, ...]           # the experts module's parameters (full model names)
    narrows: str                       # "" if its neurons can be removed, else why not


def moe_layers(stream: DecoderStream) -> list[MoeLayer]:
    """The decoder layers with routed experts (a layer with a dense MLP is absent)."""
    out = []
    for i, layer in enumerate(stream.layers):
        prefix = f"{stream.path}.{i}"
        for name, m in layer.named_modules():
            stacked = {k: p for k, p in m.named_parameters(recurse=False) if p.dim() == 3}
            if "down_proj" not in stacked:
                continue
            count = stacked["down_proj"].shape[0]
            router = _router(layer, name, m, count)
            path = f"{prefix}.{name}"
            out.append(MoeLayer(i, path, f"{prefix}.{router}", count, _width(m),
                                tuple(f"{path}.{k}" for k, _ in m.named_parameters(recurse=False)), _narrows(m)))
    return out


def _router(layer: nn.Module, experts: str, module: nn.Module, count: int) -> str:
    """The module beside the experts whose weight has one row per expert (``gate``, ``router``)."""
    parent = experts.rpartition(".")[0]
    found = [name for name, m in layer.named_modules() if m is not module and name.rpartition(".")[0] == parent
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
             and m.weight.shape[0] == count]
    if len(found) != 1:
        raise CheckpointError(f"{experts}: fxprune finds {len(found)} routers beside these experts (a module with one "
                              f"weight row per expert), not one: it cannot remove experts from this architecture")
    return found[0]


def _width(m: nn.Module) -> int:
    down = m.down_proj
    return int(down.shape[1] if getattr(m, "is_transposed", False) else down.shape[2])


def _narrows(m: nn.Module) -> str:
    """Why the experts' neurons cannot be removed here ("" when they can): the layouts understood are
    transformers' default ones (gate and up concatenated, not transposed, no bias, no norm after the expert)."""
    flags = {"is_transposed": False, "has_bias": False, "has_post_expert_norm": False, "is_concatenated": True}
    odd = [k for k, want in flags.items() if getattr(m, k, want) != want]
    params = {k for k, _ in m.named_parameters(recurse=False)}
    if odd:
        return f"its experts are stored with {', '.join(odd)}, a layout fxprune does not narrow"
    if not params <= set(NEURON_DIM):
        return f"its experts hold {', '.join(sorted(params - set(NEURON_DIM)))}, which fxprune does not narrow"
    return ""


@dataclass
class ExpertStats:
    """What the calibration text did in one MoE layer."""

    picks: np.ndarray                  # tokens routed to each expert (its top-k picks)
    weight: np.ndarray                 # the routing weight those tokens carried, summed
    neurons: np.ndarray                # [experts, width]: each neuron's score (see the module's doc)
    by_weights: list[int] = field(default_factory=list)  # experts no token reached: neurons ranked by weights


def expert_stats(stream: DecoderStream, calib: Calibration, layers: list[MoeLayer]) -> dict[int, ExpertStats]:
    """Routing counts and neuron scores per MoE layer, one pass over the calibration text."""
    sums = {m.index: _Sums(m.count, m.width) for m in layers}
    by_path = {m.experts: m for m in layers}

    def hook(layer: MoeLayer) -> Callable:
        def count(module: nn.Module, args: tuple, out: Any) -> None:
            if len(args) < 3:
                raise CheckpointError(f"{layer.experts} is not called as transformers' experts are (hidden states, "
                                      "top-k expert indices, top-k weights): fxprune cannot count its routing")
            sums[layer.index].add(module, *args[:3], neurons=not layer.narrows)
        return count

    def weights(prefix: str, decoder_layer: nn.Module) -> None:  # the fallback score, while the layer is loaded
        for m in layers:
            if m.experts.startswith(prefix + ".") and not m.narrows:
                sums[m.index].magnitude = _magnitude(decoder_layer.get_submodule(m.experts[len(prefix) + 1:]))

    calib({path: hook(m) for path, m in by_path.items()}, after_layer=weights)
    return {i: s.stats() for i, s in sums.items()}


class _Sums:
    def __init__(self, count: int, width: int) -> None:
        self.picks = torch.zeros(count, dtype=torch.float64)
        self.weight = torch.zeros(count, dtype=torch.float64)
        self.squares = torch.zeros(count, width, dtype=torch.float64)
        self.magnitude: torch.Tensor | None = None

    def add(self, m: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            neurons: bool) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index, weights = index.reshape(len(hidden), -1), weights.reshape(len(hidden), -1)
        picked = index[index < len(self.picks)]  # some kernels mark dropped slots with the expert count
        self.picks += torch.bincount(picked, minlength=len(self.picks)).double()
        self.weight.index_add_(0, picked, weights[index < len(self.picks)].double())
        if not neurons:
            return
        for e in picked.unique().tolist():
            token, slot = torch.where(index == e)
            share = _inner(m, hidden[token], e).double() * weights[token, slot, None].double()
            self.squares[e] += (share ** 2).sum(0)

    def stats(self) -> ExpertStats:
        picks = self.picks.numpy()
        neurons = (self.squares / self.picks.clamp(min=1)[:, None]).sqrt().numpy()
        unseen = [int(e) for e in np.flatnonzero(picks == 0)]
        if self.magnitude is not None:
            for e in unseen:
                neurons[e] = self.magnitude[e].numpy()
        return ExpertStats(picks, self.weight.numpy(), neurons, unseen)


def _inner(m: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s neurons on ``x`` (the down projection's input), as transformers' experts compute them."""
    if not hasattr(m, "gate_up_proj"):
        return m.act_fn(nn.functional.linear(x, m.up_proj[e]))
    both = nn.functional.linear(x, m.gate_up_proj[e])
    if hasattr(m, "_apply_gate"):
        return m._apply_gate(both)
    gate, up = both.chunk(2, dim=-1)
    return m.act_fn(gate) * up


def _magnitude(m: nn.Module) -> torch.Tensor:
    """[experts, width]: each neuron's weights, L1 (the gate and up rows and the down column)."""
    up = m.gate_up_proj if hasattr(m, "gate_up_proj") else m.up_proj
    rows = up.abs().sum(-1).double()                               # [experts, (2 x) width]
    if hasattr(m, "gate_up_proj"):
        rows = rows[:, : rows.shape[1] // 2] + rows[:, rows.shape[1] // 2:]
    return rows + m.down_proj.abs().sum(1).double()


# --- the choice -------------------------------------------------------------------------------------------------

# --- the plan ---------------------------------------------------------------------------------------------------

@dataclass
class ExpertPlan:
    """What the pruned folder holds: checkpoint name -> kept indices per dim, the new names (renumbered
    experts; absent: removed), full-size tensors written in place of the checkpoint's, and the config."""

    entries: dict[str, dict[int, list[int]]]
    rename: dict[str, str]
    replaced: dict[str, Callable[[], torch.Tensor]]   # read when written: one tensor in memory at a time
    config: dict
    changed: dict[str, list[int]]      # config field -> [before, after]

    def write(self, ckpt: Checkpoint, folder: Path, shard_bytes: int) -> None:
        """The pruned checkpoint into ``folder`` (``fxprune.checkpoints.write``), one tensor in memory at a time."""
        from .write import write_checkpoint

        write_checkpoint(ckpt, self.entries, folder, self.config, shard_bytes, rename=self.rename,
                         replaced=lambda key: self.replaced[key]() if key in self.replaced else None)


def expert_plan(stream: DecoderStream, layers: list[MoeLayer], kept_experts: dict[int, list[int]],
                kept_neurons: dict[int, list[list[int]]]) -> ExpertPlan:
    """The checkpoint edits of keeping ``kept_experts[layer]`` (every expert when absent) and, per expert
    (its source number), ``kept_neurons[layer][expert]`` (every neuron when absent)."""
    plan = ExpertPlan({}, {key: key for key in stream.ckpt.tensors}, {}, dict(stream.ckpt.config), {})
    for layer in layers:
        experts = kept_experts.get(layer.index, list(range(layer.count)))
        neurons = kept_neurons.get(layer.index)
        for name in layer.tensors:
            _plan_stacked(stream, plan, name, experts, neurons)
        for name, key in stream.names.items():  # the router's rows of the removed experts
            if name.startswith(layer.router + ".") and stream.ckpt.tensors[key].shape[:1] == (layer.count,):
                plan.entries.setdefault(key, {})[0] = experts
    return plan


def _plan_stacked(stream: DecoderStream, plan: ExpertPlan, name: str, experts: list[int],
                  neurons: list[list[int]] | None) -> None:
    """One stacked expert tensor: on disk per expert (renumbered, each sliced) or stacked (sliced; a full-size
    copy with each expert's kept neurons first when they differ between experts)."""
    leaf = name.rpartition(".")[2]
    dim = NEURON_DIM.get(leaf)
    if name in stream.fused:
        fused: Fused = stream.fused[name]
        new_number = {e: i for i, e in enumerate(experts)}
        for s, per in enumerate(fused.keys):
            for e, key in enumerate(per):
                if e not in new_number:
                    del plan.rename[key]
                    continue
                new = new_number[e]
                plan.rename[key] = fused.renumbered(key, s, new)
                if neurons is not None and dim is not None:  # one source holds one half of gate-up
                    plan.entries[key] = {dim - 1: neurons[e]}
        return
    key = stream.names[name]
    entry: dict[int, list[int]] = {0: experts}
    if neurons is not None and dim is not None:
        width = stream.ckpt.tensors[key].shape[dim] // (2 if leaf == "gate_up_proj" else 1)
        entry[dim] = _kept_first_index(len(neurons[0]), width, leaf == "gate_up_proj")
        plan.replaced[key] = lambda: _kept_first(stream, key, experts, neurons, dim, width, leaf == "gate_up_proj")
    plan.entries[key] = entry


def _kept_first(stream: DecoderStream, key: str, experts: list[int], neurons: list[list[int]], dim: int, width: int,
                halves: bool) -> torch.Tensor:
    """A stacked tensor whose kept experts hold their kept neurons first (in each half of a gate-up tensor): the
    slice ``_kept_first_index`` then keeps neurons that differ from expert to expert."""
    t = stream.ckpt.read(key)
    for e in experts:
        keep = set(neurons[e])
        order = neurons[e] + [j for j in range(width) if j not in keep]
        t[e] = t[e].index_select(dim - 1, torch.tensor(order + [width + j for j in order] if halves else order))
    return t


def _kept_first_index(k: int, width: int, halves: bool) -> list[int]:
    return list(range(k)) + (list(range(width, width + k)) if halves else [])


def _rewrite_config(config: dict, fields: tuple[str, ...], before: int, after: int, check: Callable[[dict], list[str]],
                    what: str) -> tuple[dict, str]:
    """``config`` with the first of ``fields`` that holds ``before`` (in it or its text_config) set to ``after``
    such that ``check`` finds nothing wrong; the field's name."""
    tried = []
    for key in fields:
        for where in ([], ["text_config"]):
            holder = config if not where else config.get(where[0])
            if not isinstance(holder, dict) or holder.get(key) != before:
                continue
            new = dict(config)
            if where:
                new[where[0]] = {**holder, key: after}
            else:
                new[key] = after
            problems = check(new)
            if not problems:
                return new, key
            tried.append(f"{key}: {problems[0]}")
    why = f" ({'; '.join(tried)})" if tried else ""
    raise CheckpointError(f"fxprune finds no config.json field that describes {what} {before} -> {after}{why}: it "
                          "cannot prune this architecture's experts")


# --- the run ----------------------------------------------------------------------------------------------------

@dataclass
class ExpertsResult:
    out: Path                          # the folder written
    removed: dict[int, list[int]]      # per MoE layer, the experts removed (their source numbers)
    width: tuple[int, int]             # each expert's neurons before and after
    stats: dict[int, ExpertStats]      # per MoE layer, what the calibration text did
    config: dict                       # the config.json written
    report: dict[str, Any]


def drop_experts(ckpt: Checkpoint, out: Path, the_pass: Any, budget: Any, calib: Calibration, text: TextData,
                 shard_bytes: int | None, force: bool, progress: Callable[[str], None] | None) -> ExpertsResult:
    """``prune_checkpoint`` for the experts pass: count the routing on the calibration text, choose, write
    ``out`` (staged: never half-written), with the perplexity before and after when ``text.eval_text`` is given."""
    from fxprune.artifacts import staging_folder, write_json
    from fxprune.selection.budget import SelectionError

    from .steps import Clock, measure_perplexity, recorded_notes

    with recorded_notes() as notes:
        clock = Clock(progress, ("read", "score", "select", "write"))
        stream = calib.stream
        layers = moe_layers(stream)
        if not layers:
            raise CheckpointError(f"{type(stream.model).__name__} has no routed experts (a module of stacked expert "
                                  "tensors beside a router): the experts pass prunes mixture-of-experts models")
        if the_pass.unit == "neurons" and layers[0].narrows:
            raise CheckpointError(f"{layers[0].experts}: {layers[0].narrows}; remove whole experts instead "
                                  "(--opt unit=experts)")
        clock.lap("read")
        stats = calib.timed(lambda: expert_stats(stream, calib, layers))
        clock.lap("score")
        which, resource = budget.resource
        if resource is not None and which != "params" and not the_pass.count:
            raise SelectionError(f"experts removes whole experts or neurons: give --ratio (the fraction removed), "
                                 f"--opt count=N or --target-params, not a {which} target")
        total = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
        kept_experts, kept_neurons, k, unit_params = _choose(ckpt, stream, layers, stats, the_pass, budget, total,
                                                             resource if which == "params" else None)
        plan = plan_removal(stream, layers, kept_experts, kept_neurons, the_pass.unit)
        clock.lap("select")
        first = layers[0]
        removed = {m.index: [e for e in range(m.count) if e not in kept_experts.get(m.index, range(m.count))]
                   for m in layers}
        width = (first.width, first.width - (k if the_pass.unit == "neurons" else 0))
        report = {"source": str(ckpt.root), "architecture": type(stream.model).__name__, "pass": the_pass.name,
                  "unit": the_pass.unit, "by": the_pass.by, "ratio": budget.ratio,
                  "target": {which: float(resource)} if resource is not None else {},
                  "experts": {"before": first.count, "after": first.count - len(removed[first.index]),
                              "removed": {str(i): r for i, r in removed.items()},
                              "picks": {str(i): s.picks.astype(int).tolist() for i, s in stats.items()}},
                  "expert_width": {"before": width[0], "after": width[1],
                                   "ranked_by_weights": {str(i): s.by_weights for i, s in stats.items()
                                                         if s.by_weights and the_pass.unit == "neurons"}},
                  "moe_layers": [m.index for m in layers],
                  "params": {"before": total, "after": total - k * unit_params},
                  "config_changes": plan.changed, "loadable": True, "calibration": calib.info}
    report["notes"] = notes
    with staging_folder(out, force=force) as tmp:
        plan.write(ckpt, tmp, shard_bytes or ckpt.shard_bytes())
        clock.lap("write")
        report["seconds"] = clock.seconds()
        measure_perplexity(report, ckpt, tmp, text, True)
        write_json(report, tmp / "report.json")
    return ExpertsResult(out.resolve(), removed, width, stats, plan.config, report)


def _choose(ckpt: Checkpoint, stream: DecoderStream, layers: list[MoeLayer], stats: dict[int, ExpertStats],
            the_pass: Any, budget: Any, total: int, target: float | None) \
        -> tuple[dict[int, list[int]], dict[int, list[list[int]]], int, int]:
    """The experts kept per layer and the neurons kept per expert; how many units went, and each one's parameters
    (in every layer together)."""
    shapes = {name: _shape(stream, name) for m in layers for name in m.tensors}
    if the_pass.unit == "experts":
        per = sum(math.prod(shapes[n][1:]) for m in layers for n in m.tensors) + \
            sum(m.count and _router_params(stream, m) // m.count for m in layers)
        k = removal_count(layers[0].count, per, total, count=the_pass.count or None, ratio=budget.ratio,
                          target_params=target, what="experts of a layer")
        top_k = _top_k(stream.config)
        if top_k is not None and layers[0].count - k < top_k:
            raise CheckpointError(f"removing {k} of {layers[0].count} experts leaves fewer than the {top_k} the router "
                                  "picks per token (num_experts_per_tok): remove fewer")
        score = "picks" if the_pass.by == "frequency" else "weight"
        return {m.index: kept(getattr(stats[m.index], score), k) for m in layers}, {}, k, per
    per = sum(math.prod(shapes[n]) // layers[0].width for m in layers for n in m.tensors)
    k = removal_count(layers[0].width, per, total, count=the_pass.count or None, ratio=budget.ratio,
                      target_params=target, what="neurons of an expert")
    neurons = {m.index: [kept(stats[m.index].neurons[e], k) for e in range(m.count)] for m in layers}
    return {}, neurons, k, per


def _shape(stream: DecoderStream, name: str) -> tuple[int, ...]:
    if name in stream.fused:
        f = stream.fused[name]
        one = stream.ckpt.tensors[f.keys[0][0]].shape
        return (f.experts, one[0] * len(f.keys), *one[1:])
    return tuple(stream.ckpt.tensors[stream.names[name]].shape)


def _router_params(stream: DecoderStream, m: MoeLayer) -> int:
    return sum(math.prod(stream.ckpt.tensors[key].shape) for name, key in stream.names.items()
               if name.startswith(m.router + ".") and stream.ckpt.tensors[key].shape[:1] == (m.count,))


def _top_k(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_experts_per_tok", None)


def plan_removal(stream: DecoderStream, layers: list[MoeLayer], kept_experts: dict[int, list[int]],
                 kept_neurons: dict[int, list[list[int]]], unit: str) -> ExpertPlan:
    """``expert_plan`` with config.json's expert count (``unit="experts"``) or expert width (``"neurons"``)
    rewritten, checked against the tensors written."""
    plan = expert_plan(stream, layers, kept_experts, kept_neurons)
    written = {plan.rename[old]: _written_shape(info.shape, plan.entries.get(old))
               for old, info in stream.ckpt.tensors.items() if old in plan.rename}
    def check(cfg: dict) -> list[str]:
        return written_mismatches(type(stream.config).from_dict(cfg), written)
    first = layers[0]
    if unit == "experts":
        before, after, fields, what = first.count, len(kept_experts[first.index]), EXPERT_COUNT, "the expert count"
    else:
        before, after, fields, what = first.width, len(kept_neurons[first.index][0]), EXPERT_WIDTH, "the expert width"
    if after == before:
        return plan
    plan.config, key = _rewrite_config(plan.config, fields, before, after, check, what)
    plan.changed = {key: [before, after]}
    return plan


def _written_shape(shape: tuple[int, ...], entry: dict[int, list[int]] | None) -> tuple[int, ...]:
    return tuple(len(entry[d]) if entry and d in entry else s for d, s in enumerate(shape))

