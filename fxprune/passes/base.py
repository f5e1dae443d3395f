"""The pass interface every scoring method implements, built-in or third-party.

A pass is a frozen dataclass whose fields are its options (``--opt key=value`` on the command line).
It must ``score`` every prunable group: one float per channel, higher = keep (``-inf`` must go,
``+inf`` must stay). A pass that learns something per channel inserts masks into the traced graph
(``ctx.insert_masks``), trains them with the one engine (``MaskTraining``), scores by their values and
hands ``masked.fold()``'s weights to compaction.

What a pass may read: everything in :class:`PassContext`. What it may write: nothing in place (the
graph's parameters are the user's tensors). A pass that changes weights, not only shapes (slimming
after sparsity training, ThiNet / LASSO least-squares reconstruction), hands NEW full-size tensors
to compaction instead: either it fills ``ctx.weights`` while scoring (e.g. a trained copy's state),
or it overrides :meth:`Pass.weights`, called once after selection with the removal, which returns
``{parameter or buffer name: new full-size tensor}``. Compaction substitutes them before slicing by
the plan, so they go through the same rewrite as everything else; ``PruneResult.weights`` records
them, and ``fxprune.testing.assert_equivalent`` loads them into the masked reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.groups import ChannelGroups, Group
from fxprune.selection.budget import Scores
from fxprune.state import attribute

if TYPE_CHECKING:  # the masks (and networkx, through the block edits) load only for a pass that uses them
    from fxprune.compaction.emit import GraphEdit
    from fxprune.edits.blocks import Block
    from fxprune.masking import MaskedModel

__all__ = ["Pass", "PassContext", "PassError", "Scores", "require_weights_only"]


class PassError(ValueError):
    """Unknown pass, duplicate name, an option the pass does not have, or a pass the run cannot use."""


@dataclass
class PassContext:
    """What a pass may read: the traced graph, its groups, the model's tensors and the user's data."""

    gm: fx.GraphModule
    groups: ChannelGroups
    model: torch.nn.Module
    data: dict[str, Any] = field(default_factory=dict)  # train_loader, val_loader, loss, evaluate
    selection: Any = None  # the budget (fxprune.selection.budget.Selection) the scores will be selected with
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # new full-size tensors a pass hands to compaction
    # the budget as a function: scores -> the removal it would select (a bool per channel component);
    # passes that train toward the selection (slimming's adaptive sparsity) ask it which channels would go
    select: Callable[[Scores], np.ndarray] | None = None
    # what the pass reports (JSON-able): it lands in report.json under "pass_report"; "trained_metrics":
    # evaluate() of the network the pass trained, before pruning (a row of the summary table); an entry
    # "histograms": {name: {"before": [...], "after": [...], "threshold": t, "xlabel": "..."}} is also
    # drawn as NAME_histogram.png in the output folder
    report: dict[str, Any] = field(default_factory=dict)
    # a pass that learns a mask per channel (gates): their final values, per group id; written onto the
    # graph beside the scores (``fxprune.masks``, see fxprune.annotations)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    # the run's resource target, when it has one: ("macs" or "params", fraction of the USER's model to keep)
    target: tuple[str, float] | None = None
    # a pass's own objects between prepare, score, weights and edits (a masked model...); not reported
    state: dict[str, Any] = field(default_factory=dict)
    # files a pass adds to the output folder: name -> writer(folder) (sanp's dynamic module); the CLI calls
    # each with the folder being written, fxprune.prune hands them on in PruneResult.artifacts
    artifacts: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    # where tensors are read when the graph holds none (a checkpoint folder pruned from disk, traced on the meta
    # device: ``fxprune.checkpoints``): name -> the tensor, read on demand; None: the graph's own tensors
    source: Callable[[str], torch.Tensor] | None = None

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
        weights (for ``ctx.weights``) and the channels whose mask is 0. The user's model and this graph are
        never modified."""
        from fxprune.masking import insert_masks

        return insert_masks(self.gm, self.groups, factory, only=only, placement=placement, weights=weights,
                            training=training, blocks=blocks, depth=depth, edits=edits)


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

    def prepare(self, ctx: PassContext) -> PassContext | None:
        """Optionally prune a different model than the user's: return a context with its own ``gm``,
        ``groups`` and ``model`` (e.g. Pruning from Scratch's wider copy, see
        ``fxprune.compaction.widen``), or None (the default) to prune the user's model. Scoring,
        selection and compaction then run on the returned model, ``PruneResult.plan`` refers to its
        tensors and ``PruneResult.base`` is that model; ``--target-macs``/``--target-params`` stay
        fractions of the USER's model."""
        return None

    def score(self, ctx: PassContext) -> Scores:
        raise NotImplementedError

    def evaluation_attack(self) -> Any:
        """The attack (``fxprune.robustness.PGD``) the CLI reports robustness with when ``--attack`` is not
        given: None (the default) reports none; anp returns its own."""
        return None

    def edits(self, ctx: PassContext, removed: np.ndarray) -> list[GraphEdit]:
        """Graph edits for compaction besides slicing (``fxprune.compaction.emit.GraphEdit``), given the
        removal: e.g. residual blocks to remove (``fxprune.edits.blocks``), factorised layers to merge back
        (``fxprune.edits.factorize.merge_unprofitable``). Default: none."""
        return []

    def weights(self, ctx: PassContext, removed: np.ndarray) -> dict[str, torch.Tensor]:
        """New full-size tensors for compaction, given the selected removal (a bool per channel
        component, ``removed[group.channels]`` per group). Default: what ``score`` left in ``ctx.weights``."""
        return dict(ctx.weights)

    @staticmethod
    def prunable(ctx: PassContext) -> list[Group]:
        return ctx.groups.prunable


def require_weights_only(the_pass: Pass, why: str) -> None:
    """Refuse a pass that trains or calibrates (``Pass.runs_graph``) where nothing can run: ``why`` completes
    "pass NAME trains or calibrates ..." with what is missing and what to do."""
    if getattr(the_pass, "runs_graph", True):
        raise PassError(f"pass {the_pass.name!r} trains or calibrates {why}")
