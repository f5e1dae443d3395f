"""``fxprune eval``: the robustness of an output folder's original and pruned model (fxprune.robustness)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fxprune.artifacts import MODEL, ORIGINAL, load
from fxprune.robustness import PGD, robust_metrics

from .modelfile import load_model_file

__all__ = ["evaluate_folder", "RobustnessError", "ATTACKS"]

ATTACKS = ("pgd",)


class RobustnessError(ValueError):
    """An attack that does not exist, a folder without its models, or a model file without val_loader()."""


def _load(folder: Path, name: str) -> torch.nn.Module:
    try:
        return load(folder, name)
    except FileNotFoundError as exc:
        raise RobustnessError(str(exc)) from None


def evaluate_folder(model_file: Path, folder: Path, *, attack: str = "pgd", eps: float = 0.03, steps: int = 40,
                    step: float | None = None, batches: int | None = None) -> list[dict[str, Any]]:
    """One row per model (original, pruned): clean accuracy, PGD accuracy, mean vulnerability."""
    if attack not in ATTACKS:
        raise RobustnessError(f"--attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    try:
        pgd = PGD(eps=eps, step=step, steps=steps)
    except ValueError as exc:
        raise RobustnessError(str(exc)) from None
    folder = Path(folder)
    models = {"original": _load(folder, ORIGINAL), "pruned": _load(folder, MODEL)}
    mf = load_model_file(model_file)
    mf.require("val_loader", why="eval (the data to attack)")
    loss = mf.loss()
    rows = []
    for name, model in models.items():
        metrics = robust_metrics(model, mf.loader("val_loader"), pgd, loss_fn=loss, batches=batches)
        rows.append({"model": name, "attack": attack, "eps": eps, "steps": steps, **metrics})
    return rows
