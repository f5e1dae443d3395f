"""The "Rethinking" passes (slimming, thinet, lasso) and the plugin interface.

Each weight-changing pass is checked for exact equivalence against the masked original WITH the
weights it handed to compaction (fxprune.testing.assert_equivalent loads result.weights), plus a
property of the method itself: tiny models and random data, except where a method's claim needs real
signal (ThiNet and LASSO against l1 on the bundled digits network, trained for a few seconds).
"""
from __future__ import annotations

import functools
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import fxprune
from fxprune.cli import app
from fxprune.passes.registry import PassError, available_passes, load_pass
from fxprune.testing import assert_equivalent, masked_model, with_weights

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """conv-bn-relu -> residual conv-bn -> conv-bn -> flatten -> linear: every coupling kind the passes meet."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(x + self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics and scales
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _loader(n: int = 96, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


INPUTS = (torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(7)),)


def _gamma_l1(state: dict[str, torch.Tensor]) -> float:
    return float(sum(state[f"{b}.weight"].detach().abs().sum() for b in ("b0", "b1", "b2")))


# ---------------------------------------------------------------- slimming

def test_slimming_trains_sparse_gammas_prunes_globally_and_is_exact() -> None:
    net = _net()
    before = _gamma_l1(dict(net.named_parameters()))
    opts = {"epochs": 3, "lr": 0.01, "schedule": "fixed"}  # the paper's subgradient alone
    sparse = fxprune.prune(net, INPUTS, "slimming", 0.4, options={**opts, "s": 0.1}, train_loader=_loader(),
                           budget=fxprune.Budget(min_keep=0.0))
    plain = fxprune.prune(net, INPUTS, "slimming", 0.4, options={**opts, "s": 0.0}, train_loader=_loader())
    # the L1 subgradient shrinks |gamma|: below the start and below the same training without it
    assert _gamma_l1(sparse.weights) < before
    assert _gamma_l1(sparse.weights) < _gamma_l1(plain.weights) - 0.2
    assert _gamma_l1(dict(net.named_parameters())) == before  # the user's model untouched
    # one global threshold: every removed channel's score <= every kept channel's score
    assert sparse.selection.scope == "global"
    gone = np.concatenate([sparse.scores[g.id][sparse.removed[g.channels]] for g in sparse.groups.prunable])
    kept = np.concatenate([sparse.scores[g.id][~sparse.removed[g.channels]] for g in sparse.groups.prunable])
    assert len(gone) and gone.max() <= kept.min()
    assert_equivalent(net, sparse, INPUTS)  # against the masked SPARSITY-TRAINED model


def test_slimming_adaptive_zeroes_what_it_removes_so_pruning_costs_nothing() -> None:
    net = _net()
    res = fxprune.prune(net, INPUTS, "slimming", 0.5, options={"epochs": 4, "lr": 0.01}, train_loader=_loader())
    sparsity = res.report["sparsity"]
    assert sparsity["selected_below_threshold"] and sparsity["fraction_below_before"] == 0.0
    assert sparsity["fraction_below_after"] >= sparsity["selected_fraction"] > 0.3
    # every removed channel's gamma AND beta are exactly zero: the compacted model equals the
    # sparsity-trained model itself, not only its masked copy
    trained = with_weights(net, res.weights).eval()
    checked = 0
    for g in res.groups.prunable:
        for p in (p for p in g.params if p.role == "norm"):
            gid, pos = res.groups.positions(p.key)
            gone = torch.as_tensor((gid == g.id) & res.removed[g.channels[np.where(gid == g.id, pos, 0)]])
            bn = trained.get_submodule(p.name.rsplit(".", 1)[0])
            assert not bn.weight[gone].any() and not bn.bias[gone].any()
            checked += int(gone.sum())
    assert checked >= 8  # the loop above saw the removed channels' BatchNorm entries
    torch.testing.assert_close(res.module(*INPUTS), trained(*INPUTS), rtol=1e-4, atol=1e-5)
    assert res.removed.sum() >= 8
    assert_equivalent(net, res, INPUTS)
    hist = res.report["histograms"]["gamma"]
    assert len(hist["before"]) == len(hist["after"]) == 8 + 8 + 12


def test_slimming_floor_keeps_a_fraction_of_every_group() -> None:
    net = _net()
    res = fxprune.prune(net, INPUTS, "slimming", 0.9, options={"train": False}, budget=fxprune.Budget(min_keep=0.5))
    for g in res.groups.prunable:
        assert (~res.removed[g.channels]).sum() >= len(g) / 2
    low = fxprune.prune(net, INPUTS, "slimming", 0.9, options={"train": False}, budget=fxprune.Budget(min_keep=0.0))
    assert low.removed.sum() > res.removed.sum()


def test_slimming_without_training_scores_the_given_gammas() -> None:
    net = _net()
    res = fxprune.prune(net, INPUTS, "slimming", 0.5, options={"train": False})
    assert res.weights == {}
    g = next(g for g in res.groups.prunable if any(p.name == "b2.weight" for p in g.params))
    np.testing.assert_allclose(res.scores[g.id], net.b2.weight.detach().abs().numpy(), rtol=1e-6)
    assert_equivalent(net, res, INPUTS)


# ---------------------------------------------------------------- thinet and lasso

def _fc_input_error(net: nn.Module, res: fxprune.PruneResult, batches: list) -> tuple[float, float]:
    """Output error of the last layer vs the original on calibration data: (plain removal, reconstructed)."""
    plain = masked_model(net, res.plan)
    recon = masked_model(with_weights(net, res.weights), res.plan)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        y = net(x)
        return float((plain(x) - y).pow(2).mean()), float((recon(x) - y).pow(2).mean())


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_reconstruction_is_exact_through_compaction_and_reduces_error(method: str) -> None:
    net = _net()
    data = _loader(192)
    res = fxprune.prune(net, INPUTS, method, 0.5, options={"batches": 6, "per_batch": 32}, train_loader=data)
    assert {"c1.weight", "c2.weight", "fc.weight"} <= set(res.weights)  # the consumers were reconstructed
    assert_equivalent(net, res, INPUTS)
    plain, recon = _fc_input_error(net, res, data)
    assert recon < 0.8 * plain, (plain, recon)


def test_thinet_scores_are_the_greedy_order() -> None:
    from fxprune.passes.thinet import greedy_order

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([0.1, 3, 1, 0.2, 2, 1])
    order = greedy_order(x)
    assert order[0] == 0 and sorted(order) == list(range(6))
    s = x[:, order[:2]].sum(1)  # the second step is the best extension of the first
    costs = [((x[:, order[0]] + x[:, j]) ** 2).sum() for j in range(6) if j != order[0]]
    assert np.isclose((s ** 2).sum(), min(costs))


def test_lasso_lambda_search_hits_the_target_count() -> None:
    from fxprune.passes.lasso import lasso_select

    rng = np.random.default_rng(1)
    z = rng.normal(size=(600, 40))
    y = z @ rng.uniform(0.1, 2.0, size=40) + 0.1 * rng.normal(size=600)
    y /= np.sqrt((y * y).mean())
    for keep in (10, 20, 30):
        beta, lam, count = lasso_select(z, y, keep)
        assert keep <= count <= int(1.1 * keep), (keep, count, lam)
        assert count == int((beta != 0).sum())


@pytest.fixture(scope="module")
def trained_digits():
    """The bundled example's network, trained on real data (scikit-learn's digits) for 3 epochs (~5 s):
    the reconstruction passes are only meaningful on a network whose channels carry signal."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import digits
    finally:
        sys.path.pop(0)
    epochs, digits.PRETRAIN_EPOCHS = digits.PRETRAIN_EPOCHS, 3
    try:
        net = digits.model()
    finally:
        digits.PRETRAIN_EPOCHS = epochs
    return digits, net


def _output_error(digits, net: nn.Module, method, ratio: float = 0.5) -> tuple[float, fxprune.PruneResult]:
    """Relative MSE of the pruned network's logits against the original's on the held-out digits."""
    res = fxprune.prune(net, digits.example_inputs(), method, ratio, train_loader=digits.train_loader())
    x = digits._data()[2]
    with torch.no_grad():
        ref, got = net(x), res.module(x)
    return float((got - ref).pow(2).mean() / ref.pow(2).mean()), res


def test_thinet_and_lasso_select_better_channels_than_l1_on_a_trained_network(trained_digits) -> None:
    """At the same kept count per group: both reconstruct the trained network's output far better than
    l1's plain removal; ThiNet's greedy choice beats l1's choice given the same least-squares rescale (the
    scores, not only the rescale, do the work: by a tenth on average over three ratios, and at no ratio worse by
    more than a few percent: ThiNet's greedy criterion is per layer, not the network's output, so at a single
    ratio the margin varies with the trained network, -0.6% to 42%); LASSO chooses other channels than l1."""
    from dataclasses import dataclass

    from fxprune.passes.l1 import L1Norm
    from fxprune.passes.thinet import ThiNet

    @dataclass(frozen=True)
    class L1ChoiceThiNetRescale(ThiNet):
        name = "l1-choice-thinet-rescale"

        def score(self, ctx):  # l1's choice, ThiNet's reconstruction of the consumers for it
            return fxprune.Decision(L1Norm().score(ctx), finish=functools.partial(self.reconstructed, ctx))

    digits, net = trained_digits
    opts = {"batches": 6, "per_batch": 32}
    l1, l1_res = _output_error(digits, net, "l1")
    thinet, thinet_res = _output_error(digits, net, load_pass("thinet")(**opts))
    lasso, lasso_res = _output_error(digits, net, load_pass("lasso")(**opts))
    assert thinet < 0.5 * l1 and lasso < 0.5 * l1, (l1, thinet, lasso)
    gains = [_output_error(digits, net, load_pass("thinet")(**opts), ratio)[0]
             / _output_error(digits, net, L1ChoiceThiNetRescale(**opts), ratio)[0] for ratio in (0.3, 0.5, 0.7)]
    assert max(gains) < 1.05 and float(np.prod(gains)) ** (1 / 3) < 0.9, gains
    assert not np.array_equal(lasso_res.removed, l1_res.removed)
    kept = [r["kept"] for r in l1_res.summary()]
    assert [r["kept"] for r in thinet_res.summary()] == kept == [r["kept"] for r in lasso_res.summary()]


def test_thinet_layer_by_layer_prunes_each_layer_on_the_network_pruned_and_tuned_so_far(trained_digits) -> None:
    """``layerwise=true`` (the paper's procedure, ``preset=paper``): the same count per group as the one-shot
    ranking at the same budget; the weights handed to compaction keep every removed channel at zero (the masked
    network IS the trained one) and compaction is exact with them; the pruned network, tuned after every layer,
    is more accurate before any recovery than the one-shot one; with ``layer_epochs=0`` nothing trains and the
    result is still exact."""
    from fxprune.passes.thinet import ThiNet

    digits, net = trained_digits
    x, y = digits._data()[2], digits._data()[3]
    opts = {"batches": 4, "per_batch": 32}
    one_shot = fxprune.prune(net, digits.example_inputs(), ThiNet(**opts), 0.5, train_loader=digits.train_loader())
    layered = fxprune.prune(net, digits.example_inputs(), ThiNet(layerwise=True, **opts), 0.5,
                            train_loader=digits.train_loader(), evaluate=digits.evaluate)
    assert layered.report["layerwise"] and layered.report["layers_pruned"] >= 3
    assert [r["kept"] for r in layered.summary()] == [r["kept"] for r in one_shot.summary()]
    trained = with_weights(net, layered.weights).eval()
    with torch.no_grad():
        torch.testing.assert_close(masked_model(trained, layered.plan)(x), trained(x))
    assert_equivalent(net, layered, digits.example_inputs())
    accuracy = {name: float((res.module(x).argmax(1) == y).float().mean())
                for name, res in (("one shot", one_shot), ("layered", layered))}
    assert accuracy["layered"] > accuracy["one shot"], accuracy
    assert layered.report["trained_metrics"]["accuracy"] == pytest.approx(accuracy["layered"], abs=1e-6)
    frozen = fxprune.prune(net, digits.example_inputs(), ThiNet(layerwise=True, layer_epochs=0, **opts), 0.5,
                           train_loader=digits.train_loader())
    assert_equivalent(net, frozen, digits.example_inputs())


# ---------------------------------------------------------------- plugins

def _dist_info(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    info = site / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    info.joinpath("entry_points.txt").write_text(f"[fxprune.passes]\n{lines}")


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """examples/custom_pass installed the way pip lays it out: its package and a dist-info declaring the
    entry point read from its own pyproject.toml, on sys.path (importlib.metadata rescans sys.path)."""
    example = REPO / "examples" / "custom_pass"
    meta = tomllib.loads((example / "pyproject.toml").read_text())
    site = tmp_path / "site"
    site.mkdir()
    import shutil
    shutil.copytree(example / "fxprune_l2", site / "fxprune_l2")
    _dist_info(site, "fxprune_l2", meta["project"]["entry-points"]["fxprune.passes"])
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("fxprune_l2", None)


def test_example_plugin_is_small_discovered_listed_and_runs(installed_example: Path, tmp_path: Path) -> None:
    package = REPO / "examples" / "custom_pass" / "fxprune_l2"
    assert len((package / "__init__.py").read_text().splitlines()) < 60
    assert len((package / "gates.py").read_text().splitlines()) < 80
    assert available_passes()["l2"].__module__ == "fxprune_l2"
    assert available_passes()["gates"].__module__ == "fxprune_l2.gates"
    runner = CliRunner()
    listing = runner.invoke(app, ["passes"])
    assert listing.exit_code == 0 and "l2" in listing.output
    model_file = tmp_path / "tiny.py"
    model_file.write_text(textwrap.dedent(TINY_MODEL))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(model_file), "--pass", "l2", "--ratio", "0.5", "--opt", "power=1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "plan.json").exists()


def test_example_learned_mask_pass_trains_gates_and_is_exact(installed_example: Path) -> None:
    net = _net()
    res = fxprune.prune(net, INPUTS, "gates", 0.4, options={"epochs": 2, "lam": 0.01}, train_loader=_loader())
    gated = {gid for n in res.groups.gm.graph.nodes if n.meta.get("fxprune.masks")
             for gid in n.meta["fxprune.masks"]["gates"]}
    assert gated == {g.id for g in res.groups.prunable}
    scores = np.concatenate([res.scores[g.id] for g in res.groups.prunable])
    assert 0 < scores.min() and scores.max() < 1 and scores.std() > 0  # the gates moved, differently
    assert res.removed.sum() > 0 and res.selection.scope == "global"
    assert_equivalent(net, res, INPUTS)  # the compacted model is the gated trained network, restricted
    assert not any("fxprune" in name for name in res.module.state_dict())


def test_pass_given_as_module_colon_class_without_installing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_uninstalled_pass.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import numpy as np
        from fxprune.passes.base import Pass

        @dataclass(frozen=True)
        class Reverse(Pass):
            name = "reverse"
            def score(self, ctx):
                return {g.id: -np.arange(len(g), dtype=float) for g in self.prunable(ctx)}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "reverse" not in available_passes()
    res = fxprune.prune(_net(), INPUTS, "my_uninstalled_pass:Reverse", 0.5)
    g = res.groups.prunable[0]
    assert res.removed[g.channels][0] == False and res.removed[g.channels][-1] == True  # noqa: E712
    model_file = tmp_path / "tiny.py"
    model_file.write_text(textwrap.dedent(TINY_MODEL))
    result = CliRunner().invoke(app, ["run", str(model_file), "--pass", "my_uninstalled_pass:Reverse",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    with pytest.raises(PassError, match="cannot load"):
        load_pass("my_uninstalled_pass:Nothing")


def test_two_passes_with_one_name_is_an_error_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dist_info(tmp_path, "evil_l1", {"l1": "evil_l1:L1"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PassError, match=r"fxprune\.passes\.l1:L1Norm.*evil_l1:L1|evil_l1:L1.*fxprune\.passes\.l1"):
        available_passes()


def test_builtin_passes_register_through_entry_points() -> None:
    found = available_passes()
    for name in ("l1", "slimming", "thinet", "lasso"):
        assert found[name].name == name and found[name].__module__ == f"fxprune.passes.{name}"


TINY_MODEL = '''
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 3, padding=1)).eval()

    def example_inputs():
        return (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)),)
'''


# ---- the pass interface: a function of a read-only context to a Decision --------------------------------------
def test_the_docs_show_the_l1_pass_whole_as_the_template():
    page = (REPO / "docs" / "writing-a-pass.md").read_text()
    source = (REPO / "fxprune" / "passes" / "l1.py").read_text()
    assert f"```python\n{source}```" in page


def test_a_pass_context_is_read_only_and_names_what_replaced_its_old_fields():
    import dataclasses

    model = Net().eval()
    gm = fxprune.trace(model, (torch.randn(2, 3, 4, 4),))
    ctx = fxprune.PassContext(gm, fxprune.analyze(gm), model, {"train_loader": []})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.model = None
    with pytest.raises(TypeError):
        ctx.data["loss"] = None
    for gone in ("weights", "report", "masks", "state", "artifacts"):
        with pytest.raises(AttributeError, match=rf"PassContext.{gone} is gone.*Decision|closure"):
            getattr(ctx, gone)
    wide = ctx.prepared(gm, ctx.groups, model)
    assert wide.origin is ctx and wide.user is ctx and ctx.user is ctx


def test_a_pass_with_the_old_weights_hook_is_refused_when_defined():
    from dataclasses import dataclass

    with pytest.raises(PassError, match="weights hook.*Decision"):
        @dataclass(frozen=True)
        class Old(fxprune.Pass):
            name = "old"

            def score(self, ctx):
                return {}

            def weights(self, ctx, removed):
                return {}


def test_a_pass_returning_neither_scores_nor_a_decision_is_named():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Wrong(fxprune.Pass):
        name = "wrong"

        def score(self, ctx):
            return [1.0]

    with pytest.raises(TypeError, match="pass 'wrong': score.. returned list"):
        fxprune.prune(Net().eval(), (torch.randn(2, 3, 4, 4),), Wrong(), 0.5)


def test_a_decision_finish_gets_the_removal_and_its_weights_are_compacted():
    """finish(removed) is called with the selected removal; the weights it returns are the ones compacted (the
    result equals the masked original with them loaded)."""
    from dataclasses import dataclass

    from fxprune.passes.l1 import L1Norm

    seen = []

    @dataclass(frozen=True)
    class Doubled(fxprune.Pass):
        name = "doubled"

        def score(self, ctx):
            def finish(removed):
                seen.append(removed.copy())
                return fxprune.Finish({"fc.weight": 2 * ctx.tensor("fc.weight")})
            return fxprune.Decision(L1Norm().score(ctx), finish=finish)

    model, x = Net().eval(), torch.randn(2, 3, 4, 4)
    res = fxprune.prune(model, (x,), Doubled(), 0.5)
    assert len(seen) == 1 and np.array_equal(seen[0], res.removed)
    torch.testing.assert_close(res.weights["fc.weight"], 2 * model.fc.weight)
    assert_equivalent(model, res, (x,))


def test_paper_presets_set_the_authors_options_and_given_options_win() -> None:
    """``preset=paper`` (``--opt preset=paper``): the pass is made with the preset's options, the options given
    beside it win, the preset is recorded, an unknown one is named with the known ones; the CLI lists them."""
    import json

    from typer.testing import CliRunner

    from fxprune.cli import app
    from fxprune.passes.registry import PassError, load_pass, make_pass

    for name in ("tas", "anp", "sanp", "flop", "slimming", "scratch", "thinet"):
        cls = load_pass(name)
        made = make_pass(name, {"preset": "paper"})
        assert made.preset == "paper" and cls.presets["paper"]
        assert all(getattr(made, k) == v for k, v in cls.presets["paper"].items())
        assert any(getattr(made, k) != getattr(cls(), k) for k in cls.presets["paper"])  # it changes something
        assert make_pass(name, {}).preset == ""
    assert make_pass("tas", {"preset": "paper", "epochs": 5}).epochs == 5
    assert not make_pass("tas", {"preset": "paper", "epochs": 5}).fit
    with pytest.raises(PassError, match="no preset 'cifar'.*'paper'"):
        make_pass("anp", {"preset": "cifar"})
    rows = json.loads(CliRunner().invoke(app, ["passes", "--json"]).output)
    assert {r["name"]: r["presets"] for r in rows}["flop"] == {"paper": {"schedule": "noam", "init_drop": 0.5}}


def test_flop_noam_rates_follow_the_authors_schedule() -> None:
    """The enwik8 script's --noam: rate(t) = min(t^-0.5, t w^-1.5) x lr / sqrt(d); the multipliers at prune_lr."""
    from fxprune.passes.flop import Noam, noam

    w = 100
    assert noam(1, w) == pytest.approx(1 * w ** -1.5) and noam(w, w) == pytest.approx(w ** -0.5)
    assert noam(4 * w, w) == pytest.approx((4 * w) ** -0.5)
    peak = max(noam(t, w) for t in range(1, 5 * w))
    assert peak == pytest.approx(w ** -0.5)
    penalty = SimpleNamespace(optimizer=torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0))
    hook = Noam(w, 1024, 1e-3, 3.0, penalty)  # type: ignore[arg-type]
    weights = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    hook.before_forward(SimpleNamespace(step=w - 1, optimizer=weights, mask_optimizer=None))
    assert weights.param_groups[0]["lr"] == pytest.approx(w ** -0.5 * 1e-3 / 32)
    assert penalty.optimizer.param_groups[0]["lr"] == pytest.approx(w ** -0.5 * 3.0 / 32)
