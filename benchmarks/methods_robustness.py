"""Learned passes on models they were never tuned on: every pass with its default options through
``fxprune run`` on four architectures of different kinds trained on digits inside the benchmark (a plain BatchNorm
CNN, a residual CNN, an inverted-residual network with depthwise convolutions and squeeze-excite, a small ViT:
``benchmarks/robustness_models.py``) and flop on the character LM, at a 0.5 MACs target (flop: 0.5 of the
parameters), the default recovery, several seeds.

    python benchmarks/methods_robustness.py [--seeds 0 1 2] [--archs plain residual inverted vit]
        [--passes l1 slimming thinet lasso scratch anp tas sanp flop] [--resume]

Each run is the command line in this process (``fxprune run FILE --pass P --target-macs 0.5``, the pass's
``seed`` option set to the run's seed where it has one); its ``report.json`` gives the dense model's accuracy, the
network the pass trained (``trained_metrics``), the pruned model before and after recovery, the MACs (and
parameters) kept as measured on the compacted module, whether the shared budget fit ran, and for anp PGD
accuracy (the pass's own attack); anp's adversarially trained dense baseline (``variant=at``, nothing removed)
is a row of its own. sanp's product is its per-sample module: its accuracy and average MACs per sample (on
the validation data) are the row's, the static variant's beside them. The bar (issue 33): kept fraction within
0.02 of the target on every run, final accuracy within 2 points of the dense model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import load, save  # noqa: E402

MODELS = ROOT / "benchmarks" / "robustness_models.py"
CHARLM = ROOT / "examples" / "charlm.py"
OUT = ROOT / "benchmarks" / "results" / "methods_robustness.json"
ARCHS = ("plain", "residual", "inverted", "vit")
PASSES = ("l1", "slimming", "thinet", "lasso", "scratch", "anp", "tas", "sanp", "flop")
SEEDED = ("scratch", "anp", "tas", "sanp")  # passes with a seed option
TARGET = 0.5
BAR_BUDGET, BAR_ACCURACY = 0.02, 0.02


def runs(archs: list[str], passes: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """What to run: (model, arch, pass, extra CLI arguments) per seed. flop runs where it has linear maps to
    factorise (the ViT and the character LM); the convolutional networks have none, which it refuses."""
    out = []
    for seed in seeds:
        for arch in archs:
            for name in passes:
                if name == "flop" and arch != "vit":
                    continue
                out.append({"arch": arch, "pass": name, "seed": seed, "row": name})
                if name == "anp":
                    out.append({"arch": arch, "pass": "anp", "seed": seed, "row": "anp: at (dense baseline)"})
        if "flop" in passes:
            out.append({"arch": "charlm", "pass": "flop", "seed": seed, "row": "flop"})
    return out


def arguments(run: dict[str, Any], folder: Path) -> list[str]:
    model = CHARLM if run["arch"] == "charlm" else MODELS
    args = ["run", str(model), "--pass", run["pass"], "--out", str(folder), "--force"]
    if run["row"] == "anp: at (dense baseline)":
        return [*args, "--ratio", "0", "--opt", "variant=at", "--opt", f"seed={run['seed']}"]
    args += ["--target-params" if run["pass"] == "flop" else "--target-macs", str(TARGET)]
    if run["pass"] in SEEDED:
        args += ["--opt", f"seed={run['seed']}"]
    return args


def measure(run: dict[str, Any], cache: Path) -> dict[str, Any]:
    """One run through the command line; the row from its report.json."""
    import torch
    from typer.testing import CliRunner

    from fxprune.cli import app

    os.environ.update({"FXPRUNE_BENCH_ARCH": run["arch"], "FXPRUNE_BENCH_SEED": str(run["seed"]),
                       "FXPRUNE_BENCH_CACHE": str(cache)})
    torch.manual_seed(run["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        start = time.perf_counter()
        result = CliRunner().invoke(app, arguments(run, folder))
        seconds = time.perf_counter() - start
        if result.exit_code != 0:
            return {**run, "error": (result.output or repr(result.exception))[-2000:], "seconds": seconds}
        report = json.loads((folder / "report.json").read_text())
    return {**run, **row_of(report, run), "seconds": seconds}


def _metric(block: dict[str, Any] | None) -> float | None:
    metrics = (block or {}).get("metrics") if block is not None and "metrics" in block else block
    return None if not metrics else float(next(iter(metrics.values())))


def row_of(report: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    before, after, pr = report["before"], report["after"], report.get("pass_report") or {}
    which = "params" if run["pass"] == "flop" else "macs"
    row: dict[str, Any] = {
        "dense": _metric(before), "trained": _metric(pr.get("trained_metrics")), "pruned": _metric(report["pruned"]),
        "final": _metric(after), "kept": after[which] / before[which], "which": which,
        "target": 1.0 if run["row"].startswith("anp: at") else TARGET,
        "fit": bool((pr.get("fit") or {}).get("ran")), "recovery": report["finetune"]["mode"],
        "recovery_epochs": report["finetune"]["epochs"], "notes": report.get("notes") or []}
    if run["pass"] == "sanp":  # the product is the per-sample module
        row.update({"static_final": row["final"], "static_kept": row["kept"],
                    "final": _metric(pr.get("dynamic_metrics")), "kept": pr.get("average_macs")})
    for key, where in (("pgd_dense", before), ("pgd_final", after)):
        if (where.get("robustness") or {}).get("pgd_accuracy") is not None:
            row[key] = where["robustness"]["pgd_accuracy"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fxprune-robustness-models")
    ap.add_argument("--resume", action="store_true", help="keep the runs an earlier, unfinished run saved")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    started = time.perf_counter()
    partial = args.cache / "methods_robustness.partial.json"  # outside results/: not a results file
    done: list[dict[str, Any]] = load(partial)["rows"] if args.resume and partial.exists() else []
    key = lambda r: (r["arch"], r["row"], r["seed"])  # noqa: E731
    have = {key(r) for r in done}
    for run in runs(args.archs, args.passes, args.seeds):
        if key(run) in have:
            continue
        row = measure(run, args.cache)
        done.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        save(partial, {"rows": done, "complete": False}, __file__, started)
    save(args.out, {"rows": done, "complete": True, "target": TARGET,
                    "bar": {"budget": BAR_BUDGET, "accuracy": BAR_ACCURACY}}, __file__, started)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
