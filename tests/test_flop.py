"""flop (factorised L0 pruning): hard-concrete gates, the augmented Lagrangian, the pair-vs-merge rule, and
end to end on an MLP, a LLaMA-shaped and a GPT-2-shaped model: target met, exact, no gate left."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.edits.factorize import pair_pays
from fxprune.passes.flop import Flop, HardConcrete, Lagrangian
from fxprune.passes.registry import PassError
from fxprune.recovery.engine import TrainState
from fxprune.selection.cost import CostCounter
from fxprune.testing import assert_equivalent


def test_hard_concrete_samples_in_the_unit_interval_and_expected_l0_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    gate = HardConcrete(6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]))
    samples = torch.stack([gate.sample() for _ in range(20000)])
    assert samples.min() == 0.0 and samples.max() == 1.0  # hard zeros and ones from the stretch
    assert ((samples > 0) & (samples < 1)).any()
    monte_carlo = (samples > 0).float().mean(0)
    expected = torch.sigmoid(gate.log_alpha - gate.shift)
    torch.testing.assert_close(monte_carlo, expected.detach(), atol=0.015, rtol=0)
    assert math.isclose(float(gate.l0()), float(expected.sum()), rel_tol=1e-6)
    # the initial drop rate: P(z = 0) is about init_drop at log_alpha = log((1 - m) / m)
    fresh = HardConcrete(4000, init_drop=0.05)
    assert abs(float(fresh.log_alpha.mean()) - math.log(19)) < 0.01


def test_eval_mask_zeroes_the_expected_number_of_gates() -> None:
    gate = HardConcrete(10).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-4, 4, 10))
    mask = gate()
    zeros = round(10 - float(gate.l0()))
    assert int((mask == 0).sum()) == zeros and zeros > 0
    assert torch.equal(mask == 0, torch.arange(10) < zeros)  # the smallest go
    kept = mask[mask > 0]
    torch.testing.assert_close(kept, torch.sigmoid(0.8 * gate.log_alpha[mask > 0]).detach())


def test_lagrangian_multipliers_grow_while_sparsity_is_below_target_and_push_it_up() -> None:
    torch.manual_seed(0)
    gates = {0: HardConcrete(32), 1: HardConcrete(16)}
    penalty = Lagrangian(gates, {0: 10, 1: 40}, target=0.5, warmup=0, lr=0.5)
    opt = torch.optim.Adam([g.log_alpha for g in gates.values()], lr=0.05)
    state = TrainState(nn.Linear(1, 1), opt, 1, None)
    start = float(penalty.sparsity())
    seen = []
    for step in range(60):
        state.step = step
        opt.zero_grad()
        penalty.loss(state, None, None).backward()
        penalty.after_backward(state)
        opt.step()
        seen.append(penalty.lambdas.detach().clone())
    assert seen[5][0] < 0 and seen[-1][0] < seen[5][0]  # lambda1 goes negative while s < t (ascent on s - t)
    assert seen[-1][1] > seen[5][1] > 0                 # lambda2 grows: (s - t)^2 > 0
    assert float(penalty.sparsity()) > start + 0.1      # and the penalty pushed the sparsity up


def test_pair_pays_rule() -> None:
    assert pair_pays(10, 64, 64) and not pair_pays(32, 64, 64) and not pair_pays(33, 64, 64)
    assert pair_pays(40, 256, 64) and not pair_pays(52, 256, 64)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp_data(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["", "paper"])  # paper: the noam schedule, gates at the model's rate
def test_flop_on_an_mlp_meets_the_target_is_exact_and_keeps_pairs_only_where_they_pay(preset: str) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(3, 16),)
    res = fxprune.prune(model, inputs, "flop", budget=fxprune.Budget(target_params=0.5),
                        options={"epochs": 2, "preset": preset}, train_loader=_mlp_data())
    kept = res.cost_after.params / res.cost_before.params
    assert abs(kept - 0.5) <= 0.02, kept  # the target, within 2% (the budget search's tolerance is 1%)
    assert _params(res.module) <= res.cost_after.params  # merging back never costs more than the pair counted
    assert set(res.report["factorised"]) == {"fc1", "fc2", "fc3"}  # fc3's outputs are frozen, its inputs are not
    assert 0 < res.report["target_sparsity"] < 1 and res.report["lagrangian"]
    assert_equivalent(model, res, inputs)  # against the factorised model (res.base) with the gates folded in
    names = dict(res.module.named_parameters())
    for path in ("fc1", "fc2", "fc3"):
        if f"{path}.weight_u" in names:
            out, rank = names[f"{path}.weight_u"].shape
            assert pair_pays(rank, out, names[f"{path}.weight_v"].shape[1])
        else:
            assert f"{path}.weight" in names  # merged back into one dense layer
    assert not any("fxprune" in n for n in res.module.state_dict())
    assert not res.module.training


def test_flop_options_and_errors() -> None:
    with pytest.raises(PassError, match="rank_init"):
        Flop(rank_init="random")
    with pytest.raises(PassError, match="init_drop"):
        Flop(init_drop=1.5)
    model = MLP().eval()
    with pytest.raises(PassError, match="matches no linear layer"):
        fxprune.prune(model, (torch.randn(3, 16),), "flop", 0.5, options={"targets": "conv*"}, train_loader=_mlp_data())
    with pytest.raises(PassError, match="below what the layers"):
        fxprune.prune(model, (torch.randn(3, 16),), "flop", budget=fxprune.Budget(target_params=0.05),
                      options={"targets": "fc1"},
                      train_loader=_mlp_data())
    res = fxprune.prune(model, (torch.randn(3, 16),), "flop", 0.5, options={"targets": "fc2", "epochs": 0},
                        train_loader=_mlp_data())
    assert set(res.report["factorised"]) == {"fc2"}


def test_flop_trains_about_500_steps_by_default_and_its_lagrangian_reaches_the_target() -> None:
    """Without epochs=, flop trains the whole epochs that give about 500 optimiser steps (40 batches: 13 epochs,
    520 steps); the expected sparsity then ends at the target, where one epoch (40 steps) leaves it far below,
    the cut then doing all the pruning (the ViT in the robustness benchmark: 0.006 for a 0.68 target)."""
    torch.manual_seed(0)
    model, inputs = MLP().eval(), (torch.randn(3, 16),)
    runs = {}
    for epochs in (None, 1):
        options = {} if epochs is None else {"epochs": epochs}
        res = fxprune.prune(model, inputs, "flop", budget=fxprune.Budget(target_params=0.5), options=options,
                            train_loader=_mlp_data(40))
        runs[epochs] = res.report
    assert runs[None]["epochs"] == 13 and runs[1]["epochs"] == 1
    target = runs[None]["target_sparsity"]
    assert abs(runs[None]["expected_sparsity"] - target) < 0.03, runs[None]["expected_sparsity"]
    assert target - runs[1]["expected_sparsity"] > 0.2, runs[1]["expected_sparsity"]


def _lm_data(vocab: int = 100) -> tuple[list, object]:
    g = torch.Generator().manual_seed(0)
    data = [(ids, ids) for ids in (torch.randint(0, vocab, (8, 12), generator=g) for _ in range(6))]
    loss = lambda out, y: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())  # noqa: E731
    return data, loss


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_flop_on_hugging_face_language_models(name: str) -> None:
    import transformers
    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, intermediate_size=128, use_cache=False)
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    data, loss = _lm_data()
    inputs = (data[0][0][:2],)
    res = fxprune.prune(model, inputs, "flop", budget=fxprune.Budget(target_params=0.7),
                        options={"epochs": 2}, train_loader=data, loss=loss)
    kept = res.cost_after.params / res.cost_before.params
    # the budget counts each kept pair at its factorised size: that count is within 2% of the target; a pair merged
    # back (its kept rank saves nothing) is never larger, so the compacted module (cost_after counts it) is at most
    # that count
    counted = CostCounter(res.groups)(res.removed).params / res.cost_before.params
    assert abs(counted - 0.7) <= 0.02, counted
    assert kept <= counted + 1e-9, (kept, counted)
    assert _params(res.module) == res.cost_after.params
    assert any(k.endswith("mlp.c_fc") or k.endswith("mlp.up_proj") for k in res.report["factorised"])
    assert_equivalent(model, res, inputs)
    assert not any("fxprune" in n for n in res.module.state_dict())
    with torch.no_grad():
        assert res.module(*inputs).logits.shape == model(*inputs).logits.shape


def test_cli_flop_on_the_char_lm_example(tmp_path, monkeypatch) -> None:
    """The headline command of the issue, on a tiny budget: prunes to the target, recovers, writes a
    folder whose model loads and is exact against the factorised, gated model."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from fxprune.cli import app

    for key, value in {"CHARLM_STEPS": "2", "CHARLM_BATCHES": "3", "CHARLM_VAL_BATCHES": "1"}.items():
        monkeypatch.setenv(key, value)
    example = Path(__file__).resolve().parents[1] / "examples" / "charlm.py"
    out = tmp_path / "flop"
    result = CliRunner().invoke(app, ["run", str(example), "--pass", "flop", "--target-params", "0.5",
                                      "--opt", "epochs=1", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "flop to 0.5 of the parameters" in result.output  # the budget as given, not a ratio
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"params": 0.5}
    kept = report["after"]["params"] / report["before"]["params"]
    assert abs(kept - 0.5) <= 0.02, kept
    assert "factorised" in report["pass_report"] and report["pass_report"]["lagrangian"]
    model = fxprune.load(out)
    ids = torch.randint(0, 256, (2, 128))
    with torch.no_grad():
        assert model(ids).shape == (2, 128, 256)


def test_flop_factorised_model_at_full_rank_is_the_original_in_float64() -> None:
    torch.manual_seed(0)
    model = MLP().double().eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    gm = fxprune.trace(model, (x,))
    ctx = fxprune.PassContext(gm, fxprune.analyze(gm), model, {})
    new = Flop().prepare(ctx)
    assert new.origin is ctx and set(Flop().layers(new.user)) == {"fc1", "fc2", "fc3"}
    names = dict(new.gm.named_parameters())
    assert names["fc2.weight_v"].shape == (64, 64) and "fc2.weight" not in names
    torch.testing.assert_close(new.gm(x), model(x), rtol=1e-10, atol=1e-12)
    ranks = Flop().rank_groups(new)
    assert sorted(path for path, _ in ranks.values()) == ["fc1", "fc2", "fc3"]
    assert {size for _, size in ranks.values()} == {16 + 64, 64 + 64, 64 + 4}


class PointwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pw, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.pw(torch.relu(self.conv(x)))).mean((2, 3)))


def test_flop_targets_reach_1x1_convolutions_and_the_default_leaves_them_dense() -> None:
    torch.manual_seed(0)
    model = PointwiseNet().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    res = fxprune.prune(model, inputs, "flop", 0.5, options={"targets": "pw", "epochs": 1}, train_loader=data)
    assert set(res.report["factorised"]) == {"pw"}
    assert_equivalent(model, res, inputs)
    default = fxprune.prune(model, inputs, "flop", 0.5, options={"epochs": 0}, train_loader=data)
    assert set(default.report["factorised"]) == {"fc"}  # linear maps only, unless targets name a convolution
