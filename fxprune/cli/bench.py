"""``fxprune bench DIR``: latency and peak memory of the original vs the compacted model of an output folder,
and whether the speed-up keeps the MACs promise.

Both models come from the folder's exported programs (original.pt2, model.pt2) and run on the example
inputs stored in them, so the comparison needs neither fxprune's analysis nor the user's model code.
With ``--model MODEL.py`` they come from the model file instead (the pruned one rebuilt from the folder's
plan and weights), which a folder of the modules target (a detector) needs: it has no programs.

Timing: both models are warmed up, then timed in ``rounds`` interleaved rounds (original, pruned,
original, ...; ``fxprune.measure.interleaved_latency``: wall time per forward, CUDA synchronised, torch's
current thread count), so a change of load on the machine hits both alike. Each round gives a median per model
and a speed-up;
the row reports the median over rounds and the spread (lowest and highest round). When the folder has a
``model.onnx`` (``fxprune export``) and onnxruntime is installed, it is timed too, in the same rounds, against
``original.onnx`` (written beside it) so that its speed-up compares one runtime with itself. The MACs reduction
(FlopCounterMode, as everywhere) sits next to the speed-up, with their ratio: 1.0 means the model got
exactly as much faster as it got smaller. A folder pruned to ``--target-latency T`` also gets the speed-up over
the one it promised, 1 / T (``latency_promise_kept``).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from fxprune.artifacts import MODEL, ORIGINAL
from fxprune.measure import count_macs, interleaved_latency, peak_memory_bytes, to_device

from .deploy import ONNX, ORIGINAL_ONNX, DeployError, onnx_feed, onnx_session, require_onnx
from .modelfile import load_model_file
from .rebuild import rebuilt

__all__ = ["bench", "BenchError"]


class BenchError(FileNotFoundError):
    """The folder is not an fxprune output folder."""


def _load(path: Path) -> tuple[torch.nn.Module, Any]:
    ep = torch.export.load(str(path))
    args, kwargs = ep.example_inputs or ((), {})
    return ep.module(), (args if not kwargs else kwargs)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bench(folder: str | Path, *, repeats: int = 50, rounds: int = 5,
          model_file: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per (device, model): latency (median over rounds, lowest and highest round), peak memory,
    MACs; the pruned row adds the speed-up (median and spread over rounds), the MACs reduction and their
    ratio. ``repeats`` timed forwards per model in all, in ``rounds`` interleaved rounds. ``model_file``:
    take both models from the model file and the folder's plan instead of its programs (needed for a
    folder of the modules target, which has none)."""
    folder = Path(folder)
    missing = [n for n in (ORIGINAL, MODEL) if not (folder / n).is_file()]
    if missing and model_file is None:
        hint = (" (a model compacted by resizing its modules: give --model MODEL.py)"
                if (folder / "plan.json").is_file() else "")
        raise BenchError(f"{folder} is not an fxprune output folder: missing {', '.join(missing)}{hint}")
    rounds = max(1, min(rounds, repeats))
    per_round = max(1, repeats // rounds)
    target = _latency_target(folder)
    rows: list[dict[str, Any]] = []
    for device in devices():
        models = {}
        if model_file is not None:
            mf = load_model_file(Path(model_file))
            mf.require("example_inputs", why="bench --model")
            inputs = mf.example_inputs()
            for label, module in rebuilt(folder, mf, "bench --model").items():
                models[label] = (module.to(device), to_device(inputs, device))
        else:
            for label, name in (("original", ORIGINAL), ("pruned", MODEL)):
                module, inputs = _load(folder / name)
                models[label] = (module.to(device), to_device(inputs, device))
        if device == "cpu" and (folder / ONNX).is_file() and _has_onnxruntime():
            if (folder / ORIGINAL_ONNX).is_file():  # the same runtime on both sides: a like-for-like speed-up
                models["original (onnxruntime)"] = (_OnnxModule(onnx_session(folder / ORIGINAL_ONNX)),
                                                    models["original"][1])
            models["pruned (onnxruntime)"] = (_OnnxModule(onnx_session(folder / ONNX)), models["pruned"][1])
        times = interleaved_latency(models, rounds=rounds, repeats=per_round)
        macs = {label: count_macs(m, x) for label, (m, x) in models.items() if label in ("original", "pruned")}
        for label, (module, inputs) in models.items():
            onnx = isinstance(module, _OnnxModule)
            row = {"device": device, "model": label, "threads": torch.get_num_threads(), "rounds": rounds,
                   "runs_per_round": per_round, "latency_ms": statistics.median(times[label]),
                   "latency_ms_min": min(times[label]), "latency_ms_max": max(times[label]),
                   "peak_memory_bytes": None if onnx else peak_memory_bytes(module, inputs),
                   "macs": macs["pruned" if label.startswith("pruned") else "original"], "speedup": None}
            if label.startswith("pruned"):
                base = _baseline(label, models)
                speedups = [o / p for o, p in zip(times[base], times[label])]
                row["baseline"] = base
                reduction = macs["original"] / max(macs["pruned"], 1)
                row.update(speedup=statistics.median(speedups), speedup_min=min(speedups),
                           speedup_max=max(speedups), macs_reduction=reduction,
                           promise_kept=statistics.median(speedups) / reduction)
                if target is not None:  # pruned to --target-latency: its promise is 1 / target
                    row.update(latency_target=target, latency_promise_kept=statistics.median(speedups) * target)
            rows.append(row)
    return rows


def _latency_target(folder: Path) -> float | None:
    """The --target-latency the folder was pruned to (report.json), or None."""
    import json

    from .output import REPORT_JSON

    try:
        target = json.loads((folder / REPORT_JSON).read_text()).get("target") or {}
    except (OSError, ValueError):
        return None
    return float(target["latency"]) if isinstance(target, dict) and target.get("latency") is not None else None


def _baseline(label: str, models: dict[str, Any]) -> str:
    """What a pruned row's speed-up is measured against: the original in the same runtime when the folder has
    it (``original.onnx`` for the onnxruntime row), else the original program."""
    same = label.replace("pruned", "original")
    return same if same in models else "original"


def _has_onnxruntime() -> bool:
    try:
        require_onnx()
    except DeployError:
        return False
    return True


class _OnnxModule(torch.nn.Module):
    """An onnxruntime session called like the module it was exported from (for the same timing loop)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.session.run(None, onnx_feed(self.session, args, kwargs))
