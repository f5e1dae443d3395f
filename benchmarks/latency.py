"""Latency of pruned models at real sizes: the figure the README quotes next to the headline table.

    python benchmarks/latency.py [--models resnet50 mobilenet_v3_large] [--ratio 0.5] [--batch 8] [--size 224]
                                 [--out benchmarks/results/latency.json]

Each model (torchvision, random weights) is pruned with l1 at ``--ratio`` (fxprune's default per-group
scope) and the original and the compacted module are timed in eval mode, float32, on this machine's CPU
with torch's default thread count: the median of ``--repeats`` forwards after a warm-up
(``fxprune.cli.measure.latency_ms``, what ``fxprune bench`` uses). Original and pruned runs alternate in
rounds so that a load change on the machine affects both. MACs are FlopCounterMode's, as everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import fxprune
from fxprune.cli.measure import count_macs, latency_ms

ROOT = Path(__file__).resolve().parents[1]


def one(name: str, ratio: float, batch: int, size: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(batch, 3, size, size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        res = fxprune.prune(model, x, "l1", ratio)
        prune_s = time.perf_counter() - start
    pruned = res.module.eval()
    times: dict[str, list[float]] = {"original": [], "pruned": []}
    with torch.no_grad():
        for _ in range(rounds):
            for label, m in (("original", model), ("pruned", pruned)):
                times[label].append(latency_ms(m, x, repeats=repeats, budget_s=60.0))
    orig, new = statistics.median(times["original"]), statistics.median(times["pruned"])
    return {"model": name, "ratio": ratio, "batch": batch, "size": size, "prune_s": prune_s,
            "macs_before": count_macs(model, x), "macs_after": count_macs(pruned, x),
            "params_before": sum(p.numel() for p in model.parameters()),
            "params_after": sum(p.numel() for p in pruned.parameters()),
            "latency_ms_original": orig, "latency_ms_pruned": new, "speedup": orig / new,
            "latency_rounds_ms": times}


def environment() -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "fxprune_commit": commit, "date": time.strftime("%Y-%m-%d")}


def table(rows: list[dict]) -> str:
    lines = ["| model | input | l1 ratio | MACs | params | latency original (ms) | latency pruned (ms) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['ratio']} | "
                     f"{r['macs_before'] / 1e9:.1f}G -> {r['macs_after'] / 1e9:.1f}G | "
                     f"{r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M | "
                     f"{r['latency_ms_original']:.0f} | {r['latency_ms_pruned']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    args = ap.parse_args()
    rows = []
    for name in args.models:
        rows.append(one(name, args.ratio, args.batch, args.size, args.repeats, args.rounds))
        print(table(rows[-1:]), flush=True)
    command = " ".join(["python benchmarks/latency.py"] + sys.argv[1:])
    Path(args.out).write_text(json.dumps({"env": environment(), "command": command, "args": vars(args), "rows": rows},
                                         indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
