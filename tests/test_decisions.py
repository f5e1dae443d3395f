"""The quick verdict that torch.export cannot follow a model (``fxprune.tracing.decisions``): the analysis recording
watches the forward for a Python decision on a data-dependent value, and where it finds one the modules target takes
over at once, without the symbolic front ends that would fail on that same line (they cost a Faster R-CNN most of its
prune time). A model whose data-dependent sizes only flow into arithmetic still gets the graph."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from test_modules_target import _detnet
from torch import nn

import fxprune
from fxprune.compaction.targets import trace_for
from fxprune.testing import assert_equivalent
from fxprune.tracing import tracer
from fxprune.tracing.decisions import Watch
from fxprune.tracing.record import record_trace


class Thresholded(nn.Module):
    """Keeps the boxes above a score, as detectors do, and branches on how many were kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.score, self.box = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        s, b = self.score(h).flatten(1)[0], self.box(h).flatten(2)[0].t()
        keep = s > 0
        boxes = b[keep]
        if boxes.numel() == 0:  # the decision: export cannot take this line
            return h.mean((2, 3))
        return h.mean((2, 3)) + boxes.mean()


class SizeIntoArithmetic(nn.Module):
    """A data-dependent size that only flows into a reduction: torch.export follows it (an unbacked size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        picked = h.flatten(2)[h.flatten(2) > 0.1]  # boolean mask: a size that depends on the values
        return self.fc(h.mean((2, 3))) + picked.sum()


class ValueBranch(nn.Module):
    """A Python branch on a tensor's value (``bool()``), with no data-dependent size anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.mean() > 0:
            return h.relu().mean((2, 3))
        return h.mean((2, 3))


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the symbolic front ends' calls (make_fx and torch.export)."""
    calls = {"make_fx": 0, "export": 0}
    for name in calls:
        original = tracer.FRONTENDS[name]

        def counted(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)

        monkeypatch.setitem(tracer.FRONTENDS, name, counted)
    return calls


def _trace_auto(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_for(model, (x,), "auto")


@pytest.mark.parametrize("model", [Thresholded(), _detnet()], ids=["numel-compared", "detector-nms-tolist"])
def test_a_decision_on_a_data_dependent_size_skips_the_symbolic_front_ends(model, monkeypatch) -> None:
    torch.manual_seed(0)
    calls = _counting(monkeypatch)
    x = torch.rand(2, 3, 32, 32)
    gm, used = _trace_auto(model.eval(), x)
    assert used["target"] == "modules"
    assert calls == {"make_fx": 0, "export": 0}  # the probe saw a data-dependent size: recorded first, decided
    assert "depends on the data" in used["why"] and "test_" in used["why"]  # what, and the user's line
    result = fxprune.prune(model, (x,), "l1", 0.5)  # and the result is exact, as before
    assert result.compaction["target"] == "modules"
    assert_equivalent(model, result, (x,))


def test_a_value_branch_is_decided_after_the_first_front_end_fails(monkeypatch) -> None:
    """No data-dependent size: the probe gives no hint, make_fx runs (and fails on the branch), the recording then
    sees the decision and export is not tried."""
    calls = _counting(monkeypatch)
    gm, used = _trace_auto(ValueBranch().eval(), torch.rand(2, 3, 16, 16))
    assert used["target"] == "modules"
    assert calls["make_fx"] >= 1 and calls["export"] == 0
    assert "truth" in used["why"] or "compares" in used["why"]


def test_a_data_dependent_size_without_a_decision_still_exports(monkeypatch) -> None:
    calls = _counting(monkeypatch)
    model, x = SizeIntoArithmetic().eval(), torch.rand(2, 3, 16, 16)
    gm, used = _trace_auto(model, x)
    assert used["target"] == "graph"
    assert calls["make_fx"] + calls["export"] >= 1
    result = fxprune.prune(model, (x,), "l1", 0.5)
    assert result.compaction["target"] == "graph"
    assert_equivalent(model, result, (x,))


def test_a_forced_graph_target_still_tries_export(monkeypatch) -> None:
    """Only where the modules target may take over is the verdict used; target='graph' gets export's own error."""
    calls = _counting(monkeypatch)
    with pytest.raises(tracer.TraceError):
        trace_for(Thresholded().eval(), (torch.rand(2, 3, 16, 16),), "graph")
    assert calls["export"] >= 1


def test_the_watch_names_the_line_and_its_numbers_are_plain_after_the_run() -> None:
    torch.manual_seed(0)
    watch = Watch()
    record_trace(Thresholded().eval(), (torch.rand(1, 3, 16, 16),), {}, analysis=True, watch=watch)
    assert watch.decision is not None
    assert "compares the number of elements" in watch.decision.what
    assert watch.decision.where.endswith("if boxes.numel() == 0:  # the decision: export cannot take this line")
    first = watch.decision
    sizes = torch.rand(5)[torch.rand(5) > 2]  # outside the run: nothing is watched
    assert sizes.numel() == 0 and watch.decision is first


def test_sizes_known_nonnegative_are_not_decisions() -> None:
    """``numel() >= 0`` is what every size satisfies: a tracer decides it without a guard."""

    class Known(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kept = x[x > 0.5]
            assert kept.numel() >= 0
            return x * 2

    watch = Watch()
    record_trace(Known().eval(), (torch.rand(4, 4),), {}, analysis=True, watch=watch)
    assert watch.decision is None


def test_torchvision_batched_nms_is_a_decision() -> None:
    class Nms(nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            keep = scores > 0.2
            return torchvision.ops.batched_nms(boxes[keep], scores[keep], torch.zeros_like(scores[keep]).long(), 0.5)

    xy = torch.rand(30, 2) * 20
    boxes = torch.cat([xy, xy + 5], 1)
    watch = Watch()
    record_trace(Nms().eval(), (boxes, torch.rand(30)), {}, analysis=True, watch=watch)
    assert watch.decision is not None and "torchvision" in watch.decision.where
