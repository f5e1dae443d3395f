"""Recovery benchmark on the bundled example (examples/digits.py): how much accuracy each recovery
mode brings back after L1 pruning, with and without distillation, at two pruning ratios.

Run from the repository root::

    python benchmarks/recovery.py                       # the README table (~10 minutes on 2 busy cores)
    python benchmarks/recovery.py --ratios 0.5 --epochs 2 --seeds 0   # a quick look

For each ratio: prune the trained DigitsNet with ``fxprune.prune(model, x, "l1", ratio)``, measure
validation accuracy without recovery, then run :func:`fxprune.recovery.modes.recover` on a fresh copy
of the compacted module for each mode:

* ``finetune``: inherited weights, ``--epochs`` epochs at ``--finetune-lr`` (Liu et al. fine-tune at a
  small learning rate; default lr / 10);
* ``scratch-e``: re-initialised, ``--epochs`` epochs at ``--lr``;
* ``scratch-b``: re-initialised, ``round(epochs x MACs_full / MACs_pruned)`` epochs at ``--lr`` (no cap
  unless ``--max-budget-factor``);

each without and with distillation from the unpruned model (T = 4, alpha = 0.9). Every run uses AdamW
with a cosine schedule (the example's own pre-training uses AdamW, 6 epochs, lr 3e-3) and the
model file's loss and evaluate(); the accuracy is that of the final epoch (not the best epoch),
averaged over ``--seeds``. MACs are FlopCounterMode's (fxprune.measure.count_macs) on example_inputs().
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import save  # noqa: E402

import fxprune  # noqa: E402
from fxprune.cli.modelfile import load_model_file  # noqa: E402
from fxprune.measure import count_macs  # noqa: E402
from fxprune.recovery.modes import recover, scratch_b_epochs  # noqa: E402

MODES = ("finetune", "scratch-e", "scratch-b")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-file", default=str(ROOT / "examples" / "digits.py"))
    p.add_argument("--ratios", default="0.5,0.7", help="comma-separated pruning ratios")
    p.add_argument("--epochs", type=int, default=6, help="the base epoch budget (the full model's pre-training)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--max-budget-factor", type=float, default=None)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; accuracies are averaged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "recovery.json"))
    return p.parse_args()


def _accuracy(metrics: dict[str, float]) -> float:
    return float(next(iter(metrics.values())))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    mf = load_model_file(args.model_file)
    start = time.perf_counter()
    model = mf.model().eval()
    inputs = mf.example_inputs()
    full = {"accuracy": _accuracy(mf.evaluate(model)), "macs": count_macs(model, inputs),
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
    print(f"unpruned: accuracy {full['accuracy']:.4f}, {full['macs'] / 1e6:.2f} MMACs "
          f"(pre-training {full['seconds']:.0f} s)", file=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        result = fxprune.prune(model, inputs, "l1", ratio)
        pruned = result.module.eval()
        macs = count_macs(pruned, inputs)
        base = {"ratio": ratio, "macs": macs, "params": sum(p.numel() for p in pruned.parameters())}
        rows.append({**base, "mode": "none", "distill": False, "epochs": 0,
                     "accuracy": _accuracy(mf.evaluate(pruned)), "seconds": 0.0})
        for mode in MODES:
            epochs = (scratch_b_epochs(args.epochs, full["macs"], macs, args.max_budget_factor)
                      if mode == "scratch-b" else args.epochs)
            lr = (args.finetune_lr or args.lr / 10) if mode == "finetune" else args.lr
            for distill in (False, True):
                accs, clock = [], time.perf_counter()
                for seed in seeds:
                    torch.manual_seed(seed)
                    student = copy.deepcopy(pruned)
                    log = recover(student, mode=mode, original=model, train_loader=mf.loader("train_loader"),
                                  loss=mf.loss(), epochs=args.epochs, evaluate=mf.evaluate, distill=distill,
                                  macs_full=full["macs"], macs_pruned=macs,
                                  max_budget_factor=args.max_budget_factor, lr=lr, optimizer="adamw")
                    assert len(log) == epochs
                    accs.append(_accuracy(log[-1]["metrics"]))
                rows.append({**base, "mode": mode, "distill": distill, "epochs": epochs, "lr": lr,
                             "accuracy": statistics.mean(accs), "accuracies": accs,
                             "seconds": (time.perf_counter() - clock) / len(seeds)})
                print(f"ratio {ratio} {mode:9s} distill={distill!s:5s} epochs {epochs:3d}: "
                      f"accuracy {statistics.mean(accs):.4f} {accs}", file=sys.stderr)
    return {"full": full, "rows": rows, "seeds": seeds, "epochs": args.epochs, "lr": args.lr,
            "finetune_lr": args.finetune_lr or args.lr / 10, "max_budget_factor": args.max_budget_factor,
            "threads": args.threads, "seconds": time.perf_counter() - start}


def markdown(res: dict[str, Any]) -> str:
    full = res["full"]
    lines = [f"Unpruned DigitsNet: validation accuracy {100 * full['accuracy']:.1f}%, "
             f"{full['macs'] / 1e6:.2f} MMACs, {full['params'] / 1e3:.1f}k parameters. "
             f"Accuracy (%) after the last epoch, mean of seeds {res['seeds']}.", "",
             "| ratio | MACs kept | recovery | epochs | accuracy | accuracy with KD | s / run (KD) |",
             "|---|---|---|---|---|---|---|"]
    rows = res["rows"]
    for r in rows:
        if r["distill"]:
            continue
        kd = next((k for k in rows if k["ratio"] == r["ratio"] and k["mode"] == r["mode"] and k["distill"]), None)
        with_kd = f"{100 * kd['accuracy']:.1f}" if kd else "-"
        secs = f"{r['seconds']:.0f} ({kd['seconds']:.0f})" if kd else "-"
        lines.append(f"| {r['ratio']} | {100 * r['macs'] / full['macs']:.0f}% | {r['mode']} | {r['epochs']} | "
                     f"{100 * r['accuracy']:.1f} | {with_kd} | {secs} |")
    lines.append("")
    lines.append(f"Total wall time {res['seconds'] / 60:.1f} min ({res['threads']} thread(s)); "
                 f"finetune lr {res['finetune_lr']:g}, scratch lr {res['lr']:g}, AdamW + cosine.")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    started = time.perf_counter()
    res = run(args)
    if args.json:
        save(args.json, res, __file__, started)
    print(markdown(res))


if __name__ == "__main__":
    main()
