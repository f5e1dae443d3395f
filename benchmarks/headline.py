"""The headline command on the bundled example, for several passes and ratios, exactly as a user runs it:

    fxprune run examples/digits.py --pass PASS --ratio R        (no other flag)

    python benchmarks/headline.py [--passes l1 slimming scratch] [--ratios 0.5 0.7]
                                  [--out benchmarks/results/headline.json]

Each row is one `fxprune run` (the same pipeline function the command line calls, with its defaults:
recovery by default because digits.py defines train_loader(): finetune for l1 and slimming,
scratch-b for scratch). Recorded: MACs and params kept, accuracy of the unpruned model, of the
pruned model before recovery, after recovery, and (slimming) of the sparsity-trained network before
pruning; MACs, parameters and latency (a batch of 8, this machine's CPU) before and after; wall time of
pruning, of recovery and of the whole run. Prints a Markdown table for the README.
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
    report = run_example("digits", method, ratio, folder)
    trained = (report.get("pass_report") or {}).get("trained_metrics") or {}
    return {"pass": method, "ratio": ratio, "recovery": report["finetune"]["mode"],
            "recovery_epochs": report["finetune"]["epochs"],
            "macs_before": report["before"]["macs"], "macs_after": report["after"]["macs"],
            "params_before": report["before"]["params"], "params_after": report["after"]["params"],
            "latency_ms_before": report["before"].get("latency_ms"),
            "latency_ms_after": report["after"].get("latency_ms"),
            "macs_kept": report["after"]["macs"] / report["before"]["macs"],
            "params_kept": report["after"]["params"] / report["before"]["params"],
            "acc_unpruned": report["before"]["metrics"]["accuracy"],
            "acc_trained_copy": trained.get("accuracy"),
            "acc_pruned": report["pruned"]["metrics"]["accuracy"],
            "acc_recovered": report["after"]["metrics"]["accuracy"],
            "kept": [g["kept"] for g in report["groups"]], "total": [g["total"] for g in report["groups"]],
            "seconds_prune": report["seconds"]["prune"], "seconds_recovery": report["seconds"]["finetune"],
            "seconds_total": time.perf_counter() - start, "notes": report["notes"]}


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| pass | ratio | recovery (epochs) | MACs kept | acc. unpruned | acc. network the pass trained | "
             "acc. pruned, before recovery | acc. after recovery | channels kept | run (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pass']} | {r['ratio']} | {r['recovery']} ({r['recovery_epochs']}) | "
                     f"{100 * r['macs_kept']:.1f}% | {pct(r['acc_unpruned'])} | {pct(r['acc_trained_copy'])} | "
                     f"{pct(r['acc_pruned'])} | {pct(r['acc_recovered'])} | "
                     f"{', '.join(f'{k}/{t}' for k, t in zip(r['kept'], r['total']))} | {r['seconds_total']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", nargs="+", default=["l1", "slimming", "scratch"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "headline.json")
    args = ap.parse_args()
    started = time.perf_counter()
    rows = each_run(args.passes, args.ratios, one)
    save(args.out, rows, __file__, started)
    print(table(rows))


if __name__ == "__main__":
    main()
