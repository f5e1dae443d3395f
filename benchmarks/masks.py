"""What channel masks cost (issue 15's benchmark): inserting them against tracing, and a training step of
the masked graph against the eager model's step.

    python benchmarks/masks.py [--batch 8] [--steps 5] [--rounds 3]

For resnet50 (torchvision) and a 12-layer ViT (timm vit_small_patch16_224), random weights, 224x224:

- trace, analyze and insert_masks times (insert: a Scale mask on every prunable group);
- one SGD training step (forward, cross-entropy, backward, step) of the eager model, of the traced graph
  without masks (emit with nothing removed) and of the masked graph (weights and masks in their own
  optimisers), median over ``steps`` steps per round, rounds interleaved so machine noise hits all three
  alike; the ratio masked / eager is the number the issue bounds (<= 1.3).

Writes benchmarks/results/masks.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from _results import save

import fxprune
from fxprune.analysis.reindex import Reindexing
from fxprune.compaction.emit import emit
from fxprune.masking import Scale, insert_masks
from fxprune.recovery.engine import MaskTraining, train

OUT = Path(__file__).resolve().parent / "results" / "masks.json"


def _models() -> dict[str, Callable[[], torch.nn.Module]]:
    import timm
    import torchvision

    return {"resnet50": lambda: torchvision.models.resnet50(num_classes=100),
            "vit_small_patch16_224 (12 layers)": lambda: timm.create_model("vit_small_patch16_224", pretrained=False,
                                                                             num_classes=100)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _step_time(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
               masks: list[torch.nn.Parameter] | None = None) -> float:
    """Median seconds of one training step through the engine's own loop (one epoch of ``steps`` batches
    after one warm-up batch), so the masked graph pays exactly what a pass pays."""
    times: list[float] = []

    class Clock:
        def __iter__(self):
            for _ in range(steps + 1):
                self.start = time.perf_counter()
                yield x, y
                times.append(time.perf_counter() - self.start)

    params = [p for p in module.parameters() if not masks or all(p is not m for m in masks)]
    train(module, Clock(), F.cross_entropy, epochs=1, lr=1e-4, schedule="none", parameters=params,
          masks=MaskTraining(masks, lr=1e-3) if masks else None)
    return statistics.median(times[1:])


def measure(name: str, make: Callable[[], torch.nn.Module], batch: int, steps: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make().eval()
    example = (torch.randn(2, 3, 224, 224),)
    gm, t_trace = _timed(lambda: fxprune.trace(model, example))
    groups, t_analyze = _timed(lambda: fxprune.analyze(gm))
    masked, t_insert = _timed(lambda: insert_masks(gm, groups, lambda g: Scale(len(g))))
    plain = emit(gm, Reindexing(groups, np.zeros(len(groups.comp_group), bool)), {})
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
    runs: dict[str, list[float]] = {"eager": [], "graph": [], "masked": []}
    for _ in range(rounds):
        runs["eager"].append(_step_time(model, x, y, steps))
        runs["graph"].append(_step_time(plain, x, y, steps))
        runs["masked"].append(_step_time(masked.module, x, y, steps, masked.mask_parameters()))
    step = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": name, "prunable_groups": len(groups.prunable), "masks": len(masked.masks),
            "trace_s": round(t_trace, 3), "analyze_s": round(t_analyze, 3), "insert_s": round(t_insert, 3),
            "insert_over_trace": round(t_insert / t_trace, 3),
            "step_s": {k: round(v, 4) for k, v in step.items()},
            "step_rounds_s": {k: [round(t, 4) for t in v] for k, v in runs.items()},
            "masked_over_eager_rounds": [round(m / e, 3) for m, e in zip(runs["masked"], runs["eager"])],
            "masked_over_eager": round(step["masked"] / step["eager"], 3),
            "graph_over_eager": round(step["graph"] / step["eager"], 3),
            "batch": batch, "steps": steps, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    started = time.perf_counter()
    rows = []
    for name, make in _models().items():
        row = measure(name, make, args.batch, args.steps, args.rounds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(OUT, {"rows": rows}, __file__, started)


if __name__ == "__main__":
    main()
