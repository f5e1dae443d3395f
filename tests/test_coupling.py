"""Hand-written hard cases, one or more per coupling kind (issue 2).

Every case checks (a) masked-vs-compacted equivalence (float64) at two ratios, (b) a real property of
the channel groups or of the compacted graph, and (c) that the parameter count fell.
"""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.analysis import UnsupportedOpWarning
from fxprune.analysis.schema import bind
from fxprune.testing import assert_equivalent, masked_model

aten = torch.ops.aten
RATIOS = (0.5, 0.3)
# No op here lacks a rule, no rule may fail and compaction may not fall back to keeping groups whole.
pytestmark = pytest.mark.filterwarnings("error::fxprune.analysis.couple.UnsupportedOpWarning")


# ---------------------------------------------------------------------------------------------
# helpers


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prune_checked(model: nn.Module, inputs, ratio: float = 0.5, *, unsupported_ok: bool = False,
                  **kw) -> fxprune.PruneResult:
    """Prune, assert exact equivalence and that the parameter count fell.

    Unless ``unsupported_ok``, an UnsupportedOpWarning is an error: it means an op had no rule, a rule
    failed, or compaction failed and fell back to keeping groups whole.
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if unsupported_ok else "error", UnsupportedOpWarning)
        res = fxprune.prune(model, inputs, "l1", ratio, **kw)
    assert res.plan, "something must be pruned"
    assert_equivalent(model, res, inputs)
    assert n_params(res.module) < n_params(model)
    return res


def prune_all(model: nn.Module, inputs, **kw) -> dict[float, fxprune.PruneResult]:
    return {r: prune_checked(model, inputs, r, **kw) for r in RATIOS}


def group_of(groups: fxprune.ChannelGroups, name: str, axis: int) -> fxprune.Group:
    hits = [g for g in groups if any(p.name == name and p.axis == axis for p in g.params)]
    assert len(hits) == 1, (name, axis, [g.id for g in hits])
    return hits[0]


def kept(res: fxprune.PruneResult, group: fxprune.Group) -> int:
    return int((~res.removed[group.channels]).sum())


def nodes(gm: torch.fx.GraphModule, *targets) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def run(m: nn.Module, inputs):
    with torch.no_grad():
        return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


def same_shapes(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same_shapes(a[k], b[k])
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            same_shapes(x, y)


def cbr(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that normalisation bugs show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


IMG = (torch.randn(2, 3, 8, 8),)


# ---------------------------------------------------------------------------------------------
# residual add / mul


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a1, self.a2 = cbr(16, 24), nn.Conv2d(24, 16, 3, padding=1)
        self.b1, self.b2 = cbr(16, 24), nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a2(self.a1(x))
        x = self.b2(self.b1(x)).add(x)
        return self.head(x.mean((2, 3)))


def test_residual_add_couples_the_stream():
    model = randomize_bn(Residual())
    results = prune_all(model, IMG)
    groups = results[0.5].groups
    stream = group_of(groups, "stem.0.weight", 0)
    assert stream.prunable and len(stream) == 16
    assert set(stream.layers("producer")) == {"stem.0", "a2", "b2"}
    assert set(stream.layers("consumer")) >= {"a1.0", "b1.0", "head"}
    assert len(groups.prunable) == 3  # the stream + two inner widths
    res = results[0.5]
    assert (res.plan["stem.0.weight"][0] == res.plan["a2.weight"][0] == res.plan["b2.bias"][0]
            == res.plan["head.weight"][1])
    assert len(res.plan["stem.0.weight"][0]) == 8
    assert res.module.head.weight.shape == (5, 8)


class Gated(nn.Module):
    """x * sigmoid(gate(x)) and a product of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.u, self.v = nn.Conv2d(16, 32, 1), nn.Conv2d(16, 32, 1)
        self.down = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x * torch.sigmoid(self.gate(x))
        x = self.down(self.u(x) * F.silu(self.v(x)))
        return self.head(x)


def test_residual_mul_couples_both_operands():
    results = prune_all(randomize_bn(Gated()), IMG)
    groups = results[0.5].groups
    g = group_of(groups, "stem.0.weight", 0)
    assert set(g.layers("producer")) >= {"stem.0", "gate"} and g.prunable
    uv = group_of(groups, "u.weight", 0)
    assert uv is group_of(groups, "v.weight", 0) and len(uv) == 32 and uv.prunable
    res = results[0.5]
    assert res.plan["u.weight"][0] == res.plan["v.weight"][0] == res.plan["down.weight"][1]
    # the output feature map keeps its channels
    assert run(res.module, IMG).shape == (2, 4, 8, 8)


# ---------------------------------------------------------------------------------------------
# concat


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 12), cbr(3, 20)
        self.fuse = cbr(32, 16)
        self.twice = nn.Conv2d(32, 8, 1)  # consumes cat([y, y])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        z = self.fuse(y)
        z = self.twice(torch.cat((z, z), 1))
        return self.head(z.flatten(2).amax(-1))


def test_concat_gives_one_group_per_input():
    results = prune_all(randomize_bn(Concat()), IMG)
    res = results[0.5]
    ga, gb = group_of(res.groups, "a.0.weight", 0), group_of(res.groups, "b.0.weight", 0)
    assert ga is not gb and (len(ga), len(gb)) == (12, 20) and ga.prunable and gb.prunable
    assert kept(res, ga) == 6 and kept(res, gb) == 10
    # fuse consumes the concat: its kept inputs are a's kept channels, then b's shifted by 12
    fuse_in = res.plan["fuse.0.weight"][1]
    assert fuse_in == res.plan["a.0.weight"][0] + [12 + i for i in res.plan["b.0.weight"][0]]
    assert res.module.get_submodule("fuse.0").weight.shape[1] == 16


def test_concat_of_the_same_tensor_twice():
    res = prune_all(randomize_bn(Concat()), IMG)[0.5]
    g = group_of(res.groups, "fuse.0.weight", 0)
    assert len(g) == 16 and g.prunable
    kept_z = res.plan["fuse.0.weight"][0]
    # each channel of z appears at i and 16 + i of the concat: both are removed together
    assert res.plan["twice.weight"][1] == kept_z + [16 + i for i in kept_z]
    assert res.module.twice.weight.shape[1:] == (16, 1, 1)


# ---------------------------------------------------------------------------------------------
# split / chunk / slice / getitem


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.p, self.q = cbr(8, 8), cbr(24, 8)
        self.mid = nn.Conv2d(16, 32, 1)
        self.r = nn.Conv2d(16, 6, 1)
        self.glu = nn.Conv2d(6, 16, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        a, b = torch.split(y, [8, 24], dim=1)
        y = self.mid(torch.cat([self.p(a), self.q(b)], 1))
        z = self.r(y[:, 8:24])
        u, v = self.glu(z).chunk(2, dim=1)
        return self.out(u * torch.sigmoid(v))


def test_split_uneven_sizes_slice_and_chunk():
    results = prune_all(randomize_bn(Split()), IMG)
    res = results[0.5]
    groups = res.groups
    # torch.split([8, 24]): the two parts are separate groups of the stem
    g8 = group_of(groups, "p.0.weight", 1)
    g24 = group_of(groups, "q.0.weight", 1)
    assert (len(g8), len(g24)) == (8, 24) and g8.prunable and g24.prunable
    assert set(g8.layers("producer")) == set(g24.layers("producer")) == {"stem.0"}
    sizes = [bind(n)["split_sizes"] for n in nodes(res.module, aten.split_with_sizes.default)]
    assert sizes == [[4, 12], [4, 4]]  # the chunk became a split too
    # y[:, 8:24]: the slice's bounds follow the kept positions of `mid`
    kept_mid = res.plan["mid.weight"][0]
    in_slice = [i for i in kept_mid if 8 <= i < 24]
    assert res.plan["r.weight"][1] == [i - 8 for i in in_slice]
    (sl,) = [n for n in nodes(res.module, aten.slice.Tensor) if bind(n)["dim"] == 1]
    b = bind(sl)
    assert (b["start"], b["end"]) == (sum(i < 8 for i in kept_mid), sum(i < 24 for i in kept_mid))
    # chunk(2): u's channel i and v's channel i go together (they are multiplied)
    glu = group_of(groups, "glu.weight", 0)
    assert len(glu) == 8 and glu.block == 2
    kept_glu = res.plan["glu.weight"][0]
    half = [i for i in kept_glu if i < 8]
    assert kept_glu == half + [8 + i for i in half]
    assert res.plan["out.weight"][1] == half
    assert run(res.module, IMG).shape == (2, 4, 8, 8)


class Getitem(nn.Module):
    """Indexing the tuple returned by a split with getitem; stack + unbind (the stacked axis is frozen,
    the channel axis passes through)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 24)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        parts = self.stem(x).split(8, dim=-1)
        u, v = torch.stack([torch.relu(parts[0]), parts[2]]).unbind(0)
        return self.out(u + v)


def test_getitem_of_split():
    res = prune_all(Getitem(), (torch.randn(3, 6),))[0.5]
    g = group_of(res.groups, "out.weight", 1)
    assert len(g) == 8 and g.block == 2
    kept_out = res.plan["out.weight"][1]
    # parts[1] is consumed by nobody: its channels are a separate (dead) group
    assert res.plan["stem.weight"][0][: len(kept_out)] == kept_out
    assert [i for i in res.plan["stem.weight"][0] if i >= 16] == [16 + i for i in kept_out]


class TensorSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.a, self.c = nn.Conv2d(5, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a, _, c = torch.tensor_split(self.stem(x), (5, 10), dim=1)
        return self.a(a) + self.c(c)


def test_tensor_split_at_indices():
    res = prune_all(TensorSplit(), IMG)[0.5]
    assert (len(group_of(res.groups, "a.weight", 1)), len(group_of(res.groups, "c.weight", 1))) == (5, 6)
    kept_stem = res.plan["stem.weight"][0]
    assert res.plan["a.weight"][1] == [i for i in kept_stem if i < 5]
    assert res.plan["c.weight"][1] == [i - 10 for i in kept_stem if i >= 10]
    assert [bind(n)["split_sizes"] for n in nodes(res.module, aten.split_with_sizes.default)] == [[3, 3, 3]]


# ---------------------------------------------------------------------------------------------
# grouped / depthwise convolutions


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.dw2 = nn.Conv2d(32, 64, 3, padding=1, groups=32)  # depth multiplier 2
        self.pw = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.bn(self.grouped(x)))
        x = self.dw(x)
        return self.pw(self.dw2(x))


def _conv_groups(gm: torch.fx.GraphModule) -> list[int]:
    return [int(bind(n)["groups"]) for n in nodes(gm, aten.conv2d.default)]


def test_grouped_conv_prunes_every_group_alike_and_depthwise_whole_groups():
    model = randomize_bn(Grouped())
    # widths as the ratio says (rounding: test_select)
    results = prune_all(model, IMG, budget=fxprune.Budget(group_width_to=1))
    for ratio, res in results.items():
        # grouped (4 groups, 4 inputs and 8 outputs each): position j of every group is one channel
        g_in = group_of(res.groups, "stem.0.weight", 0)
        assert len(g_in) == 4 and g_in.block == 4 and g_in.prunable
        assert group_of(res.groups, "grouped.weight", 1) is g_in  # the per-group input axis
        g_out = group_of(res.groups, "grouped.weight", 0)
        assert len(g_out) == 8 and g_out.prunable
        # depthwise convs keep whole groups: each channel goes through dw and dw2 (x2) into pw
        assert group_of(res.groups, "dw2.weight", 0) is g_out and group_of(res.groups, "pw.weight", 1) is g_out
        k_in, k_out = kept(res, g_in), kept(res, g_out)
        assert (k_in, k_out) == (4 - int(4 * ratio), 8 - int(8 * ratio))
        assert _conv_groups(res.module) == [1, 4, 4 * k_out, 4 * k_out, 1], "the grouped conv keeps its 4 groups"
        assert res.module.grouped.weight.shape == (4 * k_out, k_in, 3, 3)
        assert res.module.dw2.weight.shape == (8 * k_out, 1, 3, 3)
        # the same offsets are kept in every group of the stem's outputs
        kept_stem = res.plan["stem.0.weight"][0]
        offsets = sorted({i % 4 for i in kept_stem})
        assert kept_stem == [g * 4 + j for g in range(4) for j in offsets]


# ---------------------------------------------------------------------------------------------
# channel shuffle


class Shuffle(nn.Module):
    """A ShuffleNet-V2 unit: concat of two branches, channel shuffle (view/transpose/reshape), chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.left = cbr(16, 16)
        self.right = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16),
                                   nn.Conv2d(16, 16, 1))
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        a, b = x.chunk(2, dim=1)
        return self.out(a + F.relu(b))


def test_channel_shuffle():
    model = randomize_bn(Shuffle())
    results = prune_all(model, IMG)
    for ratio, res in results.items():
        g = group_of(res.groups, "left.0.weight", 0)
        assert g.prunable, g.frozen
        # shuffled position 2j+s is branch s's channel j: left j and right j go together, and after
        # the chunk, a's j pairs with b's j (summed), so channel j of the group is 2 branch channels each
        assert group_of(res.groups, "right.2.weight", 0) is g and group_of(res.groups, "out.weight", 1) is g
        assert len(g) == 8 and g.block == 2
        k = kept(res, g)
        assert k == 8 - int(8 * ratio)
        kl = res.plan["left.0.weight"][0]
        assert kl == res.plan["right.2.weight"][0] and len(kl) == 2 * k
        assert kl == sorted(set(kl) | {(i + 8) % 16 for i in kl})
        # the literal channel sizes of the view and the reshape were rewritten
        (v,) = nodes(res.module, aten.view.default)
        (r,) = nodes(res.module, aten.reshape.default)
        assert bind(v)["size"][1:3] == [2, 2 * k] and bind(r)["shape"][1] == 4 * k
        assert res.module.out.weight.shape == (4, 2 * k, 1, 1)
        assert group_of(res.groups, "stem.0.weight", 0).prunable


# ---------------------------------------------------------------------------------------------
# flatten / view into linear with literal sizes


class ViewHead(nn.Module):
    def __init__(self, minus_one: bool) -> None:
        super().__init__()
        self.minus_one = minus_one
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.features(x)
        if self.minus_one:
            x = x.view(-1, 512)
        else:
            x = x.view(x.size(0), 32 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("minus_one", [False, True])
def test_view_into_linear_rewrites_literal_sizes(minus_one):
    model = randomize_bn(ViewHead(minus_one))
    x = (torch.randn(2, 3, 16, 16),)
    results = prune_all(model, x)
    for ratio, res in results.items():
        g = group_of(res.groups, "features.2.0.weight", 0)
        assert len(g) == 32 and g.block == 16 and g.prunable
        k = kept(res, g)
        assert k == 32 - int(32 * ratio)
        (v,) = nodes(res.module, aten.view.default)
        size = bind(v)["size"]
        assert size[-1] == 16 * k
        if minus_one:
            assert size[0] == -1
        assert res.module.fc1.weight.shape == (64 - int(64 * ratio), 16 * k)
        # fc1's kept inputs are whole spatial blocks of the kept conv channels
        assert res.plan["fc1.weight"][1] == [c * 16 + j for c in res.plan["features.2.0.weight"][0] for j in range(16)]
        out = run(res.module, (torch.randn(5, 3, 16, 16),))
        assert out.shape == (5, 10), "another batch size still works"


class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 8)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 4), 1))


def test_flatten_into_linear():
    res = prune_all(randomize_bn(Flatten()), IMG)[0.5]
    assert res.module.fc.weight.shape == (6, 4 * 16)


# ---------------------------------------------------------------------------------------------
# normalisation layers


class BN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(10, 32), nn.BatchNorm1d(32), nn.Linear(32, 16)
        self.conv = nn.Conv1d(4, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 16, 1)

    def forward(self, x, seq):
        a = self.fc2(F.relu(self.bn1(self.fc1(x))))
        b = self.conv2(F.relu(self.bn2(self.conv(seq)))).mean(-1)
        return a + b


def test_batchnorm1d_on_features_and_sequences():
    model = randomize_bn(BN1d())
    inputs = (torch.randn(4, 10), torch.randn(4, 4, 7))
    res = prune_all(model, inputs)[0.5]
    assert group_of(res.groups, "bn1.weight", 0) is group_of(res.groups, "fc1.weight", 0)
    assert group_of(res.groups, "bn2.running_var", 0) is group_of(res.groups, "conv.weight", 0)
    assert res.module.bn1.running_mean.shape == (16,) and res.module.bn2.weight.shape == (6,)
    assert isinstance(res.module.bn1, nn.BatchNorm1d)


class LN(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.norm = norm(32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(self.norm(self.fc1(x)))))


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_layernorm_and_rmsnorm_are_inexact(norm):
    model = LN(norm).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 8),)
    res = prune_checked(model, x)
    g = group_of(res.groups, "norm.weight", 0)
    assert g.inexact is not None and "norm" in g.inexact
    assert not g.prunable and "allow_inexact" in g.frozen
    assert "norm.weight" not in res.plan and "fc1.weight" not in res.plan
    assert group_of(res.groups, "fc2.weight", 0).prunable  # the rest of the model still prunes
    # allow_inexact=True: the normalised width shrinks too, and the normalized_shape follows
    loose = fxprune.prune(model, x, "l1", 0.5, allow_inexact=True)
    g = group_of(loose.groups, "norm.weight", 0)
    assert g.prunable and g.inexact is not None
    assert loose.plan["norm.weight"][0] == loose.plan["fc1.weight"][0] == loose.plan["fc2.weight"][1]
    assert loose.module.norm.weight.shape == (16,)
    target = aten.layer_norm.default if norm is nn.LayerNorm else aten.rms_norm.default
    (ln,) = nodes(loose.module, target)
    assert list(bind(ln)["normalized_shape"]) == [16]
    assert run(loose.module, x).shape == (3, 5, 4)
    # the compacted norm equals the norm recomputed over the kept positions
    keep = torch.tensor(loose.plan["norm.weight"][0])
    with torch.no_grad():
        h = model.fc1(x[0])[..., keep]
        small = norm(16).eval()
        small.weight.copy_(model.norm.weight[keep])
        if norm is nn.LayerNorm:
            small.bias.copy_(model.norm.bias[keep])
        k2 = torch.tensor(loose.plan["fc2.weight"][0])
        ref = F.linear(small(h), model.fc2.weight[k2][:, keep], model.fc2.bias[k2])
        ref = F.linear(F.gelu(ref), model.fc3.weight[:, k2], model.fc3.bias)
        torch.testing.assert_close(run(loose.module, x), ref)


class GN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.gn = nn.GroupNorm(8, 32)
        self.conv2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.conv2(F.silu(self.gn(self.conv(x))))


def test_groupnorm_removes_whole_groups():
    model = GN()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.normal_()
    results = prune_all(model, IMG)
    for ratio, res in results.items():
        g = group_of(res.groups, "gn.weight", 0)
        assert len(g) == 8 and g.block == 4 and g.prunable and g.inexact is None
        k = kept(res, g)
        assert k == 8 - int(8 * ratio)
        (gn,) = nodes(res.module, aten.group_norm.default)
        assert bind(gn)["num_groups"] == k
        kept_c = res.plan["gn.weight"][0]
        assert len(kept_c) == 4 * k and all(kept_c[i] % 4 == i % 4 for i in range(len(kept_c)))


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16)
        self.fc, self.act2 = nn.Linear(16, 12), nn.PReLU()  # one shared slope
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        y = self.act(self.conv(x)).mean((2, 3))
        return self.out(self.act2(self.fc(y)))


def test_prelu_slopes_follow_the_channel_axis():
    model = PReLUNet()
    with torch.no_grad():
        model.act.weight.uniform_(-1, 1)
    x = (torch.randn(2, 3, 16, 16),)  # width == channels: right-aligned broadcasting would pick the width
    res = prune_all(model, x)[0.5]
    assert group_of(res.groups, "act.weight", 0) is group_of(res.groups, "conv.weight", 0)
    assert res.plan["act.weight"][0] == res.plan["conv.weight"][0] and res.module.act.weight.shape == (8,)
    assert "act2.weight" not in res.plan and res.module.fc.weight.shape == (6, 8)


# ---------------------------------------------------------------------------------------------
# attention heads


class MHA(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 4, mode: str = "plain") -> None:
        super().__init__()
        self.h, self.kv, self.d, self.mode = heads, kv_heads, dim // heads, mode
        self.q_proj = nn.Linear(dim, heads * self.d)
        self.k_proj = nn.Linear(dim, kv_heads * self.d)
        self.v_proj = nn.Linear(dim, kv_heads * self.d)
        self.o_proj = nn.Linear(heads * self.d, dim)
        self.up, self.down = nn.Linear(dim, 48), nn.Linear(48, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, 4, 8).transpose(1, 2) if self.h == 4 else \
            self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        rep = self.h // self.kv
        if self.mode == "repeat_interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        elif self.mode == "expand":
            k = k[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.h, t, self.d)
            v = v[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.h, t, self.d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.mode == "enable_gqa")
        y = y.transpose(1, 2).reshape(b, t, 32)
        x = x + self.o_proj(y)
        return x + self.down(F.relu(self.up(x)))


def test_attention_heads_removed_whole_and_literals_rewritten():
    model = MHA()
    x = (torch.randn(2, 5, 32),)
    results = prune_all(model, x)
    for ratio, res in results.items():
        g = group_of(res.groups, "q_proj.weight", 0)
        assert len(g) == 4 and g.block == 8 and g.prunable, "heads are the unit"
        for name in ("k_proj.weight", "v_proj.weight", "q_proj.bias"):
            assert group_of(res.groups, name, 0) is g
        assert group_of(res.groups, "o_proj.weight", 1) is g
        k = kept(res, g)
        assert k == 4 - int(4 * ratio)
        kept_q = res.plan["q_proj.weight"][0]
        assert kept_q == res.plan["k_proj.weight"][0] == res.plan["v_proj.weight"][0] == res.plan["o_proj.weight"][1]
        assert sorted({i // 8 for i in kept_q}) == [i // 8 for i in kept_q[::8]] and len(kept_q) == 8 * k
        sizes = [list(bind(n)["size"]) for n in nodes(res.module, aten.view.default)]
        assert [s[2:] for s in sizes] == [[k, 8]] * 3
        (r,) = nodes(res.module, aten.reshape.default)
        assert bind(r)["shape"][2] == 8 * k
        # the hidden size is the model's input/output: untouched
        assert "o_proj.weight" not in res.plan or 0 not in res.plan["o_proj.weight"]
        assert group_of(res.groups, "up.weight", 0).prunable


@pytest.mark.parametrize("mode", ["repeat_interleave", "expand", "enable_gqa"])
def test_grouped_query_attention_shares_kv_heads(mode):
    model = MHA(heads=4, kv_heads=2, mode=mode)
    x = (torch.randn(2, 5, 32),)
    res = prune_checked(model, x)
    g = group_of(res.groups, "k_proj.weight", 0)
    assert g.prunable, g.frozen
    assert group_of(res.groups, "q_proj.weight", 0) is g
    assert group_of(res.groups, "v_proj.weight", 0) is g
    assert len(g) == 2, "one kv head and the query heads that read it"
    kept_kv = res.plan["k_proj.weight"][0]
    assert len(kept_kv) == 8 and kept_kv == res.plan["v_proj.weight"][0]
    head = kept_kv[0] // 8
    assert res.plan["q_proj.weight"][0] == list(range(16 * head, 16 * head + 16))
    assert res.plan["o_proj.weight"][1] == res.plan["q_proj.weight"][0]


class TorchMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h + a)


def test_torch_multihead_attention_is_exact():
    res = prune_all(TorchMHA(), (torch.randn(2, 5, 8),))[0.5]
    g = group_of(res.groups, "inp.weight", 0)
    assert g.prunable and group_of(res.groups, "mha.out_proj.weight", 0) is g
    assert res.plan["mha.in_proj_weight"][1] == res.plan["inp.weight"][0]


class MixedReshape(nn.Module):
    """(4, 6) -> (8, 3): a reshape that splits and merges at once, without any batch involved."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 24, 1), nn.Conv2d(24, 5, 1)

    def forward(self, x):
        y = self.c1(x)
        n, _, h, w = y.shape
        y = F.relu(y.view(n, 4, 6, h * w).view(n, 8, 3, h * w))
        return self.c2(y.reshape(n, 24, h, w))


def test_reshape_that_splits_and_merges_links_the_shared_factor():
    res = prune_checked(MixedReshape(), IMG)
    g = group_of(res.groups, "c1.weight", 0)
    assert g.prunable and len(g) == 4 and g.block == 6  # the common outer factor carries the channel
    assert group_of(res.groups, "c2.weight", 1) is g
    assert res.plan["c2.weight"][1] == res.plan["c1.weight"][0]


@pytest.mark.parametrize("batch", [1, 2])
def test_torch_multihead_attention_heads_prunable(batch):
    """nn.MultiheadAttention folds its heads into the batch: view(T, B*heads, dim) with B*heads a
    symbolic product (batch >= 2) or a literal (batch 1). Heads stay the unit either way; traced at
    batch >= 2 the compacted model takes other batch sizes (batch 1 traces a static graph)."""
    model = TorchMHA().eval()
    x = torch.randn(batch, 5, 8)
    res = prune_checked(model, (x,))
    g = group_of(res.groups, "mha.in_proj_weight", 0)
    assert g.prunable and len(g) == 4 and g.block == 24  # 4 heads x (q, k, v) x 8 dims
    kept_rows = res.plan["mha.in_proj_weight"][0]
    assert len(kept_rows) == 2 * 24 and res.plan["mha.out_proj.weight"][1] == kept_rows[:16]
    assert sorted({i // 8 % 4 for i in kept_rows}) == sorted({i // 8 for i in kept_rows[:16]})
    if batch > 1:  # the symbolic product batch * 4 became batch * 2 in a new node
        assert any(n.target is operator.mul and 2 in n.args for n in res.module.graph.nodes)
    masked = masked_model(model, res.plan)
    for other in ((1, 3) if batch > 1 else ()):
        y = torch.randn(other, 5, 8)
        with torch.no_grad():
            torch.testing.assert_close(res.module(y), masked(y), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# embeddings and tied weights


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.lm_head(h)


def test_embedding_and_tied_weights():
    model = TiedLM()
    ids = (torch.randint(0, 50, (2, 7)),)
    results = prune_all(model, ids)
    for ratio, res in results.items():
        # export reads the tied tensor under one name (lm_head.weight) for both uses
        g = group_of(res.groups, "lm_head.weight", 1)
        assert len(g) == 16 and g.prunable
        assert "fc2" in g.layers("producer") and "fc1" in g.layers("consumer")
        plan = res.plan
        assert plan["embed.weight"] == plan["lm_head.weight"], "tied names get identical entries"
        assert list(plan["embed.weight"]) == [1], "the vocabulary axis never shrinks"
        assert plan["embed.weight"][1] == plan["fc1.weight"][1] == plan["fc2.weight"][0]
        assert len(plan["embed.weight"][1]) == 16 - int(16 * ratio)
        assert run(res.module, ids).shape == (2, 7, 50)
        m = res.module
        assert m.embed.weight is m.lm_head.weight, "still tied after compaction"
        kd, kh = 16 - int(16 * ratio), 32 - int(32 * ratio)
        assert n_params(m) == 50 * kd + (kd * kh + kh) + (kh * kd + kd)


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 24)
        self.fc = nn.Linear(24, 3)

    def forward(self, ids):
        return self.fc(F.relu(self.embed(ids)).mean(1))


def test_untied_embedding_dim_prunes():
    res = prune_all(Embed(), (torch.randint(0, 30, (2, 6)),))[0.5]
    assert res.module.embed.weight.shape == (30, 12)
    assert res.plan["embed.weight"][1] == res.plan["fc.weight"][1]


# ---------------------------------------------------------------------------------------------
# a module called twice


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.branch = nn.Conv2d(16, 24, 1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.shared(F.relu(self.shared(x)))
        return self.head(self.branch(x))


def test_module_called_twice():
    res = prune_all(randomize_bn(Twice()), IMG)[0.5]
    entry = res.plan["shared.weight"]
    assert entry[0] == entry[1] == res.plan["stem.0.weight"][0] == res.plan["branch.weight"][1]
    g = group_of(res.groups, "shared.weight", 0)
    assert group_of(res.groups, "shared.weight", 1) is g and len(g) == 16
    assert res.module.shared.weight.shape == (8, 8, 3, 3)


# ---------------------------------------------------------------------------------------------
# transposed and 1-D convolutions


class Deconv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = cbr(3, 16)
        self.up = nn.ConvTranspose2d(16, 24, 2, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.gup = nn.ConvTranspose2d(24, 12, 3, padding=1, groups=3)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.up(self.enc(x))))
        return self.out(F.relu(self.gup(x)))


def test_conv_transpose_plain_and_grouped():
    results = prune_all(randomize_bn(Deconv()), IMG)
    for res in results.values():
        assert group_of(res.groups, "up.weight", 0) is group_of(res.groups, "enc.0.weight", 0)
        assert group_of(res.groups, "up.weight", 1) is group_of(res.groups, "bn.weight", 0)
        # grouped transposed conv (3 groups, 8 inputs and 4 outputs each; weight (in, out per group)):
        # position j of every group is one channel, inputs and outputs separately
        g_in, g_out = group_of(res.groups, "gup.weight", 0), group_of(res.groups, "gup.weight", 1)
        assert g_in is group_of(res.groups, "bn.weight", 0) and g_out is group_of(res.groups, "out.weight", 1)
        assert (len(g_in), len(g_out)) == (8, 4) and g_in.prunable and g_out.prunable
        k_in, k_out = kept(res, g_in), kept(res, g_out)
        (gup,) = [n for n in res.module.graph.nodes if n.op == "call_function" and "conv_transpose" in str(n.target)
                  and bind(n).get("groups", 1) != 1]
        assert bind(gup)["groups"] == 3
        assert res.module.gup.weight.shape[:2] == (3 * k_in, k_out)
        assert run(res.module, IMG).shape == (2, 2, 16, 16)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c2(F.relu(self.c1(x))) + self.c1(x)
        return self.fc(self.c3(x).amax(-1))


def test_conv1d():
    res = prune_all(Conv1dNet(), (torch.randn(2, 4, 20),))[0.5]
    assert res.module.c1.weight.shape == (8, 4, 5) and res.module.c3.weight.shape == (4, 8, 1)
    (dw,) = [n for n in nodes(res.module, aten.conv1d.default) if bind(n)["groups"] != 1]
    assert bind(dw)["groups"] == 8


# ---------------------------------------------------------------------------------------------
# an op without a rule


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(3, 16)
        self.c = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = torch.cummax(self.a(x), dim=2).values
        y = torch.cummax(y, dim=3).values  # the same op again: still one warning
        z = self.b(x)
        return self.c(y) + self.d(torch.cat([z, z], 1))


def test_unknown_op_freezes_its_channels_and_warns_once():
    model = randomize_bn(Unknown())
    gm = fxprune.trace(model, IMG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = fxprune.analyze(gm)
    hits = [w for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert len(hits) == 1 and "aten.cummax" in str(hits[0].message)
    assert "aten.cummax" in " ".join(groups.unsupported) and "cummax" in str(groups)
    g = group_of(groups, "a.0.weight", 0)
    assert not g.prunable and "cummax" in g.frozen
    assert group_of(groups, "b.0.weight", 0).prunable
    results = prune_all(model, IMG, unsupported_ok=True)
    for res in results.values():
        assert "a.0.weight" not in res.plan and "c.weight" not in res.plan
        assert "b.0.weight" in res.plan


# ---------------------------------------------------------------------------------------------
# input / output structure


class DictIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.cls = nn.Linear(16, 5)
        self.aux = nn.Linear(4, 16)

    def forward(self, image, meta):
        f = self.body(image) + self.aux(meta)[:, :, None, None]
        pooled = f.mean((2, 3))
        return {"logits": self.cls(pooled), "features": f, "pair": (pooled, pooled.sum(-1))}


def test_dict_inputs_and_dict_tuple_outputs():
    model = randomize_bn(DictIO())
    inputs = {"image": torch.randn(2, 3, 8, 8), "meta": torch.randn(2, 4)}
    res = prune_checked(model, inputs)
    out, ref = run(res.module, inputs), run(model, inputs)
    same_shapes(out, ref)  # returned feature maps keep their channels
    assert group_of(res.groups, "body.0.0.weight", 0).prunable
    assert not group_of(res.groups, "body.1.0.weight", 0).prunable  # it is returned
    assert 0 not in res.plan["body.1.0.weight"] and "cls.weight" not in res.plan


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(16, 8)

    def forward(self, x, y):
        h = self.a(x)
        return self.b(h), h.amax((2, 3)) + y


def test_tuple_inputs_and_outputs():
    model = randomize_bn(TupleOut())
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 16))
    res = fxprune.prune(model.eval(), inputs, "l1", 0.5)
    out = run(res.module, inputs)
    assert isinstance(out, tuple) and len(out) == 2
    same_shapes(out, run(model, inputs))
    assert_equivalent(model, res, inputs)
    # both outputs fix the widths they carry: nothing to prune here
    assert res.plan == {}


# ---------------------------------------------------------------------------------------------
# global properties of prune()


def test_ratio_zero_is_bit_identical():
    for model, inputs in ((randomize_bn(Residual()), IMG), (MHA(), (torch.randn(2, 5, 32),)),
                          (TiedLM(), (torch.randint(0, 50, (2, 7)),))):
        model.eval()
        res = fxprune.prune(model, inputs, "l1", 0.0)
        assert res.plan == {} and not res.removed.any()
        assert torch.equal(run(res.module, inputs), run(model, inputs))
        assert n_params(res.module) == n_params(model)


def test_user_model_is_untouched():
    model = randomize_bn(Residual()).train()
    model.a1.eval()
    before = copy.deepcopy(model.state_dict())
    flags = {n: m.training for n, m in model.named_modules()}
    res = fxprune.prune(model, IMG, "l1", 0.5)
    assert res.plan
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].shape == after[k].shape for k in before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in res.module.parameters())


def _flops(m: nn.Module, inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        run(m, inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("make,inputs", [(Residual, IMG), (Grouped, IMG), (MHA, (torch.randn(2, 5, 32),))])
def test_flops_fall(make, inputs):
    model = make().eval()
    res = fxprune.prune(model, inputs, "l1", 0.5)
    before, after = _flops(model, inputs), _flops(res.module, inputs)
    assert 0 < after < 0.75 * before


class Trainable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.drop(self.body(x).mean((2, 3))))


def test_compacted_module_switches_batchnorm_and_dropout():
    model = randomize_bn(Trainable()).eval()
    res = fxprune.prune(model, IMG, "l1", 0.5)
    m = res.module
    assert not m.training
    x = torch.randn(4, 3, 8, 8)
    bn = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bn) == 2 and bn[0].num_features == 8
    e1, e2 = run(m, (x,)), run(m, (x,))
    assert torch.equal(e1, e2), "eval is deterministic"
    m.train()
    assert all(mod.training for mod in m.modules())
    stats = bn[0].running_mean.clone()
    torch.manual_seed(0)
    t1 = run(m, (x,))
    assert not torch.equal(stats, bn[0].running_mean), "train mode updates running stats"
    assert not torch.allclose(t1, e1), "train mode uses batch statistics and dropout"
    # dropout alone: with BatchNorm frozen, two train-mode passes differ only through dropout
    for mod in bn:
        mod.eval()
    torch.manual_seed(1)
    d1 = run(m, (x,))
    torch.manual_seed(2)
    d2 = run(m, (x,))
    assert not torch.equal(d1, d2)
    m.eval()
    assert torch.equal(run(m, (x,)), run(m, (x,)))


def test_gradients_reach_every_parameter():
    for model, inputs in ((randomize_bn(Residual()), IMG), (MHA(), (torch.randn(2, 5, 32),)),
                          (TiedLM(), (torch.randint(0, 50, (2, 7)),))):
        res = fxprune.prune(model.eval(), inputs, "l1", 0.5)
        m = res.module.train()
        out = m(*inputs)
        out.float().pow(2).mean().backward()
        params = dict(m.named_parameters())
        assert params
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_trace_and_analyze_on_meta_device():
    with torch.device("meta"):
        meta_model = MHA()
    x = torch.randn(2, 5, 32, device="meta")
    groups = fxprune.analyze(fxprune.trace(meta_model, (x,)))
    ref = fxprune.analyze(fxprune.trace(MHA(), (torch.randn(2, 5, 32),)))
    assert groups.rows() == ref.rows()
    g = group_of(groups, "q_proj.weight", 0)
    assert len(g) == 4 and g.block == 8 and g.prunable


class ConstantInForward(nn.Module):
    """A per-channel constant made in forward (``torch.tensor([...])``, as timm's CSATv2 does): it is
    sliced with the channels, and never assumed to be zero."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.75]).view(1, 6, 1, 1)
        return self.c2(torch.relu(self.c1(x)) + shift)


def test_constant_made_in_forward_is_sliced_and_exact():
    model = ConstantInForward().eval()
    res = fxprune.prune(model, IMG, "l1", 0.5)
    constants = [name for name in res.plan if name.startswith("_tensor_constant")]
    assert constants and len(res.plan[constants[0]][0]) == 3
    assert_equivalent(model, res, IMG)


class ClampByTensor(nn.Module):
    """``clamp`` with per-channel tensor bounds (timm's Gemma 4 ViT): an elementwise op with a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.lo, self.hi = nn.Parameter(-torch.rand(1, 6, 1, 1)), nn.Parameter(torch.rand(1, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.clamp(self.c1(x), self.lo, self.hi))


def test_clamp_by_tensor_bounds_prunes_with_its_bounds():
    model = ClampByTensor().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        res = fxprune.prune(model, IMG, "l1", 0.5)
    assert len(res.plan["lo"][1]) == len(res.plan["hi"][1]) == 3
    assert_equivalent(model, res, IMG)


class AdvancedIndex(nn.Module):
    """x[rows, cols] with two index tensors (transformers' mask building does this): the indexed axes are
    frozen, the feature axis behind them passes through to the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)                                   # (B, T, 16)
        rows = torch.arange(h.shape[0]).unsqueeze(1)      # (B, 1)
        cols = torch.arange(h.shape[1] - 1).unsqueeze(0)  # (1, T-1)
        return self.fc2(h[rows, cols])                    # (B, T-1, 16)


def test_index_with_adjacent_index_tensors():
    model = AdvancedIndex()
    res = prune_checked(model, (torch.randn(2, 5, 8),))
    assert kept(res, group_of(res.groups, "fc1.weight", 0)) == 8


class MaskedRows(nn.Module):
    """h[mask] with a (B, T) boolean mask on a (B, T, 16) tensor: the mask consumes both leading axes (its output
    axis counts the positions picked), the feature axis passes through to the next layer; y[y > 0] consumes all
    three (the rule used to fail there)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)                   # (B, T, 16)
        picked = h[x[..., 0] > 0]         # (n, 16): n depends on the values
        y = self.fc2(h)
        return self.fc2(picked).sum(0) + y.mean((0, 1)) + y[y > 0].sum()


@pytest.mark.parametrize("target", ["graph", "modules"])
def test_index_with_a_boolean_mask_over_several_axes(target):
    """The graph's export decomposes the mask into integer indices; the modules target's recording keeps it."""
    model = MaskedRows()
    res = prune_checked(model, (torch.randn(2, 5, 8),), target=target)  # (a rule that fails warns: an error here)
    assert kept(res, group_of(res.groups, "fc1.weight", 0)) == 8


class NumpyT(nn.Module):
    """``x.T`` (aten.numpy_T) reverses every axis: the channels follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).T  # (16, B)
        return self.fc2((h * 2).T)


def test_numpy_t_reverses_axes():
    model = NumpyT()
    res = prune_checked(model, (torch.randn(3, 8),))
    gm = fxprune.trace(model, (torch.randn(3, 8),))
    assert nodes(gm, aten.numpy_T.default), "the trace should record x.T as aten.numpy_T"
    assert kept(res, group_of(res.groups, "fc1.weight", 0)) == 8


class MatmulLinear(nn.Module):
    """Linear layers written as ``x @ self.weight.T + self.bias`` (Falcon's FalconLinear): the transposed
    parameter is a layer, producing and consuming channels like nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T


def test_matmul_with_transposed_parameter_is_a_layer():
    model = MatmulLinear()
    res = prune_checked(model, (torch.randn(2, 3, 8),))
    g = group_of(res.groups, "w1", 0)
    assert {p.role for p in g.params if p.name in ("w1", "w2")} == {"producer", "consumer"}
    assert kept(res, g) == 8
