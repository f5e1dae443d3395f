"""The public API's contracts: plan shape, pure slicing, robustness of compaction, extension hooks."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.analysis.rules import RULES
from fxprune.compaction import apply_plan
from fxprune.testing import assert_equivalent, masked_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.view(x.size(0), 32 * 4 * 4))


X = torch.randn(2, 3, 8, 8)


def test_plan_matches_compacted_tensors_and_slicing_is_pure():
    model = Net().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.prune(model, (X,), "l1", 0.5)
    compacted = res.module.state_dict()
    assert set(res.plan) <= set(state)
    assert set(res.plan) >= {"c1.weight", "c1.bias", "b1.weight", "b1.running_var", "c2.weight", "fc.weight"}
    for name, entry in res.plan.items():
        for dim, kept in entry.items():
            assert kept == sorted(kept) and len(set(kept)) == len(kept)
            assert compacted[name].shape[dim] == len(kept)
        # slicing is a pure function of (plan, name, tensor): a checkpoint can be compacted offline, and it is
        # exactly indexing the kept positions by hand
        by_hand = state[name]
        for dim, kept in entry.items():
            by_hand = by_hand.index_select(dim, torch.tensor(kept, dtype=torch.long))
        torch.testing.assert_close(apply_plan(res.plan, name, state[name]), by_hand, rtol=0, atol=0)
        torch.testing.assert_close(compacted[name], by_hand, rtol=0, atol=0)
        torch.testing.assert_close(state[name], model.state_dict()[name], rtol=0, atol=0)
    assert len(res.plan["c1.weight"][0]) == 8 and len(res.plan["fc.weight"][1]) == 16 * 16
    assert_equivalent(model, res, (X,))


def test_failing_rewrite_keeps_groups_whole_instead_of_crashing(monkeypatch):
    def broken(node, r):
        raise RuntimeError("cannot rewrite this view")

    view = torch.ops.aten.view.default
    monkeypatch.setitem(RULES, view, dataclasses.replace(RULES[view], rewrite=broken))
    model = Net().eval()
    with pytest.warns(UserWarning, match="keeping channel groups"):
        res = fxprune.prune(model, (X,), "l1", 0.5)
    assert "fc.weight" not in res.plan          # the group feeding the view stayed whole
    assert len(res.plan["c1.weight"][0]) == 8  # the others were still pruned
    assert_equivalent(model, res, (X,))


def test_weight_overrides_go_through_the_plan():
    model = Net().eval()
    gm = fxprune.trace(model, (X,))
    groups = fxprune.analyze(gm)
    removed = fxprune.selection.budget.select_per_group(groups, fxprune.passes.registry.make_pass("l1").score(
        fxprune.PassContext(gm, groups, model)), 0.5)
    new_w = torch.randn_like(model.c2.weight)
    out = fxprune.compact(gm, groups, removed, model, weights={"c2.weight": new_w})
    reference = Net().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.c2.weight.copy_(new_w)
    ref = masked_model(reference, out.plan)
    with torch.no_grad():
        torch.testing.assert_close(out.module(X), ref(X), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.c2.weight, gm.get_parameter("c2.weight"))  # originals untouched


def test_graph_edits_run_after_rewrites():
    model = Net().eval()
    gm = fxprune.trace(model, (X,))
    groups = fxprune.analyze(gm)
    removed = np.zeros(len(groups.comp_group), dtype=bool)

    def double_output(graph, tensors, modules):
        out = next(n for n in graph.nodes if n.op == "output")
        (value,) = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        with graph.inserting_before(out):
            doubled = graph.call_function(torch.ops.aten.mul.Tensor, (value, 2.0))
        out.replace_input_with(value, doubled)

    res = fxprune.compact(gm, groups, removed, model, edits=[double_output], verify=False)
    with torch.no_grad():
        torch.testing.assert_close(res.module(X), 2 * model(X))


class LNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(self.ln(self.a(x)))


def test_layernorm_group_reported_inexact_and_frozen_unless_allowed():
    model = LNNet().eval()
    x = torch.randn(2, 8)
    groups = fxprune.analyze(fxprune.trace(model, (x,)))
    ln_group = next(g for g in groups if any(p.name == "ln.weight" for p in g.params))
    assert ln_group.inexact and "layer_norm" in ln_group.inexact and not ln_group.prunable
    assert "inexact" in str(groups)
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert res.plan == {}
    res = fxprune.prune(model, (x,), "l1", 0.5, allow_inexact=True)
    assert res.module.get_parameter("ln.weight").shape == (16,)
    assert res.module(x).shape == (2, 4)


def test_bad_ratio_and_unknown_pass():
    with pytest.raises(ValueError, match="ratio"):
        fxprune.prune(Net(), (X,), "l1", 1.0)
    with pytest.raises(ValueError, match="unknown pass 'nope'.*l1"):
        fxprune.prune(Net(), (X,), "nope", 0.5)
    with pytest.raises(ValueError, match="no option 'alpha'"):
        fxprune.prune(Net(), (X,), "l1", 0.5, options={"alpha": 1})


def test_untraceable_model_names_the_users_line():
    """After both front ends (the fast path fails first, then torch.export) the error names the user's line."""
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(fxprune.TraceError, match="test_api.py"):
        fxprune.trace(Bad(), (torch.randn(2, 3),))


BAD_MODEL = """import torch


class Bad(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x
"""


@pytest.mark.parametrize("folder", ["fxprune", "torch"])
def test_the_users_line_is_found_in_a_project_folder_named_like_a_library(tmp_path, folder):
    """A user's project folder called fxprune (a fresh clone's default name) or torch is still the user's:
    "ours" and "torch's" are the installed packages' directories, not names in a path."""
    import importlib.util

    path = tmp_path / folder / "bad_model.py"
    path.parent.mkdir()
    path.write_text(BAD_MODEL)
    spec = importlib.util.spec_from_file_location("bad_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(fxprune.TraceError, match=f"at {path}:6: if x.sum"):
        fxprune.trace(module.Bad(), (torch.randn(2, 3),))


def test_other_batch_sizes_after_compaction():
    model = torchvision.models.resnet18().eval()
    res = fxprune.prune(model, (torch.randn(2, 3, 32, 32),), "l1", 0.3)
    masked = masked_model(model, res.plan)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), masked(x), rtol=1e-4, atol=1e-4)


def test_model_in_train_mode_batch_one_keeps_its_running_statistics():
    """Verification runs the compacted graph in eval mode: it neither fails on a batch of one (BatchNorm
    in train mode refuses it) nor updates the compacted model's running statistics."""
    model = Net().train()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-1, 1)
    res = fxprune.prune(model, (torch.randn(1, 3, 8, 8),), "l1", 0.5)
    assert res.module.training and model.training
    kept = res.plan["b1.running_mean"][0]
    torch.testing.assert_close(res.module.state_dict()["b1.running_mean"], model.b1.running_mean[kept], rtol=0, atol=0)
    assert int(res.module.state_dict()["b1.num_batches_tracked"]) == int(model.b1.num_batches_tracked) == 0


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, image, scale):
        return self.net(image) * scale


def test_compacted_module_compiles_on_first_use_and_keeps_its_signature():
    """The compacted GraphModule generates its Python code on first use; what reads its forward's
    signature first (tracing it again, exporting it) sees the real parameter names, not *args/**kwargs."""
    import inspect

    from fxprune.artifacts import export_program

    model = KeywordNet().eval()
    inputs = (torch.randn(1, 3, 8, 8), torch.rand(1, 10))
    res = fxprune.prune(model, inputs, "l1", 0.5)
    again = fxprune.prune(res.module, inputs, "l1", 0.5)  # traced before it ever ran
    assert list(inspect.signature(res.module.forward).parameters) == ["image", "scale"]
    assert [n.target for n in again.groups.gm.graph.nodes if n.op == "placeholder"] == ["image", "scale"]
    assert_equivalent(res.module, again, inputs)
    fresh = fxprune.prune(model, inputs, "l1", 0.5).module
    ep = export_program(fresh, inputs)  # exported before it ever ran
    assert [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"] == ["image", "scale"]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), fresh(*inputs))
        torch.testing.assert_close(fresh(*inputs), masked_model(model, res.plan)(*inputs))
    assert "def forward(self, image, scale)" in fresh.code


class _TokenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + token


class _ClassToken(nn.Module):
    """A view of a parameter handed to a submodule as an argument, as timm's CaiT does with its class token."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 4))
        self.block = _TokenBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.token.expand(x.shape[0], -1))


def test_macs_of_a_model_handing_a_parameter_view_to_a_submodule():
    """FlopCounterMode's module tracker fails on such an argument without grad mode; the count still works."""
    from fxprune.measure import count_macs

    assert count_macs(_ClassToken(), (torch.randn(2, 4),)) == 2 * 4 * 4


# ---- one run, one value: fxprune.Budget and fxprune.Recovery ------------------------------------------------
def _loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def test_the_previous_flat_keywords_still_work_with_a_deprecation_warning_and_the_same_result():
    model = Net().eval()
    grouped = fxprune.prune(model, (X,), "l1", budget=fxprune.Budget(target_macs=0.6, min_channels=2),
                            recovery=fxprune.Recovery(epochs=1), train_loader=_loader())
    with pytest.warns(DeprecationWarning, match=r"target_macs, min_channels, epochs are deprecated.*budget="
                                                r"fxprune.Budget") as caught:
        flat = fxprune.prune(model, (X,), "l1", target_macs=0.6, min_channels=2, epochs=1, train_loader=_loader())
    assert caught[0].filename == __file__  # the warning names the caller's line
    assert np.array_equal(flat.removed, grouped.removed) and flat.selection == grouped.selection
    assert len(flat.log) == len(grouped.log) == 1
    for k, v in grouped.module.state_dict().items():
        torch.testing.assert_close(flat.module.state_dict()[k], v)
    with pytest.raises(fxprune.selection.budget.SelectionError, match="given together"):
        fxprune.prune(model, (X,), "l1", budget=fxprune.Budget(), scope="global")


def test_a_budget_is_checked_when_built_and_the_positional_ratio_is_its_ratio():
    SelectionError = fxprune.selection.budget.SelectionError
    for bad, match in (({"target_macs": 0.5, "target_params": 0.5}, "one resource target"),
                       ({"ratio": 1.0}, "ratio must be in"), ({"scope": "layer"}, "scope must be one of"),
                       ({"ratio_for": {"fc": 2.0}}, "ratio for 'fc'"), ({"min_keep": 1.5}, "min_keep")):
        with pytest.raises(SelectionError, match=match):
            fxprune.Budget(**bad)
    with pytest.raises(SelectionError, match="recover must be one of"):
        fxprune.Recovery(epochs=1, mode="retrain")
    res = fxprune.prune(Net().eval(), (X,), "l1", 0.25, budget=fxprune.Budget(ratio=0.75, scope="global"))
    assert res.selection.ratio == 0.25 and res.selection.scope == "global"


def test_the_pass_defaults_are_resolved_in_one_place():
    from fxprune.passes.registry import make_pass
    from fxprune.pipeline import RunSpec

    tas, slimming = make_pass("tas"), make_pass("slimming")
    assert fxprune.Recovery(epochs=2).for_pass(tas) == fxprune.Recovery(2, "finetune", True)
    paper = make_pass("tas", {"preset": "paper"})
    assert fxprune.Recovery(epochs=2).for_pass(paper) == fxprune.Recovery(2, "scratch-e", True)
    assert fxprune.Recovery(epochs=2, mode="scratch-b").for_pass(paper).mode == "scratch-b"
    assert fxprune.Recovery(epochs=2, distill=False).for_pass(tas).distill is False
    assert fxprune.Recovery().for_pass(tas).mode is None  # no epochs: nothing trains
    assert fxprune.Recovery(epochs=1).for_pass(make_pass("l1")) == fxprune.Recovery(1, "finetune", False)
    sel = fxprune.Budget(0.3).selection(slimming, torch.device("cpu"))
    assert (sel.scope, sel.min_keep, sel.normalize, sel.group_width_to) == ("global", 0.1, "none", 8)
    assert fxprune.Budget(0.3, min_keep=0.0, group_width_to=1).selection(slimming).min_keep == 0.0
    with pytest.raises(fxprune.selection.budget.SelectionError, match="needs train_loader"):
        RunSpec(Net(), (X,), tas, recovery=fxprune.Recovery(epochs=1))


def test_assert_equivalent_checks_each_output_at_its_own_scale():
    """A small output beside a large one: an error of 1% in the small one fails, though it is far below the large
    output's scale (the tolerance was once taken from the largest output of all)."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.big, self.small = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.big(h) * 1e4, self.small(h) * 1e-2

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(5, 4)
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert_equivalent(model, res, (x,))
    with torch.no_grad():
        dict(res.module.named_parameters())["small.bias"].mul_(1.01)
    with pytest.raises(AssertionError, match=r"output\[1\]: Tensor-likes are not close"):
        assert_equivalent(model, res, (x,))


def test_recovery_options_reach_the_engine():
    """Scratch-B's cap and own learning rate, and distillation's weight: kd_alpha=0 is the task loss alone (the
    same weights as no distillation), the default 0.9 trains differently."""
    model = Net().eval()
    capped = fxprune.prune(model, (X,), "l1", 0.5, train_loader=_loader(),
                           recovery=fxprune.Recovery(epochs=1, mode="scratch-b", scratch_lr=0.05, scratch_b_cap=2))
    assert len(capped.log) == 2 and capped.log[0]["lr"] == pytest.approx(0.05)

    def trained(**options):
        torch.manual_seed(0)
        return fxprune.prune(model, (X,), "l1", 0.5, train_loader=_loader(),
                             recovery=fxprune.Recovery(epochs=1, **options)).module.state_dict()

    plain, alpha0, kd = trained(distill=False), trained(distill=True, kd_alpha=0.0), trained(distill=True)
    assert all(torch.equal(plain[k], alpha0[k]) for k in plain)
    assert not all(torch.equal(plain[k], kd[k]) for k in plain)
    with pytest.raises(fxprune.selection.budget.SelectionError, match="kd_alpha"):
        fxprune.Recovery(kd_alpha=1.5)
    # gradient clipping: a bound the first step's gradient is far over trains differently from none; one far
    # above every gradient trains exactly as none does
    unclipped, loose, tight = (trained(max_grad_norm=None), trained(max_grad_norm=1e6),
                               trained(max_grad_norm=1e-3))
    assert all(torch.equal(unclipped[k], loose[k]) for k in unclipped)
    assert not all(torch.equal(unclipped[k], tight[k]) for k in unclipped)
    assert fxprune.Recovery(1, "finetune").clip == 5.0 and fxprune.Recovery(1, "scratch-e").clip is None
    assert fxprune.Recovery(1, "finetune", max_grad_norm=0).clip is None
    assert fxprune.Recovery(1, "scratch-b", max_grad_norm=2).clip == 2
    with pytest.raises(fxprune.selection.budget.SelectionError, match="max_grad_norm"):
        fxprune.Recovery(max_grad_norm=-1)
