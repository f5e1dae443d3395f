"""The output folder and ``fxprune.load``: portable, pickle-free artifacts of a pruning run.

    model.pt2           the compacted model (torch.export; loads in plain PyTorch without fxprune)
    original.pt2        the model before pruning, for ``fxprune bench``
    model.safetensors   the compacted model's state dict
    plan.json           kept indices per parameter/buffer of the original model

Folders are written under a temporary name next to the target and renamed into place at the end, so
a failed run never leaves a half-written folder behind. ``source.py``: a graph torch.export cannot express
(sanp's dynamic module) as Python source and safetensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.compaction import as_trainable
from fxprune.compaction.plan import Plan
from fxprune.tracing.dynamic import INPUT_SHAPES, InputShapes
from fxprune.tracing.lazy_module import compiled
from fxprune.tracing.tracer import export_program as _export
from fxprune.tracing.tracer import normalize_inputs

__all__ = ["load", "export_program", "save_program", "save_weights", "save_plan", "write_json",
           "staging_folder", "check_target", "OutputExistsError", "MODEL", "ORIGINAL", "WEIGHTS", "PLAN"]

MODEL, ORIGINAL, WEIGHTS, PLAN = "model.pt2", "original.pt2", "model.safetensors", "plan.json"


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting it was not asked for."""


def export_program(module: nn.Module, example_inputs: Any,
                   shapes: InputShapes | None = None) -> torch.export.ExportedProgram:
    """``module`` in eval mode as an ExportedProgram whose input axes are free where ``shapes`` (default: what the
    module was traced with, ``module.meta[INPUT_SHAPES]``, for a compacted module) keeps them dynamic. An axis
    export holds at a constant even so is warned about, naming it: the saved program is fixed there."""
    args, kwargs = normalize_inputs(example_inputs)
    if shapes is None:
        shapes = getattr(module, "meta", {}).get(INPUT_SHAPES, InputShapes())
    compiled(module)  # export binds keyword inputs to the forward's signature
    was_training = module.training
    module.eval()
    try:
        ep, fixed = _export(module, args, kwargs, list(shapes.dynamic))
        if fixed:  # a size read as a Python number (len(x)): TorchDynamo's export follows it
            try:
                strict, still = _export(module, args, kwargs, list(shapes.dynamic), strict=True)
                if len(still) < len(fixed):
                    ep, fixed = strict, still
            except Exception:  # noqa: BLE001 - Dynamo cannot export this model: the non-strict program stands
                pass
    finally:
        module.train(was_training)
    if fixed:
        warnings.warn(f"fxprune: the saved program of {type(module).__name__} takes only the example's size at "
                      + "; ".join(f"{a} ({a.size}: {why})" for a, why in fixed.items())
                      + ", though the pruned module takes others", stacklevel=2)
    return ep


def save_program(module: nn.Module, example_inputs: Any, path: Path, shapes: InputShapes | None = None) -> None:
    torch.export.save(export_program(module, example_inputs, shapes), str(path))


def save_weights(module: nn.Module, path: Path) -> None:
    """The state dict as safetensors: contiguous CPU tensors, shared tensors stored once per name."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "producer": "fxprune"})


def save_plan(plan: Plan, path: Path, *, compact: bool = False) -> None:
    """``{name: {dim: [kept indices]}}``; JSON keys are strings, so dims are written as "0", "1". ``compact``: on
    one line (a large language model's plan holds millions of indices)."""
    data = {name: {str(dim): [int(i) for i in kept] for dim, kept in entry.items()} for name, entry in plan.items()}
    write_json(data, path, compact=compact)


def write_json(data: Any, path: Path, *, compact: bool = False) -> None:
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2, sort_keys=False)
    path.write_text(text + "\n")


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} already exists; pass --force to replace it")


@contextlib.contextmanager
def staging_folder(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on failure it vanishes."""
    out = Path(out).resolve()
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publishable(tmp)
        check_target(out, force)  # it may have appeared while we worked
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publishable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def load(folder: str | os.PathLike[str], name: str = MODEL, *, model: nn.Module | None = None) -> nn.Module:
    """The compacted model of an output folder as a trainable GraphModule, in eval mode (``name=ORIGINAL``:
    the model before pruning, saved beside it).

    Reads ``model.pt2`` with ``torch.export.load`` (no pickle, no user code): ``.train()``/``.eval()``
    switch BatchNorm and dropout, gradients flow, and the state-dict names are the original model's.

    ``model=``: an instance of the ORIGINAL architecture (e.g. the model file's ``model()``; its weights
    do not matter): it is resized by ``plan.json`` (``fxprune.compaction.modules.resize_modules``) and
    ``model.safetensors`` loaded into it, so the result is the user's own class with the pruned widths.
    The only way back for a folder written by the modules target (a model no static graph expresses,
    which has no ``model.pt2``); it works on any output folder whose plan refers to the user's model.
    """
    if model is not None and name == MODEL:
        return _load_resized(Path(folder), model)
    path = Path(folder) / name
    if not path.is_file():
        hint = (" (a model compacted by resizing its modules has no model.pt2: give model=, an instance of the "
                "original architecture)" if (Path(folder) / WEIGHTS).is_file() else "")
        raise FileNotFoundError(f"{path} not found: is {folder} an fxprune output folder?{hint}")
    return as_trainable(torch.export.load(str(path)).module())


def _load_resized(folder: Path, model: nn.Module) -> nn.Module:
    from safetensors.torch import load_file

    from fxprune.compaction.modules import resize_modules

    for f in (PLAN, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} not found: is {folder} an fxprune output folder?")
    plan = {k: {int(d): v for d, v in e.items()} for k, e in json.loads((folder / PLAN).read_text()).items()}
    resized = resize_modules(model, plan)
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = resized.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ValueError(f"{folder}: model.safetensors does not fit this architecture resized by plan.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}): is it the pruned model's "
                         "original architecture?")
    return resized.eval()
