"""What the method benchmarks (anp, tas, sanp, flop) share: the bundled examples, imported as the command line
imports a model file, and a mean and standard deviation per metric over seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fxprune.cli.modelfile import load_model_file

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> Any:
    """examples/NAME.py as a module (its model(), example_inputs(), loaders...)."""
    return load_model_file(ROOT / "examples" / f"{name}.py").module


def mean_std(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: [one dict of metrics per seed]} -> {row: {metric: {"mean", "std"}}}."""
    return {row: {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                  for k in rs[0]} for row, rs in runs.items()}
