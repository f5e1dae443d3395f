"""Tracing: a user's model + example inputs -> an ATen-level torch.fx GraphModule with a shape on every node.

    tracer.py       ``trace()``: picks the quickest front end that can follow the model, falls back in order
    record.py       front end 1: records every ATen call of one real (or meta) forward at pre-dispatch level
    makefx.py       front end 2: make_fx over the forward with fake parameters, symbolic batch axis
    compat.py       the one place that names private torch internals, with feature probes
    lazy_module.py  GraphModules that compile on first use
    meta_norms.py   normalisations shaped on meta instead of run
"""
