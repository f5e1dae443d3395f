"""Selection: scores + a budget -> which channels go.

    budget.py    ratios (per group or one global threshold), protections, rounding, MACs/params targets
    cost.py      MACs and parameters counted on the graph, for any selection, without compacting
    diagnose.py  why a budget removed less than asked, or nothing at all
"""
