"""depth: whole decoder blocks removed from a Hugging Face language model folder, the least important first, by
ShortGPT's block influence (``by=bi``, Men et al. 2024: 1 - cos(block input, block output) on calibration text)
or Minitron's perplexity with the block skipped (``by=ppl``). The folder driver does the work, streamed from
disk (``fxprune.checkpoints.depth``): ``fxprune run DIR --pass depth --calib FILE.txt --ratio 0.25`` (a quarter
of the blocks), ``--opt blocks=N``, or ``--target-params``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Decision, Pass, PassContext, PassError

__all__ = ["Depth"]


@dataclass(frozen=True)
class Depth(Pass):
    name = "depth"
    description = "whole decoder blocks of a language model folder, by block influence or perplexity (ShortGPT, " \
                  "Minitron)"
    removes_blocks: ClassVar[bool] = True   # the folder driver removes blocks instead of channels
    calibrates: ClassVar[bool] = True       # it needs --calib text
    graph_only = "it removes whole decoder blocks of a Hugging Face folder"

    by: str = "bi"      # "bi" (block influence, one pass) or "ppl" (perplexity with the block skipped, one pass each)
    blocks: int = 0     # how many to remove (0: from --ratio, the fraction of blocks, or --target-params)

    def __post_init__(self) -> None:
        if self.by not in ("bi", "ppl"):
            raise PassError(f"depth: by must be 'bi' or 'ppl', not {self.by!r}")

    def score(self, ctx: PassContext) -> Decision:
        raise PassError("depth removes whole decoder blocks of a Hugging Face model folder (fxprune run DIR --pass "
                        "depth --calib FILE.txt); for a model in memory, tas learns which blocks to drop")
