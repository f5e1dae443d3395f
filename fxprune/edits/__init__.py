"""Graph edits beyond channel slicing, run through compaction's ``edits=`` hook or as a transform of a
traced graph before analysis.

- :mod:`fxprune.edits.blocks`: residual blocks (single-entry single-exit regions ``x + f(x)``, found
  with networkx dominator trees), their removal, and depth masks (a scalar per block).
- :mod:`fxprune.edits.factorize`: a linear map (``linear``, GPT-2's ``addmm``, a 1x1 conv) replaced by a
  rank-r pair, whose rank axis the analysis then sees as one more prunable channel group; after
  compaction, ``merge_unprofitable`` merges a pair back into one dense layer where the kept rank no
  longer pays (``r (in + out) >= in x out``).
"""
