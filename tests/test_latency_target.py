"""target_latency: the measured latency model (fxprune.selection.latency), the budget it drives, and its CLI.

No assertion here is about how fast anything runs (timings belong in benchmarks/latency.py): the model's
arithmetic is checked with injected timings, the search against the model's own prediction, and the result,
as everywhere, against the masked original."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.analysis import analyze
from fxprune.compaction import Reindexing
from fxprune.selection.latency import LatencyModel, _fit, half_removal, node_work, op_class
from fxprune.testing import assert_equivalent

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """One node per class of op where it matters: a kxk conv, a grouped conv, a 1x1 conv, a linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pw(self.dw(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def traced(net):
    gm = fxprune.trace(net, (X,))
    return gm, analyze(gm)


def _half(groups) -> np.ndarray:
    return half_removal(groups)


def test_op_classes(traced):
    gm, _ = traced
    classes = {op_class(n, gm) for n in gm.graph.nodes} - {None}
    assert {"conv kxk", "conv grouped", "conv 1x1", "batch_norm", "relu", "linear"} <= classes
    assert all(op_class(n, gm) is None for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "output"))


def test_work_is_macs_for_products_and_elements_for_the_rest(traced):
    gm, groups = traced
    full = Reindexing(groups, np.zeros(len(groups.comp_group), dtype=bool))
    half = Reindexing(groups, _half(groups))
    by_class = {op_class(n, gm): n for n in gm.graph.nodes}
    pw, bn = by_class["conv 1x1"], by_class["batch_norm"]
    assert node_work(pw, full) == 2 * 16 * 32 * 16 * 16  # batch x in x out x pixels
    assert node_work(pw, half) == pytest.approx(node_work(pw, full) / 4)  # both sides halve
    assert node_work(bn, full) == 2 * 16 * 16 * 16 and node_work(bn, half) == node_work(bn, full) / 2


def _synthetic(gm, groups, exponents: dict[str, float], seed: int = 0) -> tuple[LatencyModel, np.ndarray, dict]:
    """A model with injected full-width times and a probe whose times follow ``exponents`` exactly."""
    rng = np.random.default_rng(seed)
    classes = {n.name: c for n in gm.graph.nodes if (c := op_class(n, gm)) is not None}
    model = LatencyModel(groups, {n: float(rng.uniform(0.5, 2.0)) for n in classes}, classes, {})
    removed = _half(groups)
    full, half = model.full_work, model.work(removed)
    probe = {n: t * (half[n] / full[n]) ** exponents.get(classes[n], 1.0) if full[n] else t
             for n, t in model.times.items()}
    return model, removed, probe


def test_fit_recovers_each_classes_exponent(traced):
    gm, groups = traced
    true = {"conv 1x1": 0.7, "conv kxk": 0.9, "conv grouped": 1.2, "batch_norm": 0.5, "relu": 1.0, "linear": 0.8}
    model, removed, probe = _synthetic(gm, groups, true)
    model.exponents, report = _fit(model, removed, probe, model.classes)
    for c, e in true.items():
        assert model.exponents[c] == pytest.approx(e, abs=1e-9), c
    # the prediction at the probe's width is what the probe measured, node for node summed
    assert model(removed).latency == pytest.approx(sum(probe.values()), rel=1e-9)
    assert model().latency == pytest.approx(sum(model.times.values()))
    assert report["classes"]["conv 1x1"]["work_kept"] == pytest.approx(0.25)


def test_prediction_only_falls_as_channels_go(traced):
    gm, groups = traced
    model, removed, probe = _synthetic(gm, groups, {"conv 1x1": 0.7, "batch_norm": 0.4})
    model.exponents, _ = _fit(model, removed, probe, model.classes)
    group = max(groups.prunable, key=len)
    last = model().latency
    for k in range(1, len(group)):
        cut = np.zeros(len(groups.comp_group), dtype=bool)
        cut[group.channels[:k]] = True
        now = model(cut).latency
        assert now <= last + 1e-12
        last = now


def test_exponents_are_clamped(traced):
    gm, groups = traced
    model, removed, probe = _synthetic(gm, groups, {"conv 1x1": 5.0, "batch_norm": -1.0})
    exps, _ = _fit(model, removed, probe, model.classes)
    assert exps["conv 1x1"] == 1.5 and exps["batch_norm"] == 0.0


def test_measure_times_every_op_of_the_graph(traced):
    gm, groups = traced
    model = LatencyModel.measure(gm, groups, runs=2)
    assert set(model.times) == {n.name for n in gm.graph.nodes if op_class(n, gm) is not None}
    assert all(t > 0 for t in model.times.values())
    assert set(model.exponents) <= set(model.classes.values()) and model.exponents
    assert model.probe["full_ms"] > 0 and model.probe["probe_ms"] > 0


def test_prune_to_a_latency_target_is_exact_and_hits_its_prediction():
    """Wide enough that the convolutions' work, not per-op overhead, is the time (a network of microsecond ops
    cannot be made faster by removing channels, and the search says so)."""
    torch.manual_seed(0)
    net = Net(width=64).eval()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    res = fxprune.prune(net, (x,), "l1", budget=fxprune.Budget(target_latency=0.7))
    assert res.latency is not None
    assert abs(res.latency["predicted_kept"] - 0.7) <= 0.01 + 1e-9  # the search's tolerance, less float rounding
    assert res.removed.any() and res.latency["measured_ms"] > 0
    assert_equivalent(net, res, (x,), dtype=torch.float32)
    json.dumps(res.latency)  # goes into report.json as it is


def test_latency_target_refusals(net):
    with pytest.raises(ValueError, match="one resource target"):
        fxprune.prune(net, (X,), "l1", budget=fxprune.Budget(target_macs=0.5, target_latency=0.5))
    with pytest.raises(ValueError, match="fraction to keep"):
        fxprune.prune(net, (X,), "l1", budget=fxprune.Budget(target_latency=0.0))
    with pytest.raises(ValueError, match="traces whole"):
        fxprune.prune(net, (X,), "l1", budget=fxprune.Budget(target_latency=0.5), target="modules")
    from fxprune.passes.registry import PassError

    with pytest.raises(PassError, match="not a latency target"):
        fxprune.prune(net, (X,), "tas", budget=fxprune.Budget(target_latency=0.5),
                      train_loader=[(X, torch.zeros(2, dtype=torch.long))])


def test_latency_target_refused_for_a_pass_that_prunes_its_own_copy(net):
    with pytest.raises(ValueError, match="target_macs instead of target_latency"):
        fxprune.prune(net, (X,), "scratch", options={"expand": 2.0}, budget=fxprune.Budget(target_latency=0.5))


MODEL_FILE = '''
import torch, torch.nn as nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

def example_inputs():
    return (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
'''


def test_cli_target_latency(tmp_path, cli):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    result = cli("run", path, "--pass", "l1", "--target-latency", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert "of the latency" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"latency": 0.5}
    assert report["latency_model"]["predicted_kept"] <= 0.51
    assert any("--target-latency 0.5" in n and "predicted" in n for n in report["notes"])
    assert report["after"]["macs"] < report["before"]["macs"]
    bench = cli("bench", out, "--repeats", "4", "--rounds", "2", "--json")
    assert bench.exit_code == 0, bench.output
    rows = [r for r in json.loads(bench.output) if r["model"] == "pruned"]
    assert rows and rows[0]["latency_target"] == 0.5
    assert rows[0]["latency_promise_kept"] == pytest.approx(rows[0]["speedup"] * 0.5)
    table = cli("bench", out, "--repeats", "4", "--rounds", "2")
    assert table.exit_code == 0 and "of target" in table.output, table.output


def test_the_probe_follows_the_selections_rounding():
    """Calibrated at ratio 0.5 under the run's own rules: a grouped conv 12 wide is probed at 8 (rounded, as the
    search will pick), not at 6, a width its kernels run slowly."""
    from test_select import GroupedNet

    from fxprune.pipeline import latency_model as _latency_model
    from fxprune.selection.budget import Selection

    torch.manual_seed(0)
    net = GroupedNet().eval()
    gm = fxprune.trace(net, (torch.randn(2, 3, 16, 16),))
    groups = analyze(gm)
    for width_to, kept in ((8, 8 / 12), (1, 6 / 12)):
        model = _latency_model(gm, groups, "graph", Selection(group_width_to=width_to))
        assert model.probe["classes"]["conv 1x1"]["work_kept"] == pytest.approx(kept, abs=1e-3)


def test_a_graph_that_cannot_be_timed_is_a_clear_error(net, monkeypatch):
    from fxprune.selection import latency
    from fxprune.selection.budget import SelectionError

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this op")

    monkeypatch.setattr(latency, "time_nodes", broken)
    with pytest.raises(SelectionError, match="times the traced graph op by op.*no kernel.*target_macs"):
        fxprune.prune(net, (X,), "l1", budget=fxprune.Budget(target_latency=0.5))


def test_bench_hints_at_a_latency_target_when_the_macs_promise_falls_short():
    from fxprune.cli.ui import bench_hint

    row = {"model": "pruned", "speedup": 2.0, "macs_reduction": 3.6, "promise_kept": 2.0 / 3.6}
    assert "--target-latency" in bench_hint([{"model": "original", "speedup": None}, row])
    assert bench_hint([{**row, "promise_kept": 0.95}]) is None
    assert bench_hint([{**row, "latency_target": 0.5}]) is None  # already pruned to a latency
    assert bench_hint([{**row, "model": "pruned (onnxruntime)"}]) is None  # eager rows only


def test_an_overhead_bound_latency_target_is_named_in_a_note():
    """A target reached only by removing nearly all the MACs (the time is per-op overhead) gets its own note."""
    from types import SimpleNamespace

    from fxprune.cli.notes import OVERHEAD_BOUND
    from fxprune.cli.notes import latency_note as _latency_note
    from fxprune.cli.runconfig import Feedback

    cfg = SimpleNamespace(budget={"target_latency": 0.5}, out="out")
    result = SimpleNamespace(latency={"predicted_kept": 0.5, "measured_ms": 1.0})
    for macs_after, overhead in ((1_000, True), (int(1e6 * 0.5 * OVERHEAD_BOUND) + 1, False), (400_000, False)):
        notes: list[str] = []
        _latency_note(cfg, result, {"latency_ms": 1.0, "macs": 1_000_000}, {"latency_ms": 0.5, "macs": macs_after},
                      Feedback(), notes)
        assert "predicted 0.50" in notes[0]
        assert any("per-op overhead" in n for n in notes) == overhead, (macs_after, notes)
