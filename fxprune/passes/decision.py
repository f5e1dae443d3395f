"""What a pass answers with: ``Pass.score(ctx) -> Decision``, a value, never a change to its context.

A pass that only ranks channels returns its scores (a plain ``{group id: score per channel}`` is read as
``Decision(scores)``). A pass that changes weights or the graph says so in the value: ``weights`` (new full-size
tensors, the same whatever is removed: slimming's sparsity-trained network) or ``finish`` (called once with the
removal the budget selected; returns the weights and graph edits for THAT removal: anp folds its masks with the
removed channels at 0, tas removes the blocks after each stage's depth). Compaction substitutes the weights before
slicing by the plan and applies the edits, so they go through the same verified rewrite as everything else.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from fxprune.selection.budget import Scores

if TYPE_CHECKING:
    from fxprune.compaction.emit import GraphEdit

__all__ = ["Decision", "Finish", "as_decision"]


class Finish(NamedTuple):
    """What compaction needs from the pass for one removal: new full-size tensors and graph edits."""

    weights: Mapping[str, torch.Tensor] = {}
    edits: Sequence[GraphEdit] = ()


@dataclass(frozen=True)
class Decision:
    """A pass's answer.

    - ``scores``: one float per channel of every prunable group, higher = keep (``-inf`` must go, ``+inf`` stays);
    - ``masks``: a pass that learns a mask per channel: their final values per group id (written onto the graph
      beside the scores, ``fxprune.annotations``; shown by ``fxprune inspect --graph``);
    - ``report``: JSON-able, lands in report.json under ``pass_report``; ``"trained_metrics"``: ``evaluate()`` of
      the network the pass trained (a row of the summary table); ``"histograms": {name: {"before", "after",
      "threshold", "xlabel"}}`` is drawn as NAME_histogram.png;
    - ``weights``: new full-size tensors for compaction, whatever the removal;
    - ``finish(removed) -> Finish``: the weights and graph edits for the selected removal (a bool per channel
      component, ``removed[group.channels]`` per group); replaces ``weights`` when given;
    - ``artifacts``: files the pass adds to the output folder, name -> writer(folder) (sanp's dynamic module);
    - ``extras``: objects it built besides the module, handed on in ``PruneResult.extras``;
    - ``product``: the method's product when it is not the compacted model (sanp: its per-sample module):
      ``PruneResult.module`` is it, and the compacted model (which recovery trains, and the command line exports)
      is ``PruneResult.compacted``.
    """

    scores: Scores
    masks: Mapping[int, np.ndarray] = field(default_factory=dict)
    report: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    finish: Callable[[np.ndarray], Finish] | None = None
    artifacts: Mapping[str, Callable[[Path], None]] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)
    product: torch.nn.Module | None = None

    def finished(self, removed: np.ndarray) -> Finish:
        """The weights and edits compaction applies for ``removed``."""
        if self.finish is not None:
            done = self.finish(removed)
            return Finish(dict(done.weights), list(done.edits))
        return Finish(dict(self.weights), [])


def as_decision(answer: Decision | Mapping[int, np.ndarray], who: str) -> Decision:
    """A pass's answer as a Decision: a plain mapping of scores is one; anything else is an error naming it."""
    if isinstance(answer, Decision):
        return answer
    if isinstance(answer, Mapping):
        return Decision(dict(answer))
    raise TypeError(f"pass {who!r}: score() returned {type(answer).__name__}; return fxprune.Decision(scores, ...) "
                    "or a dict {group id: score per channel}")
