"""The command line around the pipeline, and what it writes.

    commands.py   the typer app: run, inspect, bench, passes (nothing heavy imported at module level)
    pipeline.py   ``fxprune run`` as a function: model file -> pruned, recovered, measured output folder
    modelfile.py  loading the user's model file (model(), example_inputs(), loaders, evaluate())
    artifacts.py  the output folder: exported programs, safetensors, plan, atomic writes; ``fxprune.load``
    report.py     report.json / report.md and the plots
    measure.py    MACs, parameters, latency and peak memory on the example inputs
    bench.py      ``fxprune bench``: original vs pruned latency from an output folder
    ui.py         progress on the terminal
"""
from __future__ import annotations

from typing import Any


def main() -> None:
    from .commands import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":  # the typer app, imported on first use
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
