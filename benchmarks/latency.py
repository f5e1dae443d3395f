"""Latency of pruned models at real sizes: the figure the README quotes next to the headline table.

    python benchmarks/latency.py [--models resnet50 mobilenet_v3_large] [--ratio 0.5] [--batch 8] [--size 224]
                                 [--out benchmarks/results/latency.json]
    python benchmarks/latency.py --sweep [--out benchmarks/results/latency_sweep.json]

``--sweep``: torchvision, timm and Hugging Face models (``SWEEP_MODELS``), each at l1 ratio 0.5 (batch 1
and 8, ``round_to`` 1; batch 8 with ``round_to`` 8 and 16), at a MACs target of 0.5 (batch 8) and at a latency
target of 0.5 (batch 8 and 1: ``target_latency``, fxprune's latency model measured on this machine): latency
before and after, the speed-up, the MACs reduction and their ratio (1.0 = as much faster as smaller), and the
speed-up over the promise (the MACs reduction, or 1 / the latency target), written after every row.
``--budgets latency`` measures only those rows and replaces them in the results file, keeping the others.

Each model (torchvision, random weights) is pruned with l1 at ``--ratio`` (fxprune's default per-group
scope) and the original and the compacted module are timed in eval mode, float32, on this machine's CPU
with torch's default thread count: the median of ``--repeats`` forwards after a warm-up
(``fxprune.measure.latency_ms``, what ``fxprune bench`` uses). Original and pruned runs alternate in
rounds so that a load change on the machine affects both. MACs are FlopCounterMode's, as everywhere.
"""
from __future__ import annotations

import argparse
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
from _results import load, save

import fxprune
from fxprune.measure import count_macs, count_params, interleaved_latency

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "latency.json")


SWEEP_MODELS = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:efficientnet_b0", "tv:regnet_y_800mf",
                "tv:convnext_tiny", "tv:vit_b_16", "timm:resnet50d", "hf:bert"]
SWEEP_CONFIGS = [("ratio", 1, 1), ("ratio", 8, 1), ("ratio", 8, 8), ("ratio", 8, 16), ("macs", 8, 1), ("latency", 8, 1),
                 ("latency", 1, 1)]


def build(spec: str, batch: int, size: int) -> tuple[torch.nn.Module, tuple]:
    """``tv:NAME`` / ``timm:NAME`` (random weights, ``size`` x ``size`` images) or ``hf:bert`` (a 6-layer,
    512-wide BERT on ``size`` tokens)."""
    suite, _, name = spec.rpartition(":")
    torch.manual_seed(0)
    if suite == "hf":
        import transformers as T
        cfg = T.BertConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                           intermediate_size=2048, max_position_embeddings=512)
        return T.BertModel(cfg).eval(), (torch.randint(0, 1000, (batch, size)),)
    if suite == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    return model.eval(), (torch.randn(batch, 3, size, size),)


def one(name: str, ratio: float, batch: int, size: int, repeats: int, rounds: int, *, target_macs: float | None = None,
        round_to: int = 1, target_latency: float | None = None) -> dict:
    model, x = build(name if ":" in name else f"tv:{name}", batch, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        res = fxprune.prune(model, x, "l1", ratio,
                            budget=fxprune.Budget(target_macs=target_macs, round_to=round_to,
                                                  target_latency=target_latency))
        prune_s = time.perf_counter() - start
    pruned = res.module.eval()
    times = interleaved_latency({"original": (model, x), "pruned": (pruned, x)}, rounds=rounds, repeats=repeats,
                                warmup_first=0, warmup_each=3, budget_s=60.0)
    orig, new = statistics.median(times["original"]), statistics.median(times["pruned"])
    macs_before, macs_after = count_macs(model, x), count_macs(pruned, x)
    speedup = orig / new
    promise = 1 / target_latency if target_latency is not None else macs_before / max(macs_after, 1)
    return {"model": name, "ratio": ratio, "target_macs": target_macs, "target_latency": target_latency,
            "round_to": round_to, "batch": batch, "commit": environment()["fxprune_commit"],
            "size": size, "prune_s": prune_s, "macs_before": macs_before, "macs_after": macs_after,
            "params_before": count_params(model), "params_after": count_params(pruned),
            "latency_ms_original": orig, "latency_ms_pruned": new, "speedup": orig / new,
            "speedup_over_macs_reduction": (orig / new) / (macs_before / max(macs_after, 1)),
            # the promise: the MACs reduction for a ratio or MACs budget, 1 / target for a latency target
            "promised_speedup": promise, "speedup_over_promise": speedup / promise,
            "latency_model": res.latency, "latency_rounds_ms": times}


def environment() -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
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


def sweep_table(rows: list[dict]) -> str:
    lines = ["| model | budget | batch | round_to | MACs kept | latency ms before -> after | speed-up | "
             "speed-up / MACs reduction | speed-up / promise |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = (f"latency {r['target_latency']}" if r.get("target_latency") is not None else
                  f"MACs {r['target_macs']}" if r["target_macs"] is not None else f"ratio {r['ratio']}")
        promise = r.get("speedup_over_promise", r["speedup_over_macs_reduction"])
        lines.append(f"| {r['model']} | {budget} | {r['batch']} | {r['round_to']} | "
                     f"{r['macs_after'] / r['macs_before']:.2f} | {r['latency_ms_original']:.1f} -> "
                     f"{r['latency_ms_pruned']:.1f} | {r['speedup']:.2f}x | {r['speedup_over_macs_reduction']:.2f} | "
                     f"{promise:.2f} |")
    return "\n".join(lines)


def _budget(row: dict) -> str:
    return row.get("budget") or ("latency" if row.get("target_latency") is not None else
                                 "macs" if row.get("target_macs") is not None else "ratio")


def _new_rows(configs: list[tuple[str, int, int]], args: argparse.Namespace) -> list[dict]:
    """The (model, budget, batch, round_to) keys this run measures, as rows without figures."""
    models = args.models if args.models != ["resnet50"] else SWEEP_MODELS
    return [{"model": m, "budget": b, "batch": n, "round_to": r} for m in models for b, n, r in configs]


def _kept_rows(out: Path, args: argparse.Namespace) -> list[dict]:
    """With ``--budgets``: the rows already in ``out`` that this run does not measure again (kept, each with its
    own commit); without it, none (a full sweep starts over)."""
    if args.budgets is None or not out.exists():
        return []
    return [r for r in load(out)["rows"] if "error" not in r]


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out if args.out != DEFAULT_OUT else ROOT / "benchmarks" / "results" / "latency_sweep.json")
    configs = [c for c in SWEEP_CONFIGS if args.budgets is None or c[0] in args.budgets]
    done = {(r["model"], _budget(r), r["batch"], r["round_to"]) for r in _new_rows(configs, args)}
    rows: list[dict] = [r for r in _kept_rows(out, args)
                        if (r["model"], _budget(r), r["batch"], r["round_to"]) not in done]
    for spec in args.models if args.models != ["resnet50"] else SWEEP_MODELS:
        size = 128 if spec.startswith("hf:") else args.size
        for budget, batch, round_to in configs:
            ratio = 0.0 if budget != "ratio" else args.ratio
            targets = {f"target_{budget}": 0.5} if budget != "ratio" else {}
            try:
                rows.append(one(spec, ratio, batch, size, args.repeats, args.rounds, round_to=round_to, **targets))
            except Exception as exc:  # noqa: BLE001 - one failing row is reported, the sweep goes on
                rows.append({"model": spec, "batch": batch, "round_to": round_to, "budget": budget,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(rows[-1], flush=True)
                continue
            print(sweep_table(rows[-1:]).splitlines()[-1], flush=True)
            save(out, {"env": environment(), "rows": rows}, __file__)
    print(sweep_table([r for r in rows if "error" not in r]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--sweep", action="store_true", help="the model x budget x batch x round_to grid (see above)")
    ap.add_argument("--budgets", nargs="+", choices=["ratio", "macs", "latency"], default=None,
                    help="with --sweep: only these budgets' rows, replacing them in --out and keeping the others")
    args = ap.parse_args()
    if args.sweep:
        sweep(args)
        return
    rows = []
    for name in args.models:
        rows.append(one(name, args.ratio, args.batch, args.size, args.repeats, args.rounds))
        print(table(rows[-1:]), flush=True)
    command = " ".join(["python benchmarks/latency.py"] + sys.argv[1:])
    save(args.out, {"env": environment(), "command": command, "args": vars(args), "rows": rows}, __file__)
    print(table(rows))


if __name__ == "__main__":
    main()
