"""``fxprune run DIR``: a Hugging Face model folder pruned from disk (``fxprune.checkpoints``) into another
folder that ``from_pretrained`` loads, with the same progress, notes and exit codes as a model file's run.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from .notes import warnings_as_notes
from .runconfig import Feedback, OptionError, budget_of, parse_options

__all__ = ["run_folder", "inspect_folder", "NOT_FOR_FOLDERS"]

# options of `fxprune run` that need a model in memory or data: refused for a folder, with why
NOT_FOR_FOLDERS = {
    "finetune_epochs": "--epochs (recovery trains the model)",
    "recover": "--recover (recovery trains the model)",
    "distill": "--distill (recovery trains the model)",
    "scratch_lr": "--scratch-lr (recovery trains the model)",
    "scratch_b_cap": "--scratch-b-cap (recovery trains the model)",
    "fsdp": "--fsdp (recovery trains the model)",
    "onnx": "--onnx (export runs the model)",
    "attack": "--attack (evaluation runs the model)",
    "target_latency": "--target-latency (its latency model times the model)",
}


def check_folder_options(given: dict[str, Any], target: str) -> None:
    """Options that cannot apply to a checkpoint pruned from disk stop the run before any work."""
    refused = [NOT_FOR_FOLDERS[k] for k, v in given.items() if k in NOT_FOR_FOLDERS and v not in (None, False)]
    if target != "auto":
        refused.append("--target (a checkpoint folder is written as a checkpoint folder)")
    if refused:
        raise OptionError(f"a Hugging Face model folder is pruned from disk, without loading the model: "
                          f"{', '.join(refused)} cannot apply; load it in a model file (model() returning "
                          "from_pretrained(...)) for that")


def run_folder(folder: Path, method: str, ratio: float, out: Path, options: dict[str, str], budget: dict[str, Any],
               allow_inexact: bool, force: bool, fb: Feedback | None = None, text: Any = None) -> dict[str, Any]:
    """Prune ``folder`` into ``out``, printing its notes as they come; returns report.json's content."""
    from fxprune.checkpoints import prune_checkpoint
    from fxprune.passes.registry import load_pass

    fb = fb or Feedback()
    chosen = budget_of(ratio, budget)
    pass_cls = load_pass(method)
    opts = parse_options(pass_cls, options, method)
    notes: list[str] = []
    with contextlib.ExitStack() as steps, warnings_as_notes(fb, notes):
        warnings.simplefilter("always")

        def progress(stage: str) -> None:
            steps.close()
            steps.enter_context(fb.step(stage))

        result = prune_checkpoint(folder, out, method, options=opts, budget=chosen, allow_inexact=allow_inexact,
                                  force=force, require_prunable=not force, progress=progress, text=text)
    return dict(result.report, out=str(result.out))


def inspect_folder(folder: Path) -> tuple[Any, dict[str, Any]]:
    """``fxprune inspect DIR``: the channel groups of a Hugging Face folder's architecture, analysed on the
    meta device as ``fxprune run DIR`` analyses it (kinds no config field expresses frozen, saying why)."""
    from fxprune.checkpoints import Checkpoint
    from fxprune.checkpoints.architecture import checkpoint_tensors, load_config
    from fxprune.checkpoints.prune import analyse_architecture
    from fxprune.selection.cost import CostCounter

    ckpt = Checkpoint(folder)
    arch = analyse_architecture(load_config(ckpt.root), ckpt.config, checkpoint_tensors(ckpt))
    cost = CostCounter(arch.groups)()
    return arch.groups, {"folder": str(folder), "architecture": arch.cls.__name__, "macs": cost.macs,
                         "params": cost.params, "groups": arch.groups.rows(),
                         "unsupported_ops": sorted(arch.groups.unsupported)}
