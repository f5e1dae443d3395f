"""Why a run removed less than it was asked to, in one line a user can act on.

The analysis freezes a group for a reason (``Group.frozen``): a model input or output, an op without a
rule, a normalisation over the channels (inexact), a literal size the rewrite cannot fix. When a
budget ends far from what was asked, the largest frozen groups (by positions) are the explanation;
their reasons map to what the user can do, as a table.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fxprune.analysis.groups import ChannelGroups, Group

from .budget import SelectionError

__all__ = ["Shortfall", "shortfall", "nothing_prunable", "NothingToPruneError", "removable_fraction", "ADVICE"]


class NothingToPruneError(SelectionError):
    """A removal was asked for, but every channel group of the model is frozen."""

_IO = ("model input", "model output")

# reason text (a prefix of Group.frozen) -> what the user can do about it
ADVICE: tuple[tuple[str, str], ...] = (
    ("inexact", "--allow-inexact prunes groups frozen as inexact (the output then differs from the masked model "
                "until it is trained: recover with --epochs N)"),
    ("", "another pass cannot change this; `fxprune inspect MODEL.py` lists every group and why it is frozen"),
)


@dataclass(frozen=True)
class Shortfall:
    requested: float   # the fraction asked for (channels for a ratio, MACs or params for a target)
    achieved: float
    reasons: list[str]  # the largest frozen groups' reasons, largest first
    advice: list[str]

    def line(self, what: str, unexplained: str = "the budget's floors (min_channels, min_keep, round_to)") -> str:
        """``unexplained``: the cause named when no frozen group explains the shortfall."""
        because = "; ".join(self.reasons) if self.reasons else unexplained
        return (f"removed {self.achieved:.0%} of the {what} where {self.requested:.0%} was asked; what held it "
                f"back: {because}. " + " ".join(self.advice))


def _eligible(group: Group) -> bool:
    """A group that could shrink in principle: it has parameters and is not a model input or output."""
    return bool(group.params) and not (group.frozen or "").startswith(_IO)


def _size(group: Group) -> int:
    return len(group)


def removable_fraction(groups: ChannelGroups, removed: np.ndarray) -> float:
    """Removed channels over the channels of every eligible group (prunable or frozen), as a ratio counts them."""
    eligible = [g for g in groups if _eligible(g)]
    total = sum(_size(g) for g in eligible)
    gone = sum(int(removed[g.channels].sum()) for g in eligible if g.prunable)
    return gone / total if total else 0.0


def _frozen_reasons(groups: ChannelGroups, top: int = 2) -> list[Group]:
    frozen = [g for g in groups if _eligible(g) and not g.prunable]
    return sorted(frozen, key=_size, reverse=True)[:top]


def _advice(frozen: list[Group]) -> list[str]:
    out: list[str] = []
    for g in frozen:
        tip = next(text for prefix, text in ADVICE if (g.frozen or "").startswith(prefix))
        if tip not in out:
            out.append(tip)
    return out


def _describe(g: Group) -> str:
    layers = g.layers("producer") or g.layers("consumer")
    where = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
    return f"{_size(g)} channels of {where or f'group {g.id}'}: {g.frozen}"


def shortfall(groups: ChannelGroups, requested: float, achieved: float, factor: float = 0.5,
              protect: Sequence[str] = ()) -> Shortfall | None:
    """A Shortfall when ``achieved`` is below ``factor`` x ``requested`` (None when the run got close);
    ``protect``: the layer patterns the budget kept whole, named as a cause when given."""
    if requested <= 0 or achieved >= factor * requested:
        return None
    frozen = _frozen_reasons(groups)
    reasons = [_describe(g) for g in frozen]
    advice = _advice(frozen)
    if protect:
        patterns = ", ".join(protect)
        reasons.append(f"the groups --protect {patterns} keeps whole")
        advice.insert(0, f"Protecting fewer layers than {patterns} lets more of the model shrink.")
    return Shortfall(requested, achieved, reasons, advice)


def nothing_prunable(groups: ChannelGroups) -> str:
    """The message for a model none of whose groups can shrink."""
    frozen = _frozen_reasons(groups, top=3)
    eligible = sum(_eligible(g) for g in groups)
    if not frozen:
        return (f"nothing can be pruned: the {len(groups)} channel groups are model inputs and outputs or have no "
                "parameters. `fxprune inspect MODEL.py` lists them.")
    return (f"nothing can be pruned: all {eligible} channel groups that could shrink are frozen; the largest are "
            + "; ".join(_describe(g) for g in frozen) + ". " + " ".join(_advice(frozen))
            + " --force writes the unpruned model anyway.")
