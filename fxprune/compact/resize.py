"""What a selection means for every slot: kept indices and new sizes (read by rewrites and the plan)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..analyze.couple import TensorRef
from ..analyze.groups import ChannelGroups
from ..analyze.slots import SlotKey

__all__ = ["Resizer"]


class Resizer:
    """Answers, for the original graph's tensors, which positions survive a removal."""

    def __init__(self, groups: ChannelGroups, removed: np.ndarray) -> None:
        self.groups = groups
        self.table = groups.table
        self.removed = removed  # bool per component (channel)
        self._kept: dict[SlotKey, np.ndarray | None] = {}

    def _key(self, ref: TensorRef | Any, axis: int) -> SlotKey:
        return (ref.node.name, ref.k, axis % max(self.old_ndim(ref), 1))

    def kept_slot(self, key: SlotKey) -> np.ndarray | None:
        """Kept indices of one slot, or None when nothing is removed there."""
        if key not in self._kept:
            t = self.table
            i = t.index.get(key)
            if i is None:
                self._kept[key] = None
            else:
                keep = ~self.removed[self.groups.labels[t.offsets[i]:t.offsets[i] + t.sizes[i]]]
                self._kept[key] = None if keep.all() else np.flatnonzero(keep)
        return self._kept[key]

    def touches(self, node_name: str, inputs: list[str]) -> bool:
        """Does anything shrink on the node's outputs or inputs? (Untouched nodes need no rewrite.)"""
        names = {node_name, *inputs}
        if not hasattr(self, "_changed_nodes"):
            t = self.table
            changed = ~self.removed[self.groups.labels]
            self._changed_nodes = set()
            starts = np.asarray(t.offsets)
            sizes = np.asarray(t.sizes)
            cum = np.concatenate([[0], np.cumsum(changed, dtype=np.int64)])
            kept_per_slot = cum[starts + sizes] - cum[starts]
            for key, kept, size in zip(t.keys, kept_per_slot.tolist(), sizes.tolist()):
                if kept != size:
                    self._changed_nodes.add(key[0])
        return bool(names & self._changed_nodes)

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
