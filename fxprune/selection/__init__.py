"""Selection: scores + a budget -> which channels go.

    budget.py    ratios (per group or one global threshold), protections, rounding, MACs/params targets
    cost.py      MACs and parameters counted on the graph, for any selection, without compacting
    latency.py   latency measured op by op on the device, predicted for any selection (target_latency)
    diagnose.py  why a budget removed less than asked, or nothing at all
"""
