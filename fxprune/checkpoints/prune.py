"""``fxprune.prune_checkpoint``: a Hugging Face model folder pruned from disk into another one.

    architecture   config.json -> the model class, built on the meta device (no weights in memory)
    trace/analyze  on the meta model, with token ids (or an image) shaped from the config
    freeze         (uniform_across_layers) the kinds of group no config.json field can express
    score          the pass reads each tensor it needs from the shards (``PassContext.source``), and activations
                   on calibration text streamed layer by layer (``PassContext.calibrate``)
    select         the budget, one width per kind of layer (``fxprune.selection.uniform``)
    verify         the rewritten config rebuilds (on meta) to exactly the shapes the plan writes
    write          shard by shard, the kept slices only (``fxprune.checkpoints.write``)
    measure        (eval text) perplexity of the source and the written folder, streamed

Passes that read weights alone (``Pass.runs_graph`` False: l1) apply, and passes that read activations on
calibration text (``calibrates``: act, thinet, lasso, depth, experts), which runs through the model one decoder
layer at a time from disk (``fxprune.checkpoints.stream``); the others train a model, which a checkpoint larger
than memory cannot be.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxprune import pipeline
from fxprune.analysis import ChannelGroups, analyze
from fxprune.compaction.plan import Plan
from fxprune.passes.base import require_weights_only
from fxprune.passes.registry import PassError, make_pass
from fxprune.pipeline.spec import BUDGET_KEYWORDS, Budget, Recovery, grouped
from fxprune.selection.budget import Selection, SelectionError
from fxprune.selection.cost import Cost, CostCounter
from fxprune.tracing.tracer import trace

from .architecture import checkpoint_tensors, example_inputs, load_config, meta_model, model_class
from .biases import with_biases
from .calibration import Calibration, TextData
from .depth import drop_blocks
from .experts import drop_experts
from .folder import Checkpoint, CheckpointError
from .steps import Clock, measure_perplexity, recorded_notes
from .widths import ConfigWidths, freeze_unexpressible, layer_widths, mismatches, planned_shapes
from .write import write_checkpoint

__all__ = ["prune_checkpoint", "CheckpointResult", "Architecture", "analyse_architecture"]


@dataclass
class CheckpointResult:
    out: Path                        # the pruned folder
    plan: Plan                       # model tensor name -> {dim: kept indices}
    groups: ChannelGroups            # the analysis of the meta model
    removed: np.ndarray              # bool per channel component
    config: dict                     # the config.json written
    loadable: bool                   # from_pretrained(out) builds exactly the written tensors
    why_not: str                     # why not, when not loadable
    widths: dict[str, list[int]]     # kind of group (its first tensor's name pattern) -> channels kept per layer
    cost_before: Cost
    cost_after: Cost
    selection: Selection
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Architecture:
    """A checkpoint's architecture analysed on the meta device: what selection, the plan and the config
    rewrite need (no weights). ``names``: model tensor name -> checkpoint name; ``shapes``: checkpoint name ->
    shape; ``frozen_kinds``: the kinds kept whole because no config field could describe them narrower."""

    config: Any
    cls: type
    model: torch.nn.Module
    gm: Any
    groups: ChannelGroups
    names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    widths: ConfigWidths
    frozen_kinds: dict[str, str]

    def build(self, cfg: dict) -> torch.nn.Module:
        """The architecture ``cfg`` (a config.json dict) describes, on meta."""
        return meta_model(self._config(cfg), self.cls)

    def valid(self, cfg: dict) -> bool:
        """Does the config class accept ``cfg`` (its own checks: heads dividing the hidden size...)?"""
        try:
            self._config(cfg)
            return True
        except Exception:  # noqa: BLE001 - any refusal means: not this width
            return False

    def _config(self, cfg: dict) -> Any:
        """``cfg`` as the folder's config class, its messages on stderr and its warnings silenced."""
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(self.config).from_dict(cfg)

    def selection(self, sel: Selection) -> Selection:
        """``sel`` with the config's uniform rule (kinds by config field, counts the config accepts)."""
        if not sel.uniform_across_layers:
            return sel
        return dataclasses.replace(sel, uniform_rule=self.widths.rule(self.groups, self.valid))

    def decide(self, removed: np.ndarray) -> tuple[Plan, dict | None, str]:
        """The plan of ``removed``, the config.json that describes it (None when none does) and why not."""
        plan, planned = planned_shapes(self.gm, self.groups, removed, self.model, self.names, self.shapes)
        new_config, why_not = self.widths.for_removal(self.groups, removed)
        if new_config is not None:
            problems = mismatches(new_config, self.build, self.names, planned)
            if problems:
                new_config, why_not = None, f"the rewritten config.json does not describe the pruned tensors " \
                                            f"({problems[0]})"
        return plan, new_config, why_not


def analyse_architecture(config: Any, config_dict: dict, tensors: Callable[[torch.nn.Module], tuple[dict, dict]],
                         *, allow_inexact: bool = False, uniform_across_layers: bool = True,
                         lap: Callable[[str], None] = lambda name: None) -> Architecture:
    """config -> meta model -> trace -> analysis -> (uniform) the kinds no config field expresses, frozen.
    ``tensors(model)``: (model name -> checkpoint name, checkpoint name -> shape)."""
    cls = model_class(config)
    model = meta_model(config, cls)
    inputs = example_inputs(model, config)
    lap("read")
    gm = trace(model, inputs, dynamic_batch=False)  # shapes for the analysis only: no graph is emitted
    lap("trace")
    groups = analyze(gm, allow_inexact=allow_inexact)
    names, shapes = tensors(model)
    _freeze_missing(groups, names, model)
    arch = Architecture(config, cls, model, gm, groups, names, shapes, ConfigWidths(config_dict), {})
    if uniform_across_layers:
        arch.frozen_kinds = freeze_unexpressible(gm, groups, model, names, shapes, arch.widths, arch.build)
    return arch


def prune_checkpoint(src: str | Path, out: str | Path, method: str = "l1", ratio: float | None = None, *,
                     options: dict[str, Any] | None = None, budget: Budget | None = None,
                     allow_inexact: bool = False, shard_bytes: int | None = None, force: bool = False,
                     require_prunable: bool = True, progress: Callable[[str], None] | None = None,
                     text: TextData | None = None, **deprecated: Any) -> CheckpointResult:
    """Prune the Hugging Face model folder ``src`` (config.json + safetensors, sharded or not) into ``out``,
    never holding more than a tensor or a shard of it in memory. ``ratio`` and ``budget`` (:class:`fxprune.Budget`)
    are ``fxprune.prune``'s, but for a latency target (nothing runs); its ``uniform_across_layers`` (default
    here: on) keeps one width per kind of layer, so that ``out`` loads with ``from_pretrained``; off, layers get
    their own widths, ``out`` holds them (plan.json, report.json) and
    its config.json is the original one, which does not describe them. ``shard_bytes``: output shard size
    (default: the input's largest shard). The residual stream stays whole unless ``allow_inexact``. A removal
    asked of an architecture none of whose groups can shrink raises ``NothingToPruneError`` (naming why) unless
    ``require_prunable=False``, which writes the folder unchanged; ``force`` replaces an existing ``out``.

    ``text`` (:class:`fxprune.checkpoints.TextData`): calibration text for the passes that read activations
    (act, thinet, lasso; depth, which removes whole decoder blocks and returns a ``DepthResult``; experts, which
    removes routed experts or their neurons and returns an ``ExpertsResult``), run through the model one decoder
    layer at a time from disk, and the text whose perplexity report.json records before and after."""
    from fxprune.artifacts import check_target

    budget, text = _budget(ratio, budget, deprecated), text or TextData()
    check_target(Path(out).resolve(), force)  # before any work
    ckpt, the_pass = _open(src), _folder_pass(method, options, text)
    calib = Calibration(ckpt, text) if text.calib is not None else None
    if getattr(the_pass, "removes_blocks", False):
        return drop_blocks(ckpt, Path(out), the_pass, budget, calib, text, shard_bytes, force, progress)
    if getattr(the_pass, "removes_experts", False):
        return drop_experts(ckpt, Path(out), the_pass, budget, calib, text, shard_bytes, force, progress)
    with recorded_notes() as notes:  # fxprune's warnings: report.json's notes, and warned on as usual
        clock = Clock(progress)
        arch, analysed, sel = _analyse(ckpt, the_pass, budget, allow_inexact, require_prunable, clock.lap)
        scored = pipeline.score(the_pass, analysed, arch.model, {}, sel, *budget.resource, bool(arch.groups.prunable),
                                source=lambda name: _read(ckpt, arch.names, name), calibrate=calib)
        clock.lap("score")
        decided = _decide(the_pass, arch, scored, analysed.counter, ckpt)
        clock.lap("select")
        report = _report(ckpt, arch, decided, analysed.before, the_pass.name, budget)
        if calib is not None:
            report["calibration"] = calib.info
        if scored.decision.report:
            report["pass_report"] = scored.decision.report
    report["notes"] = notes
    _write(ckpt, Path(out), arch, decided, report, shard_bytes, force, clock, text)
    return CheckpointResult(Path(out).resolve(), decided.plan, arch.groups, decided.removed, decided.config,
                            decided.loadable, decided.why_not, decided.widths, analysed.before, decided.after,
                            decided.selection, report)



def _open(src: str | Path) -> Checkpoint:
    """The folder, refused when its tensors are quantized (packed, not channels)."""
    ckpt = Checkpoint(src)
    if ckpt.config.get("quantization_config"):
        method = ckpt.config["quantization_config"].get("quant_method", "quantization_config")
        raise CheckpointError(f"{ckpt.root} is a quantized checkpoint ({method}): its tensors are packed, not "
                              "channels; prune the full-precision checkpoint, then quantize the result")
    return ckpt


def _analyse(ckpt: Checkpoint, the_pass: Any, budget: Budget, allow_inexact: bool, require_prunable: bool,
             lap: Callable[[str], None]) -> tuple[Architecture, pipeline.Analysed, Selection]:
    """The architecture on meta, its groups (kinds no config field can express kept whole, with a warning), the
    cost before, and the selection the pass runs with; a removal asked of nothing prunable stops here."""
    sel = budget.selection(the_pass, uniform=True)
    arch = analyse_architecture(load_config(ckpt.root), ckpt.config, checkpoint_tensors(ckpt),
                                allow_inexact=allow_inexact, uniform_across_layers=sel.uniform_across_layers, lap=lap)
    for kind, why in arch.frozen_kinds.items():
        warnings.warn(f"fxprune: {kind}: kept whole, {why}", stacklevel=4)  # the line that called prune_checkpoint
    if budget.asks_removal and not arch.groups.prunable and require_prunable:
        from fxprune.selection.diagnose import NothingToPruneError, nothing_prunable

        raise NothingToPruneError(f"{nothing_prunable(arch.groups)} (pass --force to write the folder unchanged)")
    counter = CostCounter(arch.groups)
    analysed = pipeline.Analysed(arch.gm, arch.groups, {"target": "folder", "why": ""}, counter, counter())
    lap("analyze")
    return arch, analysed, arch.selection(sel)


@dataclass
class _Decided:
    """The selection and what it makes of the folder: the plan, the config.json to write (or why none)."""

    removed: np.ndarray
    selection: Selection
    plan: Plan
    config: dict                    # the config.json written: the rewritten one, else the original
    loadable: bool
    why_not: str
    widths: dict[str, list[int]]    # kind of group -> channels kept per layer, for the kinds that shrank
    after: Cost
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the pass's new tensors, by model name
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)    # tensors the checkpoint lacks, as written


def _decide(the_pass: Any, arch: Architecture, scored: pipeline.Scored, counter: CostCounter,
            ckpt: Checkpoint) -> _Decided:
    """The budget applied to the pass's scores; the plan and the rewritten config (a selection no config can
    describe is an error with uniform widths, a warning without)."""
    selected = pipeline.select(scored)
    removed, sel = selected.removed, selected.selection
    weights, edits = scored.decision.finished(removed)
    if edits or (weights and scored.ctx.calibrate is None):  # only a layer-by-layer rewrite leaves them on disk
        raise PassError(f"pass {the_pass.name!r} changes weights or the graph, which pruning from disk cannot "
                        "carry: use a pass that only scores (l1, act) or rewrites layer by layer (thinet)")
    plan, new_config, why_not = arch.decide(removed)
    if new_config is None and sel.uniform_across_layers:
        raise CheckpointError(f"fxprune could not write a config.json for this selection: {why_not}. "
                              "Pass --per-layer-widths (uniform_across_layers=False) to write the tensors anyway")
    if new_config is None:
        warnings.warn(f"fxprune: the pruned folder is not loadable by from_pretrained: {why_not}; the per-layer "
                      "widths are in its plan.json and report.json", stacklevel=4)
    widths = {kind[0][0]: w for kind, w in layer_widths(arch.groups, removed).items() if min(w) < kind[1]}
    after, added = counter(removed), {}
    new = {m: t for m, t in weights.items() if m not in arch.names}  # biases a layer lacks (act's compensation)
    if new:
        if new_config is None:
            raise CheckpointError("new biases (act compensate) need a config.json that describes the pruned widths: "
                                  "keep uniform widths across layers")
        new_config, added = with_biases(arch, new_config, new, plan, _float_dtype(ckpt), _written(ckpt, arch, plan))
        weights = {m: t for m, t in weights.items() if m in arch.names}
        after = dataclasses.replace(after, params=after.params + sum(t.numel() for t in added.values()))
    return _Decided(removed, sel, plan, new_config or ckpt.config, new_config is not None, why_not, widths,
                    after, weights, added)


def _float_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The checkpoint's floating-point dtype (the most bytes of)."""
    count: dict[torch.dtype, int] = {}
    for info in ckpt.tensors.values():
        if info.dtype.is_floating_point:
            count[info.dtype] = count.get(info.dtype, 0) + int(np.prod(info.shape))
    return max(count, key=count.__getitem__)


def _written(ckpt: Checkpoint, arch: Architecture, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> the shape written under ``plan``."""
    entries = {arch.names[m]: e for m, e in plan.items() if m in arch.names}
    return {key: tuple(len(entries[key][d]) if key in entries and d in entries[key] else s
                       for d, s in enumerate(info.shape)) for key, info in ckpt.tensors.items()}


def _write(ckpt: Checkpoint, out: Path, arch: Architecture, decided: _Decided, report: dict[str, Any],
           shard_bytes: int | None, force: bool, clock: Clock, text: TextData) -> None:
    """The kept slices shard by shard, the config, the plan and the report (with the perplexity before and after
    when asked), in a staging folder renamed into place at the end: never half-written."""
    from fxprune.artifacts import save_plan, staging_folder, write_json

    entries = {arch.names[m]: e for m, e in decided.plan.items() if m in arch.names}
    replaced = {arch.names[m]: m for m in decided.weights}  # checkpoint name -> model name of a new tensor
    with staging_folder(out, force=force) as tmp:
        write_checkpoint(ckpt, entries, tmp, decided.config, shard_bytes or ckpt.shard_bytes(),
                         replaced=lambda key: decided.weights[replaced[key]] if key in replaced else None,
                         added=decided.added)
        save_plan(decided.plan, tmp / "plan.json", compact=True)
        clock.lap("write")
        report["seconds"] = clock.seconds()
        measure_perplexity(report, ckpt, tmp, text, decided.loadable)
        write_json(report, tmp / "report.json")



def _budget(ratio: float | None, budget: Budget | None, deprecated: dict[str, Any]) -> Budget:
    """The call's budget (the previous release's flat keywords with a DeprecationWarning); a latency target, or
    a keyword that is no budget's, is an error."""
    unknown = sorted(set(deprecated) - set(BUDGET_KEYWORDS))
    if unknown:
        raise TypeError(f"prune_checkpoint() got an unexpected keyword argument {unknown[0]!r}")
    budget, _ = grouped(ratio, budget, Recovery(), deprecated, "fxprune.prune_checkpoint", stacklevel=4)
    if budget.target_latency is not None:
        raise SelectionError("target_latency times the model on its device, which pruning from disk never loads: "
                             "give target_macs or target_params")
    return budget



def _folder_pass(method: str, options: dict[str, Any] | None, text: TextData) -> Any:
    """The pass, which must read weights only (``Pass.runs_graph`` False), or read activations on calibration
    text (``calibrates``: act, thinet, lasso, depth, experts) given with ``text.calib``: the others train, which a
    folder is not."""
    the_pass = make_pass(method, options)
    if getattr(the_pass, "calibrates", False):
        if text.calib is None:
            raise PassError(f"pass {the_pass.name!r} reads activations on calibration text: give --calib FILE.txt "
                            "(text=TextData(calib=...)), a plain-text file like the text the model will see")
        return the_pass
    require_weights_only(the_pass, "a model, and a checkpoint folder is pruned from disk without loading it: use a "
                         "pass that reads weights only (l1) or calibration text (act, thinet, lasso, depth, experts, "
                         "with --calib), or write a model file whose model() loads the checkpoint")
    return the_pass


def _read(ckpt: Checkpoint, names: dict[str, str], name: str) -> torch.Tensor:
    if name not in names:
        raise CheckpointError(f"{ckpt.root} has no tensor for {name}")
    return ckpt.read(names[name]).float()


def _freeze_missing(groups: ChannelGroups, names: dict[str, str], model: torch.nn.Module) -> None:
    """Groups touching a tensor the model saves (its state dict) that the checkpoint does not hold stay whole:
    nothing to score or slice. Non-persistent buffers (rotary frequencies) are rebuilt at load, not saved."""
    saved = model.state_dict().keys()
    for g in groups.prunable:
        missing = next((p.name for p in g.params if p.name not in names and p.name in saved), None)
        if missing is not None:
            g.frozen = f"the checkpoint has no tensor {missing}"


def _frozen_kinds(groups: ChannelGroups) -> dict[str, str]:
    """Why each kind of group with parameters stays whole (its first tensor's name pattern -> reason)."""
    from fxprune.selection.uniform import pattern

    out: dict[str, str] = {}
    for g in groups:
        if g.frozen and g.params:
            out.setdefault(pattern(g.params[0].name), g.frozen)
    return out


def _report(ckpt: Checkpoint, arch: Architecture, decided: _Decided, before: Cost, method: str,
            budget: Budget) -> dict[str, Any]:
    new_config, after, sel = decided.config if decided.loadable else None, decided.after, decided.selection
    changed = {k: [v, new_config[k]] for k, v in ckpt.config.items() if new_config and new_config.get(k) != v}
    changed.update({k: [None, v] for k, v in (new_config or {}).items() if k not in ckpt.config})
    which, resource = budget.resource
    return {
        "source": str(ckpt.root), "architecture": arch.cls.__name__,
        "model_type": getattr(arch.config, "model_type", None),
        "pass": method, "ratio": sel.ratio, "uniform_across_layers": sel.uniform_across_layers,
        "loadable": decided.loadable, "why_not_loadable": decided.why_not or None,
        "config_changes": changed, "widths": decided.widths, "kept_whole_for_config": arch.frozen_kinds,
        "frozen": _frozen_kinds(arch.groups),
        "params": {"before": before.params, "after": after.params},
        "macs": {"before": before.macs, "after": after.macs, "tokens": _tokens_note()},
        "checkpoint_bytes": ckpt.nbytes,
        "target": {which: float(resource)} if resource is not None else {},
    }


def _tokens_note() -> str:
    from .architecture import TOKENS

    return f"{TOKENS} token ids (or one image), batch 1"

