"""FLOP's fidelity benchmark on the char-level LM of the Python standard library (examples/charlm.py).

    python benchmarks/flop.py [--pretrain 300] [--prune-epochs 3] [--finetune-epochs 2] [--batches 50]

Rows (bits per character on the fixed validation windows, LOWER is better; parameters of the whole model;
latency: median forward of one 128-byte window, batch 1, on this CPU):

- dense: the CharLM pre-trained for ``pretrain`` steps;
- flop P: ``fxprune.prune(..., "flop", target_params=P)`` (P = 0.5 and 0.3 of the parameters: 50% and 70%
  sparsity of the whole model) with ``prune_epochs`` epochs of gate training, then ``finetune_epochs``
  epochs of fine-tuning (the engine, AdamW 1e-3); once with the authors' defaults, once per extra option
  set of ``--variants`` (default: ``prune_lr=0.03``: the multipliers' rate for a run this short);
- magnitude P: the same factorised model and budget, rank components scored by their singular value
  (no gate training), then fine-tuned for ``prune_epochs + finetune_epochs`` epochs (the same steps);
- dense-small P: a CharLM narrowed to about the same parameter count, trained from scratch for the
  same total number of steps as the dense model plus flop's (``pretrain + (prune + finetune) x batches``).

Claims checked: FLOP's final parameter fraction within 2% of the target; FLOP beats the same-size dense
model. Writes benchmarks/results/flop.json (the README's table).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import example
from _results import save

import fxprune
from fxprune.edits.factorize import merge_unprofitable
from fxprune.measure import latency_ms
from fxprune.passes.base import PassContext, Scores
from fxprune.passes.flop import Flop
from fxprune.recovery.engine import train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "flop.json"


@dataclass(frozen=True)
class MagnitudeFactors(Flop):
    """The baseline: FLOP's factorisation and budget, rank components scored by their singular value
    (|P column| x |Q row|), no gate training, no folding."""

    name = "flop-magnitude"

    def score(self, ctx: PassContext) -> fxprune.Decision:
        layers = self.layers(ctx.user)
        scores: Scores = {g.id: np.full(len(g), np.inf) for g in ctx.groups.prunable}
        for gid, (path, _) in self.rank_groups(ctx, layers).items():
            norms = [_rank_norms(ctx, gid, f"{path}.weight_{k}") for k in ("u", "v")]
            scores[gid] = (norms[0] * norms[1]).detach().double().cpu().numpy()
        # the weights as factorised; layers whose rank saves nothing merged back
        return fxprune.Decision(scores, finish=lambda removed: fxprune.Finish(edits=[merge_unprofitable(layers)]))


def _rank_norms(ctx: PassContext, gid: int, name: str) -> torch.Tensor:
    """The norm of every rank component's slice of factor ``name`` (its axis in the rank group, whatever
    the layer's layout: a linear's (r, in) rows or an addmm's (in, r) columns)."""
    t = ctx.tensor(name)
    axis = next(p.axis for p in ctx.groups[gid].params if p.name == name)
    return t.norm(dim=[d for d in range(t.dim()) if d != axis])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(name: str, module: torch.nn.Module, lm: Any, seconds: float, **extra: Any) -> dict[str, Any]:
    ids = lm.example_inputs()[0][:1]
    row = {"model": name, "bpc": round(lm.evaluate(module)["bpc"], 4), "params": _params(module),
           "latency_ms": round(latency_ms(module.eval(), (ids,), repeats=30), 3), "seconds": round(seconds, 1)}
    row.update(extra)
    print(json.dumps(row), flush=True)
    return row


def _finetune(module: torch.nn.Module, lm: Any, epochs: int) -> None:
    if epochs > 0:
        train(module, lm.train_loader(), lm.loss, epochs, 1e-3, optimizer="adamw", weight_decay=0.0,
              schedule="cosine")


def _small(lm: Any, params: int) -> torch.nn.Module:
    """A CharLM whose widths are scaled down until it has about ``params`` parameters."""
    best = None
    for d_model in range(32, 129, 8):
        for d_mlp in range(64, 513, 32):
            net = lm.CharLM(d_model=d_model, heads=4, d_mlp=d_mlp)
            gap = abs(_params(net) - params)
            if d_model % 4 == 0 and (best is None or gap < best[0]):
                best = (gap, d_model, d_mlp)
    torch.manual_seed(lm.SEED)
    return lm.CharLM(d_model=best[1], heads=4, d_mlp=best[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain", type=int, default=300)
    ap.add_argument("--prune-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--variants", default='[{"prune_lr": 0.03}]', help="JSON list of extra flop option sets")
    args = ap.parse_args()
    started = time.perf_counter()
    os.environ["CHARLM_STEPS"] = str(args.pretrain)
    os.environ["CHARLM_BATCHES"] = str(args.batches)
    lm = example("charlm")
    start = time.perf_counter()
    dense = lm.model()
    rows = [_row("dense", dense, lm, time.perf_counter() - start, steps=args.pretrain)]
    inputs = lm.example_inputs()
    steps = args.pretrain + (args.prune_epochs + args.finetune_epochs) * args.batches
    variants = [{}] + json.loads(args.variants)
    for target in (float(t) for t in args.targets.split(",")):
        for options in variants:
            torch.manual_seed(0)
            start = time.perf_counter()
            res = fxprune.prune(dense, inputs, "flop", budget=fxprune.Budget(target_params=target),
                                options={"epochs": args.prune_epochs, **options},
                                train_loader=lm.train_loader(), loss=lm.loss)
            pruned = lm.evaluate(res.module)["bpc"]
            _finetune(res.module, lm, args.finetune_epochs)
            label = "".join(f", {k}={v}" for k, v in options.items())
            rows.append(_row(f"flop {target}{label}", res.module, lm, time.perf_counter() - start, target=target,
                             options=options, bpc_before_finetune=round(pruned, 4),
                             kept=round(res.cost_after.params / res.cost_before.params, 4),
                             expected_sparsity=round(res.report["expected_sparsity"], 4),
                             target_sparsity=round(res.report["target_sparsity"], 4)))
            if not options:
                flop_params = rows[-1]["params"]
        start = time.perf_counter()
        res = fxprune.prune(dense, inputs, MagnitudeFactors(), budget=fxprune.Budget(target_params=target))
        pruned = lm.evaluate(res.module)["bpc"]
        _finetune(res.module, lm, args.prune_epochs + args.finetune_epochs)
        rows.append(_row(f"magnitude {target}", res.module, lm, time.perf_counter() - start, target=target,
                         bpc_before_finetune=round(pruned, 4),
                         kept=round(res.cost_after.params / res.cost_before.params, 4)))
        start = time.perf_counter()
        small = _small(lm, flop_params)
        lm.pretrain(small, steps)
        rows.append(_row(f"dense-small {target}", small.eval(), lm, time.perf_counter() - start, steps=steps,
                         target=target))
    save(OUT, {"args": vars(args), "rows": rows}, __file__, started)


if __name__ == "__main__":
    main()
