"""Budgets and selection: scopes, per-layer overrides, protections, rounding, resource targets, cost counting."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.selection.cost import CostCounter, count
from fxprune.testing import assert_equivalent

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18().eval()


def _kept(res, group):
    return int((~res.removed[group.channels]).sum())


def _macs(module, *args):
    with FlopCounterMode(display=False) as f, torch.no_grad():
        module(*args)
    return f.get_total_flops() // 2


def test_per_group_scope_removes_the_same_fraction_everywhere(resnet):
    res = fxprune.prune(resnet, (X,), "l1", 0.3)
    for g in res.groups.prunable:
        assert _kept(res, g) == len(g) - math.floor(0.3 * len(g))


def test_global_scope_uses_one_threshold(resnet):
    res = fxprune.prune(resnet, (X,), "l1", 0.5, budget=fxprune.Budget(scope="global"))
    groups = res.groups.prunable
    total = sum(len(g) for g in groups)
    removed = sum(len(g) - _kept(res, g) for g in groups)
    assert removed == math.floor(0.5 * total)
    fractions = {round(_kept(res, g) / len(g), 3) for g in groups}
    assert len(fractions) > 1  # not uniform: the threshold is global
    # the threshold: every removed normalised score <= every kept one
    kept_scores, dropped_scores = [], []
    for g in groups:
        s = res.scores[g.id] / np.mean(np.abs(res.scores[g.id]))
        mask = res.removed[g.channels]
        dropped_scores += list(s[mask])
        kept_scores += list(s[~mask])
    assert max(dropped_scores) <= min(kept_scores)
    assert_equivalent(resnet, res, (X,))


def test_overrides_protections_and_minimum(resnet):
    res = fxprune.prune(resnet, (X,), "l1", 0.5,
                        budget=fxprune.Budget(ratio_for={"layer4.*": 0.75}, protect=["layer1.*"], min_channels=40))
    for g in res.groups.prunable:
        names = [p.name for p in g.params]
        kept = _kept(res, g)
        if any(n.startswith("layer1.") for n in names):
            assert kept == len(g)
        elif any(n.startswith("layer4.") for n in names):
            assert kept == max(len(g) - math.floor(0.75 * len(g)), 40)
        else:
            assert kept == max(len(g) - math.floor(0.5 * len(g)), 40)


def test_round_to_keeps_multiples_of_eight(resnet):
    res = fxprune.prune(resnet, (X,), "l1", 0.37, budget=fxprune.Budget(round_to=8))
    for g in res.groups.prunable:
        assert _kept(res, g) % 8 == 0
    assert_equivalent(resnet, res, (X,))


def test_round_to_keeps_heads_whole():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=96, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    res = fxprune.prune(model, (torch.randint(0, 100, (2, 8)),), "l1", 0.3, budget=fxprune.Budget(round_to=8))
    heads = [g for g in res.groups.prunable if g.block == 16]
    assert heads and all(_kept(res, g) in (3, 4) for g in heads)  # whole heads of 16 positions
    mlp = [g for g in res.groups.prunable if g.block == 1]
    assert mlp and all(_kept(res, g) % 8 == 0 for g in mlp)


@pytest.mark.parametrize("which", ["macs", "params"])
def test_resource_target_within_one_percent(resnet, which):
    res = fxprune.prune(resnet, (X,), "l1", budget=fxprune.Budget(**{f"target_{which}": 0.5}))
    before, after = res.cost_before, res.cost_after
    assert abs(getattr(after, which) / getattr(before, which) - 0.5) <= 0.01
    if which == "macs":  # torch's own counter agrees
        assert abs(_macs(res.module, X) / _macs(resnet, X) - 0.5) <= 0.01
    else:
        n = sum(p.numel() for p in res.module.parameters())
        assert abs(n / sum(p.numel() for p in resnet.parameters()) - 0.5) <= 0.01


def test_unreachable_target_warns(resnet):
    with pytest.warns(UserWarning, match="cannot reach"):
        res = fxprune.prune(resnet, (X,), "l1", budget=fxprune.Budget(target_macs=0.001, min_channels=16))
    assert res.cost_after.macs < res.cost_before.macs


class Mixed(nn.Module):
    """Conv1d, ConvTranspose2d (grouped), linear and matmul: every counted op family."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 32, 2, stride=2, groups=2)
        self.fc = nn.Linear(32, 24)
        self.w = nn.Parameter(torch.randn(24, 8))

    def forward(self, x):
        y = torch.relu(self.c1(x))                      # [B, 16, L]
        y = self.up(y.unsqueeze(-1))                     # [B, 32, 2L, 2]
        y = self.fc(y.mean(dim=(2, 3)))                  # [B, 24]
        return torch.relu(y) @ self.w


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(), lambda: torchvision.models.mobilenet_v2(),
                                   lambda: Mixed()])
def test_cost_counter_agrees_with_flop_counter(build):
    model = build().eval()
    x = torch.randn(2, 4, 10) if isinstance(model, Mixed) else X
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert res.cost_before.macs == _macs(model, x)
    assert res.cost_after.macs == _macs(res.module, x) < res.cost_before.macs
    assert res.cost_before.params == sum(p.numel() for p in model.parameters())
    assert res.cost_after.params == sum(p.numel() for p in res.module.parameters())
    assert count(res.groups, res.removed) == res.cost_after


def test_macs_per_layer_add_up_and_name_the_layer():
    model = Mixed().eval()
    res = fxprune.prune(model, (torch.randn(2, 4, 10),), "l1", 0.5)
    counter = CostCounter(res.groups)
    before, after = counter.per_layer(), counter.per_layer(res.removed)
    assert set(before) == {"c1", "up", "fc", "matmul"}  # layers by their weight's module; a matmul by its node
    assert sum(before.values()) == res.cost_before.macs and sum(after.values()) == res.cost_after.macs
    assert after["c1"] < before["c1"]


def test_bad_budgets(resnet):
    with pytest.raises(ValueError, match="scope"):
        fxprune.prune(resnet, (X,), "l1", 0.5, budget=fxprune.Budget(scope="layer"))
    with pytest.raises(ValueError, match="ratio for 'fc'"):
        fxprune.prune(resnet, (X,), "l1", 0.5, budget=fxprune.Budget(ratio_for={"fc": 1.5}))
    with pytest.raises(ValueError, match="one resource target"):
        fxprune.prune(resnet, (X,), "l1", budget=fxprune.Budget(target_macs=0.5, target_params=0.5))
    with pytest.raises(ValueError, match="fraction to keep"):
        fxprune.prune(resnet, (X,), "l1", budget=fxprune.Budget(target_macs=1.5))


MODEL_FILE = '''
import torch, torchvision

def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)

def example_inputs():
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
'''


def test_cli_target_macs_and_bad_budget_options(tmp_path, cli):
    import json

    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    result = cli("run", path, "--target-macs", "0.5", "--scope", "global", "--round-to", "8", "--protect", "layer1.*",
                 "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert abs(report["after"]["macs"] / report["before"]["macs"] - 0.5) <= 0.01
    plan = json.loads((out / "plan.json").read_text())
    plan = plan.get("plan", plan)
    assert not any(name.startswith("layer1.") for name in plan)
    for args, message in ((["--target-macs", "1.5"], "fraction to keep"), (["--scope", "layer"], "scope"),
                          (["--ratio-for", "fc"], "PATTERN=RATIO"), (["--round-to", "0"], "round_to"),
                          (["--target-macs", "0.5", "--target-params", "0.5"], "give one of")):
        bad = cli("run", path, *args, "--out", tmp_path / "bad")
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
        assert not (tmp_path / "bad").exists()


def test_cli_recovery_modes_write_log_and_curve(tmp_path, cli):
    """--recover scratch-b --distill: re-initialised training with the Scratch-B epoch budget, logged."""
    import json

    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE + '''

def train_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 16, 8)]
''')
    out = tmp_path / "out"
    result = cli("run", path, "--ratio", "0.5", "--epochs", "1", "--recover", "scratch-b", "--distill", "--out", out,
                 "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    ratio = report["before"]["macs"] / report["after"]["macs"]
    assert report["finetune"]["mode"] == "scratch-b" and report["finetune"]["distill"]
    assert report["finetune"]["epochs"] == round(ratio) == len((out / "train_log.jsonl").read_text().splitlines())
    assert (out / "training.png").stat().st_size > 0
    bad = cli("run", path, "--recover", "magic", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--recover" in bad.output
    capped = cli("run", path, "--ratio", "0.5", "--epochs", "1", "--recover", "scratch-b", "--scratch-b-cap", "1.5",
                 "--scratch-lr", "0.05", "--lr", "0.001", "--out", tmp_path / "capped", "--quiet")
    assert capped.exit_code == 0, capped.output
    log = json.loads((tmp_path / "capped" / "report.json").read_text())["finetune"]
    assert round(ratio) > 2 and log["epochs"] == 2 and log["scratch_b_cap"] == 1.5  # at most 1.5 x 1 epoch
    assert log["lr"] == 0.05 and log["log"][0]["lr"] == pytest.approx(0.05)  # scratch-b's own rate, not --lr
    assert log["max_grad_norm"] is None  # re-initialised training is not clipped by default (fine-tuning is)
    for args, message in ((["--kd-alpha", "2"], "kd_alpha"), (["--scratch-b-cap", "0.5"], "scratch_b_cap"),
                          (["--scratch-lr", "0"], "learning rates"), (["--max-grad-norm", "-1"], "max_grad_norm")):
        bad = cli("run", path, *args, "--out", tmp_path / "bad")
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "bad").exists(), (args, bad.output)


class GroupedNet(nn.Module):
    """A RegNet-like block: 1x1 -> grouped 3x3 (4 groups of 12) -> 1x1, and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 48, 1)
        self.b = nn.Conv2d(48, 48, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.c = nn.Conv2d(48, 10, 1)

    def forward(self, x):
        return self.c(self.dw(torch.relu(self.b(torch.relu(self.a(x))))))


def _group_width(module) -> int:
    conv = next(n for n in module.graph.nodes if n.op == "call_function" and "conv" in str(n.target)
                and len(n.args) > 6 and n.args[6] == 4)
    return module.get_parameter(conv.args[1].target).shape[1]


@pytest.mark.parametrize("ratio,width_to,expected", [(0.5, 1, 6), (0.5, 8, 8), (0.7, 8, 4), (0.7, 1, 4), (0.3, 8, 12),
                                                     (0.5, 4, 8), (0.5, 3, 6), (0.85, 8, 2), (0.6, 8, 8)])
def test_group_width_to_rounds_a_grouped_convs_group_width(ratio, width_to, expected):
    """Kept channels of the groups that set a grouped conv's width: a multiple of group_width_to, or a power of
    two below it (12 at 0.5 keeps 6 -> 8; at 0.7, 4 and at 0.85, 2 stay); depthwise and plain convs are not touched."""
    torch.manual_seed(0)
    net = GroupedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.prune(net, (x,), "l1", ratio, budget=fxprune.Budget(group_width_to=width_to))
    assert _group_width(res.module) == expected
    grouped = [g for g in res.groups.prunable if g.grouped_conv]
    assert len(grouped) == 2 and all(len(g) == 12 and g.block == 4 for g in grouped)
    assert all(_kept(res, g) == len(g) - math.floor(ratio * len(g)) for g in res.groups.prunable if not g.grouped_conv)
    assert_equivalent(net, res, (x,))


def test_group_width_default_is_the_devices():
    from fxprune.selection.budget import GROUP_WIDTH_BY_DEVICE, default_group_width

    torch.manual_seed(0)
    net = GroupedNet().eval()
    res = fxprune.prune(net, (torch.randn(2, 3, 8, 8),), "l1", 0.5)
    assert res.selection.group_width_to == GROUP_WIDTH_BY_DEVICE["cpu"] == default_group_width(torch.device("cpu"))
    assert default_group_width("meta") == 1
    with pytest.raises(ValueError, match="group_width_to"):
        fxprune.prune(net, (torch.randn(2, 3, 8, 8),), "l1", 0.5, budget=fxprune.Budget(group_width_to=0))


def test_a_target_the_rounded_group_widths_overshoot_gets_the_widths_it_needs():
    """Every prunable group of GroupedNet sets the grouped conv's width (12: 4, 8 or 12 when rounded): a MACs
    target of 0.6 would fall to 0.44 with rounded widths, so the widths it needs are kept, with a warning."""
    torch.manual_seed(0)
    net = GroupedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="group widths rounded to 8"):
        res = fxprune.prune(net, (x,), "l1", budget=fxprune.Budget(target_macs=0.6))
    assert abs(res.cost_after.macs / res.cost_before.macs - 0.6) <= 0.02
    assert res.selection.group_width_to == 1 and _group_width(res.module) not in (4, 8, 12)
    assert_equivalent(net, res, (x,))
