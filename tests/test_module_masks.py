"""Channel masks on the user's own modules (fxprune.masking.on_modules), for models compacted by resizing their
modules: in float64, all ones is the original, a 0/1 mask (eval) is exactly the resized model, soft masks fold
exactly, the copy keeps the user's class and Python control flow, trains, and the user's model is left alone."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from test_modules_target import DetNet, _detnet
from torch import nn

import fxprune
from fxprune.analysis import analyze
from fxprune.analysis.reindex import Reindexing
from fxprune.compaction.modules import freeze_code_sizes, resize_modules
from fxprune.compaction.plan import add_aliases, build_plan
from fxprune.masking import Fixed, Scale, fold
from fxprune.masking.on_modules import insert_module_masks
from fxprune.masking.sites import MASKS
from fxprune.passes.registry import PassError
from fxprune.recovery.engine import MaskTraining, train
from fxprune.testing import _close_per_output, _plain, assert_equivalent
from fxprune.tracing.record import record_trace

F64 = torch.float64


def _analysed(model: nn.Module, x: torch.Tensor):
    gm = record_trace(model, (x,), {}, analysis=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = analyze(gm)
    freeze_code_sizes(gm, groups, model)
    return gm, groups


def _values(groups, seed: int = 0) -> dict[int, np.ndarray]:
    """A 0/1 value per channel: about a third of each group's channels at 0, at least one kept."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups.prunable:
        v = (rng.random(len(g)) > 0.35).astype(np.float64)
        v[0] = 1.0
        out[g.id] = v
    return out


def test_all_ones_is_the_original_and_a_zero_is_the_resized_model() -> None:
    model = _detnet().to(F64)
    x = torch.rand(1, 3, 32, 32, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, groups = _analysed(model, x)
    masked = insert_module_masks(model, gm, groups, lambda g: Scale(len(g)))
    assert type(masked.module).__name__ == "DetNet" and isinstance(masked.module, DetNet)
    assert set(masked.masks) == {g.id for g in groups.prunable} and not masked.skipped
    masked.module.eval()
    _close_per_output(_plain(masked.module(x)), _plain(model(x)), 1e-12)
    values = _values(groups)
    folded = fold(masked, values)  # the values folded into the copy's weights
    holder = next(m for name, m in masked.module.named_modules() if name.endswith(MASKS))
    for gid, v in values.items():  # and set as its masks (the contract: a 0 in eval is the pruned channel)
        setattr(holder, f"g{gid}", Fixed(torch.as_tensor(v)))
    removed = folded.removed
    assert removed.sum() > 0
    plan = add_aliases(build_plan(gm, Reindexing(groups, removed)), model)
    resized = resize_modules(model, plan, folded.weights).eval()
    for size in [(1, 3, 32, 32), (1, 3, 48, 40)]:  # another size: its own boxes, its own loop
        xs = torch.rand(*size, dtype=F64)
        _close_per_output(_plain(resized(xs)), _plain(masked.module(xs)), 1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in model.state_dict())


def test_soft_masks_fold_exactly_and_names_stay_the_users() -> None:
    model = _detnet().to(F64)
    x = torch.rand(1, 3, 32, 32, dtype=F64)
    gm, groups = _analysed(model, x)
    rng = np.random.default_rng(1)
    values = {g.id: torch.as_tensor(rng.uniform(0.2, 1.5, len(g))) for g in groups.prunable}
    masked = insert_module_masks(model, gm, groups, lambda g: Fixed(values[g.id]))
    masked.module.eval()
    state = masked.state()
    assert set(state) == set(model.state_dict())  # the user's names, the masks left out
    folded = fold(masked)
    assert not folded.removed.any()
    plain = copy.deepcopy(model).eval()
    plain.load_state_dict(folded.weights)
    _close_per_output(_plain(plain(x)), _plain(masked.module(x)), 1e-9)


def test_module_masks_train_in_their_own_optimiser_and_take_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3))
    x = torch.rand(4, 3, 8, 8)
    gm, groups = _analysed(model.eval(), x)
    new = {"0.weight": torch.randn_like(model[0].weight)}
    masked = insert_module_masks(model, gm, groups, lambda g: Scale(len(g)), weights=new, training=True)
    assert torch.equal(masked.state()["0.weight"], new["0.weight"])
    assert not torch.equal(model[0].weight, new["0.weight"])
    masks, weights = masked.mask_parameters(), masked.weight_parameters()
    assert masks and not {id(p) for p in masks} & {id(p) for p in weights}
    start = [p.detach().clone() for p in masks]
    loader = [(torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    train(masked.module, loader, epochs=1, lr=0.05, parameters=weights, masks=MaskTraining(masks, lr=0.2))
    assert any(not torch.equal(a, p) for a, p in zip(start, masks))
    assert masked.module.training and not any("parametrizations" in k for k in model.state_dict())


def _feature_loss(out, y):
    return nn.functional.cross_entropy(out["features"][:, :3] * 4, y)


def _loader(n: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 3, 32, 32, generator=g), torch.randint(0, 3, (1,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["slimming", "scratch", "thinet", "lasso"])
def test_learned_passes_prune_a_model_without_a_graph_exactly(method: str) -> None:
    model = _detnet()
    x = torch.rand(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"epochs": 2} if method in ("slimming", "scratch") else {"batches": 2}
        result = fxprune.prune(model, (x,), method, 0.5, train_loader=_loader(), loss=_feature_loss,
                               options=options)
    assert result.compaction["target"] == "modules" and type(result.module) is DetNet
    assert result.weights  # the trained, gated or reconstructed network is what was resized
    assert result.cost_after.macs < 0.75 * result.cost_before.macs
    assert_equivalent(model, result, (x,))
    assert_equivalent(model, result, (torch.rand(1, 3, 48, 40),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in result.module.state_dict())


@pytest.mark.parametrize(("method", "why"), [("anp", "per sample"), ("tas", "edits of the traced graph"),
                                             ("sanp", "compiled from the traced graph"),
                                             ("flop", "edits of the traced graph")])
def test_passes_that_need_the_graph_say_why_on_the_modules_target(method: str, why: str) -> None:
    with pytest.raises(PassError, match=why), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.prune(_detnet(), (torch.rand(1, 3, 32, 32),), method, 0.5, train_loader=_loader(),
                      loss=_feature_loss)


def test_scratch_refuses_a_wider_copy_on_the_modules_target() -> None:
    with pytest.raises(PassError, match="expand > 1 traces a wider copy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.prune(_detnet(), (torch.rand(1, 3, 32, 32),), "scratch", 0.5, train_loader=_loader(),
                      loss=_feature_loss, options={"expand": 1.25})
