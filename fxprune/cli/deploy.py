"""Deployment formats: the pruned model of an output folder as ONNX, checked with onnxruntime.

``fxprune export DIR --format onnx`` (and ``fxprune run ... --onnx``) converts ``model.pt2`` (and
``original.pt2``, the baseline ``fxprune bench`` times it against) with
``torch.onnx.export(..., dynamo=True)`` (the batch axis stays dynamic where the .pt2 has it), writes
``model.onnx`` (``original.onnx``) next to it (through a temporary file: never half-written), and runs it with
onnxruntime on
the folder's example inputs against the .pt2 in the same command. Needs the optional extra
``pip install "fxprune[onnx]"`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxprune.artifacts import MODEL, ORIGINAL
from fxprune.tracing.compat import tree_leaves

__all__ = ["ONNX", "ORIGINAL_ONNX", "FORMATS", "DeployError", "export_onnx", "onnx_session", "onnx_feed",
           "require_onnx"]

ONNX, ORIGINAL_ONNX = "model.onnx", "original.onnx"
FORMATS = ("onnx",)
TOLERANCE = 1e-4  # relative to the largest output magnitude: onnxruntime's float32 kernels sum in another order


class DeployError(ValueError):
    """The folder, the format or the optional dependencies are not what an export needs."""


def require_onnx() -> Any:
    """onnxruntime, or a DeployError naming what to install."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise DeployError(f"ONNX export needs the optional dependencies ({', '.join(missing)} missing): "
                          'pip install "fxprune[onnx]"')
    return importlib.import_module("onnxruntime")


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session for ``path``."""
    ort = require_onnx()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """The session's inputs by name from the positional then keyword example inputs."""
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise DeployError(f"the ONNX model takes {len(names)} inputs, the example inputs have {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def export_onnx(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/model.onnx`` from ``folder/model.pt2`` (and ``original.onnx`` from ``original.pt2``, so that
    ``fxprune bench`` compares the two in one runtime) and check each with onnxruntime; returns what was checked
    for the pruned model (the path, the largest relative difference on the example inputs, the inputs' dynamic
    axes), and the original's under "original"."""
    folder = Path(folder)
    if not (folder / MODEL).is_file():
        raise DeployError(f"{folder} is not an fxprune output folder: missing {MODEL}")
    require_onnx()
    info = _convert(folder, MODEL, ONNX)
    if (folder / ORIGINAL).is_file():
        info["original"] = _convert(folder, ORIGINAL, ORIGINAL_ONNX)
    return info


def _convert(folder: Path, source: str, target: str) -> dict[str, Any]:
    """``folder/source`` (an exported program) as ``folder/target`` (ONNX), checked against it with onnxruntime
    on its example inputs before it is renamed into place."""
    ep = torch.export.load(str(folder / source))
    args, kwargs = ep.example_inputs or ((), {})
    with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx prints its progress to stdout
        program = torch.onnx.export(ep, args, kwargs=kwargs or None, dynamo=True, verbose=False)
    tmp = folder / f".{target}.tmp"
    try:
        program.save(str(tmp))
        session = onnx_session(tmp)
        got = session.run(None, onnx_feed(session, args, kwargs))
        with torch.no_grad():
            ref = [t.detach().cpu().numpy() for t in tree_leaves(ep.module()(*args, **kwargs))
                   if isinstance(t, torch.Tensor)]
        error = _relative_error(ref, got)
        if error > TOLERANCE:
            raise DeployError(f"the ONNX model differs from {source} on the example inputs: relative error "
                              f"{error:.2e} > {TOLERANCE:g}")
        os.replace(tmp, folder / target)
    finally:
        tmp.unlink(missing_ok=True)
    dynamic = [[d if isinstance(d, str) else None for d in i.shape] for i in session.get_inputs()]
    return {"path": str(folder / target), "max_rel_err": error, "input_shapes": dynamic}


def _relative_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(ref) != len(got):
        raise DeployError(f"the ONNX model returns {len(got)} outputs, {MODEL} returns {len(ref)}")
    scale = max([1.0] + [float(np.abs(r).max()) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)])
    diff = max([0.0] + [float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) for r, g in zip(ref, got)
                        if r.size])
    return diff / scale
