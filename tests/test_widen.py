"""Widening (the inverse of compaction, for scratch's ``expand``): every prunable group grows to
round(factor * n) channels through the same literal rewrites, and removing the added copies again
gives back the original model exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_coupling import (
    GN,
    IMG,
    MHA,
    Concat,
    Conv1dNet,
    Deconv,
    Grouped,
    Residual,
    Shuffle,
    Split,
    ViewHead,
    randomize_bn,
)
from torch import nn

import fxprune
from fxprune.compaction.widen import widen, widen_copies

CASES = {
    "residual": (lambda: Residual(), IMG),
    "concat": (lambda: Concat(), IMG),
    "split": (lambda: Split(), IMG),
    "grouped": (lambda: Grouped(), IMG),
    "shuffle": (lambda: Shuffle(), IMG),
    "view_head": (lambda: ViewHead(True), (torch.randn(2, 3, 16, 16),)),
    "view_head_literal": (lambda: ViewHead(False), (torch.randn(2, 3, 16, 16),)),
    "groupnorm": (lambda: GN(), IMG),
    "heads": (lambda: MHA(), (torch.randn(2, 5, 32),)),
    "gqa": (lambda: MHA(heads=4, kv_heads=2, mode="enable_gqa"), (torch.randn(2, 5, 32),)),
    "deconv": (lambda: Deconv(), IMG),
    "conv1d": (lambda: Conv1dNet(), (torch.randn(2, 4, 20),)),
}


def _copies_removed(wide_groups: fxprune.ChannelGroups, plan: dict) -> np.ndarray:
    """In the widened model's own analysis: True for every channel that is a second copy."""
    removed = np.zeros(len(wide_groups.comp_group), dtype=bool)
    for group in wide_groups.prunable:
        p = next(p for p in group.params if p.name in plan and p.axis in plan[p.name])
        source = np.asarray(plan[p.name][p.axis])
        gid, pos = wide_groups.positions(p.key)
        seen: set[tuple[int, ...]] = set()
        for c in range(len(group)):
            idx = tuple(source[(gid == group.id) & (pos == c)].tolist())
            removed[group.channels[c]] = idx in seen
            seen.add(idx)
    return removed


def _check_roundtrip(model: nn.Module, inputs: tuple, factor: float) -> None:
    model = randomize_bn(model).eval().double()
    inputs = tuple(x.double() for x in inputs)
    gm = fxprune.trace(model, inputs)
    groups = fxprune.analyze(gm)
    wide, plan = widen(gm, groups, factor)
    wgm = fxprune.trace(wide, inputs)
    wgroups = fxprune.analyze(wgm)
    # every prunable group grew to round(factor * n)
    wanted = sorted(int(round(factor * len(g))) for g in groups.prunable)
    assert sorted(len(g) for g in wgroups.prunable) == wanted
    # removing the copies is the identity
    back = fxprune.compact(wgm, wgroups, _copies_removed(wgroups, plan), wide)
    assert sum(p.numel() for p in back.module.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(back.module(*inputs), model(*inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_widening_grows_every_group_and_removing_the_copies_is_the_identity(name):
    torch.manual_seed(0)
    make, inputs = CASES[name]
    _check_roundtrip(make(), inputs, 1.5)


def test_widening_a_torchvision_resnet():
    import torchvision as tv
    torch.manual_seed(0)
    _check_roundtrip(tv.models.resnet18(num_classes=10), (torch.randn(2, 3, 32, 32),), 1.25)


def test_copies_spread_and_factor_one_is_the_identity():
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    groups = fxprune.analyze(gm)
    copies = widen_copies(groups, 2.5)
    for g in groups.prunable:
        assert int(copies[g.channels].sum()) == round(2.5 * len(g)) and set(copies[g.channels].tolist()) <= {2, 3}
    only = [groups.prunable[0].id]
    assert (widen_copies(groups, 1.5, only)[groups.prunable[-1].channels] == 1).all()
    same, _ = widen(gm, groups, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=">= 1"):
        widen_copies(groups, 0.5)
