"""Property tests: random DAGs of conv/BN/activation/add/mul/concat/split/slice/grouped-conv blocks.

For every drawn architecture, pruning with l1 at a drawn ratio is exactly equivalent to the masked
model, and ratio=0 is the identity. Derandomized, so CI sees the same examples every run.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.analysis import UnsupportedOpWarning, couple_graph
from fxprune.analysis.build import components as contracted_components
from fxprune.testing import assert_equivalent

WIDTHS = (2, 4, 6, 8, 12, 16)
ACTS = {"none": lambda x: x, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Spec:
    ops: tuple[tuple, ...]      # see Net.forward; value 0 is the input, each op appends values
    widths: tuple[int, ...]     # channel count of every value
    out: int                    # value read by the head
    head: str                   # "pool" (mean + 1x1 conv), "flatten" or "view" (into a Linear)
    also_return: int | None     # a value returned as a feature map (its channels are fixed)
    seed: int


KINDS = ("res", "gconv", "cat", "split", "gate", "shuffle", "slice", "conv")


@st.composite
def specs(draw, max_blocks: int = 6) -> Spec:
    """Blocks (residual, grouped/depthwise conv, concat, split, gate, channel shuffle, slice, conv),
    each a few primitive ops reading recent values."""
    widths = [3]
    ops: list[tuple] = []

    def recent() -> list[int]:
        return list(range(max(1, len(widths) - 4), len(widths)))

    def conv(src: int, cout: int, k: int = 1, groups: int = 1) -> int:
        ops.append(("conv", src, widths[src], cout, k, groups, draw(st.booleans()),
                    draw(st.sampled_from(sorted(ACTS)))))
        widths.append(cout)
        return len(widths) - 1

    conv(0, draw(st.sampled_from(WIDTHS[1:])), 3)
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(KINDS))
        src = draw(st.sampled_from(recent()))
        c = widths[src]
        if kind == "res":
            body = conv(conv(src, draw(st.sampled_from(WIDTHS)), 3), c)
            ops.append(("add", src, body))
            widths.append(c)
        elif kind == "gconv":
            g = draw(st.sampled_from([d for d in (2, 4, c) if c % d == 0 and d > 1] or [1]))
            conv(src, g * draw(st.sampled_from([1, 2])), 3, g)
        elif kind == "cat":
            srcs = draw(st.lists(st.sampled_from(recent()), min_size=2, max_size=3))
            ops.append(("cat", tuple(srcs)))
            widths.append(sum(widths[s] for s in srcs))
        elif kind == "split" and c >= 2:
            cut = draw(st.integers(1, c - 1))
            ops.append(("split", src, (cut, c - cut)))
            widths.extend([cut, c - cut])
            if draw(st.booleans()):  # an inception-like merge of the two parts
                a = conv(len(widths) - 2, draw(st.sampled_from(WIDTHS)))
                b = conv(len(widths) - 2, draw(st.sampled_from(WIDTHS)))
                ops.append(("cat", (a, b)))
                widths.append(widths[a] + widths[b])
        elif kind == "gate":
            ops.append(("mul", src, conv(src, c)))
            widths.append(c)
        elif kind == "shuffle" and c % 2 == 0:
            ops.append(("shuffle", src, 2))
            widths.append(c)
        elif kind == "slice" and c >= 2:
            a = draw(st.integers(0, c - 2))
            b = draw(st.integers(a + 1, c))
            ops.append(("slice", src, a, b))
            widths.append(b - a)
        else:
            conv(src, draw(st.sampled_from(WIDTHS)), draw(st.sampled_from([1, 3])))
    out = draw(st.sampled_from(recent()))
    also = draw(st.one_of(st.none(), st.sampled_from(range(1, len(widths)))))
    head = draw(st.sampled_from(["pool", "flatten", "view"]))
    return Spec(tuple(ops), tuple(widths), out, head, also, draw(st.integers(0, 2**16)))


class Net(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.layers = nn.ModuleDict()
        for i, op in enumerate(spec.ops):
            if op[0] == "conv":
                _, _, cin, cout, k, groups, bn, _ = op
                layer = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)]
                if bn:
                    norm = nn.BatchNorm2d(cout)
                    with torch.no_grad():
                        norm.running_mean.normal_(0, 0.1)
                        norm.running_var.uniform_(0.5, 1.5)
                        norm.weight.uniform_(0.5, 1.5)
                        norm.bias.normal_(0, 0.1)
                    layer.append(norm)
                self.layers[str(i)] = nn.Sequential(*layer)
        c = spec.widths[spec.out]
        self.head = nn.Conv2d(c, 5, 1) if spec.head == "pool" else nn.Linear(c * 3 * 3, 5)

    def forward(self, x):
        vals = [x]
        for i, op in enumerate(self.spec.ops):
            kind = op[0]
            if kind == "conv":
                vals.append(ACTS[op[7]](self.layers[str(i)](vals[op[1]])))
            elif kind == "add":
                vals.append(vals[op[1]] + vals[op[2]])
            elif kind == "mul":
                vals.append(vals[op[1]] * torch.sigmoid(vals[op[2]]))
            elif kind == "cat":
                vals.append(torch.cat([vals[s] for s in op[1]], dim=1))
            elif kind == "split":
                vals.extend(torch.split(vals[op[1]], list(op[2]), dim=1))
            elif kind == "slice":
                vals.append(vals[op[1]][:, op[2]:op[3]])
            elif kind == "shuffle":
                x = vals[op[1]]
                n, c, h, w = x.shape
                vals.append(x.view(n, op[2], c // op[2], h, w).transpose(1, 2).reshape(n, c, h, w))
        y = vals[self.spec.out]
        if self.spec.head == "pool":
            y = self.head(y).mean((2, 3))
        elif self.spec.head == "flatten":
            y = self.head(torch.flatten(F.max_pool2d(y, 2), 1))
        else:  # a literal size written in the model's code
            y = self.head(F.avg_pool2d(y, 2).view(-1, self.spec.widths[self.spec.out] * 9))
        return y if self.spec.also_return is None else (y, vals[self.spec.also_return])


INPUTS = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _prune(model: nn.Module, ratio: float) -> fxprune.PruneResult:
    with warnings.catch_warnings():
        # every op here has a rule, and no rule may fail (a failing rule warns and freezes); group widths as the
        # ratio says (their rounding for CPU kernels, group_width_to, is tested in test_select)
        warnings.simplefilter("error", UnsupportedOpWarning)
        return fxprune.prune(model, INPUTS, "l1", ratio, budget=fxprune.Budget(group_width_to=1))


@settings(max_examples=30, **SETTINGS)
@given(spec=specs(), ratio=st.sampled_from([0.2, 0.4, 0.5, 0.75]))
def test_random_dag_is_exact(spec: Spec, ratio: float) -> None:
    model = Net(spec).eval()
    res = _prune(model, ratio)
    assert_equivalent(model, res, INPUTS)
    can_drop = [g for g in res.groups.prunable if math.floor(ratio * len(g) + 1e-9) >= 1]
    if can_drop:
        assert res.plan and n_params(res.module) < n_params(model)
    else:
        assert not res.plan and n_params(res.module) == n_params(model)
    # every kept group keeps exactly len - floor(ratio * len) channels
    for g in res.groups.prunable:
        assert int((~res.removed[g.channels]).sum()) == len(g) - min(math.floor(ratio * len(g) + 1e-9), len(g) - 1)
    # the model's input and outputs keep their shapes
    with torch.no_grad():
        got, ref = res.module(*INPUTS), model(*INPUTS)
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    assert [t.shape for t in got] == [t.shape for t in ref]


@settings(max_examples=8, **SETTINGS)
@given(spec=specs(max_blocks=4))
def test_ratio_zero_is_identity(spec: Spec) -> None:
    model = Net(spec).eval()
    res = _prune(model, 0.0)
    assert res.plan == {} and not res.removed.any()
    with torch.no_grad():
        got, ref = res.module(*INPUTS), model(*INPUTS)
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert n_params(res.module) == n_params(model)


def _by_first_element(labels: np.ndarray) -> np.ndarray:
    """A partition written canonically: each element labelled by the first element of its component."""
    first = np.full(int(labels.max()) + 1, len(labels))
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


def _element_components(coupler) -> np.ndarray:
    """The definition: every link, whole-axis identity links included, expanded to element pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t = coupler.table
    ranges = [np.arange(t.offsets[i], t.offsets[i] + t.sizes[i]) for pair in coupler.same for i in pair]
    a = np.concatenate(list(coupler.edges_a) + ranges[0::2] + [np.zeros(0, np.int64)])
    b = np.concatenate(list(coupler.edges_b) + ranges[1::2] + [np.zeros(0, np.int64)])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(t.total, t.total))
    return connected_components(graph, directed=False)[1]


@settings(max_examples=15, **SETTINGS)
@given(spec=specs())
def test_contracted_components_equal_element_components(spec: Spec) -> None:
    """The analysis contracts whole-axis identity links per slot before expanding the rest to
    elements; the channels it finds are exactly those of linking every element."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coupler = couple_graph(fxprune.trace(Net(spec).eval(), INPUTS))
    assert coupler.same  # the contraction has something to do
    got = contracted_components(coupler)
    assert len(got) == coupler.table.total
    assert np.array_equal(_by_first_element(got), _by_first_element(_element_components(coupler)))
