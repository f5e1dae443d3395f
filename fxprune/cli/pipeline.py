"""``fxprune run`` as a function: model file -> pruned, fine-tuned, measured model in an output folder.

    check   every cheap validation, before any work (bad input stops here with a clear message)
    run     load -> measure -> prune -> evaluate -> fine-tune -> evaluate -> measure -> write the folder

The command line is a thin layer over :func:`run`; progress goes through a small :class:`Feedback`
object so this module never imports a UI library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
import time
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune import artifacts
from fxprune.measure import count_macs, count_params, latency_ms, to_device
from fxprune.passes.registry import PassError, load_pass, make_pass
from fxprune.recovery import Hook
from fxprune.recovery.curves import plot_log, write_log
from fxprune.recovery.distributed import launch_rank
from fxprune.recovery.engine import batches_per_epoch
from fxprune.recovery.modes import MODES, recover, scratch_b_epochs
from fxprune.selection.budget import Selection, check_ratio
from fxprune.selection.diagnose import removable_fraction, shortfall
from fxprune.tracing.quiet import ThreadHeldStream

from .deploy import ONNX, ORIGINAL_ONNX, export_onnx, require_onnx
from .modelfile import ModelFile, load_model_file
from .report import group_rows, layer_rows, pass_report, plot_blocks, plot_channels, plot_histogram, render_markdown
from .workfolder import resumable

__all__ = ["RunConfig", "Feedback", "check", "run", "parse_options", "OptionError", "stderr_only_on_success",
           "default_epochs", "REPORT_JSON", "REPORT_MD", "CHART"]

REPORT_JSON, REPORT_MD, CHART = "report.json", "report.md", "channels.png"
TRAIN_LOG, TRAIN_CHART = "train_log.jsonl", "training.png"  # only when recovery ran
HISTOGRAM = "_histogram.png"  # NAME_histogram.png for each histogram a pass reports (slimming: gamma)
DEFAULT_STEPS = 250  # recovery without --epochs: about this many optimiser steps (1 to 10 epochs)
DROP_POINTS = 0.03   # a metric in [0, 1] that fell by more than this (3 points) gets a line saying how to recover


class OptionError(ValueError):
    """An ``--opt`` value that does not parse, or a device that is not available."""


@dataclass
class RunConfig:
    model_file: Path
    method: str
    ratio: float
    out: Path
    finetune_epochs: int | None = None  # None: the default recovery when the file defines train_loader()
    lr: float = 0.01
    options: dict[str, str] = field(default_factory=dict)  # raw key=value strings from --opt
    device: str = "cpu"
    force: bool = False
    budget: dict[str, Any] = field(default_factory=dict)  # fxprune.prune's selection keywords (scope, target_macs...)
    recover: str | None = None  # what --epochs runs: finetune, scratch-e, scratch-b; None: the pass's
    #                             default_recovery, else finetune
    distill: bool | None = None  # knowledge distillation from the unpruned model during recovery; None: the
    #                              pass's default
    no_recover: bool = False    # --no-recover: no recovery even when the model file can train
    allow_inexact: bool = False  # --allow-inexact: also prune groups where removal is not exactly the masked model
    onnx: bool = False  # --onnx: also write model.onnx, checked with onnxruntime (fxprune.cli.deploy)
    attack: str | None = None  # --attack pgd: robustness before and after (fxprune.robustness), on val_loader()
    eps: float = 0.03
    attack_steps: int = 40
    resume: bool = True  # continue a killed run of the same description from OUT.resume (fxprune.cli.workfolder)


class Feedback:
    """Progress reporting; the default reports nothing (``--quiet``, or use from Python)."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        yield

    def training(self, epochs: int, batches: int | None) -> Hook | None:
        return None

    def note(self, text: str) -> None:
        """One line the user should read (a default the run chose, a result far from what was asked)."""


# ---- option parsing: --opt key=value strings -> the pass's dataclass field types -----------------
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(text: str, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or type(kind).__name__ == "UnionType":
        if text.lower() == "none" and type(None) in args:
            return None
        return _convert(text, next(a for a in args if a is not type(None)), key)
    if origin is typing.Literal:
        match = [a for a in args if str(a) == text]
        if not match:
            raise OptionError(f"option {key!r} must be one of {', '.join(map(str, args))}, got {text!r}")
        return match[0]
    if kind is bool:
        if text.lower() not in _TRUE | _FALSE:
            raise OptionError(f"option {key!r} is a bool: use true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise OptionError(f"option {key!r} must be {kind.__name__}, got {text!r}") from None
    return text


def parse_options(pass_cls: type, pairs: dict[str, str], name: str) -> dict[str, Any]:
    """Typed options for ``pass_cls`` from raw strings; an unknown key is a PassError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(pass_cls)} if dataclasses.is_dataclass(pass_cls) else {}
    unknown = sorted(set(pairs) - set(fields))
    if unknown:
        raise PassError(f"pass {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(pass_cls)
    return {k: _convert(v, hints.get(k, str), k) for k, v in pairs.items()}


# ---- validation ------------------------------------------------------------------------------------
TARGET_KEYS = ("target_macs", "target_params", "target_latency")  # the resource targets (one at most)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: CUDA is not available on this machine")


def check_budget(ratio: float, budget: dict[str, Any]) -> None:
    """The selection keywords are valid (same checks as fxprune.prune, before any work)."""
    targets = {k: budget[k] for k in TARGET_KEYS if budget.get(k) is not None}
    if len(targets) > 1:
        raise OptionError(f"give one of --target-macs, --target-params and --target-latency, not "
                          f"{' and '.join('--' + k.replace('_', '-') for k in targets)}")
    for key, value in targets.items():
        if not 0.0 < value <= 1.0:
            raise OptionError(f"--{key.replace('_', '-')} is the fraction to keep, in (0, 1]; got {value}")
    if budget.get("target", "auto") not in ("auto", "graph", "modules"):
        raise OptionError(f"--target must be auto, graph or modules, got {budget['target']!r}")
    fields = {k: budget[k] for k in ("scope", "ratio_for", "protect", "min_channels", "min_keep", "round_to",
                                     "group_width_to") if k in budget}
    for key in ("scope", "min_keep", "group_width_to"):
        if fields.get(key) is None:
            fields.pop(key, None)
    Selection(ratio=ratio, **fields)


def check(cfg: RunConfig) -> tuple[ModelFile, Any]:
    """Everything that can be checked before any work: returns the model file and the configured pass."""
    check_ratio(cfg.ratio)
    check_budget(cfg.ratio, cfg.budget)
    artifacts.check_target(cfg.out, cfg.force)
    if cfg.finetune_epochs is not None and cfg.finetune_epochs < 0:
        raise OptionError(f"--finetune-epochs must be >= 0, got {cfg.finetune_epochs}")
    if cfg.no_recover and cfg.finetune_epochs:
        raise OptionError("--no-recover and --finetune-epochs/--epochs contradict each other: give one")
    if cfg.recover is not None and cfg.recover not in MODES:
        raise OptionError(f"--recover must be one of {', '.join(MODES)}, got {cfg.recover!r}")
    _check_device(cfg.device)
    if cfg.onnx:
        require_onnx()  # before any work: the export runs last
    attack = _attack(cfg)
    pass_cls = load_pass(cfg.method)
    the_pass = make_pass(cfg.method, parse_options(pass_cls, cfg.options, cfg.method))
    mf = load_model_file(cfg.model_file)
    mf.require("model", "example_inputs", why="pruning")
    if cfg.finetune_epochs:
        mf.require("train_loader", why=f"--finetune-epochs {cfg.finetune_epochs}")
    needs = tuple(getattr(pass_cls, "needs", ()))  # the model-file functions the pass reads (Pass.needs)
    if needs:
        mf.require(*needs, why=f"pass {cfg.method!r}")
    if attack is not None:
        mf.require("val_loader", why=f"--attack {cfg.attack} (the data to attack)")
    return mf, the_pass


def _attack(cfg: RunConfig) -> Any:
    """The attack --attack asks for (None without it); an OptionError naming what is wrong."""
    if cfg.attack is None:
        return None
    from fxprune.robustness import PGD

    from .robust import ATTACKS

    if cfg.attack not in ATTACKS:
        raise OptionError(f"--attack must be one of {', '.join(ATTACKS)}, got {cfg.attack!r}")
    try:
        return PGD(eps=cfg.eps, steps=cfg.attack_steps)
    except ValueError as exc:
        raise OptionError(f"--attack {cfg.attack}: {exc}") from None


def _run_attack(cfg: RunConfig, the_pass: Any, mf: ModelFile) -> Any:
    """--attack's, else the pass's own (``Pass.evaluation_attack``: anp's PGD) when the file has val_loader()."""
    attack = _attack(cfg)
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
def _costs(module: nn.Module, inputs: Any) -> dict[str, Any]:
    return {"macs": count_macs(module, inputs), "params": count_params(module),
            "latency_ms": latency_ms(module, inputs)}


def model_file_data(mf: ModelFile) -> dict[str, Any]:
    """What passes may read (``fxprune.prune``'s data keywords): loaders built once, functions as they are."""
    data: dict[str, Any] = {name: mf.loader(name) for name in ("train_loader", "val_loader") if mf.has(name)}
    data.update({name: mf.get(name) for name in ("loss", "evaluate") if mf.has(name)})
    return data


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape)
    if isinstance(inputs, (tuple, list)):
        return [_shapes(v) for v in inputs]
    if isinstance(inputs, dict):
        return {k: _shapes(v) for k, v in inputs.items()}
    return repr(inputs)


def _programs(model: nn.Module, result: Any, inputs: Any) -> dict[str, torch.export.ExportedProgram]:
    """model.pt2 and original.pt2 as programs, each keeping the input axes the pruned model keeps free; none for
    a model compacted by resizing its modules (it has no graph to save)."""
    if getattr(result, "compaction", {}).get("target", "graph") != "graph":
        return {}
    return {artifacts.MODEL: artifacts.export_program(result.module, inputs, result.shapes),
            artifacts.ORIGINAL: artifacts.export_program(model, inputs, result.shapes)}


def _write(out: Path, force: bool, result: Any, programs: dict[str, torch.export.ExportedProgram],
           report: dict[str, Any], onnx: bool = False) -> None:
    """Every file of the output folder, into a temporary folder renamed into place at the end."""
    with artifacts.staging_folder(out, force=force) as tmp:
        for name, program in programs.items():
            torch.export.save(program, str(tmp / name))
        if programs:
            if onnx:  # from the saved programs, checked with onnxruntime; the report says how they compared
                info = export_onnx(tmp)
                report["onnx"] = {**info, "path": ONNX,
                                  "original": {**info["original"], "path": ORIGINAL_ONNX}}
        # the modules target: no program to export; model.safetensors + plan.json, fxprune.load(DIR, model=...)
        artifacts.save_weights(result.module, tmp / artifacts.WEIGHTS)
        artifacts.save_plan(result.plan, tmp / artifacts.PLAN)
        artifacts.write_json(report, tmp / REPORT_JSON)
        (tmp / REPORT_MD).write_text(render_markdown(report))
        plot_channels(report["groups"], tmp / CHART,
                      title=f"{Path(report['model_file']).name}: channels kept per group")
        for write in getattr(result, "artifacts", {}).values():  # files the pass adds (sanp's dynamic/)
            write(tmp)
        if result.report.get("stages"):
            plot_blocks(result.report["stages"], tmp / "blocks.png",
                        title=f"{Path(report['model_file']).name}: residual blocks kept per stage")
        for name, hist in result.report.get("histograms", {}).items():
            plot_histogram(hist, tmp / f"{name}{HISTOGRAM}", title=f"{report['pass']}: {hist.get('xlabel', name)}")
        log = report["finetune"]["log"]
        if log:
            write_log(tmp / TRAIN_LOG, log)
            plot_log(log, tmp / TRAIN_CHART, title=f"{report['finetune']['mode']} after {report['pass']}")


def default_epochs(loader: Any) -> int:
    """Recovery epochs when none are given: about ``DEFAULT_STEPS`` optimiser steps, 1 to 10 epochs
    (small data sets get several passes, a large one a single epoch); 1 for a loader without a length."""
    batches = batches_per_epoch(loader)
    return 1 if not batches else min(10, max(1, math.ceil(DEFAULT_STEPS / batches)))


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
    epochs = default_epochs(data["train_loader"])
    _note(fb, notes, f"recovering with {cfg.recover} for {epochs} epoch{'s' * (epochs > 1)} (the default when the "
                     "model file defines train_loader(); --epochs N sets it, --no-recover turns it off)")
    return epochs


def _note(fb: Feedback, notes: list[str], text: str) -> None:
    notes.append(text)
    fb.note(text)


@contextlib.contextmanager
def _warnings_as_notes(fb: Feedback, notes: list[str]) -> Iterator[None]:
    """fxprune's own warnings while pruning (a budget it cannot meet, sparsity training that ran out of
    epochs, a rewrite that kept groups whole) become notes: printed as such and kept in report.json.
    Warnings from elsewhere (torch, the user's code) pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if _ours(w.filename):
            text = str(w.message).removeprefix("fxprune: ")
            if text not in notes:
                _note(fb, notes, text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _ours(filename: str) -> bool:
    """A warning issued from fxprune's own code (its built-in passes included)."""
    root = sys.modules[__package__.partition(".")[0]]  # fxprune itself, not only fxprune.cli
    return Path(filename).resolve().is_relative_to(Path(root.__file__).resolve().parent)


def _check_shortfall(cfg: RunConfig, result: Any, fb: Feedback, notes: list[str]) -> None:
    """One line when the run removed far less than asked, naming why and what to do."""
    if cfg.budget.get("target_latency") is not None:  # a time, not a count: the search warns when it falls short
        return
    which = "macs" if cfg.budget.get("target_macs") is not None else "params"
    target, protect = cfg.budget.get(f"target_{which}"), tuple(cfg.budget.get("protect") or ())
    if target is not None:
        after, before = getattr(result.cost_after, which), max(getattr(result.cost_before, which), 1)
        found = shortfall(result.groups, 1.0 - float(target), 1.0 - after / before, protect=protect)
        what = "MACs" if which == "macs" else "parameters"
    else:
        found = shortfall(result.groups, cfg.ratio, removable_fraction(result.groups, result.removed), protect=protect)
        what = "channels"
    if found is None:
        return
    scores = [np.asarray(v) for v in (result.scores or {}).values()]
    if scores and all(np.isinf(v).all() for v in scores):  # the pass chose the channels (tas's search), not a budget
        _note(fb, notes, found.line(what, f"{cfg.method} chose which channels stay itself (scores of +-inf, which no "
                                          "budget overrides); its own note says why"))
        return
    _note(fb, notes, found.line(what))


# a latency target that keeps less than this fraction of its own value in MACs is overhead-bound (the note says so)
OVERHEAD_BOUND = 0.25


def _latency_note(cfg: RunConfig, result: Any, before: dict[str, Any], after: dict[str, Any], fb: Feedback,
                  notes: list[str]) -> None:
    """With --target-latency: what the latency model predicted and what the pruned model measured, side by side."""
    target, model = cfg.budget.get("target_latency"), getattr(result, "latency", None)
    if target is None or not model:
        return
    measured = after["latency_ms"] / max(before["latency_ms"], 1e-9)
    _note(fb, notes, f"--target-latency {target:g}: the latency model (measured op by op here) predicted "
                     f"{model['predicted_kept']:.2f} of {model['measured_ms']:.1f} ms; measured once each: "
                     f"{measured:.2f} ({before['latency_ms']:.1f} -> {after['latency_ms']:.1f} ms). Timings vary from "
                     f"run to run: `fxprune bench {cfg.out}` times both in turns, with a spread")
    macs_kept = after["macs"] / max(before["macs"], 1)
    if macs_kept < target * OVERHEAD_BOUND:
        _note(fb, notes, f"--target-latency {target:g} kept only {macs_kept:.1%} of the MACs: most of this "
                         "model's time "
                         "on these inputs is per-op overhead, which removing channels hardly reduces, so the search "
                         "removed nearly everything it could. Check the accuracy before using it; a larger batch in "
                         "example_inputs() or --target-macs is the better budget for such a model")


def _check_drop(before: dict[str, Any] | None, pruned: dict[str, Any] | None, fb: Feedback,
                notes: list[str], why: str | None = None) -> None:
    """Without recovery: one line when evaluate() fell by more than a few points, and how to recover
    (``why``: the reason no recovery ran, when it is not a missing train_loader())."""
    if not before or not pruned:
        return
    name = next(iter(before))
    b, a = before.get(name), pruned.get(name)
    if b is None or a is None:
        return
    fell = (b - a) >= DROP_POINTS if 0.0 <= b <= 1.0 else abs(a - b) > DROP_POINTS * max(abs(b), 1e-12)
    if fell:
        how = why or ("define train_loader() in the model file (recovery then runs by default) or give --epochs N")
        _note(fb, notes, f"{name} changed from {b:.4g} to {a:.4g} by pruning and nothing recovered it: {how}")


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
    cfg = dataclasses.replace(cfg, recover=cfg.recover or getattr(the_pass, "default_recovery", None) or "finetune",
                              distill=bool(getattr(the_pass, "default_distill", False) if cfg.distill is None
                                           else cfg.distill))
    with resumable(cfg, lambda text: _note(fb, notes, text)):  # a killed run continues when run again
        return _run_checked(cfg, mf, the_pass, fb, notes, clock)


def _run_checked(cfg: RunConfig, mf: ModelFile, the_pass: Any, fb: Feedback, notes: list[str],
                 clock: dict[str, float]) -> tuple[dict[str, Any], Any]:
    from fxprune.api import prune

    with fb.step(f"loading {mf.path.name}"):
        model = mf.model().to(cfg.device).eval()  # measured and pruned for inference; fine-tuning trains
        inputs = to_device(mf.example_inputs(), cfg.device)
        data = model_file_data(mf)
    start = time.perf_counter()
    stages = contextlib.ExitStack()

    def stage(name: str) -> None:  # one progress line per pipeline stage, each ticked off when the next starts
        stages.close()
        stages.enter_context(fb.step(f"{name} ({cfg.method})" if name == "score" else name))
        if name == "trace":  # torch.export's partial graphs on failure: held back for the trace only
            stages.enter_context(stderr_only_on_success())

    with stages, _warnings_as_notes(fb, notes):
        result = prune(model, inputs, the_pass, cfg.ratio, progress=stage, allow_inexact=cfg.allow_inexact,
                       require_prunable=not cfg.force, dynamic_shapes=mf.dynamic_shapes(), **cfg.budget,
                       **data)  # an untraceable model fails early
    clock["prune"] = time.perf_counter() - start
    if getattr(result, "compaction", {}).get("target") == "modules":
        _note(fb, notes, f"compacted by resizing the model's own modules: {result.compaction['why']}. The folder "
                         "holds model.safetensors and plan.json, no model.pt2: fxprune.load(DIR, model=model()) "
                         "rebuilds it")
    if launch_rank() != 0:  # trains with rank 0 (recovery is data-parallel); rank 0 measures and writes
        _train_with_rank_zero(cfg, mf, data, result, model, the_pass)
        return {}, result
    _check_shortfall(cfg, result, fb, notes)
    with fb.step("measuring the original model"):
        before = {**_costs(model, inputs), "metrics": mf.evaluate(model)}  # prune() left it untouched
    attack = _run_attack(cfg, the_pass, mf)
    before["robustness"] = _robustness(attack, mf, model, fb, "original")
    pruned: dict[str, Any] = {"metrics": None}
    if mf.has("evaluate"):
        with fb.step("evaluating the pruned model"):
            pruned["metrics"] = mf.evaluate(result.module)
    epochs = _recovery_epochs(cfg, mf, data, fb, notes, the_pass)
    if epochs == 0:
        why = None
        if not cfg.no_recover and cfg.finetune_epochs is None and "train_loader" in data:
            why = (f"{cfg.method} does not recover by default; --epochs N recovers ({cfg.recover}"
                   f"{', which trains on the clean loss' if the_pass.evaluation_attack() is not None else ''})")
        elif cfg.no_recover or cfg.finetune_epochs == 0:
            why = "recovery was turned off; --epochs N recovers"
        _check_drop(before["metrics"], pruned["metrics"], fb, notes, why)
        if cfg.allow_inexact and any(g.inexact for g in result.groups.prunable):
            _note(fb, notes, "--allow-inexact pruned groups whose removal is not exactly the masked model, and "
                             "nothing recovered it: recover with --epochs N (needs train_loader())")
    log: list[dict[str, float]] = []
    if epochs > 0:
        start = time.perf_counter()
        log = _recover(cfg, mf, data, result, model, epochs, fb)
        clock["finetune"] = time.perf_counter() - start
    with fb.step("measuring the pruned model"):
        result.module.eval()
        after = {**_costs(result.module, inputs), "metrics": mf.evaluate(result.module)}
    after["robustness"] = _robustness(attack, mf, result.module, fb, "pruned")
    _latency_note(cfg, result, before, after, fb, notes)
    cpu_inputs = to_device(inputs, "cpu")
    result.module.cpu().eval()
    with fb.step("exporting"), _warnings_as_notes(fb, notes):  # an axis export fixes is a note of report.json
        programs = _programs(model.cpu(), result, cpu_inputs)
    report = _report(cfg, the_pass, inputs, before, pruned, after, result, log, clock, notes, attack)
    with fb.step(f"writing {cfg.out}"):
        _write(cfg.out, cfg.force, result, programs, report, onnx=cfg.onnx)
    return report, result


def _recover(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], result: Any, model: nn.Module, epochs: int,
             fb: Feedback) -> list[dict[str, float]]:
    loader = data["train_loader"]
    total = epochs
    if cfg.recover == "scratch-b":
        total = scratch_b_epochs(epochs, result.cost_before.macs, result.cost_after.macs)
    return recover(result.module, mode=cfg.recover, original=model, train_loader=loader, loss=mf.loss(),
                   epochs=epochs, evaluate=mf.evaluate if mf.has("evaluate") else None,
                   distill=cfg.distill, macs_full=result.cost_before.macs, macs_pruned=result.cost_after.macs,
                   lr=cfg.lr, device=cfg.device, progress=fb.training(total, batches_per_epoch(loader)))


def _train_with_rank_zero(cfg: RunConfig, mf: ModelFile, data: dict[str, Any], result: Any, model: nn.Module,
                          the_pass: Any = None) -> None:
    """A rank other than 0: the recovery rank 0 runs, in step with it (the same epochs, decided from the
    same data), and nothing else."""
    epochs = _recovery_epochs(cfg, mf, data, Feedback(), [], the_pass)
    if epochs > 0:
        _recover(cfg, mf, data, result, model, epochs, Feedback())


@contextlib.contextmanager
def stderr_only_on_success() -> Iterator[None]:
    """Hold back what this thread writes to ``sys.stderr``; show it only if the block succeeds.

    On failure torch.export prints its partial graph to stderr; the TraceError we raise already names
    the failing line, and a page of graph above it buries the message. ``sys.stderr`` is one object for
    the whole process, so it is replaced by one that holds back this thread's writes only: other
    threads keep writing through to the real stream.
    """
    held = ThreadHeldStream(sys.stderr, threading.get_ident())
    sys.stderr = held
    try:
        yield
    finally:
        held.owner = None  # from now on it writes everything through, should anything still hold it
        if sys.stderr is held:
            sys.stderr = held.stream
    held.stream.write(held.buffer.getvalue())


def _report(cfg: RunConfig, the_pass: Any, inputs: Any, before: dict, pruned: dict, after: dict, result: Any,
            log: list[dict[str, float]], clock: dict[str, float], notes: list[str],
            attack: Any = None) -> dict[str, Any]:
    from fxprune import __version__

    groups = group_rows(result)
    return {
        "fxprune_version": __version__, "torch_version": torch.__version__,
        "model_file": str(cfg.model_file), "pass": cfg.method, "options": dataclasses.asdict(the_pass),
        "compaction": dict(getattr(result, "compaction", {"target": "graph", "why": ""})),
        "ratio": cfg.ratio, "device": cfg.device, "example_inputs": _shapes(inputs),
        # the input axes the pruned model takes at any size (checked at a second size), and those it fixes
        "input_axes": result.shapes.report(),
        "target": {k.removeprefix("target_"): float(v) for k, v in cfg.budget.items()
                   if k in TARGET_KEYS and v is not None} or None,
        # with --target-latency: the latency model's measured and predicted milliseconds (``before``/``pruned`` hold
        # the pruned model's measured latency_ms)
        "latency_model": getattr(result, "latency", None),
        "attack": None if attack is None else {"name": "pgd", "eps": attack.eps, "steps": attack.steps,
                                               "step": attack.step_length,
                                               "from": "--attack" if cfg.attack else "the pass"},
        "before": before, "pruned": pruned, "after": after,
        "finetune": {"mode": cfg.recover, "distill": cfg.distill, "epochs": len(log), "lr": cfg.lr, "log": log},
        "groups": groups, "frozen_groups": len(result.groups) - len(groups),
        "layers": layer_rows(result), "allow_inexact": cfg.allow_inexact,
        "pass_report": pass_report(result.report), "notes": notes,
        # a pass that pruned a model of its own (scratch's expand): totals and plan.json refer to it
        "base": None if result.base is None else {
            "built_by_pass": True, "params": sum(p.numel() for p in result.base.parameters())},
        "seconds": {"prune": clock.get("prune"), "finetune": clock.get("finetune"),
                    "total": time.perf_counter() - clock["start"]},
    }
