"""``fxprune run`` as a function: model file -> pruned, fine-tuned, measured model in an output folder.

    run     check -> load -> measure -> prune (fxprune.prune) -> evaluate -> recover -> evaluate -> measure ->
            write the folder, its trainings resumable (``workfolder.py``)

Beside it: ``runconfig.py`` (what a run is asked, checked before any work), ``notes.py`` (what the run tells the
user besides its figures), ``output.py`` (the output folder). The command line is a thin layer over :func:`run`;
progress goes through a small ``Feedback`` object so this module never imports a UI library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from torch import nn

from fxprune.measure import to_device
from fxprune.recovery.distributed import launch_rank
from fxprune.recovery.engine import batches_per_epoch, epochs_for_steps
from fxprune.recovery.modes import recover, scratch_b_epochs

from .modelfile import ModelFile
from .notes import (
    check_drop,
    check_final,
    check_shortfall,
    latency_note,
    note,
    stderr_only_on_success,
    warnings_as_notes,
)
from .output import build_report, export_programs, measured_costs, write_folder
from .runconfig import Feedback, RunConfig, attack_of, budget_of, check, recovery_of
from .workfolder import resumable

__all__ = ["run", "model_file_data", "default_epochs"]

SCRATCH = ("scratch-e", "scratch-b")  # the recoveries that re-initialise, whose epochs stand for the original training
DEFAULT_STEPS = 250  # recovery without --epochs: about this many optimiser steps (1 to 10 epochs)


# ---- option parsing: --opt key=value strings -> the pass's dataclass field types -----------------


# ---- validation ------------------------------------------------------------------------------------


def _run_attack(cfg: RunConfig, the_pass: Any, mf: ModelFile) -> Any:
    """--attack's, else the pass's own (``Pass.evaluation_attack``: anp's PGD) when the file has val_loader()."""
    attack = attack_of(cfg)
    if attack is None and mf.has("val_loader"):
        attack = the_pass.evaluation_attack() if hasattr(the_pass, "evaluation_attack") else None
    return attack


def _robustness(attack: Any, mf: ModelFile, model: nn.Module, fb: Feedback, which: str) -> dict[str, Any] | None:
    """Clean accuracy, PGD accuracy and vulnerability of ``model`` under ``attack`` (None without)."""
    if attack is None:
        return None
    from fxprune.robustness import robust_metrics

    with fb.step(f"attacking the {which} model (pgd, eps {attack.eps:g}, {attack.steps} steps)"):
        return robust_metrics(model, mf.loader("val_loader"), attack, loss_fn=mf.loss())


# ---- the run ---------------------------------------------------------------------------------------


def model_file_data(mf: ModelFile) -> dict[str, Any]:
    """What passes may read (``fxprune.prune``'s data keywords): loaders built once, functions as they are."""
    data: dict[str, Any] = {name: mf.loader(name) for name in ("train_loader", "val_loader", "calib_loader")
                            if mf.has(name)}
    data.update({name: mf.get(name) for name in ("loss", "evaluate") if mf.has(name)})
    return data


def default_epochs(loader: Any) -> int:
    """Recovery epochs when none are given: about ``DEFAULT_STEPS`` optimiser steps, 1 to 10 epochs
    (small data sets get several passes, a large one a single epoch); 1 for a loader without a length."""
    return epochs_for_steps(loader, DEFAULT_STEPS, most=10)


def _recovery_epochs(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], fb: Feedback,
                     notes: list[str], the_pass: Any = None) -> int:
    """What the run recovers for: the given epochs, else the pass's default (``Pass.recovery_epochs``),
    else a default when the file can train."""
    if cfg.no_recover:
        return 0
    if cfg.finetune_epochs is not None:
        return cfg.finetune_epochs
    if "train_loader" not in data:
        return 0
    if getattr(the_pass, "recovery_epochs", None) is not None:
        return int(the_pass.recovery_epochs)
    scratch = cfg.recover in SCRATCH
    if scratch and mf.train_epochs is not None:
        scaled = " (x the MACs removed)" if cfg.recover == "scratch-b" else ""
        note(fb, notes, f"retraining from scratch ({cfg.recover}) for the model's own training length{scaled}: "
                         f"train_epochs = {mf.train_epochs} in the model file (--epochs N sets it)")
        return mf.train_epochs
    epochs = default_epochs(data["train_loader"])
    how = " (the default when the model file defines train_loader(); "
    if scratch:
        how = (f" standing for the original training{' (x the MACs removed)' * (cfg.recover == 'scratch-b')}: the "
               "model file does not say how long model() was trained (train_epochs = N says it; ")
    note(fb, notes, f"{_doing(cfg.recover)} for {epochs} epoch{'s' * (epochs > 1)}{how}--epochs N sets it, "
                     "--no-recover turns it off)")
    return epochs


def _doing(mode: str) -> str:
    """How a note names the recovery ``mode``."""
    return f"retraining from scratch ({mode})" if mode in SCRATCH else f"recovering with {mode}"


def run(cfg: RunConfig, feedback: Feedback | None = None) -> tuple[dict[str, Any], Any]:
    """Run the whole pipeline; returns the report (as written to report.json) and the PruneResult.

    Under ``torchrun`` every rank runs it (training is data-parallel); the ranks other than 0 neither
    measure, report nor write, and return an empty report."""
    if launch_rank() != 0:
        feedback = None
    fb = feedback or Feedback()
    clock = {"start": time.perf_counter()}
    notes: list[str] = []
    mf, the_pass = check(cfg)
    own = recovery_of(cfg, 1).for_pass(the_pass)  # the pass's defaults
    cfg = dataclasses.replace(cfg, recover=own.mode, distill=own.distill)
    with resumable(cfg, lambda text: note(fb, notes, text)):  # a killed run continues when run again
        return _run_checked(cfg, mf, the_pass, fb, notes, clock)


def _run_checked(cfg: RunConfig, mf: ModelFile, the_pass: Any, fb: Feedback, notes: list[str],
                 clock: dict[str, float]) -> tuple[dict[str, Any], Any]:
    with fb.step(f"loading {mf.path.name}"):
        model = mf.model().to(cfg.device).eval()  # measured and pruned for inference; fine-tuning trains
        inputs = to_device(mf.example_inputs(), cfg.device)
        data = model_file_data(mf)
    result = _pruned(cfg, mf, the_pass, model, inputs, data, fb, notes, clock)
    if launch_rank() != 0:  # trains with rank 0 (recovery is data-parallel); rank 0 measures and writes
        _train_with_rank_zero(cfg, mf, data, result, model, the_pass)
        return {}, result
    check_shortfall(cfg, result, fb, notes)
    with fb.step("measuring the original model"):
        before = {**measured_costs(model, inputs), "metrics": mf.evaluate(model)}  # prune() left it untouched
    attack = _run_attack(cfg, the_pass, mf)
    before["robustness"] = _robustness(attack, mf, model, fb, "original")
    pruned: dict[str, Any] = {"metrics": None}
    if mf.has("evaluate"):
        with fb.step("evaluating the pruned model"):
            pruned["metrics"] = mf.evaluate(result.compacted)
    log = _recovered(cfg, mf, data, result, model, the_pass, before, pruned, fb, notes, clock)
    with fb.step("measuring the pruned model"):
        result.compacted.eval()
        after = {**measured_costs(result.compacted, inputs), "metrics": mf.evaluate(result.compacted)}
    after["robustness"] = _robustness(attack, mf, result.compacted, fb, "pruned")
    if log:
        check_final(cfg, before["metrics"], after["metrics"], len(log), the_pass, fb, notes)
    latency_note(cfg, result, before, after, fb, notes)
    result.compacted.cpu().eval()
    with fb.step("exporting"), warnings_as_notes(fb, notes):  # an axis export fixes is a note of report.json
        programs = export_programs(model.cpu(), result, to_device(inputs, "cpu"))
    report = build_report(cfg, the_pass, inputs, before, pruned, after, result, log, clock, notes, attack)
    with fb.step(f"writing {cfg.out}"):
        write_folder(cfg.out, cfg.force, result, programs, report, onnx=cfg.onnx)
    return report, result


def _pruned(cfg: RunConfig, mf: ModelFile, the_pass: Any, model: nn.Module, inputs: Any, data: dict[str, Any],
            fb: Feedback, notes: list[str], clock: dict[str, float]) -> Any:
    """``fxprune.prune`` with one progress line per pipeline stage and fxprune's warnings as notes."""
    from fxprune.api import prune

    start = time.perf_counter()
    stages = contextlib.ExitStack()

    def stage(name: str) -> None:  # one progress line per pipeline stage, each ticked off when the next starts
        stages.close()
        stages.enter_context(fb.step(f"{name} ({cfg.method})" if name == "score" else name))
        if name == "trace":  # torch.export's partial graphs on failure: held back for the trace only
            stages.enter_context(stderr_only_on_success())

    with stages, warnings_as_notes(fb, notes):
        result = prune(model, inputs, the_pass, budget=budget_of(cfg.ratio, cfg.budget), progress=stage,
                       target=cfg.budget.get("target", "auto"), allow_inexact=cfg.allow_inexact,
                       require_prunable=not cfg.force, dynamic_shapes=mf.dynamic_shapes(),
                       **data)  # an untraceable model fails early
    clock["prune"] = time.perf_counter() - start
    if getattr(result, "compaction", {}).get("target") == "modules":
        note(fb, notes, f"compacted by resizing the model's own modules: {result.compaction['why']}. The folder "
                         "holds model.safetensors and plan.json, no model.pt2: fxprune.load(DIR, model=model()) "
                         "rebuilds it")
    return result


def _recovered(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], result: Any, model: nn.Module, the_pass: Any,
               before: dict[str, Any], pruned: dict[str, Any], fb: Feedback, notes: list[str],
               clock: dict[str, float]) -> list[dict[str, float]]:
    """The recovery (its log), or without one a note when the pruned model fell far below the original."""
    epochs = _recovery_epochs(cfg, mf, data, fb, notes, the_pass)
    if epochs > 0:
        start = time.perf_counter()
        log = _recover(cfg, mf, data, result, model, epochs, fb)
        clock["finetune"] = time.perf_counter() - start
        return log
    why = None
    if not cfg.no_recover and cfg.finetune_epochs is None and "train_loader" in data:
        why = (f"{cfg.method} does not recover by default; --epochs N recovers ({cfg.recover}"
               f"{', which trains on the clean loss' if the_pass.evaluation_attack() is not None else ''})")
    elif cfg.no_recover or cfg.finetune_epochs == 0:
        why = "recovery was turned off; --epochs N recovers"
    check_drop(before["metrics"], pruned["metrics"], fb, notes, why)
    if cfg.allow_inexact and any(g.inexact for g in result.groups.prunable):
        note(fb, notes, "--allow-inexact pruned groups whose removal is not exactly the masked model, and "
                         "nothing recovered it: recover with --epochs N (needs train_loader())")
    return []


def _recover(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], result: Any, model: nn.Module, epochs: int,
             fb: Feedback) -> list[dict[str, float]]:
    loader, recovery = data["train_loader"], recovery_of(cfg, epochs)
    total = epochs
    if recovery.mode == "scratch-b":
        total = scratch_b_epochs(epochs, result.cost_before.macs, result.cost_after.macs, recovery.scratch_b_cap)
    return recover(result.compacted, original=model, train_loader=loader, loss=mf.loss(),
                   evaluate=mf.evaluate if mf.has("evaluate") else None, macs_full=result.cost_before.macs,
                   macs_pruned=result.cost_after.macs, device=cfg.device,
                   progress=fb.training(total, batches_per_epoch(loader)), **recovery.options())


def _train_with_rank_zero(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], result: Any, model: nn.Module,
                          the_pass: Any = None) -> None:
    """A rank other than 0: the recovery rank 0 runs, in step with it (the same epochs, decided from the
    same data), and nothing else."""
    epochs = _recovery_epochs(cfg, mf, data, Feedback(), [], the_pass)
    if epochs > 0:
        _recover(cfg, mf, data, result, model, epochs, Feedback())


