"""Property tests for statistics over a pruned axis: normalisations and reductions that read many
channels at once (weight standardisation, weight norm, ``F.normalize``, channel softmax, means, maxima,
cosine attention, group/instance/layer norm over channels).

Each drawn network is a chain of stages; stage ``i`` is a plain convolution ``stages.i.conv`` (its
output channels are the stage's group) followed by one construct that reads those channels. A construct
is either EXACT (removing a channel is the same as zeroing it: sums, Lp norms, maxima of non-negative
values, per-channel or whole-group statistics) or INEXACT (means, variances, softmax, maxima of signed
values). The properties: pruning is always exactly the masked model; a stage's group is prunable iff
its construct is exact, and otherwise frozen and labelled inexact. Separately, for every INEXACT
construct, pruning it anyway (``allow_inexact=True``) really does change the output: the label is needed.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.analysis import UnsupportedOpWarning
from fxprune.testing import assert_equivalent

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INPUTS = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation as timm's StdConv2d writes it: batch norm over each filter, training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=self.padding)


class VarMeanConv(nn.Conv2d):
    """Weight standardisation with ``var_mean`` over the input/kernel axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return F.conv2d(x, (self.weight - mean) / torch.sqrt(var + 1e-5), self.bias, padding=self.padding)


class ChannelsLastLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's layout). GroupNorm(1, C) is not this
    case: it makes all channels one inseparable unit, which is exact (and never prunable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _weight_norm_conv(c: int) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(c, c, 3, padding=1))


def _cosine_attention(x: torch.Tensor) -> torch.Tensor:
    """Tokens = positions, features = channels; q and k L2-normalised over the channels."""
    t = x.flatten(2).transpose(1, 2)                          # (B, HW, C)
    q, k = F.normalize(t, dim=-1), F.normalize(t * 0.5, dim=-1)
    att = torch.softmax(q @ k.transpose(1, 2) * 5.0, dim=-1)  # softmax over tokens, not channels
    return (att @ t).transpose(1, 2).reshape(x.shape)


EXACT, INEXACT = True, False


@dataclass(frozen=True)
class Construct:
    exact: bool
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None  # a function of the stage's output
    layer: Callable[[int], nn.Module] | None = None               # or a layer reading it


CONSTRUCTS: dict[str, Construct] = {
    # exact: dropping zeros leaves the value unchanged, or the statistics are per channel / per group
    "weight_norm": Construct(EXACT, layer=_weight_norm_conv),
    "normalize": Construct(EXACT, apply=lambda x: F.normalize(x, dim=1)),
    "lp_norm": Construct(EXACT, apply=lambda x: x / (1 + torch.linalg.vector_norm(x, 3, dim=1, keepdim=True))),
    "channel_sum": Construct(EXACT, apply=lambda x: x * torch.sigmoid(x.sum(1, keepdim=True))),
    "amax_of_relu": Construct(EXACT, apply=lambda x: F.relu(x) - F.relu(x).amax(1, keepdim=True)),
    "cosine_attention": Construct(EXACT, apply=_cosine_attention),
    "group_norm": Construct(EXACT, layer=lambda c: nn.GroupNorm(c // 2, c)),
    "instance_norm": Construct(EXACT, layer=lambda c: nn.InstanceNorm2d(c, affine=True)),
    # inexact: counts, orders or signs of the removed entries matter
    "weight_standardisation": Construct(INEXACT, layer=lambda c: StandardisedConv(c, c, 3, padding=1)),
    "weight_var_mean": Construct(INEXACT, layer=lambda c: VarMeanConv(c, c, 3, padding=1)),
    "channel_softmax": Construct(INEXACT, apply=lambda x: torch.softmax(x, dim=1)),
    "channel_mean": Construct(INEXACT, apply=lambda x: x - x.mean(1, keepdim=True)),
    "channel_std": Construct(INEXACT, apply=lambda x: x / (1 + x.std(1, keepdim=True))),
    "amax_signed": Construct(INEXACT, apply=lambda x: x - x.amax(1, keepdim=True)),
    "logsumexp": Construct(INEXACT, apply=lambda x: x - torch.logsumexp(x, 1, keepdim=True)),
    "layer_norm_over_channels": Construct(INEXACT, layer=lambda c: ChannelsLastLayerNorm(c)),
    "batch_stats_over_channels": Construct(INEXACT, apply=lambda x: F.batch_norm(
        x.flatten(2).transpose(1, 2), None, None, training=True).transpose(1, 2).reshape(x.shape)),
}


class Stage(nn.Module):
    def __init__(self, cin: int, c: int, construct: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        spec = CONSTRUCTS[construct]
        self.layer = spec.layer(c) if spec.layer else None
        self.fn = spec.apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x))
        return self.layer(x) if self.layer is not None else self.fn(x)


class Chain(nn.Module):
    def __init__(self, constructs: tuple[str, ...], widths: tuple[int, ...], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cins = (3,) + widths[:-1]
        self.stages = nn.ModuleList(Stage(a, b, k) for a, b, k in zip(cins, widths, constructs))
        self.head = nn.Linear(widths[-1], 5)
        with torch.no_grad():  # non-trivial affine parameters: a norm's ones and zeros would hide errors
            for m in self.modules():
                if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


@st.composite
def chains(draw) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    n = draw(st.integers(1, 4))
    constructs = tuple(draw(st.sampled_from(sorted(CONSTRUCTS))) for _ in range(n))
    widths = tuple(draw(st.sampled_from([4, 6, 8])) for _ in range(n))
    return constructs, widths, draw(st.integers(0, 2**16))


def _prune(model: nn.Module, ratio: float, **kw) -> fxprune.PruneResult:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)  # every construct here has a rule
        return fxprune.prune(model, INPUTS, "l1", ratio, **kw)


def _stage_group(res: fxprune.PruneResult, i: int):
    """The group of stage ``i``'s conv output channels."""
    name = f"stages.{i}.conv.weight"
    found = [g for g in res.groups if any(p.name == name and p.axis == 0 for p in g.params)]
    assert len(found) == 1, (name, found)
    return found[0]


@settings(max_examples=40, **SETTINGS)
@given(chain=chains(), ratio=st.sampled_from([0.25, 0.5]))
def test_exact_or_frozen_and_labelled(chain, ratio: float) -> None:
    constructs, widths, seed = chain
    model = Chain(constructs, widths, seed).eval()
    res = _prune(model, ratio)
    assert_equivalent(model, res, INPUTS)
    for i, name in enumerate(constructs):
        g = _stage_group(res, i)
        if CONSTRUCTS[name].exact:
            assert g.inexact is None and g.prunable, (name, g.frozen, g.inexact)
            dropped = int(res.removed[g.channels].sum())
            assert dropped == math.floor(ratio * len(g) + 1e-9), (name, dropped)
        else:
            assert g.inexact is not None and not g.prunable and "inexact" in g.frozen, (name, g.frozen)
            assert not res.removed[g.channels].any()


@pytest.mark.parametrize("name", sorted(k for k, c in CONSTRUCTS.items() if not c.exact))
def test_inexact_label_is_needed(name: str) -> None:
    """Pruning an inexact construct anyway changes the output: the analysis was right to refuse it."""
    model = Chain((name, "normalize"), (8, 6), seed=1).eval()
    res = _prune(model, 0.5, allow_inexact=True)
    g = _stage_group(res, 0)
    assert g.inexact is not None and g.prunable and res.removed[g.channels].sum() == 4
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):  # values, not a shape
        assert_equivalent(model, res, INPUTS)


@pytest.mark.parametrize("name", sorted(k for k, c in CONSTRUCTS.items() if c.exact))
def test_exact_construct_prunes_exactly(name: str) -> None:
    model = Chain((name, name), (8, 6), seed=2).eval()
    res = _prune(model, 0.5)
    assert all(_stage_group(res, i).prunable for i in range(2))
    assert_equivalent(model, res, INPUTS)
