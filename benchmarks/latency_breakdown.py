"""Why a pruned CNN is less faster than its MACs promise: time and MACs per class of op, before and after.

Each model (random weights) is traced and pruned with l1 at 0.5 (fxprune's defaults); the traced original
and the compacted module then run node by node, taking turns run by run, under an ``torch.fx.Interpreter``
that times every node
(batch 8 at 224, one thread, ``--repeats`` runs after a warm-up; a speed-up is the median over runs of
the two models' times in the same turn). Nodes are classed as:

    conv 1x1        groups 1, a 1x1 kernel (the pointwise convolutions: MAC-bound)
    conv kxk        groups 1, a larger kernel
    conv grouped    grouped and depthwise convolutions (few MACs per byte moved)
    batch norm      inference batch norm (a pass over the activations)
    elementwise     activations, adds, multiplies (squeeze-excitation scales), clamps
    pool / other    pooling, linear layers, reshapes, everything else

and each class gets its share of the original's time, its time speed-up and its MACs reduction
(FlopCounterMode's, per node). Where a class's time follows its MACs, the kernels keep the promise and the gap
is in the classes whose cost follows the activations (which halve at ratio 0.5 while pointwise MACs quarter).
Each row also gets a bound: each class's work reduction (MACs for convolutions and other products, elements
written for the rest, from the plan's shapes) and the speed-up the time shares allow if every class ran exactly
as much faster as its work shrinks (perfect kernels): ``bound``, and ``bound_over_macs_reduction`` (a ceiling
on speed-up / MACs reduction that no emitted graph can pass).

    python benchmarks/latency_breakdown.py [--models tv:mobilenet_v2 ...]
        [--out benchmarks/results/latency_breakdown.json]
    python benchmarks/latency_breakdown.py --models tv:mobilenet_v2 --round-to 1 8 16   # does rounding pay?
    python benchmarks/latency_breakdown.py --bound-only --out benchmarks/results/latency_breakdown.json  # no timing
    python benchmarks/latency_breakdown.py --group-widths --threads 2 --out benchmarks/results/group_widths.json
    python benchmarks/latency_breakdown.py --widths-in-models --threads 2 --repeats 3 --models tv:regnet_y_800mf \
        tv:regnet_y_1_6gf tv:regnet_y_3_2gf tv:regnet_x_1_6gf tv:regnet_x_8gf tv:regnet_y_8gf tv:resnext50_32x4d \
        --out benchmarks/results/group_widths_models.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.selection.latency import op_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load, save  # noqa: E402
from latency import build  # noqa: E402 - the same model builder as the latency sweep

CNNS = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:efficientnet_b0", "tv:regnet_y_800mf",
        "tv:convnext_tiny", "timm:resnet50d"]
CLASSES = ("conv 1x1", "conv kxk", "conv grouped", "batch norm", "elementwise", "pool / other")
_ELEMENTWISE = ("relu", "hardtanh", "clamp", "silu", "sigmoid", "hardswish", "hardsigmoid", "gelu", "add", "mul",
                "div", "sub")


_COARSE = {"conv 1x1": "conv 1x1", "conv kxk": "conv kxk", "conv grouped": "conv grouped", "batch_norm": "batch norm"}


def classify(node: fx.Node, module: torch.nn.Module) -> str | None:
    """The class of one node (None: placeholders, outputs, attributes): the latency model's op class
    (``fxprune.selection.latency.op_class``), its other ops folded into elementwise and pool / other."""
    c = op_class(node, module)
    if c is None or c in _COARSE:
        return None if c is None else _COARSE[c]
    return "elementwise" if any(c == e or c.startswith(e + "_") for e in _ELEMENTWISE) else "pool / other"


class Timed(fx.Interpreter):
    """Runs a GraphModule node by node, adding each node's seconds and MACs to its class."""

    def __init__(self, module: fx.GraphModule, count_macs: bool = False) -> None:
        super().__init__(module)
        self.seconds = dict.fromkeys(CLASSES, 0.0)
        self.macs = dict.fromkeys(CLASSES, 0)
        self.count_macs = count_macs  # count each node's MACs instead of timing it
        self.classes = {n: classify(n, module) for n in module.graph.nodes}

    def run_node(self, n: fx.Node) -> Any:
        cls = self.classes[n]
        if cls is None:
            return super().run_node(n)
        if self.count_macs:
            with FlopCounterMode(display=False) as fc:
                out = super().run_node(n)
            self.macs[cls] += fc.get_total_flops() // 2
            return out
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.seconds[cls] += time.perf_counter() - t0
        return out


def _macs(gm: fx.GraphModule, x: tuple) -> dict[str, int]:
    t = Timed(gm, count_macs=True)
    with torch.no_grad():
        t.run(*x)
    return dict(t.macs)


def profile(models: list[fx.GraphModule], x: tuple, repeats: int) -> list[list[dict[str, float]]]:
    """Milliseconds per class of each model, one dict per run, the models taking turns run by run (so that
    the machine's drift, up to 25% between minutes here, hits both alike), after two warm-up runs."""
    runs: list[list[dict[str, float]]] = [[] for _ in models]
    with torch.no_grad():
        for i in range(repeats + 2):
            for k, gm in enumerate(models):
                t = Timed(gm)
                t.run(*x)
                if i >= 2:
                    runs[k].append({c: 1000 * v for c, v in t.seconds.items()})
    return runs


def _ratio(before: list[float], after: list[float]) -> float:
    """The median over runs of before / after of the same turn: a drift between turns cancels."""
    return statistics.median(b / a for b, a in zip(before, after) if a > 0) if any(after) else float("nan")


def onnx_latency(models: list[torch.nn.Module], x: tuple, repeats: int, threads: int) -> list[list[float]]:
    """Milliseconds per forward of each model exported to ONNX (``torch.onnx.export(dynamo=True)``) and run by
    onnxruntime with its default graph optimisations (batch norm folded into the convolution, activations
    fused into it), ``threads`` intra-op threads, the models taking turns run by run: each one's times."""
    import tempfile

    import onnxruntime as ort

    from fxprune.artifacts import export_program

    sessions = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(models):
            path = f"{tmp}/{i}.onnx"
            torch.onnx.export(export_program(m, x), x, dynamo=True, verbose=False).save(path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            sessions.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
    feeds = [{s.get_inputs()[0].name: x[0].numpy()} for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(repeats + 2):
        for k, (sess, feed) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            if i >= 2:
                times[k].append(1000 * (time.perf_counter() - t0))
    return times


def one(spec: str, batch: int, repeats: int, round_to: int = 1, onnx: bool = False) -> dict[str, Any]:
    model, x1 = build(spec, 1, 224)
    _, x = build(spec, batch, 224)
    gm = fxprune.trace(model, x1).eval()
    res = fxprune.prune(model, x1, "l1", 0.5, budget=fxprune.Budget(round_to=round_to))
    runs_b, runs_a = profile([gm, res.module.eval()], x, repeats)
    macs_before, macs_after = _macs(gm, x), _macs(res.module.eval(), x)
    before = {c: statistics.median(r[c] for r in runs_b) for c in CLASSES}
    after = {c: statistics.median(r[c] for r in runs_a) for c in CLASSES}
    total_b, total_a = sum(before.values()), sum(after.values())
    mb, ma = sum(macs_before.values()), sum(macs_after.values())
    rows = {c: {"share_of_time": round(before[c] / total_b, 3), "ms": [round(before[c], 2), round(after[c], 2)],
                "speedup": round(_ratio([r[c] for r in runs_b], [r[c] for r in runs_a]), 2),
                "macs_reduction": round(macs_before[c] / macs_after[c], 2) if macs_after[c] else None}
            for c in CLASSES if before[c] > 0}
    speedup = _ratio([sum(r.values()) for r in runs_b], [sum(r.values()) for r in runs_a])
    extra = {}
    if onnx:
        tb, ta = onnx_latency([model, res.module.eval()], x, repeats, torch.get_num_threads())
        ratio = _ratio(tb, ta)
        extra = {"onnxruntime": {"ms": [round(statistics.median(tb), 1), round(statistics.median(ta), 1)],
                                 "speedup": round(ratio, 2),
                                 "speedup_over_macs_reduction": round(ratio / (mb / ma), 2)}}
    return {**extra, "model": spec, "batch": batch, "round_to": round_to, "threads": torch.get_num_threads(),
            "ms": [round(total_b, 1), round(total_a, 1)], "speedup": round(speedup, 2),
            "macs_reduction": round(mb / ma, 2), "speedup_over_macs_reduction": round(speedup / (mb / ma), 2),
            "classes": rows}


def work_reduction(spec: str, round_to: int = 1) -> dict[str, float]:
    """Each class's work before / after l1 at 0.5: MACs for convolutions and other products, elements written for
    the rest (``fxprune.selection.latency.node_work``, from the plan's shapes): how much faster each class would
    run if its time followed its work exactly."""
    import numpy as np

    from fxprune.compaction import Reindexing
    from fxprune.selection.latency import node_work

    model, x1 = build(spec, 1, 224)
    res = fxprune.prune(model, x1, "l1", 0.5, budget=fxprune.Budget(round_to=round_to))
    gm = res.groups.gm
    full, after = Reindexing(res.groups, np.zeros_like(res.removed)), Reindexing(res.groups, res.removed)
    w0, w1 = dict.fromkeys(CLASSES, 0.0), dict.fromkeys(CLASSES, 0.0)
    for n in gm.graph.nodes:
        if (c := classify(n, gm)) is not None:
            w0[c] += node_work(n, full)
            w1[c] += node_work(n, after)
    return {c: w0[c] / w1[c] for c in CLASSES if w1[c] > 0}


def add_bound(row: dict[str, Any]) -> dict[str, Any]:
    """The best speed-up the row's time shares allow: every class as much faster as its work shrinks, the
    kernels perfect (``bound``), and that over the MACs reduction (``bound_over_macs_reduction``)."""
    work = work_reduction(row["model"], row.get("round_to", 1))
    for c, v in row["classes"].items():
        v["work_reduction"] = round(work.get(c, 1.0), 2)
    bound = 1 / sum(v["share_of_time"] / v["work_reduction"] for v in row["classes"].values())
    return {**row, "bound": round(bound, 2), "bound_over_macs_reduction": round(bound / row["macs_reduction"], 2)}


GROUP_WIDTH_CASES = [(9, 56), (20, 28), (6, 14)]  # (conv groups, resolution): RegNetY-800MF's stages
GROUP_WIDTHS = [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]


def group_widths(batch: int, repeats: int) -> list[dict[str, Any]]:
    """Milliseconds per channel of group width of a 3x3 grouped convolution (``groups`` groups of ``width`` in and
    out channels each, batch ``batch``) for every width in ``GROUP_WIDTHS``: what ``group_width_to`` rests on."""
    rows = []
    for groups, size in GROUP_WIDTH_CASES:
        per_channel = {}
        for width in GROUP_WIDTHS:
            conv = torch.nn.Conv2d(width * groups, width * groups, 3, padding=1, groups=groups, bias=False).eval()
            x = torch.randn(batch, width * groups, size, size)
            times = []
            with torch.no_grad():
                for i in range(repeats + 2):
                    t0 = time.perf_counter()
                    conv(x)
                    if i >= 2:
                        times.append(1000 * (time.perf_counter() - t0))
            per_channel[width] = round(statistics.median(times) / width, 4)
        rows.append({"groups": groups, "size": size, "batch": batch, "threads": torch.get_num_threads(),
                     "ms_per_channel": per_channel})
        print(f"groups {groups} at {size}x{size}: " + ", ".join(f"{w}: {v:.3f}" for w, v in per_channel.items()),
              flush=True)
    return rows


def widths_in_models(specs: list[str], batch: int, rounds: int) -> list[dict[str, Any]]:
    """Each model pruned with l1 at 0.5 twice, group widths as the ratio says (``group_width_to=1``) and rounded by
    the device default, the original and both timed in ``rounds`` interleaved rounds (eager, whole forwards)."""
    from fxprune.measure import count_macs, interleaved_latency
    from fxprune.selection.budget import default_group_width

    rows = []
    for spec in specs:
        model, x = build(spec, batch, 224)
        exact = fxprune.prune(model, x, "l1", 0.5, budget=fxprune.Budget(group_width_to=1)).module.eval()
        rounded = fxprune.prune(model, x, "l1", 0.5).module.eval()
        times = interleaved_latency({"original": (model, x), "widths 1": (exact, x), "rounded": (rounded, x)},
                                    rounds=rounds, repeats=3, warmup_first=1)
        ms = {k: statistics.median(v) for k, v in times.items()}
        macs = count_macs(model, x)
        rows.append({"model": spec, "batch": batch, "threads": torch.get_num_threads(),
                     "group_width_to": default_group_width("cpu"), "ms": {k: round(v, 1) for k, v in ms.items()},
                     "macs_kept": {"widths 1": round(count_macs(exact, x) / macs, 3),
                                   "rounded": round(count_macs(rounded, x) / macs, 3)},
                     "speedup": {"widths 1": round(ms["original"] / ms["widths 1"], 2),
                                 "rounded": round(ms["original"] / ms["rounded"], 2)}})
        print(rows[-1], flush=True)
    return rows


def _save(rows: list[dict[str, Any]], out: str | None) -> None:
    if out:
        save(out, rows, __file__)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=CNNS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--round-to", type=int, nargs="*", default=[1], help="one row per value (kept positions a "
                    "multiple of N)")
    ap.add_argument("--onnx", action="store_true", help="also time both models in onnxruntime (batch norm "
                    "folded, activations fused), as deployed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bound-only", action="store_true", help="add the work-reduction bound to the rows already in "
                    "--out, timing nothing")
    ap.add_argument("--group-widths", action="store_true", help="time a grouped 3x3 convolution at every group width "
                    "instead (per channel; what group_width_to rests on), into --out")
    ap.add_argument("--widths-in-models", action="store_true", help="time --models pruned at 0.5 with group widths as "
                    "the ratio says and rounded (the device default), whole forwards, into --out")
    args = ap.parse_args(argv)
    if args.widths_in_models:
        torch.set_num_threads(args.threads)
        rows = widths_in_models(args.models, args.batch, args.repeats)
        _save(rows, args.out)
        return rows
    if args.group_widths:
        torch.set_num_threads(args.threads)
        rows = group_widths(args.batch, args.repeats)
        _save(rows, args.out)
        return rows
    if args.bound_only:
        rows = [add_bound(r) for r in load(args.out)]
        _save(rows, args.out)
        for r in rows:
            print(f"{r['model']}: at best {r['bound']}x for {r['macs_reduction']}x fewer MACs "
                  f"({r['bound_over_macs_reduction']})")
        return rows
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for spec, round_to in [(m, r) for m in args.models for r in args.round_to]:
        rows.append(add_bound(one(spec, args.batch, args.repeats, round_to, args.onnx)))
        r = rows[-1]
        print(f"{spec} round_to {round_to}: {r['speedup']}x for {r['macs_reduction']}x fewer MACs "
              f"({r['speedup_over_macs_reduction']})", flush=True)
        if "onnxruntime" in r:
            o = r["onnxruntime"]
            print(f"   onnxruntime: {o['speedup']}x ({o['speedup_over_macs_reduction']})", flush=True)
        for c, v in r["classes"].items():
            print(f"   {c:14s} {v['share_of_time']:6.1%} of time  {v['speedup']:5.2f}x faster  "
                  f"{v['macs_reduction'] or '-'}x fewer MACs", flush=True)
        _save(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
