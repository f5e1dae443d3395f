"""Fidelity of the "Rethinking" methods on the bundled digits example: l1, slimming, thinet and lasso
at ratio 0.5 and 0.7 — accuracy with no recovery and after a short fine-tune, MACs kept, wall time.

    python benchmarks/methods.py [--finetune-epochs 3] [--out benchmarks/results/methods.json]

Every method prunes the same trained model (examples/digits.py, deterministic). Wall time is the
prune() call (slimming includes its sparsity training). Fine-tuning: the shared engine, SGD lr 0.01,
cosine, on the compacted model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402
from _results import save  # noqa: E402

import fxprune  # noqa: E402
from fxprune.recovery.engine import finetune  # noqa: E402

# row name -> (pass, options); "slimming (fixed)" is the paper's fixed-s subgradient alone
METHODS = {"l1": ("l1", {}), "slimming": ("slimming", {"epochs": 10, "s": 1e-4}),
           "slimming (fixed)": ("slimming", {"epochs": 10, "s": 1e-4, "schedule": "fixed"}),
           "thinet": ("thinet", {}), "lasso": ("lasso", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.json")
    args = ap.parse_args()
    started = time.perf_counter()
    model = digits.model()
    inputs = digits.example_inputs()
    base = digits.evaluate(model)["accuracy"]
    ref = fxprune.prune(model, inputs, "l1", 0.0).cost_before.macs
    rows = [{"method": "unpruned", "ratio": 0.0, "acc": base, "acc_ft": None, "macs_kept": 1.0, "seconds": 0.0}]
    # The unpruned model fine-tuned the same way: the fair reference for "within 1 point after fine-tuning".
    import copy
    tuned = copy.deepcopy(model)
    finetune(tuned, digits.train_loader(), digits.loss, epochs=args.finetune_epochs, lr=0.01)
    rows[0]["acc_ft"] = digits.evaluate(tuned)["accuracy"]
    print(rows[0], flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            start = time.perf_counter()
            name, options = METHODS[method]
            res = fxprune.prune(model, inputs, name, ratio, options=options,
                                train_loader=digits.train_loader(), val_loader=digits.val_loader())
            seconds = time.perf_counter() - start
            acc = digits.evaluate(res.module)["accuracy"]
            finetune(res.module, digits.train_loader(), digits.loss, epochs=args.finetune_epochs, lr=0.01)
            row = {"method": method, "ratio": ratio, "acc": acc, "acc_ft": digits.evaluate(res.module)["accuracy"],
                   "macs_kept": res.cost_after.macs / ref, "seconds": seconds}
            rows.append(row)
            print(row, flush=True)
    save(args.out, rows, __file__, started)
    print("\n| method | ratio | acc (no recovery) | acc after fine-tune | MACs kept | prune time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ft = f"{100 * r['acc_ft']:.1f}" if r["acc_ft"] is not None else "-"
        print(f"| {r['method']} | {r['ratio']} | {100 * r['acc']:.1f} | {ft} | {100 * r['macs_kept']:.0f}% | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
