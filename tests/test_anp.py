"""anp (fxprune/passes/anp.py): the Kumaraswamy-to-Beta KL in closed form against Monte Carlo, E[pi] and its
threshold, the per-sample relaxed Bernoulli, folding the soft survivors (the compacted model computes
what the trained masked network computes, float64), the engine's phases, every variant end to end on a
tiny CNN, an MLP and a ViT, and the CLI's robustness report."""
from __future__ import annotations

import contextlib
import json
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import fxprune
from fxprune.analysis import analyze
from fxprune.cli import app
from fxprune.passes.anp import VARIANTS, Anp, BetaBernoulli, kumaraswamy_beta_kl, kumaraswamy_mean, with_features
from fxprune.passes.base import PassContext
from fxprune.recovery.engine import Hook, MaskTraining, TrainState, train
from fxprune.robustness import robust_metrics
from fxprune.testing import assert_equivalent
from fxprune.tracing.tracer import trace

F64 = torch.float64


def _kumaraswamy(a: float, b: float, n: int, seed: int = 0) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64).clamp(1e-12, 1 - 1e-12)
    return (1 - u.pow(1 / b)).pow(1 / a)


@pytest.mark.parametrize("a,b,alpha", [(2.127, 1.0, 1e-4), (0.8, 1.7, 0.5), (3.0, 0.6, 2.0), (0.3, 1.0, 1e-4)])
def test_kl_closed_form_matches_monte_carlo(a: float, b: float, alpha: float) -> None:
    pi = _kumaraswamy(a, b, 400_000).clamp_min(1e-300)
    log_q = math.log(a) + math.log(b) + (a - 1) * pi.log() + (b - 1) * torch.log1p(-pi.pow(a))
    log_p = math.log(alpha) + (alpha - 1) * pi.log()  # Beta(alpha, 1)
    samples = log_q - log_p
    mc, err = float(samples.mean()), float(samples.std()) / math.sqrt(len(samples))
    closed = float(kumaraswamy_beta_kl(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64), alpha))
    assert abs(closed - mc) < 4 * err + 1e-3, (closed, mc, err)


@pytest.mark.parametrize("a,b", [(2.127, 1.0), (0.5, 2.0), (0.05, 1.0)])
def test_expected_pi_matches_monte_carlo(a: float, b: float) -> None:
    mc = float(_kumaraswamy(a, b, 400_000).mean())
    closed = float(kumaraswamy_mean(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)))
    assert closed == pytest.approx(mc, abs=3e-3)


def test_defaults_and_the_threshold() -> None:
    mask = BetaBernoulli(4)  # conv init: a = softplus(2.0), b = softplus(0.5413) = 1
    a, b = mask.ab()
    assert float(b[0]) == pytest.approx(1.0, abs=1e-4)
    assert float(mask.expected()[0]) == pytest.approx(0.68, abs=0.005)
    assert float(BetaBernoulli(2, a_init=-1.0).expected()[0]) == pytest.approx(0.24, abs=0.005)
    with torch.no_grad():
        mask.a_raw.copy_(torch.tensor([2.0, -8.0, -6.0, 0.0]))  # E[pi] ~ 0.68, 3e-4, 2.5e-3, 0.41
    e, keep = mask.expected(), mask.keep()
    assert float(e[1]) <= 1e-3 < float(e[2])
    assert keep[1] == 0 and keep[2] == e[2] and keep[0] == e[0]
    mask.eval()
    x = torch.randn(5, 4, 3, 3)
    assert torch.equal(mask(x), keep.expand(5, 4))  # evaluation: E[pi], thresholded, for every sample


def test_training_samples_are_per_sample_relaxed_bernoulli_with_rate_pi() -> None:
    torch.manual_seed(0)
    mask = BetaBernoulli(3, a_init=2.0).train()
    z = torch.cat([mask(torch.zeros(512, 3)) for _ in range(40)])
    assert z.shape == (512 * 40, 3) and bool(((z >= 0) & (z <= 1)).all())
    assert float(((z > 0.1) & (z < 0.9)).float().mean()) < 0.1  # temperature 0.1: nearly binary
    assert float((z > 0.5).float().mean()) == pytest.approx(float(mask.expected()[0]), abs=0.03)
    assert len({tuple(r.tolist()) for r in (z[:64] > 0.5).int()}) > 1  # different samples, different masks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class BiasNet(Net):
    """Net with biased convolutions: the bias takes the constant a removed channel emits before its BatchNorm
    (anp's prenorm masks); it reaches the next layer everywhere alike, except where zero padding reads 0."""

    def __init__(self, padding: int = 1) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=padding), nn.Conv2d(8, 8, 3, padding=padding)
        if not padding:
            self.fc1 = nn.Linear(8 * 4, 16)


class NoPadNet(BiasNet):
    def __init__(self) -> None:
        super().__init__(padding=0)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc1(x.flatten(1)))  # tanh(0) = 0, but a sigmoid would not: the masks handle both
        return self.fc3(torch.sigmoid(self.fc2(x)))


def _data(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, *shape, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _context(model: nn.Module, x: torch.Tensor, data: list) -> PassContext:
    gm = trace(model, (x,))
    return PassContext(gm, analyze(gm), model, {"train_loader": data})


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("placement", ["output", "prenorm"])
@pytest.mark.parametrize("net,shape", [(Net, (1, 8, 8)), (BiasNet, (1, 8, 8)), (NoPadNet, (1, 8, 8)),
                                       (MLP, (1, 8, 8))])
def test_folded_soft_scales_equal_the_trained_masked_network(placement: str, net: type, shape: tuple) -> None:
    """After training, the compacted model (survivors' E[pi] folded into the weights, channels at or under
    the threshold and the budget's removed) computes what the masked network computes in eval mode."""
    model = _randomise(net())
    x = torch.rand(6, *shape)
    ctx = _context(model, x, _data(shape))
    the_pass = Anp(variant="bp", epochs=1, placement=placement, lr_mask=0.5)
    finish = the_pass.score(ctx).finish
    masked = finish.masked
    assert set(masked.masks) == {g.id for g in ctx.groups.prunable}  # every group, with or without a norm
    with torch.no_grad():  # push a few channels under the threshold: the method's own pruning
        for mask in masked.masks.values():
            mask.a_raw[:2] = -9.0
    scores = {gid: np.where(m.expected().detach().double().numpy() > 1e-3, m.expected().detach().double().numpy(),
                            -np.inf) for gid, m in masked.masks.items()}
    removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
    for g in ctx.groups.prunable:
        removed[g.channels[np.isneginf(scores[g.id])]] = True
    uncarried = placement == "prenorm" and net is Net  # conv2 has no bias, its BatchNorm sits behind a mask
    with pytest.warns(UserWarning, match="conv2d_1 has no bias") if uncarried else contextlib.nullcontext():
        weights = finish(removed).weights
    out = fxprune.compact(ctx.gm, ctx.groups, removed, model, weights=weights)
    assert out.removed.sum() == 2 * len(masked.masks)
    want = masked.module.eval().to(F64)(x.to(F64))
    got = out.module.eval().to(F64)(x.to(F64))
    if uncarried:  # the fold said where it differs
        assert not torch.allclose(got, want, atol=1e-9)
        return
    if placement == "prenorm" and net is BiasNet:  # the documented border effect: zero padding reads 0 where a
        diff = (got - want).abs().max()            # removed channel emitted its constant; without padding, exact
        assert diff > 1e-6
        return
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # the masks compute E[pi] in float32


def test_features_graph_shares_the_weights_and_taps_every_activation() -> None:
    model = Net().eval()
    x = torch.rand(2, 1, 8, 8)
    gm = trace(model, (x,))
    feats, store = with_features(gm)
    store.clear()
    out = feats(x)
    assert torch.equal(out, gm(x)) and len(store) == 3  # three ReLUs
    p = dict(feats.named_parameters())
    assert any(t is dict(gm.named_parameters())[k] for k, t in p.items())


class Phases(Hook):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_forward(self, state: TrainState) -> None:
        self.seen.append(state.phase)


def test_engine_tells_hooks_each_forwards_phase() -> None:
    model, mask = nn.Linear(4, 2), nn.Parameter(torch.ones(2))
    data = [(torch.randn(3, 4), torch.randint(0, 2, (3,))) for _ in range(3)]
    hook = Phases()
    train(nn.ModuleDict({"m": model}).m, data, epochs=1, hooks=[hook], masks=MaskTraining([mask], loader=data),
          loss_fn=lambda out, y: F.cross_entropy(out * mask, y))
    assert hook.seen == ["weights", "masks"] * 3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_runs_end_to_end_and_compacts_exactly(variant: str) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(4, 1, 8, 8)
    data = _data((1, 8, 8))
    result = fxprune.prune(model, (x,), "anp", 0.25, options={"variant": variant, "epochs": 1, "steps": 2,
                                                              "eps": 0.1, "step_size": 0.05}, train_loader=data)
    assert result.removed.any() and result.report["variant"] == variant
    assert ("masked_groups" in result.report) == VARIANTS[variant][0]
    assert result.weights and not all(torch.equal(result.weights[k], v) for k, v in model.state_dict().items()
                                      if k in result.weights)  # trained
    assert_equivalent(model, result, (x,))
    assert result.module(x).shape == (4, 4)


def test_without_a_budget_anp_removes_exactly_what_its_threshold_removes() -> None:
    """Ratio 0: the channels whose keep probability E[pi] is at or under the threshold go, and no other. One
    epoch moves no E[pi] under the default 1e-3, so the threshold is set between the trained values (it does not
    change the training: the same E[pi] come out)."""
    model = Net().eval()
    x = torch.rand(4, 1, 8, 8)
    options = {"variant": "bp", "epochs": 1}
    first = fxprune.prune(model, (x,), "anp", 0.0, options=options, train_loader=_data((1, 8, 8)))
    assert first.report["pruned_by_threshold"] == int(first.removed.sum()) == 0
    every = np.asarray(first.report["histograms"]["keep_probability"]["after"])
    threshold = float(np.quantile(every, 0.3))
    result = fxprune.prune(model, (x,), "anp", 0.0, options={**options, "threshold": threshold},
                           train_loader=_data((1, 8, 8)))
    assert np.array_equal(result.report["histograms"]["keep_probability"]["after"], every)
    assert 0 < result.report["pruned_by_threshold"] == int((every <= threshold).sum()) == int(result.removed.sum())
    for g in result.groups.prunable:  # exactly the channels at or under it
        assert np.array_equal(result.removed[g.channels], np.isneginf(result.scores[g.id]))
        assert np.array_equal(np.isneginf(result.scores[g.id]), first.scores[g.id] <= threshold)
    assert result.module(x).shape == (4, 4)
    assert_equivalent(model, result, (x,))


def test_vision_transformer_heads_and_mlp_units() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=4).eval()
    x = torch.rand(2, 3, 16, 16)
    data = [(torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))) for _ in range(2)]
    result = fxprune.prune(model, (x,), "anp", 0.5, options={"epochs": 1, "steps": 1}, train_loader=data)
    assert result.report["masked_groups"] >= 2 and not result.report["skipped"]
    assert result.removed.any()
    assert_equivalent(model, result, (x,), dtype=torch.float64)


def test_masks_start_near_the_trained_network_and_the_prior_weighs_as_on_cifar(monkeypatch) -> None:
    """fxprune's defaults: every mask starts at E[pi] ~ 0.97 (the authors' 0.68 / 0.24 with preset=paper), and
    the KL is divided by at least kl_n_min = 50000 examples (the training set's own size with kl_n_min=0)."""
    import fxprune.passes.anp as anp_module
    from fxprune.passes.registry import make_pass

    seen: list[int] = []
    original = anp_module.AnpHook.__init__

    def spy(self, model, masks, beta, n, *args, **kwargs):
        seen.append(n)
        assert masks and all(float(m.expected().detach().min()) > 0.96 for m in masks)  # before any step
        original(self, model, masks, beta, n, *args, **kwargs)

    monkeypatch.setattr(anp_module.AnpHook, "__init__", spy)
    model, x, data = Net().eval(), torch.rand(4, 1, 8, 8), _data((1, 8, 8))
    options = {"variant": "bp", "epochs": 1}
    fxprune.prune(model, (x,), "anp", 0.25, options=options, train_loader=data)
    fxprune.prune(model, (x,), "anp", 0.25, options={**options, "kl_n_min": 0}, train_loader=data)
    assert seen == [50000, 64]  # 4 batches of 16: the samples, not the batches
    paper = make_pass("anp", {"preset": "paper"})
    assert kumaraswamy_mean(F.softplus(torch.tensor(paper.a_init_conv)), torch.tensor(1.0)) == pytest.approx(
        0.68, abs=0.01) and paper.kl_n_min == 0


def test_bad_options_are_named() -> None:
    from fxprune.passes.registry import PassError

    for bad in ({"variant": "nope"}, {"placement": "middle"}, {"eps": 0.0}, {"steps": 0}):
        with pytest.raises(PassError, match="anp"):
            Anp(**bad)


def test_robust_metrics_of_a_compacted_anp_model() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(4, 1, 8, 8)
    result = fxprune.prune(model, (x,), "anp", 0.25, options={"variant": "anp", "epochs": 1, "steps": 2},
                           train_loader=_data((1, 8, 8)))
    metrics = robust_metrics(result.module, _data((1, 8, 8), n=2, seed=3), Anp(eps=0.1).evaluation_attack())
    assert metrics["pgd_accuracy"] <= metrics["clean_accuracy"] and metrics["vulnerability"] > 0


MODEL_FILE = textwrap.dedent('''
    import torch, torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 16, 4)

        def forward(self, x):
            return self.fc(F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))

    def _data(seed):
        g = torch.Generator().manual_seed(seed)
        return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]

    def model():
        torch.manual_seed(0)
        return Net()

    def example_inputs():
        return (torch.rand(2, 1, 8, 8),)

    def train_loader():
        return _data(0)

    def val_loader():
        return _data(1)

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return {"accuracy": sum(float((m(x).argmax(1) == y).float().mean()) for x, y in _data(1)) / 3}
''')


def test_cli_run_reports_robustness_with_the_pass_attack_and_does_not_fine_tune(tmp_path) -> None:
    (tmp_path / "m.py").write_text(MODEL_FILE)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "m.py"), "--pass", "anp", "--ratio", "0.25",
                                      "--opt", "epochs=1", "--opt", "steps=2", "--opt", "eval_steps=3",
                                      "--opt", "eps=0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["attack"] == {"name": "pgd", "eps": 0.05, "steps": 3, "step": 0.007, "from": "the pass"}
    for side in ("before", "after"):
        assert set(report[side]["robustness"]) == {"clean_accuracy", "pgd_accuracy", "vulnerability"}
    assert not report["finetune"]["log"]  # anp's trained network is the result
    assert "PGD accuracy" in (out / "report.md").read_text()
    assert (out / "keep_probability_histogram.png").exists()


def test_joint_update_steps_each_side_on_its_own_loss_from_one_forward_and_one_attack() -> None:
    """update="joint" (the authors'): the weights' gradient is their loss's, (CE(x) + 2 CE(x_adv)) / 3 + the hook's
    terms; the masks' gradient is replaced by CE(x_adv) + beta KL / N's, from the same forward."""
    from types import SimpleNamespace

    from fxprune.passes.anp import JointGrads, Output

    torch.manual_seed(0)
    w, m = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.rand(3) + 0.5)
    x, xa, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 3, (5,))

    def forward() -> Output:
        return Output((x @ w.T) * m, (xa @ w.T) * m, None)

    def kl() -> torch.Tensor:
        return (m ** 2).sum() / 7

    def weights_loss(out: Output) -> torch.Tensor:
        return (F.cross_entropy(out.clean, y) + 2 * F.cross_entropy(out.adv, y)) / 3 + kl()

    hook, state = JointGrads([m], kl, F.cross_entropy), SimpleNamespace(phase="joint")
    out = forward()
    assert hook.loss(state, out, y) is None
    weights_loss(out).backward()
    hook.after_backward(state)
    want_m = torch.autograd.grad(F.cross_entropy(forward().adv, y) + kl(), m)[0]
    want_w = torch.autograd.grad(weights_loss(forward()), w)[0]
    torch.testing.assert_close(m.grad, want_m)
    torch.testing.assert_close(w.grad, want_w)
    assert not torch.allclose(want_m, torch.autograd.grad(weights_loss(forward()), m)[0])  # the two losses differ


def test_budget_schedule_drives_the_budgets_channels_under_the_threshold_before_training_ends() -> None:
    """schedule="budget" (fxprune's default): by 60% of the epochs the channels the budget removes have E[pi] under
    the threshold, so the method's own pruning IS the budget's cut (and the masked network the pass trained equals
    the compacted one); schedule="threshold" (the authors') leaves the cut to selection after training."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(4, 1, 8, 8)
    data = _data((1, 8, 8))
    options = {"variant": "bp", "epochs": 5}
    result = fxprune.prune(model, (x,), "anp", 0.5, options=options, train_loader=data)
    channels = sum(len(g) for g in result.groups.prunable)
    assert result.report["pruned_by_threshold"] == int(result.removed.sum()) >= 0.4 * channels
    assert_equivalent(model, result, (x,))
    hard = fxprune.prune(model, (x,), "anp", 0.5, options={**options, "schedule": "threshold"}, train_loader=data)
    assert hard.report["pruned_by_threshold"] == 0 and int(hard.removed.sum()) == int(result.removed.sum())
