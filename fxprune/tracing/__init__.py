"""Tracing: a user's model + example inputs -> an ATen-level torch.fx GraphModule with a shape on every node.

    tracer.py       ``trace()``: picks the quickest front end that can follow the model, falls back in order
    record.py       front end 1: records every ATen call of one real (or meta) forward at pre-dispatch level
    makefx.py       front end 2: make_fx over the forward with fake parameters, the free input axes symbolic
    dynamic.py      which input axes stay free: found by running the model at a second size; what a graph kept
    quiet.py        torch's own tracing noise held back (stderr of one thread; a table of its warnings)
    compat.py       the one place that names private torch internals, with feature probes
    lazy_module.py  GraphModules that compile on first use
    meta_norms.py   normalisations shaped on meta instead of run
"""
