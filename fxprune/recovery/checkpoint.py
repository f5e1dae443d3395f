"""Pickle-free training checkpoints: tensors in ``.safetensors``, everything else in JSON.

A checkpoint is two files side by side, ``NAME.safetensors`` and ``NAME.json``:

- the safetensors file holds the model's state dict under ``model.<name>``, the optimiser's
  per-parameter tensors under ``optimizer.<param index>.<key>`` (momentum buffers, Adam moments,
  step counters), a hook's tensors under ``hook.<i>.<key>`` and random-number-generator states
  (``torch.get_rng_state()`` is a uint8 tensor) under ``rng.<name>``;
- the JSON file holds the epoch, the optimiser's hyper-parameters (``param_groups``) and any
  non-tensor per-parameter state, the scheduler and gradient-scaler state, Python's and NumPy's RNG
  states, the training log so far and the best metric seen.

Both open with ``safetensors.torch.load_file`` and ``json.load``: nothing in them is executed.
Files are written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint intact; the JSON file is written last and is what marks a checkpoint complete. Both carry
one random ``pair`` token: a process killed between the two renames leaves a new tensor file beside
the old JSON, which ``checkpoint_exists`` then reports as no checkpoint (a resumed run starts that
training afresh: slower, never wrong) and ``load_checkpoint`` refuses.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_exists", "flatten_state", "unflatten_state",
           "module_tensors", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "fxprune.checkpoint/1"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # An owned, contiguous CPU copy: safetensors refuses tensors that share storage (tied weights).
    return t.detach().to("cpu", copy=True).contiguous()


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as plain CPU tensors (parameters and buffers)."""
    return {k: _cpu(v) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def flatten_state(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested state dict into ``{"prefix.a.b": tensor}`` and the JSON-able rest (same nesting).

    Keys are turned into strings; :func:`unflatten_state` turns digit keys back into ints (the
    optimiser indexes its state by parameter position).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = _cpu(value)
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {path!r} without pickle")

    return tensors, walk(state, prefix)


def unflatten_state(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state` (digit-string keys become ints)."""
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            return tensors[meta["__tensor__"]]
        return {(int(k) if k.isdigit() else k): unflatten_state(v, tensors) for k, v in meta.items()}
    if isinstance(meta, list):
        return [unflatten_state(v, tensors) for v in meta]
    return meta


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random-number generator a training step may draw from: torch (CPU and each CUDA
    device), Python's ``random``, NumPy's global state, and extra ``generators`` (a loader's)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"rng.{name}"] = g.get_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    for name, g in (generators or {}).items():
        if f"rng.{name}" in tensors:
            g.set_state(tensors[f"rng.{name}"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``folder/name.safetensors`` then ``folder/name.json``; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pair = os.urandom(8).hex()
    _write_atomic(folder / f"{name}.safetensors",
                  lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "pair": pair}))
    text = json.dumps({"format": FORMAT, "pair": pair, **meta}, indent=1, allow_nan=True)
    _write_atomic(folder / f"{name}.json", lambda p: p.write_text(text))
    return folder / f"{name}.json"


def _tensor_pair(folder: Path, name: str) -> str | None:
    """The pair token of the tensor file (from its header: no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
        return (f.metadata() or {}).get("pair")


def checkpoint_exists(folder: str | Path, name: str) -> bool:
    """Both files are there and belong together."""
    folder = Path(folder)
    if not ((folder / f"{name}.json").is_file() and (folder / f"{name}.safetensors").is_file()):
        return False
    return json.loads((folder / f"{name}.json").read_text()).get("pair") == _tensor_pair(folder, name)


def load_checkpoint(folder: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` as written by :func:`save_checkpoint`."""
    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / name}.json is not an fxprune checkpoint (format {meta.get('format')!r})")
    if meta.get("pair") != _tensor_pair(folder, name):
        raise ValueError(f"{folder / name}.safetensors and .json are from two different saves (a process stopped "
                         "between writing them): that checkpoint is lost, the one before it was replaced")
    return load_file(str(folder / f"{name}.safetensors")), meta
