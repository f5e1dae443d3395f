"""The original and the pruned model of an output folder the modules target wrote (a plan and weights, no program
to load): rebuilt from the model file, for ``fxprune bench --model`` and ``fxprune eval``."""
from __future__ import annotations

from pathlib import Path

import torch

from .modelfile import ModelFile

__all__ = ["rebuilt"]


def rebuilt(folder: Path, mf: ModelFile, why: str) -> dict[str, torch.nn.Module]:
    """The original (the model file's ``model()``, in eval mode) and the pruned model rebuilt from the folder's plan
    and weights (``fxprune.load(DIR, model=...)``): a folder written by the modules target has no ``.pt2`` to read
    them from. ``why``: the command, named when the file defines no ``model()``."""
    from fxprune.artifacts import load

    mf.require("model", why=why)
    return {"original": mf.model().eval(), "pruned": load(folder, model=mf.model())}
