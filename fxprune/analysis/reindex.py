"""What a selection means for every slot: kept indices and new sizes (read by rewrites and the plan).

A selection is a number of copies per channel: 0 (removed) or 1 (kept) when pruning; widening
(Pruning from Scratch's ``expand``) gives some channels 2 or more. A slot's index list then repeats
each RUN of consecutive positions of one channel as a block (a head of 8 positions duplicated is
``0..7, 0..7``, not ``0, 0, 1, 1, ...``), in the original order: that is what keeps a flat axis and
its reshaped (heads, dim) form consistent, and concat blocks and split ranges contiguous. Every
rewrite (sizes, slice bounds, group counts) is the same code for shrinking and growing."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .couple import TensorRef
from .groups import ChannelGroups
from .slots import SlotKey

__all__ = ["Reindexing"]


def _repeat_runs(labels: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Indices 0..n-1 with every run of equal labels repeated ``count`` times as a block."""
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    lengths = np.diff(np.r_[starts, len(labels)])
    sizes = lengths * count[starts]
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(starts, sizes) + (np.arange(int(sizes.sum())) - first) % np.repeat(lengths, sizes)


class Reindexing:
    """A selection (copies per channel) read per slot of the original graph: the original positions the
    new tensor holds along that axis, in order (a removed position absent, a widened one repeated), and
    so every tensor's new shape. Compaction and widening both build one; the rewrites read it."""

    def __init__(self, groups: ChannelGroups, removed: np.ndarray | None = None, *,
                 copies: np.ndarray | None = None) -> None:
        if (removed is None) == (copies is None):
            raise ValueError("give removed (a bool per channel) or copies (a count per channel), not both")
        self.groups = groups
        self.table = groups.table
        self.copies = (~np.asarray(removed, dtype=bool)).astype(np.int64) if copies is None \
            else np.asarray(copies, dtype=np.int64)
        self._kept: dict[SlotKey, np.ndarray | None] = {}

    def _key(self, ref: TensorRef | Any, axis: int) -> SlotKey:
        return (ref.node.name, ref.k, axis % max(self.old_ndim(ref), 1))

    def kept_slot(self, key: SlotKey) -> np.ndarray | None:
        """Kept indices of one slot (a position repeated once per copy), or None when it is unchanged."""
        if key not in self._kept:
            t = self.table
            i = t.index.get(key)
            if i is None or not self._changed_per_slot[i]:
                self._kept[key] = None
            else:
                labels = self.groups.labels[t.offsets[i]:t.offsets[i] + t.sizes[i]]
                count = self.copies[labels]
                if count.max() <= 1:  # pruning
                    self._kept[key] = np.flatnonzero(count)
                else:
                    self._kept[key] = _repeat_runs(labels, count)
        return self._kept[key]

    @functools.cached_property
    def _changed_per_slot(self) -> np.ndarray:
        """For each slot, whether any of its positions loses or gains copies (one pass over the elements)."""
        t = self.table
        out = np.zeros(len(t.keys), dtype=bool)
        changed = self.copies != 1  # per channel
        if changed.any():
            starts, sizes = np.asarray(t.offsets, dtype=np.int64), np.asarray(t.sizes, dtype=np.int64)
            full = sizes > 0  # slots are contiguous: each non-empty one runs to the next non-empty start
            out[full] = np.logical_or.reduceat(changed[self.groups.labels], starts[full])
        return out

    @functools.cached_property
    def _changed_nodes(self) -> set[str]:
        return {key[0] for key, n in zip(self.table.keys, self._changed_per_slot.tolist()) if n}

    def touches(self, node_name: str, inputs: list[str]) -> bool:
        """Does anything shrink on the node's outputs or inputs? (Untouched nodes need no rewrite.)"""
        return node_name in self._changed_nodes or any(n in self._changed_nodes for n in inputs)

    def kept(self, ref: TensorRef, axis: int) -> np.ndarray | None:
        return self.kept_slot(self._key(ref, axis))

    def old_ndim(self, ref: TensorRef) -> int:
        return ref.val.dim()

    def old_shape(self, ref: TensorRef) -> tuple[int, ...]:
        return tuple(self.table.size((ref.node.name, ref.k, a)) for a in range(self.old_ndim(ref)))

    def new_shape(self, ref: TensorRef) -> tuple[int, ...]:
        shape = []
        for a, old in enumerate(self.old_shape(ref)):
            kept = self.kept_slot((ref.node.name, ref.k, a))
            shape.append(old if kept is None else len(kept))
        return tuple(shape)
