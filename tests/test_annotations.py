"""What every stage decides is written on the graph (fxprune.annotations): groups per axis, frozen reasons,
each pass's scores and masks, the selection; compaction reads the selection from there."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

import fxprune
from fxprune.annotations import FROZEN, GROUPS, MASKS, NODE_KEYS, SCORES, SELECTION, read_selection, write_selection
from fxprune.cli import app
from fxprune.passes.l1 import L1Norm
from fxprune.testing import assert_equivalent

ROOT = Path(__file__).resolve().parents[1]
X = (torch.randn(2, 3, 8, 8),)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.b1(self.c1(x)))
        return self.c3(torch.cat([a, torch.relu(self.c2(a))], 1))


def _nodes_of(gm, gid: int) -> list:
    return [n for n in gm.graph.nodes if any(gid in ids for ids in n.meta.get(GROUPS, {}).values())]


def test_every_stage_writes_what_it_decided_on_the_nodes_of_each_group():
    model = Net().eval()
    res = fxprune.prune(model, X, "l1", 0.5)
    gm = res.groups.gm
    cat = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default)
    assert len(cat.meta[GROUPS][(0, 1)]) == 2  # a concat's channel axis carries both groups
    for g in res.groups:
        nodes = _nodes_of(gm, g.id)
        assert nodes, g.id
        for n in nodes:
            if g.prunable:
                np.testing.assert_array_equal(n.meta[SCORES]["l1"][g.id], res.scores[g.id])
                assert list(n.meta[SELECTION][g.id]) == list(np.flatnonzero(~res.removed[g.channels]))
                assert g.id not in n.meta[FROZEN]
            else:
                assert n.meta[FROZEN][g.id] == g.frozen and g.id not in n.meta[SELECTION]
    np.testing.assert_array_equal(read_selection(gm, res.groups), res.removed)


def test_compaction_applies_the_selection_written_on_the_graph():
    model = Net().eval()
    gm = fxprune.trace(model, X)
    groups = fxprune.analyze(gm)
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    g = max(groups.prunable, key=len)
    removed[g.channels[[0, 3, 5]]] = True  # a removal no pass would choose
    write_selection(gm, groups, removed)
    out = fxprune.compact(gm, groups, None, model)
    np.testing.assert_array_equal(out.removed, removed)
    kept = [i for i in range(len(g)) if i not in (0, 3, 5)]
    assert any(entry.get(0) is not None and len(entry[0]) == len(kept) for entry in out.plan.values())
    assert_equivalent(model, fxprune.PruneResult(out.module, out.plan, groups, out.removed), X)


@dataclasses.dataclass(frozen=True)
class GatedL1(L1Norm):
    """A toy pass that learns a mask: it reports one (here: scores scaled to [0, 1])."""

    name = "gated-l1"

    def score(self, ctx):
        scores = super().score(ctx)
        return fxprune.Decision(scores, masks={g: s / s.max() for g, s in scores.items()})


def test_a_pass_mask_is_written_beside_its_scores():
    res = fxprune.prune(Net().eval(), X, GatedL1(), 0.5)
    gm = res.groups.gm
    for g in res.groups.prunable:
        for n in _nodes_of(gm, g.id):
            np.testing.assert_allclose(n.meta[MASKS]["gated-l1"][g.id], res.scores[g.id] / res.scores[g.id].max())


def test_each_annotation_key_has_one_writer():
    """Only fxprune/annotations.py writes the fxprune.* node keys."""
    writes = re.compile(r"meta\[(GROUPS|FROZEN|SCORES|MASKS|SELECTION|META_GROUPS)\]\s*=|meta\[\"fxprune\.")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fxprune").rglob("*.py")
                 if p.name != "annotations.py" and writes.search(p.read_text())]
    assert offenders == []
    assert set(NODE_KEYS) == {GROUPS, FROZEN, SCORES, MASKS, SELECTION}


def test_inspect_graph_shows_scores_and_kept_channels(tmp_path):
    path = tmp_path / "net.py"
    path.write_text("import torch\nfrom torch import nn\n"
                    "def model():\n    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))\n"
                    "def example_inputs():\n    return (torch.randn(2, 3, 6, 6),)\n")
    out = CliRunner().invoke(app, ["inspect", str(path), "--graph", "--pass", "l1", "--ratio", "0.5"])
    assert out.exit_code == 0, out.output
    assert "l1 scores:" in out.output and re.search(r"g\d+ kept: \[.*\] \(4\)", out.output)
    assert "frozen: model input" in out.output
    bad = CliRunner().invoke(app, ["inspect", str(path), "--graph", "--pass", "no-such-pass"])
    assert bad.exit_code == 2

