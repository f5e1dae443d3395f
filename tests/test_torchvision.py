"""Masked-vs-compacted equivalence on torchvision models (small inputs; the full zoo is benchmarks/zoo.py)."""
import pytest
import torch
import torchvision

import fxprune
from fxprune.testing import assert_equivalent

# Depthwise convolutions have no fast float64 kernel on CPU (~40x slower): check these in float32,
# with a tolerance relative to the output's magnitude.
FLOAT32 = {"mobilenet_v2", "efficientnet_b0", "convnext_tiny", "mnasnet0_5", "shufflenet_v2_x0_5", "regnet_x_400mf",
           "swin_t"}

MODELS = {
    "resnet18": 64, "mobilenet_v2": 64, "shufflenet_v2_x0_5": 64, "efficientnet_b0": 64,
    "resnext50_32x4d": 64, "googlenet": 64, "regnet_x_400mf": 64, "squeezenet1_0": 64, "convnext_tiny": 64,
    "mnasnet0_5": 64, "vgg11_bn": 64, "swin_t": 64, "densenet121": 64,
}


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_l1_half_is_exact_and_smaller(name):
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    x = torch.randn(2, 3, MODELS[name], MODELS[name])
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert res.plan, "something must be pruned"
    assert_equivalent(model, res, (x,), dtype=torch.float32 if name in FLOAT32 else torch.float64)
    assert _params(res.module) < 0.8 * _params(model)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_compaction_adds_no_op(name):
    """The compacted graph runs exactly the traced graph's ops, no slice, copy or reshape added: the only
    difference is that batch norm and dropout become modules again (so that .train()/.eval() switch them)."""
    from collections import Counter

    model = getattr(torchvision.models, name)().eval()
    x = (torch.randn(1, 3, 64, 64),)
    traced, res = fxprune.trace(model, x), fxprune.prune(model, x, "l1", 0.5)
    ops = lambda gm: Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")  # noqa: E731
    as_modules = Counter({"aten.batch_norm.default": 0, "aten.dropout.default": 0})
    before, after = ops(traced), ops(res.module)
    for op in as_modules:
        as_modules[op] = before.pop(op, 0)
    assert after == before
    kinds = Counter(type(res.module.get_submodule(n.target)).__name__ for n in res.module.graph.nodes
                    if n.op == "call_module")
    assert kinds["BatchNorm2d"] == as_modules["aten.batch_norm.default"]
    assert kinds["Dropout"] == as_modules["aten.dropout.default"]
