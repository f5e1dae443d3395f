"""SANP's fidelity benchmark on the bundled digits task (examples/digits.py).

    python benchmarks/sanp.py [--seeds 3] [--epochs 5] [--targets 0.5,0.35]

Per average-MACs target T and seed, from the pre-trained digits network:

- sanp dynamic: ``fxprune.prune(..., "sanp", target_macs=T)`` (``epochs`` epochs of joint training); the
  dynamic module's accuracy (= the masked network's, each sample at its own channels), its average
  per-sample MACs (the cost model's count of each validation sample's kept channels, SPMs included) and
  its measured batch-1 latency;
- sanp static: the same run's static variant (channels no training sample keeps removed, no gating);
- l1 + fine-tune: l1 at the dynamic network's AVERAGE MACs, fine-tuned for the same ``epochs``;
- original: the pre-trained network.

Scale check (``--scale``): the same dynamic-module mechanism on torchvision's ResNet-18 at 224x224, batch 1,
SPMs with random weights gating the inner channel of every basic block (about half of them kept per
sample, no training): measured latency of the dynamic module against the traced original, and the
average MACs, to see where skipping work pays for its own overhead.

Latency: mean of one forward at batch 1 over 64 validation images, median of 3 rounds, 1 CPU thread, in
one process; "original graph" is the traced original run op by op like the dynamic and static modules
(the fair baseline for them; the eager model skips fx's per-node Python). Writes
benchmarks/results/sanp.json (the README's table).
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import example, mean_std
from _results import save

import fxprune
from fxprune.measure import batch1_ms
from fxprune.recovery.modes import recover

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sanp.json"


def _samples(digits: Any, n: int = 64) -> list[torch.Tensor]:
    xs = torch.cat([x for x, _ in digits.val_loader()])[:n]
    return [xs[i:i + 1] for i in range(len(xs))]


def run(digits: Any, model: torch.nn.Module, target: float, epochs: int, seed: int) -> dict[str, dict[str, float]]:
    data = {"train_loader": digits.train_loader(), "val_loader": digits.val_loader(), "evaluate": digits.evaluate}
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(model, digits.example_inputs(), "sanp", budget=fxprune.Budget(target_macs=target),
                            options={"epochs": epochs, "seed": seed}, **data)
    rep = res.report
    lat = rep["latency_ms_batch1"]
    rows = {"sanp dynamic": {"accuracy": rep["dynamic_metrics"]["accuracy"], "macs": rep["average_macs"],
                             "latency_ms": lat["dynamic"]},
            "sanp static": {"accuracy": float(digits.evaluate(res.compacted.eval())["accuracy"]),
                            "macs": res.cost_after.macs / res.cost_before.macs, "latency_ms": lat["static"]},
            "original": {"accuracy": float(digits.evaluate(model)["accuracy"]), "macs": 1.0,
                         "latency_ms": lat["original graph"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1 = fxprune.prune(model, digits.example_inputs(), "l1", budget=fxprune.Budget(target_macs=rep["average_macs"]))
    torch.manual_seed(seed)
    recover(l1.module, mode="finetune", train_loader=digits.train_loader(), epochs=epochs, lr=0.01)
    rows["l1 + fine-tune"] = {"accuracy": float(digits.evaluate(l1.module.eval())["accuracy"]),
                              "macs": l1.cost_after.macs / l1.cost_before.macs,
                              "latency_ms": batch1_ms(l1.module.eval(), _samples(digits))}
    return rows


def scale_check(samples: int = 8) -> dict[str, float]:
    """ResNet-18 at 224, random SPMs (see the module docstring): latency (ms) and average MACs kept."""
    import torchvision
    from torch import nn

    from fxprune.analysis import analyze
    from fxprune.compaction.dynamic import dynamic_module
    from fxprune.passes.base import PassContext
    from fxprune.passes.sanp import SPM, _gates
    from fxprune.selection.cost import CostCounter
    from fxprune.tracing.tracer import trace

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    gm = trace(model, (torch.randn(2, 3, 224, 224),))
    ctx = PassContext(gm, analyze(gm), model, {})
    gates, _ = _gates(ctx, lambda g, c_in, axis: SPM(c_in, len(g), axis, init_bias=0.0))
    for g in gates.values():
        nn.init.normal_(g.spm.fc2.weight, std=2.0)
    masked = ctx.insert_masks(lambda g: gates[g.id].spm, only=list(gates), training=True)
    masked.module.eval()
    dyn = dynamic_module(gm, masked.state(), gates).eval()
    xs = [torch.randn(1, 3, 224, 224) for _ in range(samples)]
    counter = CostCounter(ctx.groups)
    full, fractions = counter().macs, []
    with torch.no_grad():
        for x in xs:
            masked.module(x)
            removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
            for gid, g in gates.items():
                removed[ctx.groups[gid].channels[g.spm.last[0].numpy() == 0]] = True
            fractions.append((counter(removed).macs + sum(g.spm.macs for g in gates.values())) / full)
    original = batch1_ms(gm, xs)
    dynamic = batch1_ms(dyn, xs)
    return {"gated_groups": len(gates), "average_macs": float(np.mean(fractions)), "original_graph_ms": original,
            "dynamic_ms": dynamic, "speedup": original / dynamic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--targets", default="0.5,0.35")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    scale = scale_check() if args.scale else None
    print("scale check", scale, flush=True)
    digits = example("digits")
    model = digits.model().eval()
    table: dict[str, dict[str, Any]] = {}
    for target in [float(t) for t in args.targets.split(",")]:
        runs: dict[str, list[dict[str, float]]] = {}
        for seed in range(args.seeds):
            for row, values in run(digits, copy.deepcopy(model), target, args.epochs, seed).items():
                runs.setdefault(row, []).append(values)
                print(target, seed, row, {k: round(v, 4) for k, v in values.items()}, flush=True)
        table[str(target)] = mean_std(runs)
    save(OUT, {"settings": vars(args), "rows": table, "resnet18_scale_check": scale}, __file__, started)
    for target, rows in table.items():
        print(f"target {target}")
        for row, t in rows.items():
            print(f"  {row:16} acc {100 * t['accuracy']['mean']:6.2f}±{100 * t['accuracy']['std']:4.2f} "
                  f"MACs {t['macs']['mean']:.3f}±{t['macs']['std']:.3f} latency {t['latency_ms']['mean']:.3f} ms")


if __name__ == "__main__":
    main()
