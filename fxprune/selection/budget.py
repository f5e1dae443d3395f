"""Selection: scores + a budget -> which channels go (a boolean per channel).

Scope "group" removes the same fraction in every group, ranked within the group (Li et al.);
scope "global" ranks all channels against one threshold, after normalising each group's scores
where a method's raw scores are not comparable across layers. Per-layer ratios and protections
match layer names with shell patterns; ``round_to`` makes kept counts multiples of N positions
(heads stay whole: a head is one channel). A MACs or parameter target is reached by binary search
over the ratio (each step counts cost on the graph, without compacting).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxprune.analysis.groups import ChannelGroups, Group

__all__ = ["Selector", "Selection", "select", "select_per_group", "search_budget", "SelectionError", "check_ratio",
           "default_group_width", "GROUP_WIDTH_BY_DEVICE", "resource_target", "Scores"]

Scores = dict[int, np.ndarray]  # group id -> one score per channel (higher = keep): what a pass gives selection

SCOPES = ("group", "global")
NORMALISE = ("mean", "max", "l2", "none")


class SelectionError(ValueError):
    """Scores that do not fit the groups, or a budget that makes no sense."""


def check_ratio(ratio: float, what: str = "ratio") -> float:
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise SelectionError(f"{what} must be in [0, 1) (the fraction of channels removed), got {ratio}")
    return r


@dataclass(frozen=True)
class Selection:
    ratio: float = 0.5
    scope: str = "group"
    ratio_for: Mapping[str, float] = field(default_factory=dict)  # layer-name pattern -> ratio
    protect: Sequence[str] = ()                                   # layer-name patterns never pruned
    min_channels: int = 1
    round_to: int = 1
    normalize: str = "mean"
    min_keep: float = 0.0   # per-group floor: every group keeps at least this fraction of its channels
    # every layer keeps the same count of each kind of group (``fxprune.selection.uniform``): what a Hugging
    # Face config, one width for all layers, can describe
    uniform_across_layers: bool = False
    # what makes a kind for uniform_across_layers and which counts it may keep (``fxprune.selection.uniform.
    # UniformRule``; default: parameter names with layer indices as *, any count); a checkpoint's rule is its
    # config fields (several kinds may share one) and the counts its config class accepts
    uniform_rule: Any = field(default=None, compare=False, repr=False)
    # kept channels of a group that sets a grouped convolution's group width (``Group.grouped_conv``): a multiple of
    # this, a power of two below it, or the whole group. CPU kernels run group widths of 4, 8, 16, 24, 32 up
    # to 3x faster per channel than 5, 6, 12, 20 (``benchmarks/latency_breakdown.py --group-widths``):
    # ``fxprune.prune``'s default is 8 on CPU
    group_width_to: int = 1

    @classmethod
    def for_pass(cls, the_pass: Any, ratio: float, *, scope: str | None = None, min_keep: float | None = None,
                 **given: Any) -> Selection:
        """The selection a pass runs with: its paper defaults (``scope``, ``normalize``, ``min_keep``, class
        attributes of the pass) where the caller gave none. The one place those defaults are read."""
        return cls(ratio=check_ratio(ratio), scope=scope or getattr(the_pass, "scope", "group"),
                   normalize=getattr(the_pass, "normalize", "mean"),
                   min_keep=getattr(the_pass, "min_keep", 0.0) if min_keep is None else min_keep, **given)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for pattern, r in self.ratio_for.items():
            check_ratio(r, f"ratio for {pattern!r}")
        if self.scope not in SCOPES:
            raise SelectionError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.normalize not in NORMALISE:
            raise SelectionError(f"normalize must be one of {NORMALISE}, got {self.normalize!r}")
        if self.min_channels < 1 or self.round_to < 1 or self.group_width_to < 1:
            raise SelectionError("min_channels, round_to and group_width_to must be at least 1")
        if not 0.0 <= self.min_keep <= 1.0:
            raise SelectionError(f"min_keep is the fraction of each group always kept, in [0, 1]; got {self.min_keep}")


def resource_target(**targets: float | None) -> tuple[str, float | None]:
    """The one resource target a run gives (``macs=0.5``, ``params=``, ``latency=``; None: not given): its kind and
    the fraction to keep, or ("macs", None) without one. Two at once, or a fraction outside (0, 1], is an error."""
    given = {k: float(v) for k, v in targets.items() if v is not None}
    if len(given) > 1:
        raise SelectionError(f"give one resource target, not {' and '.join('target_' + k for k in given)}")
    for key, value in given.items():
        if not 0.0 < value <= 1.0:
            raise SelectionError(f"target_{key} is the fraction to keep, in (0, 1]; got {value}")
    return next(iter(given.items()), ("macs", None))


# Selection.group_width_to by the device the model is pruned on (fxprune.prune's default): measured where given
# (``benchmarks/latency_breakdown.py --group-widths``); a device not listed keeps every width (1)
GROUP_WIDTH_BY_DEVICE = {"cpu": 8}


def default_group_width(device: Any) -> int:
    """``group_width_to`` for models on ``device`` (a torch.device or its type)."""
    return GROUP_WIDTH_BY_DEVICE.get(getattr(device, "type", str(device)), 1)


def _layers(group: Group) -> list[str]:
    return [p.name.rsplit(".", 1)[0] for p in group.params]


def _matches(group: Group, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in _layers(group))


def _override(group: Group, sel: Selection) -> float | None:
    return next((r for pattern, r in sel.ratio_for.items() if _matches(group, pattern)), None)


def _protected(group: Group, sel: Selection) -> bool:
    return any(_matches(group, p) for p in sel.protect)


def _keep_count(group: Group, keep: int, sel: Selection) -> int:
    """At least ``min_channels``, ``min_keep`` of the group (and one); positions kept a multiple of
    ``round_to`` where possible, and a grouped convolution's group width a multiple of ``group_width_to``."""
    n = len(group)
    keep = min(n, max(keep, sel.min_channels, math.ceil(sel.min_keep * n - 1e-9), 1))
    width = sel.group_width_to if group.grouped_conv else 1
    while keep < n and ((keep * group.block) % sel.round_to or not _fast_width(keep, width)):
        keep += 1
    return keep


def _fast_width(keep: int, width: int) -> bool:
    """A group width the kernels run well: a multiple of ``width``, or a power of two below it (on CPU, 4 of 8 costs
    as little per channel as 8, and 3, 5, 6 and 7 up to twice as much; in whole networks 2 beats keeping 4)."""
    return keep % width == 0 or (keep < width and keep & (keep - 1) == 0)


def _drop_lowest(s: np.ndarray, keep: int) -> np.ndarray:
    """Mask of channels to drop: the lowest scores (earlier index first among ties); +inf stays, -inf goes."""
    order = np.lexsort((np.arange(len(s)), s))
    order = order[~np.isposinf(s[order])]
    mask = np.zeros(len(s), bool)
    mask[order[: max(len(s) - keep, 0)]] = True
    mask |= np.isneginf(s)
    if mask.all():
        mask[int(np.argmax(s))] = False
    return mask


def _scores_of(group: Group, scores: Scores) -> np.ndarray | None:
    s = scores.get(group.id)
    if s is None:
        return None
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (len(group),):
        raise SelectionError(f"group {group.id}: expected {len(group)} scores, got shape {s.shape}")
    return s


def _normalise(s: np.ndarray, how: str) -> np.ndarray:
    finite = s[np.isfinite(s)]
    if how == "none" or not len(finite):
        return s
    scale = {"mean": np.mean(np.abs(finite)), "max": np.max(np.abs(finite)),
             "l2": np.sqrt(np.sum(finite ** 2))}[how]
    return s / scale if scale > 0 else s


def _global_drops(groups: list[tuple[Group, np.ndarray]], ratio: float, how: str) -> dict[int, int]:
    """How many channels each group loses under one threshold over normalised scores."""
    if not groups:
        return {}
    values = np.concatenate([_normalise(s, how) for _, s in groups])
    owner = np.concatenate([np.full(len(s), g.id) for g, s in groups])
    n_drop = int(math.floor(ratio * len(values) + 1e-9))
    order = np.lexsort((np.arange(len(values)), values))[:n_drop]
    counts = np.bincount(owner[order], minlength=max(g.id for g, _ in groups) + 1)
    return {g.id: int(counts[g.id]) for g, _ in groups}


def select(groups: ChannelGroups, scores: Scores, sel: Selection) -> np.ndarray:
    """Which channels go (bool per channel component of ``groups``)."""
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    pool: list[tuple[Group, np.ndarray]] = []
    plan: dict[int, tuple[Group, np.ndarray, int]] = {}
    for group in groups.prunable:
        s = _scores_of(group, scores)
        if s is None or _protected(group, sel):
            continue
        r = _override(group, sel)
        if r is None and sel.scope == "global":
            pool.append((group, s))
            continue
        r = sel.ratio if r is None else r
        plan[group.id] = (group, s, len(group) - int(math.floor(r * len(group) + 1e-9)))
    for gid, n_drop in _global_drops(pool, sel.ratio, sel.normalize).items():
        group, s = next((g, s) for g, s in pool if g.id == gid)
        plan[gid] = (group, s, len(group) - n_drop)
    keeps = {gid: _keep_count(group, keep, sel) for gid, (group, _, keep) in plan.items()}
    if sel.uniform_across_layers:
        from .uniform import uniform_keeps

        keeps = uniform_keeps(groups, keeps, lambda g, k: _keep_count(g, k, sel), sel.uniform_rule)
    for gid, keep in keeps.items():
        group, s, _ = plan[gid]
        removed[group.channels[_drop_lowest(s, keep)]] = True
    return removed


def select_per_group(groups: ChannelGroups, scores: Scores, ratio: float) -> np.ndarray:
    """The same fraction in every prunable group (Li et al.): ``select`` with the defaults."""
    return select(groups, scores, Selection(ratio=ratio))


def search_budget(groups: ChannelGroups, scores: Scores, sel: Selection, cost: Callable[[np.ndarray], float],
                  target: float, tolerance: float = 0.01, steps: int = 40) -> tuple[np.ndarray, Selection]:
    """Binary search on the ratio until ``cost(removed)`` (a kept fraction, 1.0 = full model) is within
    ``tolerance`` of ``target``; returns the closest selection at or under the target if none is (warning)."""
    removed, found, shortfall = _search(groups, scores, sel, cost, target, tolerance, steps)
    if shortfall:
        warnings.warn(shortfall, stacklevel=2)
    return removed, found


def _search(groups: ChannelGroups, scores: Scores, sel: Selection, cost: Callable[[np.ndarray], float],
            target: float, tolerance: float, steps: int = 40) -> tuple[np.ndarray, Selection, str | None]:
    """``search_budget``'s search: the removal, the selection found, and why it misses the target (None if it
    does not)."""
    if not 0.0 < target <= 1.0:
        raise SelectionError(f"a resource target is the fraction to keep, in (0, 1], got {target}")
    lo, hi = 0.0, 0.999
    best: tuple[np.ndarray, Selection, float] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        trial = dataclasses.replace(sel, ratio=mid)
        removed = select(groups, scores, trial)
        kept = cost(removed)
        if kept <= target + tolerance and (best is None or abs(kept - target) < abs(best[2] - target)):
            best = (removed, trial, kept)
        if abs(kept - target) <= tolerance and kept <= target + tolerance:
            return removed, trial, None
        if kept > target:
            lo = mid
        else:
            hi = mid
    if best is None:
        trial = dataclasses.replace(sel, ratio=0.999)
        removed = select(groups, scores, trial)
        return removed, trial, (f"fxprune: cannot reach a kept fraction of {target:.3f}; the smallest reachable is "
                                f"{cost(removed):.3f} (frozen groups, min_channels or round_to bound it)")
    return best[0], best[1], (f"fxprune: the closest kept fraction to {target:.3f} at or under it is {best[2]:.3f}: "
                              "the budget moves in steps here (few groups, round_to, group_width_to, or per-group "
                              "scope); scope='global' is finer")


@dataclass
class Selector:
    """The selection a run applies: a ratio budget (``select``) or a MACs/parameter target (binary search)."""

    groups: ChannelGroups
    sel: Selection
    counter: Any          # fxprune.selection.cost.CostCounter: the cost of a removal
    before: Any           # its Cost of the full model
    which: str                 # "macs" or "params": what a target is a fraction of
    target: float | None
    tolerance: float

    def __call__(self, scores: dict[int, np.ndarray]) -> tuple[np.ndarray, Selection]:
        if self.target is None:
            return select(self.groups, scores, self.sel), self.sel
        full = max(getattr(self.before, self.which), 1)
        kept = lambda rem: getattr(self.counter(rem), self.which) / full  # noqa: E731
        target = float(self.target)
        removed, sel, shortfall = _search(self.groups, scores, self.sel, kept, target, self.tolerance)
        if self.sel.group_width_to > 1 and self.which != "latency" and kept(removed) < target - 2 * self.tolerance \
                and any(g.grouped_conv for g in self.groups.prunable):
            # rounded group widths move the budget in steps too large for it (a RegNet's grouped convolutions
            # hold most of its MACs: 16 or 8 wide, nothing between): widths as the target needs them. Not for a
            # latency target: faster than asked is within its promise, and the widths between run slowly
            relaxed = _search(self.groups, scores, dataclasses.replace(self.sel, group_width_to=1), kept, target,
                              self.tolerance)
            if abs(kept(relaxed[0]) - target) < abs(kept(removed) - target):
                warnings.warn(f"fxprune: group widths rounded to {self.sel.group_width_to} reach only "
                              f"{kept(removed):.3f} of the {self.which} for a target of {target:.3f}; grouped "
                              f"convolutions keep the widths the target needs ({kept(relaxed[0]):.3f}), which CPU "
                              "kernels run slower per channel (--scope global reaches the target with rounded widths)",
                              stacklevel=2)
                removed, sel, shortfall = relaxed
        if shortfall:
            warnings.warn(shortfall, stacklevel=2)
        return removed, sel

    def removal(self, scores: dict[int, np.ndarray]) -> np.ndarray:
        """What the budget would remove under ``scores`` (for passes that train toward the selection);
        the target search's warnings are left to the final selection."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self(scores)[0]
