"""The pass interface every scoring method implements, built-in or third-party.

A pass is a frozen dataclass whose fields are its options (``--opt key=value`` on the command line). It is a
function of what it may read, :class:`PassContext` (read-only), to its answer, :class:`~fxprune.Decision`:
``score(ctx)`` returns the scores of every prunable group (one float per channel, higher = keep; ``-inf`` must
go, ``+inf`` must stay) and, for a pass that changes more than shapes, the new weights and graph edits.

A pass that learns something per channel inserts masks into the traced graph (``ctx.insert_masks``), trains them
with the one mask-training helper (``fxprune.masking.train.train_masked``), scores by their values and returns
``masked.fold()``'s weights in its Decision. The graph's parameters are the user's tensors: a pass changes
none in place. A pass that changes weights (slimming after sparsity training, ThiNet / LASSO least-squares
reconstruction) returns NEW full-size tensors (``Decision.weights``, or ``Decision.finish(removed)`` when they
depend on the removal); compaction substitutes them before slicing by the plan, so they go through the same
rewrite as everything else; ``PruneResult.weights`` records them, and ``fxprune.testing.assert_equivalent``
loads them into the masked reference.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.selection.budget import Scores
from fxprune.state import attribute

from .decision import Decision, Finish

if TYPE_CHECKING:  # the masks (and networkx, through the block edits) load only for a pass that uses them
    from fxprune.compaction.emit import GraphEdit
    from fxprune.edits.blocks import Block
    from fxprune.masking import MaskedModel

__all__ = ["Calibrator", "Decision", "Finish", "Pass", "PassContext", "PassError", "Scores", "require_weights_only",
           "require_modules_support"]


class PassError(ValueError):
    """Unknown pass, duplicate name, an option the pass does not have, or a pass the run cannot use."""


_GONE = {  # what a pass wrote into its context before passes returned a Decision, and where it goes now
    "weights": "Decision(scores, weights=...) (or finish=, for weights that depend on the removal)",
    "report": "Decision(scores, report={...})",
    "masks": "Decision(scores, masks={group id: values})",
    "artifacts": "Decision(scores, artifacts={name: writer})",
    "state": "a closure: Decision(scores, finish=functools.partial(my_finish, what_it_needs))",
}


class Calibrator(Protocol):
    """How a pass runs a Hugging Face folder's calibration text through the model, one decoder layer at a time
    from disk (``fxprune.checkpoints.calibration.Calibration``)."""

    def __call__(self, hooks: Mapping[str, Callable], after_layer: Callable[[str, torch.nn.Module], None] | None = None
                 ) -> None:
        """The text through the model once: each forward hook (module name -> hook) as its module runs, and
        ``after_layer(prefix, layer)`` once a decoder layer has run every batch (its tensors still loaded)."""

    def rewrite(self, edit: Callable[[Any], Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
        """The text through the model while ``edit(run)`` rewrites each decoder layer
        (``fxprune.checkpoints.stream.LayerRun``: the layer on the original and the rewritten model's hidden states,
        ``run.root`` the model with that layer loaded); the new tensors by name, read from disk on access."""


@dataclass(frozen=True)
class PassContext:
    """What a pass may read: the traced graph, its groups, the model's tensors, the user's data and the budget.
    Read-only: a pass answers with the :class:`fxprune.Decision` that ``score`` returns."""

    gm: fx.GraphModule
    groups: ChannelGroups
    model: torch.nn.Module
    data: Mapping[str, Any] = field(default_factory=dict)  # train_loader, val_loader, loss, evaluate
    selection: Any = None  # the budget (fxprune.selection.budget.Selection) the scores will be selected with
    # the budget as a function: scores -> the removal it would select (a bool per channel component);
    # passes that train toward the selection (slimming's adaptive sparsity) ask it which channels would go
    select: Callable[[Scores], np.ndarray] | None = None
    # the run's resource target, when it has one: ("macs" or "params", fraction of the USER's model to keep)
    target: tuple[str, float] | None = None
    # where tensors are read when the graph holds none (a checkpoint folder pruned from disk, traced on the meta
    # device: ``fxprune.checkpoints``): name -> the tensor, read on demand; None: the graph's own tensors
    source: Callable[[str], torch.Tensor] | None = None
    # a context ``Pass.prepare`` made for a model of the pass's own (scratch's wider copy, flop's factorised
    # graph): the user's model's context it was made from; None: this is the user's
    origin: PassContext | None = None
    # how the model is compacted: "graph" (the traced graph runs) or "modules" (its modules are resized; no traced
    # graph runs, and ``insert_masks`` puts the masks on a copy of the user's modules)
    compaction: str = "graph"
    # a Hugging Face folder's calibration text (``--calib``), run from disk one decoder layer at a time
    # (:class:`Calibrator`); None: the pass reads the model file's loaders itself
    calibrate: Calibrator | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    def __getattr__(self, name: str) -> Any:
        if name in _GONE:
            raise AttributeError(f"PassContext.{name} is gone: a pass's context is read-only; return {_GONE[name]} "
                                 "from score()")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def prepared(self, gm: fx.GraphModule, groups: ChannelGroups, model: torch.nn.Module) -> PassContext:
        """The context of a model the pass prunes instead of the user's (what ``Pass.prepare`` returns): the
        same data, budget and target; ``origin`` is this context."""
        return dataclasses.replace(self, gm=gm, groups=groups, model=model, origin=self, select=None)

    @property
    def user(self) -> PassContext:
        """The user's model's context (this one unless ``prepare`` made it)."""
        return self.origin.user if self.origin is not None else self

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter or buffer of the traced graph by its name in the original model (read from the
        checkpoint on disk when the graph is on the meta device)."""
        return self.source(name) if self.source is not None else attribute(self.gm, name)

    def macs_target(self, who: str) -> float:
        """The run's MACs budget as the fraction to keep, for a pass whose own cost is MACs (tas, sanp):
        ``--target-macs``; with a ratio r alone (the fraction of channels to remove), (1 - r)^2, what removing
        r of every channel costs a chain of convolutions; a parameter or latency target is refused."""
        if self.target is not None:
            which, value = self.target
            if which != "macs":
                what = "a parameter" if which == "params" else f"a {which}"
                raise PassError(f"{who} searches under a MACs target: give --target-macs (target_macs=), not {what} "
                                "target")
            return value
        ratio = self.selection.ratio if self.selection is not None else 0.5
        return (1 - ratio) ** 2

    def insert_masks(self, factory: Callable[[Group], torch.nn.Module] | None, *, only: Iterable[int] | None = None,
                     placement: str = "output", weights: Mapping[str, torch.Tensor] | None = None,
                     training: bool = True, blocks: Sequence[Block] = (),
                     depth: Callable[[Block], torch.nn.Module] | None = None,
                     edits: Sequence[GraphEdit] = ()) -> MaskedModel:
        """A masked copy of this context's traced graph (``fxprune.masking.insert_masks``): one
        ``factory(group)`` module per prunable group (``only``: these ids) multiplying its channels, and
        with ``blocks`` (``fxprune.edits.blocks.residual_blocks(ctx.gm)``) one ``depth(block)`` scalar per
        residual block multiplying its branch.
        Train it with ``fxprune.masking.train.train_masked(masked, ctx.data, epochs=..., lr=..., mask_lr=...)``
        (the engine, the weights and masks in optimisers of their own); ``masked.fold()`` gives the full-size
        weights (for ``Decision.weights``) and the channels whose mask is 0. The user's model and this graph are
        never modified. On the modules target (``compaction == "modules"``) the masks act on a copy of the user's
        model (``fxprune.masking.on_modules``): per-channel masks at the output placement only, no depth masks or
        graph edits."""
        from fxprune.masking import insert_masks

        if self.compaction == "modules":
            return self._module_masks(factory, only, placement, weights, training, bool(blocks or edits))
        return insert_masks(self.gm, self.groups, factory, only=only, placement=placement, weights=weights,
                            training=training, blocks=blocks, depth=depth, edits=edits)


    def _module_masks(self, factory: Callable[[Group], torch.nn.Module] | None, only: Iterable[int] | None,
                      placement: str, weights: Mapping[str, torch.Tensor] | None, training: bool,
                      edits: bool) -> MaskedModel:
        from fxprune.masking.on_modules import insert_module_masks

        if edits or placement != "output":
            what = "depth masks and graph edits" if edits else f"placement={placement!r}"
            raise PassError(f"{what} need the traced graph, and this model is compacted by resizing its modules: "
                            "use the pass's defaults, or a model torch.export traces whole")
        return insert_module_masks(self.model, self.gm, self.groups, factory, only=only, weights=weights,
                                   training=training)


@dataclass(frozen=True)
class Pass:
    """Base class: subclass as a frozen dataclass; set ``name`` and ``description``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    scope: ClassVar[str] = "group"  # the paper's default selection scope: "group" or "global"
    needs: ClassVar[tuple[str, ...]] = ()  # model-file functions / data keywords it reads, e.g. ("train_loader",)
    tolerance: ClassVar[float] = 0.01  # how close a --target-macs/--target-params search must get (kept fraction)
    min_keep: ClassVar[float] = 0.0  # the per-group floor the selection applies unless min_keep= / --min-keep is given
    default_recovery: ClassVar[str | None] = None  # the CLI's recovery when --recover is not given (None: finetune)
    # a preset's own recovery where it differs from the pass's: {"paper": {"mode": "scratch-e"}} (tas),
    # {"paper": {"distill": False}} (scratch); own_recovery() and own_distill() answer which applies
    preset_recovery: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_distill: ClassVar[bool] = False  # the CLI's recovery distils from the unpruned model (tas) unless
    #                                          --no-distill
    # the CLI's recovery epochs when --epochs is not given (None: chosen from the data when the model file can
    # train; 0: none, e.g. anp, whose trained network is the result and a clean fine-tune would cost robustness)
    recovery_epochs: ClassVar[int | None] = None
    # the pass removes channels itself (scores of -inf: anp's E[pi] <= 1e-3), so it runs even without a budget
    # (ratio 0): what it removes is then exactly what it decided; a budget removes more
    self_pruning: ClassVar[bool] = False
    # the pass runs the traced graph (training, calibration): it cannot prune a model without a static graph,
    # which is compacted by resizing its modules (``fxprune.prune(target="modules")``); l1 reads weights only
    runs_graph: ClassVar[bool] = True
    # why the pass needs the traced graph to run (None: it also runs on the modules target, where its masks, made
    # with ``ctx.insert_masks``, act on a copy of the user's modules: slimming, scratch); a pass that reads
    # weights only (``runs_graph = False``) runs there anyway
    graph_only: ClassVar[str | None] = "it runs the traced graph"
    # named sets of options; "paper": the authors' released code's schedule and hyperparameters where fxprune's
    # defaults differ (``--opt preset=paper``; options given beside it win). A pass with presets has a
    # ``preset: str = ""`` option ("": fxprune's defaults) that records which one it was made with
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def with_preset(cls, name: str, **options: Any) -> Pass:
        """The pass made with preset ``name``'s options, then ``options`` (which win); "" is fxprune's defaults."""
        if name and name not in cls.presets:
            known = ", ".join(map(repr, cls.presets)) or "none"
            raise PassError(f"pass {cls.name!r} has no preset {name!r}; its presets: {known}")
        return cls(**{**cls.presets.get(name, {}), **options, "preset": name})

    def _preset_recovery(self) -> Mapping[str, Any]:
        """The recovery this pass's preset (its ``preset`` option, if any) asks for: {} when none."""
        return self.preset_recovery.get(getattr(self, "preset", ""), {})

    def own_recovery(self) -> str | None:
        """The recovery mode this pass's result gets when the caller names none: its preset's, else
        ``default_recovery`` (None: finetune)."""
        return self._preset_recovery().get("mode", self.default_recovery)

    def own_distill(self) -> bool:
        """Whether that recovery distils from the unpruned model when the caller does not say: the preset's
        choice, else ``default_distill``."""
        return bool(self._preset_recovery().get("distill", self.default_distill))

    def prepare(self, ctx: PassContext) -> PassContext | None:
        """Optionally prune a different model than the user's: return ``ctx.prepared(gm, groups, model)``, a
        context with its own graph, groups and model (e.g. Pruning from Scratch's wider copy, see
        ``fxprune.compaction.widen``; its ``origin`` is the user's context), or None (the default) to prune the
        user's model. Scoring, selection and compaction then run on the returned model, ``PruneResult.plan``
        refers to its tensors and ``PruneResult.base`` is that model; ``--target-macs``/``--target-params`` stay
        fractions of the USER's model."""
        return None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = [hook for hook in ("weights", "edits") if callable(cls.__dict__.get(hook))]
        if old:
            raise PassError(f"pass {cls.__name__}: the {' and '.join(old)} hook(s) are gone; score() returns "
                            "fxprune.Decision(scores, finish=...) whose finish(removed) gives the weights and edits "
                            "for the removal (fxprune.Finish)")

    def score(self, ctx: PassContext) -> Decision | Scores:
        """The pass's answer for ``ctx``: its :class:`~fxprune.Decision`, or just the scores."""
        raise NotImplementedError

    def evaluation_attack(self) -> Any:
        """The attack (``fxprune.robustness.PGD``) the CLI reports robustness with when ``--attack`` is not
        given: None (the default) reports none; anp returns its own."""
        return None

    @staticmethod
    def prunable(ctx: PassContext) -> list[Group]:
        return ctx.groups.prunable


def require_modules_support(the_pass: Pass) -> None:
    """Refuse a pass that cannot run on a model compacted by resizing its modules (``Pass.graph_only``), saying
    why and what runs there."""
    why = getattr(the_pass, "graph_only", "it runs the traced graph")
    if getattr(the_pass, "runs_graph", True) and why:
        raise PassError(f"pass {the_pass.name!r} cannot run on this model: it has no graph that runs on other inputs "
                        f"(it is compacted by resizing its modules), and {why}. Passes that run there: l1, slimming, "
                        "scratch")


def require_weights_only(the_pass: Pass, why: str) -> None:
    """Refuse a pass that trains or calibrates (``Pass.runs_graph``) where nothing can run: ``why`` completes
    "pass NAME trains or calibrates ..." with what is missing and what to do."""
    if getattr(the_pass, "runs_graph", True):
        raise PassError(f"pass {the_pass.name!r} trains or calibrates {why}")
