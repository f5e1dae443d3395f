"""Graph edits beyond channel slicing, run through compaction's ``edits=`` hook or as a transform of a
traced graph before analysis.

- :mod:`fxprune.edits.blocks`: residual blocks (single-entry single-exit regions ``x + f(x)``, found
  with networkx dominator trees), their removal, and depth masks (a scalar per block).
- :mod:`fxprune.edits.factorize`: a linear map (``linear`` / 1x1 conv) replaced by a rank-r pair, whose
  rank axis the analysis then sees as one more prunable channel group.
"""
