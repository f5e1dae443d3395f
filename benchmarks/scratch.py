"""scratch (Pruning from Scratch) vs l1 vs slimming at the same MACs budget on the bundled digits example.

    python benchmarks/scratch.py [--target-macs 0.5] [--epochs 2] [--search-epochs 3]
                                 [--out benchmarks/results/scratch.json]

Every method gets the same MACs target (binary search; scratch must land within 0.1%, the others 1%)
and the same recovery budget: ``--epochs`` E recovery epochs through fxprune's recovery (finetune:
E epochs on the inherited weights; scratch-b: re-initialised, E x MACs_full / MACs_pruned epochs).
l1 and slimming prune the trained model (examples/digits.py, deterministic); scratch learns its gates
on a re-initialised copy (no pre-training needed), once at the original width and once on a x1.25 wider
copy (``expand=1.25``; its channel totals are the wide model's). "search s" is the architecture search: slimming's
sparsity training and scratch's gate training, both for ``--search-epochs`` epochs (it is the whole
prune() call: trace, analysis and budget search included; l1 has no training).
One thread (torch.set_num_threads(1)): the timings are comparable, not fast.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402
from _results import save  # noqa: E402

import fxprune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--search-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scratch.json")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = digits.model()
    inputs = digits.example_inputs()
    rows = [{"method": "unpruned", "recovery": "-", "macs_kept": 1.0, "acc": digits.evaluate(model)["accuracy"],
             "search_s": None, "recovery_s": None}]
    print(rows[0], flush=True)
    runs = [("l1", {}, "finetune"), ("l1", {}, "scratch-b"),
            ("slimming", {"epochs": args.search_epochs}, "finetune"),
            ("slimming", {"epochs": args.search_epochs}, "scratch-b"),
            ("scratch", {"epochs": args.search_epochs}, "scratch-b"),
            ("scratch", {"epochs": args.search_epochs, "expand": 1.25}, "scratch-b")]
    for method, options, recovery in runs:
        data = {"train_loader": digits.train_loader(), "loss": digits.loss, "evaluate": digits.evaluate}
        start = time.perf_counter()
        res = fxprune.prune(model, inputs, method, options=options, budget=fxprune.Budget(target_macs=args.target_macs),
                            **data)
        search = time.perf_counter() - start
        acc0 = digits.evaluate(res.module)["accuracy"]
        start = time.perf_counter()
        from fxprune.recovery.modes import recover
        log = recover(res.module, mode=recovery, original=model, train_loader=data["train_loader"], loss=digits.loss,
                      epochs=args.epochs, evaluate=None, macs_full=res.cost_before.macs,
                      macs_pruned=res.cost_after.macs)
        row = {"method": method, "options": options, "recovery": recovery,
               "macs_kept": res.cost_after.macs / res.cost_before.macs,
               "acc_pruned": acc0, "acc": digits.evaluate(res.module)["accuracy"], "recovery_epochs": len(log),
               "search_s": search, "recovery_s": time.perf_counter() - start,
               "channels": [(r["kept"], r["total"]) for r in res.summary()]}
        rows.append(row)
        print(row, flush=True)
        save(args.out, rows, __file__, started)


if __name__ == "__main__":
    main()
