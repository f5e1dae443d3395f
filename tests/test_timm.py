"""timm models in the suite: a CNN, a ViT, a convolution/attention hybrid and a weight-standardised network,
each pruned with l1 and checked in float64 against the masked original.

timm's ``test_*`` models are its own small configurations of the real architectures (same blocks, fewer and
narrower layers), built with random weights: nothing is downloaded. ``benchmarks/zoo.py --suite
timm-families`` runs the same check on the smallest model of every timm family.
"""
from __future__ import annotations

import pytest
import timm
import torch

import fxprune
from fxprune.testing import assert_equivalent


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7).eval()
    with torch.no_grad():  # timm zero-initialises some heads and layer scales: make every branch count
        for p in model.parameters():
            if p.dim() >= 1 and bool((p == p.reshape(-1)[0]).all()) and p.numel() > 1:
                p.normal_(0, 0.1)
    return model


def _inputs(model: torch.nn.Module) -> tuple[torch.Tensor]:
    size = (model.pretrained_cfg.get("input_size", (3, 64, 64))[-1] if model.pretrained_cfg.get("fixed_input_size")
            else 64)
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_coatnet", "test_efficientnet"])
def test_timm_model_prunes_exactly(name: str) -> None:
    model = _model(name)
    x = _inputs(model)
    res = fxprune.prune(model, x, "l1", 0.5)
    assert res.plan, "something was pruned"
    assert res.cost_after.params < res.cost_before.params
    assert_equivalent(model, res, x)


def test_weight_standardised_net_is_exact_and_its_inexact_groups_are_needed() -> None:
    """NF-Net's ScaledStdConv2d standardises each filter over its input channels (batch norm in training
    mode on the weight): those input channels are frozen as inexact, the rest prunes exactly; pruning the
    frozen ones anyway really changes the output."""
    model = _model("test_nfnet")
    x = _inputs(model)
    res = fxprune.prune(model, x, "l1", 0.5)
    refused = [g for g in res.groups if g.inexact is not None]
    assert refused and all(not g.prunable for g in refused)
    assert any("batch-norm statistics" in g.inexact for g in refused)
    assert res.plan
    assert_equivalent(model, res, x)

    anyway = fxprune.prune(model, x, "l1", 0.5, allow_inexact=True)
    assert any(g.prunable and anyway.removed[g.channels].any() for g in anyway.groups if g.inexact is not None)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):  # values, not a shape
        assert_equivalent(model, anyway, x)
