"""A run that survives a crash: every ``train()`` call of a run checkpoints into a folder of its own and resumes
from it.

Inside ``checkpoints_in(folder)``, each ``fxprune.recovery.train`` call that names no ``checkpoint_dir`` of its own
gets ``folder/train-N`` (N: its place among the run's training calls, 0 first) with ``resume=True``. The engine
writes the last epoch's full state there (weights, optimisers, schedules, hooks, every random generator) and
continues from it, ending on exactly the weights an uninterrupted run ends on. A run started again with the same
description therefore replays its stages (seeded, so the same), fast-forwards every training it had finished,
and continues the one it was killed in. Training calls run in the same order on every rerun of one description:
that order is the key. Who keys the folder by the run's description is the caller's (``fxprune run``: ``OUT.resume``
beside the output folder).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["checkpoints_in", "next_checkpoint_dir"]


@dataclass
class _Checkpoints:
    root: Path
    first_use: Callable[[Path], None] | None
    count: int = 0

    def next(self) -> Path:
        if self.count == 0 and self.first_use is not None:
            self.first_use(self.root)
        folder = self.root / f"train-{self.count}"
        self.count += 1
        return folder


_ACTIVE: contextvars.ContextVar[_Checkpoints | None] = contextvars.ContextVar("fxprune_checkpoints", default=None)


@contextlib.contextmanager
def checkpoints_in(folder: str | Path, first_use: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Checkpoint and resume every ``train()`` call inside into ``folder/train-N``; ``first_use(folder)`` runs
    before the first of them (nothing is created when nothing trains)."""
    token = _ACTIVE.set(_Checkpoints(Path(folder), first_use))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def next_checkpoint_dir() -> Path | None:
    """The folder of the next training call under ``checkpoints_in``, or None outside it."""
    active = _ACTIVE.get()
    return active.next() if active is not None else None
