"""The op registry (fxprune.analysis.rules): one record per op holds its coupling rule, its literal
rewrite, its cost and its roles; adding an op is one registration, and every stage reads it."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.analysis import UnsupportedOpWarning
from fxprune.analysis.couple import TensorRef, as_ref
from fxprune.analysis.rules import RULES, Role, ops, ops_with_role, rule
from fxprune.analysis.schema import bind, set_arg
from fxprune.recovery import modes
from fxprune.selection.cost import CostCounter
from fxprune.testing import assert_equivalent
from fxprune.tracing import meta_norms, record
from fxprune.tracing.compat import op_schema


# ---- a toy op, supported by one registration --------------------------------------------------------
@torch.library.custom_op("fxprune_test::scale_channels", mutates_args=())
def scale_channels(x: torch.Tensor, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """``x * weight`` per channel (axis 1), with the channel count as a literal argument."""
    return x * weight.view(1, channels, *[1] * (x.dim() - 2))


@scale_channels.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, channels: int) -> torch.Tensor:
    torch._check(weight.shape[0] == channels and x.shape[1] == channels)
    return torch.empty_like(x)


SCALE = torch.ops.fxprune_test.scale_channels.default


def register_scale_channels() -> None:
    """The documented way (README, "How it works"): one registration with everything about the op."""

    def channels_rewrite(node, r):  # compaction: the literal follows the new width
        set_arg(node, "channels", r.new_shape(as_ref(bind(node)["x"]))[1])

    def macs(node, shape):  # one multiply per output element
        return math.prod(shape(TensorRef(node)))

    @rule(SCALE, rewrite=channels_rewrite, cost=macs)
    def couple(node, coupler):  # out[:, c] = x[:, c] * weight[c]
        b = bind(node)
        x, w, out = as_ref(b["x"]), as_ref(b["weight"]), TensorRef(node)
        for a in range(x.ndim):
            coupler.link_axes(x, a, out, a)
            coupler.set_zero(out, a, coupler.is_zero(x, a))
        coupler.link_axes(w, 0, out, 1)


@pytest.fixture
def registered():
    register_scale_channels()
    yield
    RULES.pop(SCALE, None)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(scale_channels(self.c1(x), self.scale, self.scale.shape[0])))


X = torch.randn(2, 3, 10, 10)


def _group_of(groups, name: str, axis: int):
    hits = [g for g in groups if any(p.name == name and p.axis == axis for p in g.params)]
    assert len(hits) == 1, (name, axis)
    return hits[0]


def test_toy_op_prunes_through_exactly_with_its_rewrite_and_cost(registered):
    torch.manual_seed(0)
    model = Toy().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        res = fxprune.prune(model, (X,), "l1", 0.5)
    g = _group_of(res.groups, "c1.weight", 0)
    assert g.prunable and {(p.name, p.axis) for p in g.params} >= {("scale", 0), ("c2.weight", 1)}
    assert list(res.plan["scale"][0]) == list(res.plan["c1.weight"][0]) and len(res.plan["scale"][0]) == 4
    node = next(n for n in res.module.graph.nodes if n.target is SCALE)
    assert bind(node)["channels"] == 4  # the literal was rewritten
    assert_equivalent(model, res, (X,))

    counter = CostCounter(res.groups)
    assert [n.target for n in counter.compute].count(SCALE) == 1
    assert counter.per_layer()["scale"] == 2 * 8 * 10 * 10  # keyed by the parameter it reads as ``weight``
    assert counter.per_layer(res.removed)["scale"] == 2 * 4 * 10 * 10
    convs = (2 * 8 * 3 * 9 * 100) + (2 * 4 * 8 * 9 * 100)
    assert counter().macs == convs + 2 * 8 * 100


def test_toy_op_without_its_registration_freezes_its_channels():
    assert SCALE not in RULES
    with pytest.warns(UnsupportedOpWarning, match="scale_channels"):
        groups = fxprune.analyze(fxprune.trace(Toy().eval(), (X,)))
    assert not _group_of(groups, "c1.weight", 0).prunable


def test_a_case_is_part_of_an_existing_record_and_only_couples(registered):
    with pytest.raises(ValueError, match="a case .when=.... only couples"):
        rule(SCALE, when=lambda node: True, cost=lambda node, shape: 0)(lambda node, coupler: None)
    unknown = ops("aten.cosh.default")[0]
    assert unknown not in RULES
    with pytest.raises(KeyError, match="register its record before a case of it"):
        rule(unknown, when=lambda node: True)(lambda node, coupler: None)
    assert unknown not in RULES


def test_batch_norm_from_the_batch_is_a_case_of_its_record():
    """Eval mode with running statistics: per channel, exact. Training mode (or no running statistics,
    weight standardisation): statistics over every other axis, which a removed channel does not change,
    but a removed batch position would: the case marks those axes."""
    bn = RULES[torch.ops.aten.batch_norm.default]
    assert bn.cases and bn.cases[0].couple.__name__ == "batch_norm_from_the_batch"

    class WS(nn.Module):  # weight standardisation: a batch norm on a weight, over its input channels
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 1)
            self.w = nn.Parameter(torch.randn(6, 8, 1, 1))

        def forward(self, x):
            w = torch.nn.functional.batch_norm(self.w.reshape(1, 6, -1), None, None, training=True).reshape(6, 8, 1, 1)
            return torch.nn.functional.conv2d(self.c1(x), w)

    g = _group_of(fxprune.analyze(fxprune.trace(WS().eval(), (X,))), "c1.weight", 0)
    assert not g.prunable and "batch-norm statistics" in g.frozen
    masked = dataclasses.replace(bn, cases=())
    RULES[torch.ops.aten.batch_norm.default] = masked
    try:  # without the case the same graph would (wrongly) prune
        assert _group_of(fxprune.analyze(fxprune.trace(WS().eval(), (X,))), "c1.weight", 0).prunable
    finally:
        RULES[torch.ops.aten.batch_norm.default] = bn


def test_native_layer_norm_prunes_rows_exactly():
    class LN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(3, 8, 1)
            self.w, self.b = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
            self.c2 = nn.Conv1d(8, 4, 1)

        def forward(self, x):
            out, mean, rstd = torch.ops.aten.native_layer_norm(self.c1(x), [6], self.w, self.b, 1e-5)
            return self.c2(out * rstd + mean)

    torch.manual_seed(0)
    model, x = LN().eval(), torch.randn(2, 3, 6)
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert len(res.plan["c1.weight"][0]) == 4 and "w" not in res.plan  # rows go, the normalised axis stays
    assert_equivalent(model, res, (x,))


# ---- every stage reads the registry -----------------------------------------------------------------
def test_roles_are_read_from_the_registry():
    kernels = ops_with_role(Role.KERNEL)
    assert torch.ops.aten.conv2d.default in kernels and torch.ops.aten.linear.default in kernels
    assert all(RULES[op].cost is not None for op in kernels), "a kernel without a cost would count as free"
    assert modes._KERNEL_OPS == kernels
    assert modes._NORM_OPS == ops_with_role(Role.NORM) >= {torch.ops.aten.batch_norm.default,
                                                           torch.ops.aten.layer_norm.default}
    assert modes._PRELU_OPS == ops_with_role(Role.SLOPE) == {torch.ops.aten.prelu.default,
                                                             *ops("aten._prelu_kernel.default")}
    assert meta_norms.shaped_on_meta() == ops_with_role(Role.SHAPE_OF_INPUT) == {
        torch.ops.aten.batch_norm.default, torch.ops.aten.instance_norm.default, torch.ops.aten.group_norm.default,
        torch.ops.aten.layer_norm.default}
    assert record.state_updaters() == ops_with_role(Role.STATE_UPDATE) == {
        torch.ops.aten.batch_norm.default, torch.ops.aten.instance_norm.default}


def test_roles_name_arguments_the_op_has():
    """What the stages read by argument name: a role on an op without those arguments would be a bug."""
    def names(op):
        return [a.name for a in op_schema(op).arguments]

    for op in ops_with_role(Role.KERNEL) | ops_with_role(Role.NORM):
        assert "weight" in names(op), op
    for op in ops_with_role(Role.STATE_UPDATE):
        assert {"running_mean", "running_var"} <= set(names(op)), op
        assert {"training", "use_input_stats"} & set(names(op)), op
        assert record._OpCheck(op, True).stats == (5, (3, 4))
    for op in ops_with_role(Role.SHAPE_OF_INPUT):
        assert meta_norms._per_channel_positions(op), op
    assert meta_norms._per_channel_positions(torch.ops.aten.group_norm.default) == (2, 3)


def test_recording_refuses_a_state_update_and_shapes_norms_on_meta(monkeypatch):
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return torch.nn.functional.batch_norm(x, self.mean, self.var, training=True)

    with pytest.raises(Exception, match="updates running statistics"):
        record.record_trace(Stats(), (X,), {})
    shaped = []
    monkeypatch.setattr(record, "norm_output",
                        lambda func, args: shaped.append(func) or meta_norms.norm_output(func, args))
    gm = record.record_trace(nn.Sequential(nn.BatchNorm2d(3), nn.GroupNorm(1, 3)).eval(), (X,), {}, on_meta=True)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == shaped == [
        torch.ops.aten.batch_norm.default, torch.ops.aten.group_norm.default]


# ---- every op name written in the code resolves -----------------------------------------------------
def _op_names_in_code() -> dict[str, list[str]]:
    """Every string literal passed to ``ops(...)`` anywhere in fxprune/, with where it is written."""
    import ast
    from pathlib import Path

    found: dict[str, list[str]] = {}
    root = Path(fxprune.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "ops":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.setdefault(arg.value, []).append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_op_name_given_to_ops_resolves_to_an_overload():
    """``ops()`` skips a name this torch lacks (so an older torch still imports), which would also drop a
    misspelled name silently: every name written in the code must resolve on the torch the suite runs."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    names = _op_names_in_code()
    assert len(names) > 100, f"the scan found only {len(names)} names: the ops(...) calls moved?"
    missing = {name: where for name, where in names.items() if len(ops(name)) != 1}
    assert not missing, f"op names that resolve to no overload: {missing}"
    assert all(isinstance(op, torch._ops.OpOverload) for op in ops(*names))
