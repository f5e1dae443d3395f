"""Learned passes on a detector that cannot be exported whole, exactly as a user runs them:

    fxprune run examples/EXAMPLE.py --pass PASS --ratio R [--opt K=V]      (no other flag)

    python benchmarks/detection.py [--example yolo] [--passes l1 slimming] [--ratios 0.5] [--opt K=V ...]
                                   [--widths 4 6] [--out benchmarks/results/detection.json]
    python benchmarks/detection.py --example fasterrcnn --passes slimming --opt epochs=2 \\
                                   --out benchmarks/results/detection_fasterrcnn.json

The examples train in their ``model()`` on a synthetic detection set (examples/shapes.py) and compute their own
losses: the YOLO-style detector of examples/yolo.py (shapes.py's PLAIN task), and torchvision's Faster R-CNN with a
MobileNetV3-Large FPN backbone (examples/fasterrcnn.py, trained one pass over its images; slimming's sparsity
training given two such passes, ``--opt epochs=2``: its default of 20 is over an hour there on two cores). fxprune
prunes them through the modules target (their own modules resized; slimming's sparsity trained on a masked copy of
them) and recovers them by default.

The control (on unless ``--no-control``): each example's dense model trained for as many passes over its images
as the pruned one saw in all (the example's own training, the pass's, the recovery's), by the example's own recipe
(its ``YOLO_EPOCHS`` / ``FRCNN_EPOCHS``). A pruned detector that ends above its dense model may only have trained
longer: "final - dense trained as long" says what the pruning cost. The capacity rows (``--widths``, the YOLO
example's ``YOLO_WIDTH``): the same network built narrower and trained in full by ``model()``, what a network of
that size reaches on the task without pruning; where they fall as far as the pruned one, the task leaves no spare
channels and no pass could keep the mAP. Recorded per row: mAP@0.5 and mAP@0.5:0.95 (%, on
the validation images, torchmetrics) of the dense model, of the network the pass trained, of the pruned model
before recovery and after; MACs and parameters kept; the recovery; seconds.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]

import _common  # noqa: E402
from _common import each_run, run_example  # noqa: E402
from _results import save  # noqa: E402


def one(example: str, options: dict[str, str], method: str, ratio: float, folder: Path) -> dict:
    start = time.perf_counter()
    report = run_example(example, method, ratio, folder, options)
    trained = (report.get("pass_report") or {}).get("trained_metrics") or {}
    return {"example": example, "options": options, "pass": method, "ratio": ratio,
            "compaction": report["compaction"]["target"],
            "recovery": report["finetune"]["mode"], "recovery_epochs": report["finetune"]["epochs"],
            "macs_kept": report["after"]["macs"] / report["before"]["macs"], "macs_before": report["before"]["macs"],
            "params_kept": report["after"]["params"] / report["before"]["params"],
            "dense": report["before"]["metrics"], "trained": trained or None,
            "pruned": report["pruned"]["metrics"], "final": report["after"]["metrics"],
            "terms": report["finetune"]["log"][-1].get("terms") if report["finetune"]["log"] else None,
            "seconds_prune": report["seconds"]["prune"], "seconds_recovery": report["seconds"]["finetune"],
            "seconds_total": time.perf_counter() - start, "notes": report["notes"],
            "epochs_in_all": _epochs_in_all(example, method, options, report)}


# the example's knob for the length of its own training in model(), and its default
EPOCHS_KNOB = {"yolo": "YOLO_EPOCHS", "fasterrcnn": "FRCNN_EPOCHS"}


def _epochs_in_all(example: str, method: str, options: dict[str, str], report: dict) -> int | None:
    """Passes over the training images the pruned model saw: the example's training, the pass's (a pass that trains:
    its ``epochs``), the recovery's."""
    from fxprune.cli.runconfig import parse_options
    from fxprune.passes.registry import load_pass, make_pass

    the_pass = make_pass(method, parse_options(load_pass(method), options, method))
    trains = getattr(the_pass, "train", False) and hasattr(the_pass, "epochs")
    pass_epochs = int(the_pass.epochs) if trains else 0
    own = int(_common.example(example).train_epochs)
    return own + pass_epochs + int(report["finetune"]["epochs"] or 0)


def control(example: str, epochs: int) -> dict:
    """The example's dense model trained ``epochs`` passes over its images by its own recipe, and its metrics."""
    start = time.perf_counter()
    with mock.patch.dict(os.environ, {EPOCHS_KNOB[example]: str(epochs)}):
        module = _common.example(example)  # a fresh import reads the knob
        metrics = module.evaluate(module.model())
    return {"example": example, "options": {}, "pass": "dense, trained as long", "control_epochs": epochs,
            "final": metrics, "seconds_total": time.perf_counter() - start}


WIDTH_KNOB = {"yolo": "YOLO_WIDTH"}  # the examples built at another width by a knob


def capacity(example: str, width: int, macs_full: int) -> dict:
    """The example's network built at ``width`` and trained in full by ``model()``: its metrics and MACs (kept,
    against the example's own width)."""
    from fxprune.measure import count_macs

    start = time.perf_counter()
    with mock.patch.dict(os.environ, {WIDTH_KNOB[example]: str(width)}):
        module = _common.example(example)
        net = module.model()
        metrics = module.evaluate(net)
        macs = count_macs(net, module.example_inputs())
    return {"example": example, "options": {}, "pass": f"dense, width {width}", "width": width,
            "macs_kept": macs / macs_full, "final": metrics, "seconds_total": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="yolo", choices=["yolo", "fasterrcnn"])
    ap.add_argument("--passes", nargs="+", default=["l1", "slimming"])
    ap.add_argument("--opt", nargs="*", default=[], help="pass options KEY=VALUE, as fxprune run's --opt")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the dense model trained as long as the pruned one")
    ap.add_argument("--widths", type=int, nargs="*", default=[4, 6],
                    help="capacity rows: the example built at these widths, trained in full (yolo only)")
    args = ap.parse_args()
    started = time.perf_counter()
    options = dict(o.split("=", 1) for o in args.opt)
    rows = each_run(args.passes, args.ratios, functools.partial(one, args.example, options))
    if args.control:
        for epochs in sorted({r["epochs_in_all"] for r in rows if r["epochs_in_all"]}):
            rows.append(control(args.example, epochs))
    if args.widths and args.example in WIDTH_KNOB:
        macs_full = next(r["macs_before"] for r in rows if "macs_before" in r)
        rows += [capacity(args.example, w, macs_full) for w in args.widths]
    save(args.out, rows, __file__, started)


if __name__ == "__main__":
    main()
