"""What the method benchmarks (anp, tas, sanp, flop, headline, detection) share: the bundled examples, imported as
the command line imports a model file or run as `fxprune run` runs them, and a mean and standard deviation per
metric over seeds."""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from collections.abc import Callable
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


def run_example(name: str, method: str, ratio: float, folder: Path, options: dict[str, str] | None = None
                ) -> dict[str, Any]:
    """``fxprune run examples/NAME.py --pass METHOD --ratio RATIO`` (and ``--opt K=V`` for each of ``options``) with
    every other default (the pipeline function the command line calls), into ``folder``; returns its report
    (report.json)."""
    from fxprune.cli.pipeline import run
    from fxprune.cli.runconfig import RunConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report, _ = run(RunConfig(ROOT / "examples" / f"{name}.py", method, ratio, folder / f"{method}-{ratio}",
                                  options=dict(options or {})))
    return report


def each_run(passes: list[str], ratios: list[float], one: Callable[[str, float, Path], dict]) -> list[dict]:
    """``one(pass, ratio, folder)`` for every ratio and pass, in a temporary folder; each row is printed to stderr
    as it lands (its notes left out)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ratio in ratios:
            for method in passes:
                rows.append(one(method, ratio, Path(folder)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "notes"}), file=sys.stderr, flush=True)
    return rows
