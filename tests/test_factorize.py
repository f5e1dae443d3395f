"""Factorisation (fxprune.edits.factorize): a linear / 1x1 conv becomes a rank-r pair whose rank axis is
one more channel group, so compaction shrinks the rank with nothing special (float64 throughout)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.edits.factorize import factorize, factorized_graph
from fxprune.selection.cost import CostCounter
from fxprune.testing import assert_equivalent

pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 20), nn.Linear(20, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """A 1x1 conv with stride and padding (both go on the first factor) between a 3x3 conv and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.proj = nn.Conv2d(10, 14, 1, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.proj(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _bn_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(14, generator=g) * 0.1)
        model.bn.running_var.copy_(torch.rand(14, generator=g) + 0.5)
    return model


# name -> (model, inputs, layer to factorise, rank, positions per sample the layer runs at (tokens))
CASES = {
    "mlp": (lambda: MLP(), (4, 12), "fc2", 16, 1),
    "conv": (lambda: _bn_stats(ConvNet()), (2, 3, 8, 8), "proj", 10, 5 * 5),
}


def _case(name: str):
    build, shape, path, rank, positions = CASES[name]
    model = build().double().eval()
    inputs = (torch.randn(*shape, dtype=torch.float64),)
    return model, inputs, path, rank, positions * shape[0]


def _run(module: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def _with_weight(model: nn.Module, name: str, w: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.get_parameter(name).copy_(w.reshape(out.get_parameter(name).shape))
    return out


def _rank_group(groups: fxprune.ChannelGroups, path: str) -> fxprune.Group:
    """The group whose producer is weight_v's rows; its consumer must be weight_u's columns."""
    group = next(g for g in groups if any(p.name == f"{path}.weight_v" and p.axis == 0 and p.role == "producer"
                                          for p in g.params))
    assert {(p.name, p.axis, p.role) for p in group.params} == \
        {(f"{path}.weight_v", 0, "producer"), (f"{path}.weight_u", 1, "consumer")}
    return group


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_rank_svd_is_the_original(name):
    model, inputs, path, rank, _ = _case(name)
    gm = fxprune.trace(model, inputs)
    before = {n: t.clone() for n, t in gm.state_dict().items()}
    graph_before = str(gm.graph)
    out = factorize(gm, {path: rank})
    torch.testing.assert_close(_run(out, inputs), _run(model, inputs), rtol=1e-10, atol=1e-12)
    state = dict(out.named_parameters())
    assert f"{path}.weight" not in out.state_dict()
    v, u = state[f"{path}.weight_v"], state[f"{path}.weight_u"]
    w = model.get_parameter(f"{path}.weight")
    assert isinstance(v, nn.Parameter) and isinstance(u, nn.Parameter) and v.dtype == u.dtype == torch.float64
    assert v.shape == (rank, w.shape[1], *w.shape[2:]) and u.shape == (w.shape[0], rank, *w.shape[2:])
    # the input graph is untouched
    assert str(gm.graph) == graph_before
    assert all(torch.equal(before[n], t) for n, t in gm.state_dict().items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_rank_r_is_the_model_with_w_replaced_by_uv(name):
    model, inputs, path, rank, _ = _case(name)
    r = rank // 2
    gm = fxprune.trace(model, inputs)
    out = factorize(gm, {path: r})
    u = out.get_parameter(f"{path}.weight_u").flatten(1)
    v = out.get_parameter(f"{path}.weight_v").flatten(1)
    w = model.get_parameter(f"{path}.weight").flatten(1)
    su, s, svh = torch.linalg.svd(w, full_matrices=False)  # the truncated SVD: best rank-r approximation
    torch.testing.assert_close(u @ v, su[:, :r] * s[:r] @ svh[:r], rtol=1e-10, atol=1e-12)
    reference = _with_weight(model, f"{path}.weight", u @ v)
    torch.testing.assert_close(_run(out, inputs), _run(reference, inputs), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(_run(out, inputs), _run(model, inputs))  # rank r < full: a different function


def test_explicit_factors_in_the_weights_dtype():
    model = MLP().eval()  # float32
    inputs = (torch.randn(4, 12),)
    u, v = torch.randn(16, 3, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    out = factorize(fxprune.trace(model, inputs), {"fc2": (u, v)})
    assert out.get_parameter("fc2.weight_u").dtype == torch.float32
    torch.testing.assert_close(out.get_parameter("fc2.weight_v"), v.float())
    reference = _with_weight(model, "fc2.weight", (u @ v).float())
    torch.testing.assert_close(_run(out, inputs), _run(reference, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rank_group_compacts_to_a_smaller_rank(name):
    model, inputs, path, rank, tokens = _case(name)
    gm, groups = factorized_graph(model, inputs, {path: rank})
    group = _rank_group(groups, path)
    assert group.prunable and len(group) == rank
    k = 3
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    removed[group.channels[[0, 2, rank - 1]]] = True
    result = fxprune.compact(gm, groups, removed, gm)
    assert result.module.get_parameter(f"{path}.weight_v").shape[0] == rank - k
    assert result.module.get_parameter(f"{path}.weight_u").shape[1] == rank - k
    assert result.removed.sum() == k
    assert_equivalent(gm, result, inputs)
    w = model.get_parameter(f"{path}.weight")
    counter = CostCounter(groups)
    assert counter().macs - counter(removed).macs == k * (w.shape[0] + w.shape[1]) * tokens
    assert counter().params - counter(removed).params == k * (w.shape[0] + w.shape[1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_factorized_model_prunes_exactly(name):
    model, inputs, path, rank, _ = _case(name)
    factorized = factorize(fxprune.trace(model, inputs), {path: rank})
    res = fxprune.prune(factorized, inputs, "l1", 0.5)
    assert_equivalent(factorized, res, inputs)
    assert res.module.get_parameter(f"{path}.weight_v").shape[0] == rank // 2


def test_llama_factorized_projections():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    inputs = (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)
    layers = [f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.o_proj")]
    gm, groups = factorized_graph(model, inputs, {path: 64 for path in layers})  # full rank: 64 = hidden size
    torch.testing.assert_close(_run(gm, inputs).logits, _run(model, inputs).logits, rtol=1e-10, atol=1e-10)
    for path in layers:
        group = _rank_group(groups, path)
        assert group.prunable and len(group) == 64
    res = fxprune.prune(gm, inputs, "l1", 0.5)
    assert_equivalent(gm, res, inputs)
    for path in layers:
        assert res.module.get_parameter(f"{path}.weight_v").shape[0] == 32


class Bad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(self.conv3(x)).mean((2, 3)))


@pytest.mark.parametrize("factors, message", [
    ({"nope": 2}, r"'nope'.*no linear layer or convolution.*e\.g\. 'conv3', 'grouped', 'fc'"),
    ({"fc.weight": 2}, r"give the module path 'fc', not the weight"),
    ({"conv3": 2}, r"'conv3'.*kernel \(3, 3\).*only 1x1 convolutions"),
    ({"grouped": 2}, r"'grouped'.*grouped convolution \(groups=2\)"),
    ({"fc": 0}, r"'fc' to rank 0.*between 1 and 6"),
    ({"fc": 7}, r"'fc' to rank 7.*6 x 8.*between 1 and 6"),
    ({"fc": (torch.randn(6, 2), torch.randn(3, 8))}, r"'fc'.*U must be \(6, r\) and V \(r, 8\); got U \(6, 2\)"),
    ({"fc": "2"}, r"'fc'.*a rank \(int\) or a pair of tensors"),
])
def test_errors_name_the_layer_and_the_fix(factors, message):
    gm = fxprune.trace(Bad().eval(), (torch.randn(1, 4, 6, 6),))
    with pytest.raises(ValueError, match=message):
        factorize(gm, factors)
