"""experts: routed experts removed from a Hugging Face mixture-of-experts language model folder (Mixtral, Qwen-MoE,
OLMoE...), the least used first: per layer, the experts the router sends the fewest calibration tokens to
(``by=frequency``) or the least routing weight (``by=weight``); or, with ``unit=neurons``, each expert's FFN
narrowed to its neurons most active on the tokens routed to it. The folder driver does the work, streamed from disk
(``fxprune.checkpoints.experts``): ``fxprune run DIR --pass experts --calib FILE.txt --ratio 0.25`` (a quarter of
every layer's experts), ``--opt count=N``, or ``--target-params``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Decision, Pass, PassContext, PassError

__all__ = ["Experts"]


@dataclass(frozen=True)
class Experts(Pass):
    name = "experts"
    description = "routed experts of a mixture-of-experts folder by routing frequency, or their neurons by activation"
    removes_experts: ClassVar[bool] = True  # the folder driver removes experts instead of channels
    calibrates: ClassVar[bool] = True       # it needs --calib text
    graph_only = "it removes routed experts of a Hugging Face mixture-of-experts folder"

    unit: str = "experts"   # "experts" (whole experts, per layer) or "neurons" (each expert's FFN neurons)
    by: str = "frequency"   # experts ranked by "frequency" (tokens routed to them) or "weight" (routing weight)
    count: int = 0          # how many to remove (experts per layer, or neurons per expert); 0: from --ratio

    def __post_init__(self) -> None:
        if self.unit not in ("experts", "neurons"):
            raise PassError(f"experts: unit must be 'experts' or 'neurons', not {self.unit!r}")
        if self.by not in ("frequency", "weight"):
            raise PassError(f"experts: by must be 'frequency' or 'weight', not {self.by!r}")
        if self.count < 0:
            raise PassError(f"experts: count must be 0 (from --ratio) or more, not {self.count}")

    def score(self, ctx: PassContext) -> Decision:
        raise PassError("experts removes routed experts of a Hugging Face mixture-of-experts folder (fxprune run DIR "
                        "--pass experts --calib FILE.txt)")
