"""The pruned widths as ``config.json`` fields, and the check that the rewritten config describes exactly the
tensors written (the folder loads with ``from_pretrained``).

A Hugging Face config holds one width per kind of layer (``fxprune.selection.uniform``). Which field a kind is
follows from the sizes, read against the table :data:`WIDTH_KEYS`: a kind of head groups (channels of several
positions) is ``num_attention_heads`` / ``num_key_value_heads`` (a channel is a key/value group with its query
heads under grouped-query attention), a per-layer kind as wide as ``intermediate_size`` is the MLP, the one
group as wide as ``hidden_size`` is the residual stream. ``head_dim`` is written explicitly whenever heads
change: most families derive it as ``hidden_size / num_attention_heads`` otherwise.

Nothing here is trusted: the rewritten config builds the architecture on the meta device and every tensor's
shape must equal what the plan writes (:func:`mismatches`). :func:`freeze_unexpressible` runs that check
before selection with half the channels gone from every group of a kind, and freezes the kinds no config
field can express (GPT-2's and BERT's heads: their head size is always ``hidden / heads``), saying why.
:class:`ConfigRule` tells selection which kinds share a field and which counts the config class accepts.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.analysis.reindex import Reindexing
from fxprune.compaction.plan import Plan, add_aliases, build_plan
from fxprune.selection.uniform import Kind, kinds, layer_kind, pattern
from fxprune.state import named_tensors

__all__ = ["WIDTH_KEYS", "ConfigWidths", "ConfigRule", "layer_widths", "freeze_unexpressible", "mismatches",
           "planned_shapes"]

# what each kind of width is called in the config families transformers defines, first match wins
WIDTH_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "mlp": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim", "ffn_hidden_size"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
    "head_dim": ("head_dim", "d_kv"),
}


def _key(config: dict, role: str) -> str | None:
    return next((k for k in WIDTH_KEYS[role] if k in config), None)


def _value(config: dict, role: str) -> int | None:
    key = _key(config, role)
    if key is None:
        return None
    v = config[key]
    if v is None and key in ("n_inner", "ffn_hidden_size"):  # GPT-2, Falcon: None means 4 * hidden
        hidden = _value(config, "hidden")
        return 4 * hidden if hidden else None
    return v if isinstance(v, int) else None


def layer_widths(groups: ChannelGroups, removed: np.ndarray) -> dict[Kind, list[int]]:
    """Channels kept per group, for each kind of group, in layer order."""
    return {kind: [int((~removed[g.channels]).sum()) for g in members] for kind, members in kinds(groups).items()}


class ConfigWidths:
    """Which config field each kind of group is (``role_of``), and the config with new widths (``rewrite``)."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.heads = _value(config, "heads")
        self.kv_heads = _value(config, "kv_heads") or self.heads
        hidden = _value(config, "hidden")
        self.head_dim = _value(config, "head_dim") or (hidden // self.heads if hidden and self.heads else None)

    def role_of(self, kind: Kind, members: list[Group]) -> str | None:
        _, n, block = kind
        per_layer = all("*" in p for p in kind[0])  # every tensor inside a numbered layer
        if block > 1 and per_layer and n in (self.kv_heads, self.heads):
            return "heads"
        if per_layer and n == _value(self.config, "mlp"):  # block 2: a fused gate_up projection (Phi-3)
            return "mlp"
        if block == 1 and not per_layer and len(members) == 1 and n == _value(self.config, "hidden"):
            return "hidden"
        return None

    def rewrite(self, widths: dict[str, int]) -> dict:
        """The config with ``widths`` (role -> channels kept: heads in key/value groups under GQA)."""
        out = dict(self.config)
        if "heads" in widths:
            kept = widths["heads"]
            per_kv = self.heads // self.kv_heads
            out[_key(out, "heads")] = kept * per_kv
            if _key(out, "kv_heads"):
                out[_key(out, "kv_heads")] = kept
        if ("heads" in widths or "hidden" in widths) and self.head_dim:
            out[_key(out, "head_dim") or "head_dim"] = self.head_dim
        if "mlp" in widths:
            out[_key(out, "mlp")] = widths["mlp"]
        if "hidden" in widths:
            out[_key(out, "hidden")] = widths["hidden"]
        return out

    def roles(self, groups: ChannelGroups) -> dict[int, str]:
        """Group id -> the config field role of its kind, for the groups whose kind has one."""
        out: dict[int, str] = {}
        for kind, members in kinds(groups).items():
            role = self.role_of(kind, members)
            if role is not None:
                out.update({g.id: role for g in members})
        return out

    def rule(self, groups: ChannelGroups, valid: Callable[[dict], bool]) -> ConfigRule:
        """The selection's uniform rule for ``groups``: kinds by config field, counts that ``valid`` accepts."""
        return ConfigRule(self, self.roles(groups), valid)

    def for_removal(self, groups: ChannelGroups, removed: np.ndarray) -> tuple[dict | None, str]:
        """The config that describes ``removed``, or None and why not (widths differ across layers, or a kind
        that shrank has no config field)."""
        widths: dict[str, int] = {}
        for key, members in kinds(groups, self.rule(groups, lambda c: True).key).items():
            kept = {int((~removed[g.channels]).sum()) for g in members}
            if kept == {len(members[0])}:
                continue
            name = pattern(members[0].params[0].name)
            if not isinstance(key, str):
                return None, f"no config.json field holds the width of {name} ({len(members[0])} channels)"
            if len(kept) > 1:
                return None, f"{name} keeps {min(kept)} to {max(kept)} channels across layers, and config.json " \
                             f"holds one width ({_key(self.config, key)}) for all of them"
            widths[key] = kept.pop()
        return self.rewrite(widths), ""


class ConfigRule:
    """Uniform widths for a checkpoint: one kind per config field (T5's encoder and decoder MLPs share ``d_ff``,
    every attention shares ``num_heads``), else the layer kind; a kept count is allowed when the config class
    accepts the rewritten config (LLaMA's: the hidden size a multiple of the heads)."""

    def __init__(self, widths: ConfigWidths, roles: dict[int, str], valid: Callable[[dict], bool]) -> None:
        self.widths, self.roles, self.valid = widths, roles, valid
        self._seen: dict[tuple[str, int], bool] = {}

    def key(self, group: Group) -> Hashable:
        return self.roles.get(group.id) or layer_kind(group)

    def allowed(self, key: Hashable, count: int) -> bool:
        if not isinstance(key, str):
            return True
        if (key, count) not in self._seen:
            self._seen[key, count] = self.valid(self.widths.rewrite({key: count}))
        return self._seen[key, count]


def planned_shapes(gm: fx.GraphModule, groups: ChannelGroups, removed: np.ndarray, model: nn.Module,
                   names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> tuple[Plan, dict[str, tuple]]:
    """The plan of ``removed`` and the shape every checkpoint tensor gets under it (checkpoint names)."""
    plan = add_aliases(build_plan(gm, Reindexing(groups, removed)), model)
    out = dict(shapes)
    for model_name, ckpt_name in names.items():
        entry = plan.get(model_name)
        if entry:
            out[ckpt_name] = tuple(len(entry[d]) if d in entry else s for d, s in enumerate(shapes[ckpt_name]))
    return plan, out


def mismatches(config: dict, build: Callable[[dict], nn.Module], names: dict[str, str],
               shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How the architecture ``config`` describes differs from the tensors to be written (empty: it loads)."""
    try:
        model = build(config)
    except Exception as exc:  # noqa: BLE001 - the family's own check (e.g. heads must divide hidden)
        return [f"transformers cannot build it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    state = named_tensors(model)
    problems = []
    for model_name, ckpt_name in names.items():
        t = state.get(model_name)
        if t is None:
            problems.append(f"{ckpt_name}: the rebuilt architecture has no {model_name}")
        elif tuple(t.shape) != tuple(shapes[ckpt_name]):
            problems.append(f"{ckpt_name}: written {tuple(shapes[ckpt_name])}, config.json describes {tuple(t.shape)}")
    return problems


def freeze_unexpressible(gm: fx.GraphModule, groups: ChannelGroups, model: nn.Module, names: dict[str, str],
                         shapes: dict[str, tuple[int, ...]], widths: ConfigWidths,
                         build: Callable[[dict], nn.Module]) -> dict[str, str]:
    """Freeze every kind of group whose narrower width no config field can describe: with half the channels
    of each of its groups gone (and the others whole), the rewritten config must rebuild to exactly the
    planned shapes. Returns {kind (its first tensor's name pattern): why} for the kinds frozen."""
    frozen: dict[str, str] = {}
    for key, members in kinds(groups, widths.rule(groups, lambda c: True).key).items():
        n = len(members[0])
        if not all(g.prunable for g in members) or n < 2:
            continue
        name = pattern(members[0].params[0].name)
        if not isinstance(key, str):
            why = f"config.json has no field for the width of {name} ({n} channels)"
        else:
            removed = np.zeros(len(groups.comp_group), dtype=bool)
            for g in members:
                removed[g.channels[n - n // 2:]] = True
            _, planned = planned_shapes(gm, groups, removed, model, names, shapes)
            problems = mismatches(widths.rewrite({key: n - n // 2}), build, names, planned)
            why = "" if not problems else (f"config.json cannot express a narrower {_key(widths.config, key)} "
                                           f"here ({problems[0]}{'; ...' if len(problems) > 1 else ''})")
        if why:
            frozen[name] = why
            for g in members:
                g.frozen = f"{why}: kept whole so that from_pretrained loads the result (uniform_across_layers)"
    return frozen
