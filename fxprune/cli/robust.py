"""``fxprune eval``: the model file's metrics (``evaluate()``) and the robustness (fxprune.robustness) of an output
folder's original and pruned model. A folder of the modules target (a detector: no ``.pt2``) is rebuilt from the
model file and the folder's plan, as ``fxprune bench --model`` does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fxprune.artifacts import MODEL, ORIGINAL, PLAN, load
from fxprune.robustness import PGD, robust_metrics

from .modelfile import ModelFile, load_model_file
from .rebuild import rebuilt

__all__ = ["evaluate_folder", "RobustnessError", "ATTACKS"]

ATTACKS = ("pgd",)


class RobustnessError(ValueError):
    """An attack that does not exist, a folder without its models, or a model file without val_loader()."""


def _models(folder: Path, mf: ModelFile) -> dict[str, torch.nn.Module]:
    """The original and the pruned model: the folder's programs, or, for a folder of the modules target (a plan and
    weights, no program), the model file's ``model()`` and that model resized by the plan."""
    if not (folder / MODEL).is_file() and (folder / PLAN).is_file():
        return rebuilt(folder, mf, "eval of a folder without model.pt2 (the modules target)")
    try:
        return {"original": load(folder, ORIGINAL), "pruned": load(folder, MODEL)}
    except FileNotFoundError as exc:
        raise RobustnessError(str(exc)) from None


def evaluate_folder(model_file: Path, folder: Path, *, attack: str = "pgd", eps: float = 0.03, steps: int = 40,
                    step: float | None = None, batches: int | None = None) -> list[dict[str, Any]]:
    """One row per model (original, pruned): the model file's ``evaluate()`` metrics when it defines one, and with an
    attack (``none``: no attack) clean accuracy, PGD accuracy and mean vulnerability."""
    if attack not in (*ATTACKS, "none"):
        raise RobustnessError(f"--attack must be one of {', '.join((*ATTACKS, 'none'))}, got {attack!r}")
    pgd = None
    if attack != "none":
        try:
            pgd = PGD(eps=eps, step=step, steps=steps)
        except ValueError as exc:
            raise RobustnessError(str(exc)) from None
    folder = Path(folder)
    mf = load_model_file(model_file)
    if pgd is not None:
        mf.require("val_loader", why="eval (the data to attack; --attack none evaluates without attacking)")
    elif not mf.has("evaluate"):
        mf.require("evaluate", why="eval --attack none (the metrics to report)")
    models = _models(folder, mf)
    evaluate, loss = mf.get("evaluate"), mf.loss()
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {"model": name}
        if evaluate is not None:
            row["metrics"] = dict(evaluate(model))
        if pgd is not None:
            metrics = robust_metrics(model, mf.loader("val_loader"), pgd, loss_fn=loss, batches=batches)
            row.update({"attack": attack, "eps": eps, "steps": steps, **metrics})
        rows.append(row)
    return rows
