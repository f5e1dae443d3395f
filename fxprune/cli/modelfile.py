"""The model file: a plain Python file that tells fxprune what to prune and on which data.

    model()            -> torch.nn.Module          (or a module-level ``model`` instance)
    example_inputs()   -> tensor | tuple | dict    (what ``model`` is called with)
    train_loader()     -> iterable of (inputs, target) batches        optional
    val_loader()       -> iterable of (inputs, target) batches        optional
    loss(output, target) -> scalar tensor                            optional (default: cross-entropy)
    evaluate(model)    -> dict[str, float], e.g. {"accuracy": 0.97}   optional
    dynamic_shapes()   -> torch.export dynamic_shapes for example_inputs   optional (default: every axis the
                          model runs at with a second size stays free)
    train_epochs       = N (or train_epochs() -> int): how many epochs model() was trained       optional
                          (the length the scratch recoveries retrain for; default: the recovery's epochs)

The file is imported with importlib as it is (never edited); its folder is put on ``sys.path`` while
it imports, so it can import its neighbours.
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ModelFile", "ModelFileError", "load_model_file", "CONTRACT"]

# What each function of the convention must return: quoted in every "missing" message.
CONTRACT: dict[str, str] = {
    "model": "def model() -> torch.nn.Module (or a module-level `model = MyNet()`)",
    "example_inputs": "def example_inputs() -> a tensor, a tuple of positional inputs or a dict of keyword inputs",
    "train_loader": "def train_loader() -> an iterable of (inputs, target) batches",
    "val_loader": "def val_loader() -> an iterable of (inputs, target) batches",
    "calib_loader": "def calib_loader() -> an iterable of input batches (or (inputs, target)): what the passes that "
                    "read activations (act, thinet, lasso) calibrate on; default: train_loader()",
    "loss": "def loss(output, target) -> a scalar tensor",
    "evaluate": "def evaluate(model) -> dict[str, float], e.g. {'accuracy': 0.97}",
    "dynamic_shapes": "def dynamic_shapes() -> torch.export's dynamic_shapes for example_inputs(), e.g. "
                      "({0: Dim.AUTO, 1: Dim('seq', max=2048)},)",
    "train_epochs": "train_epochs = N (or def train_epochs() -> int): how many epochs model() was trained for",
}


class ModelFileError(ValueError):
    """The model file is missing, does not import, or lacks a function the command needs."""


def _user_line(exc: BaseException, path: Path) -> str:
    """The last traceback frame inside the user's file, as 'file:line: source'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class ModelFile:
    """An imported model file. ``get(name)`` is None when the file does not define ``name``."""

    path: Path
    module: ModuleType

    def get(self, name: str) -> Any:
        return getattr(self.module, name, None)

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def require(self, *names: str, why: str) -> None:
        """Stop before any work when a function ``why`` needs is missing; the message names each one."""
        missing = [n for n in names if not self.has(n)]
        if missing:
            lines = "\n".join(f"  {CONTRACT[n]}" for n in missing)
            raise ModelFileError(f"{self.path} does not define {', '.join(missing)}, which {why} needs:\n{lines}")

    def call(self, name: str, *args: Any) -> Any:
        """Call the file's ``name``; an exception inside it becomes a ModelFileError with the user's line."""
        fn = self.get(name)
        if not callable(fn):
            raise ModelFileError(f"{self.path}: `{name}` is not callable; expected {CONTRACT[name]}")
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's code failed: say where, no traceback
            raise ModelFileError(f"{name}() in {self.path} raised "
                                 f"{_describe(exc)}{_user_line(exc, self.path)}") from exc

    def model(self) -> Any:
        import torch

        obj = self.get("model")
        if obj is None:
            raise ModelFileError(f"{self.path} defines no model: add {CONTRACT['model']}")
        model = obj if isinstance(obj, torch.nn.Module) else self.call("model")
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(f"model() in {self.path} returned {type(model).__name__}; "
                                 f"expected {CONTRACT['model']}")
        return model

    def example_inputs(self) -> Any:
        import torch

        self.require("example_inputs", why="tracing")
        value = self.call("example_inputs")
        if not isinstance(value, (torch.Tensor, tuple, list, dict)):
            raise ModelFileError(f"example_inputs() in {self.path} returned {type(value).__name__}; "
                                 f"expected {CONTRACT['example_inputs']}")
        return value

    def dynamic_shapes(self) -> Any:
        """The file's ``dynamic_shapes()`` (torch.export's format), or None to let fxprune find the free axes."""
        if not self.has("dynamic_shapes"):
            return None
        value = self.call("dynamic_shapes")
        if value is not None and value is not False and not isinstance(value, (tuple, list, dict)):
            raise ModelFileError(f"dynamic_shapes() in {self.path} returned {type(value).__name__}; "
                                 f"expected {CONTRACT['dynamic_shapes']}")
        return value

    @cached_property
    def train_epochs(self) -> int | None:
        """How many epochs ``model()`` was trained for (``train_epochs = N`` or a function returning it, called
        once), or None when the file does not say: Scratch-E retrains that long, Scratch-B that long x the MACs
        removed."""
        value = self.get("train_epochs")
        if value is None:
            return None
        if callable(value):
            value = self.call("train_epochs")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFileError(f"train_epochs in {self.path} is {value!r}; expected {CONTRACT['train_epochs']} "
                                 "(a whole number >= 1)")
        return value

    def loss(self) -> Callable[[Any, Any], Any] | None:
        return self.get("loss")

    def loader(self, name: str) -> Iterable[Any]:
        return self.call(name)

    def evaluate(self, model: Any) -> dict[str, float] | None:
        """The file's metrics for ``model`` (None without ``evaluate``), checked to be name -> number."""
        if not self.has("evaluate"):
            return None
        metrics = self.call("evaluate", model)
        try:  # numpy scalars and 0-d tensors are numbers too
            return {str(k): float(v) for k, v in metrics.items()}
        except (AttributeError, TypeError, ValueError):
            raise ModelFileError(f"evaluate() in {self.path} returned {metrics!r}; "
                                 f"expected {CONTRACT['evaluate']}") from None


def load_model_file(path: str | Path) -> ModelFile:
    """Import ``path`` as a module (unchanged); errors while importing name the user's line."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix != ".py":
        raise ModelFileError(f"model file must be a Python file (.py), got {path.name}")
    name = f"fxprune_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # @dataclass and typing resolve the module through sys.modules while it runs
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import
        sys.modules.pop(name, None)
        raise ModelFileError(f"importing {path} raised {_describe(exc)}{_user_line(exc, path)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return ModelFile(path, module)
