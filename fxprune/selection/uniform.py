"""One width per kind of layer: the selection constraint ``uniform_across_layers``.

A Hugging Face config describes one width for all layers (``intermediate_size``, ``num_attention_heads``...),
so a checkpoint that ``from_pretrained`` loads keeps the same channel count of a kind in every layer. A group's
*kind* is its parameters' names with the layer index written ``*`` (``model.layers.*.mlp.gate_proj.weight``),
its channel count and its block (head size): the MLP groups of all layers are one kind, the head groups
another. Selection decides a kept count per group as usual, then every group of a kind keeps the kind's mean
(each group still keeps its own best-scoring channels). A kind that is frozen or protected in any layer is
kept whole in every layer: a single narrower layer would already not fit the config.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from fxprune.analysis.groups import ChannelGroups, Group

__all__ = ["layer_kind", "kinds", "uniform_keeps", "pattern", "UniformRule", "LayerKinds"]

_LAYER_INDEX = re.compile(r"(^|\.)\d+(?=\.|$)")

Kind = tuple[tuple[str, ...], int, int]


def pattern(name: str) -> str:
    """A parameter name with its layer indices written ``*``: ``model.layers.*.mlp.up_proj.weight``."""
    return _LAYER_INDEX.sub(r"\1*", name)


def layer_kind(group: Group) -> Kind:
    return tuple(sorted({pattern(p.name) for p in group.params})), len(group), group.block


def kinds(groups: Iterable[Group], key: Callable[[Group], Hashable] = layer_kind) -> dict[Hashable, list[Group]]:
    """Groups by kind, every group of the model (frozen ones too: they hold their kind whole). ``key``: what
    makes a kind (default :func:`layer_kind`; a checkpoint's config field, where several kinds share one)."""
    out: dict[Hashable, list[Group]] = {}
    for g in groups:
        out.setdefault(key(g), []).append(g)
    return out


class UniformRule(Protocol):
    """What makes a kind (``key``), and which kept counts a kind may have (``allowed``)."""

    def key(self, group: Group) -> Hashable: ...

    def allowed(self, key: Hashable, count: int) -> bool: ...


class LayerKinds:
    """The default rule: kinds by :func:`layer_kind`, any count allowed."""

    @staticmethod
    def key(group: Group) -> Hashable:
        return layer_kind(group)

    @staticmethod
    def allowed(key: Hashable, count: int) -> bool:
        return True


def uniform_keeps(groups: ChannelGroups, keeps: dict[int, int], fit: Callable[[Group, int], int],
                  rule: UniformRule | None = None) -> dict[int, int]:
    """``keeps`` (group id -> channels kept, for the groups the selection prunes) made equal within each kind:
    the kind's mean, rounded, passed through ``fit`` (min_channels, round_to) and raised to the next count the
    rule allows (a checkpoint's config: heads that divide the hidden size); a kind with a member the
    selection does not prune (frozen, protected, unscored) keeps every member whole (dropped from the result)."""
    rule = rule or LayerKinds()
    out: dict[int, int] = {}
    for kind, members in kinds(groups, rule.key).items():
        chosen = [g for g in members if g.id in keeps]
        if not chosen:
            continue
        held = [g for g in members if g.id not in keeps]
        if held:
            if any(keeps[g.id] < len(g) for g in chosen):
                why = held[0].frozen or "protected or not scored"
                warnings.warn(f"fxprune: uniform_across_layers keeps {pattern(members[0].params[0].name)} "
                              f"({len(members)} layers) whole: "
                              f"{held[0].params[0].name} cannot shrink ({why})", stacklevel=3)
            continue
        keep = fit(chosen[0], round(sum(keeps[g.id] for g in chosen) / len(chosen)))
        while keep < len(chosen[0]) and not rule.allowed(kind, keep):
            keep += 1
        for g in chosen:
            out[g.id] = keep
    return out
