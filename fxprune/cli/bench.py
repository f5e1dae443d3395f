"""``fxprune bench DIR``: latency and peak memory of the original vs the compacted model of an output folder.

Both models come from the folder's exported programs (original.pt2, model.pt2) and run on the example
inputs stored in them, so the comparison needs neither fxprune's analysis nor the user's model code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifacts import MODEL, ORIGINAL
from .measure import latency_ms, peak_memory_bytes, to_device

__all__ = ["bench", "BenchError"]


class BenchError(FileNotFoundError):
    """The folder is not an fxprune output folder."""


def _load(path: Path) -> tuple[torch.nn.Module, Any]:
    ep = torch.export.load(str(path))
    args, kwargs = ep.example_inputs or ((), {})
    return ep.module(), (args if not kwargs else kwargs)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bench(folder: str | Path, *, repeats: int = 50, budget_s: float = 5.0) -> list[dict[str, Any]]:
    """One row per (device, model): median latency over ``repeats`` runs and peak memory."""
    folder = Path(folder)
    missing = [n for n in (ORIGINAL, MODEL) if not (folder / n).is_file()]
    if missing:
        raise BenchError(f"{folder} is not an fxprune output folder: missing {', '.join(missing)}")
    rows: list[dict[str, Any]] = []
    for device in devices():
        base = None
        for label, name in (("original", ORIGINAL), ("pruned", MODEL)):
            module, inputs = _load(folder / name)
            module, inputs = module.to(device), to_device(inputs, device)
            ms = latency_ms(module, inputs, repeats=repeats, budget_s=budget_s)
            base = base or ms
            rows.append({"device": device, "model": label, "latency_ms": ms,
                         "peak_memory_bytes": peak_memory_bytes(module, inputs),
                         "speedup": base / ms if label == "pruned" else None})
    return rows
