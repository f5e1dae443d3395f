"""scratch and slimming on models without BatchNorm (a ViT, a LLaMA-shaped model): their gates / scales are
masks in the traced graph (fxprune.masking) on attention heads and MLP channels; the budget is met, the
compacted model is exact against the masked trained model, and no mask is left in the output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import fxprune
from fxprune.annotations import MASKS
from fxprune.testing import assert_equivalent


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=4)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    loss = lambda out, y: F.cross_entropy(out.logits, y)  # noqa: E731
    return transformers.ViTForImageClassification(cfg).eval(), (data[0][0][:2],), data, loss


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=128, use_cache=False)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(0, 100, (8, 12), generator=g)
        data.append((ids, ids))
    loss = lambda out, y: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())  # noqa: E731
    return transformers.LlamaForCausalLM(cfg).eval(), (data[0][0][:2],), data, loss


MODELS = {"vit": _vit, "llama": _llama}


def _no_masks_left(module: torch.nn.Module) -> None:
    assert not any("fxprune" in name for name, _ in module.named_modules())
    assert not any("fxprune" in name for name in module.state_dict())


def _learned_groups(res: fxprune.PruneResult, name: str) -> dict[int, np.ndarray]:
    return {gid: v for n in res.groups.gm.graph.nodes if n.meta.get(MASKS) for gid, v in n.meta[MASKS][name].items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_scratch_gates_heads_and_mlp_channels_and_meets_a_macs_target(name: str) -> None:
    model, inputs, data, loss = MODELS[name]()
    res = fxprune.prune(model, inputs, "scratch", budget=fxprune.Budget(target_macs=0.5),
                        options={"epochs": 1, "lr": 0.05},
                        train_loader=data, loss=loss)
    kept = res.cost_after.macs / res.cost_before.macs
    assert abs(kept - 0.5) <= 0.02, kept
    gated = _learned_groups(res, "scratch")
    assert set(gated) == {g.id for g in res.groups.prunable}  # heads and MLP channels: no residual stream here
    assert all(0 <= v.min() and v.max() <= 1 for v in gated.values())
    assert any((v < 1).any() for v in gated.values())
    assert_equivalent(model, res, inputs)
    _no_masks_left(res.module)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slimming_learns_scales_where_no_batchnorm_is(name: str) -> None:
    model, inputs, data, loss = MODELS[name]()
    res = fxprune.prune(model, inputs, "slimming", 0.4, options={"epochs": 6, "lr": 0.05},
                        train_loader=data, loss=loss)
    hist = res.report["histograms"]["gamma"]
    channels = sum(len(g) for g in res.groups.prunable)
    assert len(hist["before"]) == len(hist["after"]) == channels  # one learned scale per prunable channel
    assert res.report["sparsity"]["selected_below_threshold"]  # the adaptive schedule zeroed what goes
    assert res.removed.sum() > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_equivalent(model, res, inputs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the removed channels' scales are zero, so the compacted model equals the trained network itself
    from fxprune.testing import with_weights
    trained = with_weights(model, res.weights).eval()
    with torch.no_grad():
        want, got = trained(*inputs).logits, res.module(*inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _no_masks_left(res.module)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slimming_ranks_untrained_scales_by_their_filters(name: str) -> None:
    """The learned scales all start equal, so at the first selection the producing filters rank the channels
    (the score ``train=false`` gives), not the order the channels come in: a tie there let the adaptive
    schedule zero whichever channels came first (3 of the 4 heads of a ViT's first layers)."""
    model, inputs, data, loss = MODELS[name]()
    start = fxprune.prune(model, inputs, "slimming", 0.4, options={"epochs": 0}, train_loader=data, loss=loss)
    given = fxprune.prune(model, inputs, "slimming", 0.4, options={"train": False}, train_loader=data, loss=loss)
    assert set(start.scores) == set(given.scores)
    for gid, scores in given.scores.items():
        np.testing.assert_allclose(start.scores[gid], scores, rtol=1e-6)
    assert all(np.ptp(v) > 0 for v in start.scores.values() if len(v) > 1)
