"""Learned passes on a detector that cannot be exported whole, exactly as a user runs them:

    fxprune run examples/yolo.py --pass PASS --ratio R        (no other flag)

    python benchmarks/detection.py [--passes l1 slimming] [--ratios 0.5] [--out benchmarks/results/detection.json]

The YOLO-style example trains in its ``model()`` on a synthetic detection set (examples/shapes.py) and computes
its own loss; fxprune prunes it through the modules target (its own modules resized; slimming's sparsity
trained on a masked copy of them) and recovers it by default. Recorded per row: mAP@0.5 and mAP@0.5:0.95 (%, on
the validation images, torchmetrics) of the dense model, of the network the pass trained, of the pruned model
before recovery and after; MACs and parameters kept; the recovery; seconds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _common import each_run, run_example  # noqa: E402
from _results import save  # noqa: E402


def one(method: str, ratio: float, folder: Path) -> dict:
    start = time.perf_counter()
    report = run_example("yolo", method, ratio, folder)
    trained = (report.get("pass_report") or {}).get("trained_metrics") or {}
    return {"pass": method, "ratio": ratio, "compaction": report["compaction"]["target"],
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
    ap.add_argument("--passes", nargs="+", default=["l1", "slimming"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    args = ap.parse_args()
    started = time.perf_counter()
    rows = each_run(args.passes, args.ratios, one)
    save(args.out, rows, __file__, started)


if __name__ == "__main__":
    main()
