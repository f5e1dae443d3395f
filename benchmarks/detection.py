"""Learned passes on a detector that cannot be exported whole, exactly as a user runs them:

    fxprune run examples/EXAMPLE.py --pass PASS --ratio R [--opt K=V]      (no other flag)

    python benchmarks/detection.py [--example yolo] [--passes l1 slimming] [--ratios 0.5] [--opt K=V ...]
                                   [--out benchmarks/results/detection.json]
    python benchmarks/detection.py --example fasterrcnn --passes slimming --opt epochs=2 \
                                   --out benchmarks/results/detection_fasterrcnn.json

The examples train in their ``model()`` on a synthetic detection set (examples/shapes.py) and compute their own
losses: the YOLO-style detector of examples/yolo.py, and torchvision's Faster R-CNN with a MobileNetV3-Large FPN
backbone (examples/fasterrcnn.py, trained one pass over its images; slimming's sparsity training given two such
passes, ``--opt epochs=2``: its default of 20 is over an hour there on two cores). fxprune prunes them through the
modules target (their own modules resized; slimming's sparsity trained on a masked copy of them) and recovers them
by default. Recorded per row: mAP@0.5 and mAP@0.5:0.95 (%, on
the validation images, torchmetrics) of the dense model, of the network the pass trained, of the pruned model
before recovery and after; MACs and parameters kept; the recovery; seconds.
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _common import each_run, run_example  # noqa: E402
from _results import save  # noqa: E402


def one(example: str, options: dict[str, str], method: str, ratio: float, folder: Path) -> dict:
    start = time.perf_counter()
    report = run_example(example, method, ratio, folder, options)
    trained = (report.get("pass_report") or {}).get("trained_metrics") or {}
    return {"example": example, "options": options, "pass": method, "ratio": ratio,
            "compaction": report["compaction"]["target"],
            "recovery": report["finetune"]["mode"], "recovery_epochs": report["finetune"]["epochs"],
            "macs_kept": report["after"]["macs"] / report["before"]["macs"],
            "params_kept": report["after"]["params"] / report["before"]["params"],
            "dense": report["before"]["metrics"], "trained": trained or None,
            "pruned": report["pruned"]["metrics"], "final": report["after"]["metrics"],
            "terms": report["finetune"]["log"][-1].get("terms") if report["finetune"]["log"] else None,
            "seconds_prune": report["seconds"]["prune"], "seconds_recovery": report["seconds"]["finetune"],
            "seconds_total": time.perf_counter() - start, "notes": report["notes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="yolo", choices=["yolo", "fasterrcnn"])
    ap.add_argument("--passes", nargs="+", default=["l1", "slimming"])
    ap.add_argument("--opt", nargs="*", default=[], help="pass options KEY=VALUE, as fxprune run's --opt")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    args = ap.parse_args()
    started = time.perf_counter()
    options = dict(o.split("=", 1) for o in args.opt)
    rows = each_run(args.passes, args.ratios, functools.partial(one, args.example, options))
    save(args.out, rows, __file__, started)


if __name__ == "__main__":
    main()
