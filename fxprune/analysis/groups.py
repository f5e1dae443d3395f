"""Channels and channel groups: the connected components of the coupling relation, and their table.

A *channel* is one connected component of linked elements: the smallest set of positions (across
every tensor and parameter it touches) that can be removed on its own. A *group* is the set of
channels that touch exactly the same slots: e.g. the 64 channels of a residual stream, or the 12
heads of one attention layer. Scoring passes score the channels of a group; selection removes some.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .couple import Coupler
from .slots import SlotKey, SlotTable

__all__ = ["Group", "ChannelGroups"]


@dataclass(frozen=True)
class ParamSlot:
    """One axis of one parameter or buffer that a group shrinks."""

    name: str        # parameter/buffer name in the original model (get_attr target)
    axis: int
    role: str        # producer / consumer / norm / other
    key: SlotKey


@dataclass
class Group:
    id: int
    channels: np.ndarray                 # component ids, in position order
    params: list[ParamSlot]
    frozen: str | None = None            # why it cannot shrink (None = prunable)
    inexact: str | None = None           # why zeroing is not equivalent to removal (None = exact)
    block: int = 1                       # positions per channel on its widest parameter slot (head size...)
    nodes: list[str] = field(default_factory=list)
    # its channels are positions inside every group of a grouped (not depthwise) convolution: their count is that
    # convolution's group width, which CPU kernels run fast only at some values (Selection.group_width_to)
    grouped_conv: bool = False

    def __len__(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return self.frozen is None

    def layers(self, role: str) -> list[str]:
        return sorted({_module_of(p.name) for p in self.params if p.role == role})


def _grouped_conv_weights(gm: fx.GraphModule) -> set[str]:
    """Weights (get_attr targets) of the graph's grouped convolutions that are not depthwise: more than one
    input channel per group."""
    from .rules.layers import conv_layout

    out: set[str] = set()
    for n in gm.graph.nodes:
        w, groups = conv_layout(n) or (None, 1)
        val = w.meta.get("val") if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if groups > 1 and val is not None and val.shape[1] > 1:
            out.add(str(w.target))
    return out


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class ChannelGroups:
    """All channel groups of a traced graph. Iterate it, index it, or print it as a table."""

    def __init__(self, gm: fx.GraphModule, coupler: Coupler, labels: np.ndarray, allow_inexact: bool) -> None:
        self.gm = gm
        self.table: SlotTable = coupler.table
        self.coupler = coupler
        self.labels = labels
        self.allow_inexact = allow_inexact
        self.unsupported = dict(coupler.unsupported)
        self.groups: list[Group] = []
        ncomp = int(labels.max()) + 1 if len(labels) else 0
        self.comp_group = np.full(ncomp, -1, dtype=np.int64)
        self.comp_pos = np.zeros(ncomp, dtype=np.int64)
        self._build(ncomp)

    # ---- construction ------------------------------------------------------------------
    def _slot_flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        t, coupler = self.table, self.coupler
        nslots = len(t.keys)
        frozen, inexact, param, role = (np.zeros(nslots, bool) for _ in range(4))
        attrs = {n.name for n in self.gm.graph.nodes if n.op == "get_attr"}
        for i, key in enumerate(t.keys):
            frozen[i] = key in coupler.frozen or t.symbolic[i]
            inexact[i] = key in coupler.inexact
            param[i] = key[0] in attrs
            role[i] = key in coupler.roles
        return frozen, inexact, param, role

    def _build(self, ncomp: int) -> None:
        t, coupler, labels = self.table, self.coupler, self.labels
        slot_of = t.slot_of_elements()
        frozen_s, inexact_s, param_s, role_s = self._slot_flags()
        frozen_el = frozen_s[slot_of]
        for ids, _ in coupler.frozen_elements:
            frozen_el[ids] = True
        comp_frozen = _any_per_component(labels, frozen_el, ncomp)
        del frozen_el
        comp_inexact, comp_param, comp_role = (_any_per_component(labels, flag[slot_of], ncomp)
                                               for flag in (inexact_s, param_s, role_s))
        # Signature of a component = the set of slots it touches (hashed), so parallel channels group.
        nkeys = len(t.keys)
        pairs = labels.astype(np.int64) * nkeys + slot_of
        del slot_of
        pairs.sort()  # sort + dedupe beats np.unique's hashing here
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
        pl, ps = np.divmod(pairs, nkeys)
        del pairs
        rng = np.random.default_rng(0)
        slot_hash = rng.integers(1, 2**62, size=nkeys, dtype=np.int64).astype(np.uint64)
        sig = np.zeros(ncomp, dtype=np.uint64)
        np.add.at(sig, pl, slot_hash[ps])
        # Shown: channels with parameters; frozen ones only where they are channel axes of a layer
        # (not kernel positions or vocabulary rows).
        interesting = comp_param & (~comp_frozen | comp_role)
        first_el = np.full(ncomp, t.total, dtype=np.int64)
        np.minimum.at(first_el, labels, np.arange(t.total, dtype=labels.dtype))
        comps = np.nonzero(interesting)[0]
        comps = comps[np.argsort(first_el[comps], kind="stable")]
        by_sig: dict[int, list[int]] = {}
        for c in comps.tolist():
            by_sig.setdefault(int(sig[c]), []).append(c)
        slot_lists = _slots_per_component(pl, ps, [m[0] for m in by_sig.values()])
        attrs = {n.name: n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        grouped = _grouped_conv_weights(self.gm)
        for members in by_sig.values():
            arr = np.asarray(members, dtype=np.int64)
            gid = len(self.groups)
            self.comp_group[arr] = gid
            self.comp_pos[arr] = np.arange(len(arr))
            slots = [t.keys[s] for s in slot_lists[members[0]]]
            params = [ParamSlot(attrs[k[0]], k[2], coupler.roles.get(k, "other"), k) for k in slots if k[0] in attrs]
            params = _dedupe_params(params)
            group = Group(gid, arr, params, nodes=sorted({k[0] for k in slots if k[0] not in attrs}))
            group.frozen = self._frozen_reason(slots, members) if comp_frozen[arr].any() else None
            group.inexact = (next((coupler.inexact[k] for k in slots if k in coupler.inexact), None)
                             if comp_inexact[arr].any() else None)
            if group.frozen is None and not any(p.role != "other" for p in params):
                group.frozen = "no layer produces or consumes these positions"
            if group.frozen is None and group.inexact is not None and not self.allow_inexact:
                group.frozen = f"inexact ({group.inexact}); pass allow_inexact=True to prune it"
            group.grouped_conv = any(p.name in grouped for p in params)
            group.block = max((int(np.sum(labels[t.offsets[t.index[p.key]]:t.offsets[t.index[p.key]] + t.size(p.key)]
                                          == members[0]))
                               for p in params), default=1)
            self.groups.append(group)

    def _frozen_reason(self, slots: list[SlotKey], members: list[int]) -> str:
        coupler = self.coupler
        for k in slots:
            if k in coupler.frozen:
                return f"{coupler.frozen[k]} ({k[0]})"
            if self.table.symbolic[self.table.index[k]]:
                return f"symbolic size ({k[0]})"
        for ids, reason in coupler.frozen_elements:
            if np.isin(self.labels[ids], members).any():
                return reason
        return "frozen"

    def node_axes(self) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
        """Each node's groups per (output, axis): what ``analyze`` writes onto the graph
        (``fxprune.annotations.write_groups``); a concat's axis carries several."""
        t = self.table
        group = self.comp_group.astype(np.int32)[self.labels]  # group ids are few: int32 halves this array
        sized = np.flatnonzero(np.asarray(t.sizes) > 0)
        starts = np.asarray(t.offsets, dtype=np.int64)[sized]
        # per slot, its lowest and highest group: one pass over the elements; only a slot carrying several
        # groups (a concat's axis) is looked at element by element. Seen as unsigned, "no group" (-1) is the
        # largest value, so the lowest skips it without a masked copy.
        lowest = np.minimum.reduceat(group.view(np.uint32), starts).astype(np.int64)
        highest = np.maximum.reduceat(group, starts)
        axes: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {}
        for i, lo, hi in zip(sized.tolist(), lowest.tolist(), highest.tolist()):
            if hi < 0:
                continue
            if lo == hi:
                ids: tuple[int, ...] = (lo,)
            else:
                values = group[t.offsets[i]:t.offsets[i] + t.sizes[i]]
                ids = tuple(int(g) for g in np.unique(values[values >= 0]))
            name, k, a = t.keys[i]
            axes.setdefault(name, {})[(k, a)] = ids
        return axes

    def frozen_reasons(self) -> dict[int, str]:
        """Why each frozen group cannot shrink, by group id."""
        return {g.id: g.frozen for g in self.groups if g.frozen}

    # ---- queries -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> Group:
        return self.groups[i]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def positions(self, key: SlotKey) -> np.ndarray:
        """For each index of slot ``key``: (group id, channel position); -1 where no group."""
        i = self.table.index[key]
        comp = self.labels[self.table.offsets[i]:self.table.offsets[i] + self.table.sizes[i]]
        return np.stack([self.comp_group[comp], self.comp_pos[comp]])

    def groups_near(self, node_name: str) -> set[int]:
        """Ids of the groups that touch a node's outputs or inputs (to back off from a failing rewrite)."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        names = {node_name} | ({a.name for a in nodes[node_name].all_input_nodes} if node_name in nodes else set())
        found: set[int] = set()
        for key, i in self.table.index.items():
            if key[0] in names:
                comp = self.labels[self.table.offsets[i]:self.table.offsets[i] + self.table.sizes[i]]
                found.update(int(g) for g in np.unique(self.comp_group[comp]) if g >= 0)
        return found

    def channel_sum(self, group: Group, p: ParamSlot, per_index: np.ndarray) -> np.ndarray:
        """Sum ``per_index`` (one value per index of p's axis) into one value per channel of ``group``."""
        gid, pos = self.positions(p.key)
        mask = gid == group.id
        return np.bincount(pos[mask], weights=np.asarray(per_index, dtype=np.float64)[mask], minlength=len(group))

    def rows(self) -> list[dict]:
        """One dict per group, for tables and JSON reports."""
        out = []
        for g in self.groups:
            out.append({
                "group": g.id, "channels": len(g), "block": g.block,
                "producers": g.layers("producer"), "consumers": g.layers("consumer"), "norms": g.layers("norm"),
                "status": "prunable" if g.prunable else "frozen",
                "why": g.frozen or "", "exact": g.inexact is None, "inexact_reason": g.inexact or "",
            })
        return out

    def __str__(self) -> str:
        rows = self.rows()
        head = f"{len(rows)} channel groups, {sum(r['status'] == 'prunable' for r in rows)} prunable"
        lines = [head, f"{'id':>4} {'size':>6} {'status':<9} {'producers':<40} {'consumers':<40} note"]
        for r in rows:
            size = f"{r['channels']}x{r['block']}" if r["block"] > 1 else str(r["channels"])
            note = r["why"] or ("" if r["exact"] else f"inexact: {r['inexact_reason']}")
            lines.append(f"{r['group']:>4} {size:>6} {r['status']:<9} {_short(r['producers']):<40} "
                         f"{_short(r['consumers']):<40} {note}")
        if self.unsupported:
            lines.append("ops without a rule (their channels are frozen): " + ", ".join(sorted(self.unsupported)))
        return "\n".join(lines)

    __repr__ = __str__


def _any_per_component(labels: np.ndarray, flag: np.ndarray, ncomp: int) -> np.ndarray:
    """Per component: does any of its elements have ``flag``?"""
    out = np.zeros(ncomp, dtype=bool)
    out[labels[flag]] = True
    return out


def _short(names: list[str], width: int = 40) -> str:
    s = ", ".join(names) if names else "-"
    return s if len(s) <= width else s[: width - 3] + "..."


def _slots_per_component(pl: np.ndarray, ps: np.ndarray, wanted: list[int]) -> dict[int, list[int]]:
    """Slots touched by each wanted component (pl is sorted: pairs come from np.unique)."""
    w = np.asarray(wanted, dtype=np.int64)
    starts = np.searchsorted(pl, w, side="left")
    ends = np.searchsorted(pl, w, side="right")
    return {int(c): ps[s:e].tolist() for c, s, e in zip(w, starts, ends)}


def _dedupe_params(params: list[ParamSlot]) -> list[ParamSlot]:
    seen: dict[tuple[str, int], ParamSlot] = {}
    for p in params:
        cur = seen.get((p.name, p.axis))
        if cur is None or (cur.role == "other" and p.role != "other"):
            seen[(p.name, p.axis)] = p
    return list(seen.values())
