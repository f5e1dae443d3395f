"""Channel masks in the traced graph (fxprune.masking), in float64: all ones is the original bit for bit, a
0/1 mask is exactly the compacted model, soft masks fold exactly, per-sample masks act per sample, the
prenorm placement's constant is carried into the consumers (exact away from borders), and the masked
graph trains with the engine (masks in their own optimiser, jointly or alternating)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_coupling import (
    GN,
    IMG,
    MHA,
    BN1d,
    Concat,
    Conv1dNet,
    Deconv,
    Gated,
    Grouped,
    PReLUNet,
    Residual,
    Shuffle,
    Split,
    ViewHead,
    randomize_bn,
)
from torch import nn

import fxprune
from fxprune.masking import Fixed, Scale, fold, insert_masks
from fxprune.recovery.engine import Hook, MaskTraining, train
from fxprune.testing import _cast, _plain, _run, _tensors, masked_model
from fxprune.tracing.tracer import normalize_inputs

F64 = torch.float64


class SigmoidPath(nn.Module):
    """A path that does not keep zeros (sigmoid(0) = 0.5): only zeroing the consumer's columns is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 8 * 8, 10), nn.Linear(10, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.sigmoid(self.b2(self.c2(x))).flatten(1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


CASES = {
    "sigmoid_path": (lambda: SigmoidPath(), IMG),
    "residual": (lambda: Residual(), IMG),
    "concat": (lambda: Concat(), IMG),
    "split": (lambda: Split(), IMG),
    "grouped": (lambda: Grouped(), IMG),
    "shuffle": (lambda: Shuffle(), IMG),
    "gated": (lambda: Gated(), IMG),
    "prelu": (lambda: PReLUNet(), IMG),
    "view_head": (lambda: ViewHead(True), (torch.randn(2, 3, 16, 16),)),
    "groupnorm": (lambda: GN(), IMG),
    "bn1d": (lambda: BN1d(), (torch.randn(4, 10), torch.randn(4, 4, 7))),
    "heads": (lambda: MHA(), (torch.randn(2, 5, 32),)),
    "gqa": (lambda: MHA(heads=4, kv_heads=2, mode="enable_gqa"), (torch.randn(2, 5, 32),)),
    "deconv": (lambda: Deconv(), IMG),
    "conv1d": (lambda: Conv1dNet(), (torch.randn(2, 4, 20),)),
}


def _flat(module: nn.Module, inputs) -> list[torch.Tensor]:
    return [t for t in _tensors(_plain(_run(module, *normalize_inputs(inputs)))) if t.is_floating_point()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-9) -> None:
    assert len(a) == len(b)
    scale = max([1.0] + [float(t.abs().max()) for t in b if t.numel()])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale)


def _set(masked, values: dict[int, np.ndarray]) -> None:
    with torch.no_grad():
        for gid, v in values.items():
            masked.masks[gid].weight.copy_(torch.as_tensor(v))


def _random_values(masked, rng: np.random.Generator, soft: bool) -> dict[int, np.ndarray]:
    out = {}
    for gid, sites in masked.sites.items():
        v = rng.uniform(0.3, 1.7, sites.channels) if soft else np.ones(sites.channels)
        v[rng.random(sites.channels) < 0.4] = 0.0
        v[rng.integers(sites.channels)] = 1.0  # every group keeps a channel
        out[gid] = v
    return out


def check_contract(model: nn.Module, inputs, seed: int = 0, tol: float = 1e-9) -> None:
    """The three contracts of the masks on one model, in float64."""
    model = model.to(F64).eval()
    inputs = _cast(inputs, F64)
    gm = fxprune.trace(model, inputs)
    groups = fxprune.analyze(gm)
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)))
    assert masked.masks, "no group got a mask"
    module = masked.module.eval()
    # all ones: the original, bit for bit
    for got, want in zip(_flat(module, inputs), _flat(model, inputs)):
        assert torch.equal(got, want)
    rng = np.random.default_rng(seed)
    # a 0/1 mask: exactly the compacted model (and the masked original)
    values = _random_values(masked, rng, soft=False)
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    for gid, v in values.items():
        removed[groups[gid].channels[v == 0]] = True
    out = fxprune.compact(gm, groups, removed, model)
    _set(masked, {gid: (~out.removed[groups[gid].channels]).astype(np.float64) for gid in values})
    got = _flat(module, inputs)
    _close(got, _flat(out.module.to(F64).eval(), inputs), tol)
    _close(got, _flat(masked_model(model, out.plan, groups), inputs), tol)
    # soft masks with zeros: folding gives the same outputs, and compaction drops the zeros
    values = _random_values(masked, rng, soft=True)
    _set(masked, values)
    folded = fold(masked)
    assert folded.removed.sum() == sum(int((v == 0).sum()) for v in values.values())
    out = fxprune.compact(gm, groups, folded.removed, model, weights=folded.weights)
    assert (out.removed == folded.removed).all()
    _close(_flat(module, inputs), _flat(out.module.to(F64).eval(), inputs), tol)
    assert not any("fxprune_mask" in name for name, _ in out.module.named_modules())


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_contract_on_coupling_cases(name: str, one_thread) -> None:
    make, inputs = CASES[name]
    check_contract(randomize_bn(make()), inputs)


def test_mask_contract_on_torchvision() -> None:
    import torchvision as tv
    x = (torch.randn(1, 3, 32, 32),)
    check_contract(randomize_bn(tv.models.resnet18(num_classes=10)), x)
    check_contract(randomize_bn(tv.models.mobilenet_v3_small(num_classes=10)), x)  # depthwise, SE, hardswish


def test_mask_contract_on_timm() -> None:
    import timm
    check_contract(timm.create_model("test_vit", pretrained=False), (torch.randn(1, 3, 160, 160),))


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "gpt2", "vit", "t5"])
def test_mask_contract_on_hugging_face(name: str) -> None:
    import test_transformers as hf
    import transformers  # noqa: F401  (the test extra)

    model, inputs, _ = getattr(hf, f"_{name}")()
    check_contract(model, inputs)


def test_masks_on_a_chosen_subset_and_where_they_act() -> None:
    model = randomize_bn(Residual()).eval()
    gm = fxprune.trace(model, IMG)
    groups = fxprune.analyze(gm)
    stream = next(g for g in groups.prunable if len(g.layers("producer")) > 1)
    inner = [g.id for g in groups.prunable if g.id != stream.id]
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)), only=inner)
    assert sorted(masked.masks) == sorted(inner)
    for gid in inner:  # conv -> BatchNorm: masked after the BatchNorm, folded into its affine parameters
        sites = masked.sites[gid]
        assert sites.activations and all(s.node.startswith("batch_norm") for s in sites.activations)
        assert {s.node.rsplit(".", 1)[1] for s in sites.folds} == {"weight", "bias"}
    full = insert_masks(gm, groups, lambda g: Scale(len(g)))
    assert len(full.sites[stream.id].activations) == 3  # the stream's three writers (stem, a2, b2)


class PerSample(nn.Module):
    per_sample = True

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", values)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return self.value


def test_per_sample_masks_act_per_sample() -> None:
    model = randomize_bn(Residual()).to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    gm = fxprune.trace(model, (x,), dynamic_shapes=False)  # the masks below are for a batch of 2: a static graph
    groups = fxprune.analyze(gm)
    target = next(g for g in groups.prunable if len(g.layers("producer")) == 1)
    values = torch.ones(2, len(target), dtype=F64)
    mask = PerSample(values)
    masked = insert_masks(gm, groups, lambda g: mask, only=[target.id])
    live = masked.masks[target.id]
    assert torch.equal(masked.module(x), model(x))
    assert live.seen[-1][0] == 2  # it read the activation it masks (batch first)
    assert not masked.sites[target.id].weights  # a per-sample zero zeroes no shared weight
    live.value[0, :3] = 0.0  # sample 0 loses three channels, sample 1 keeps everything
    removed = np.zeros(len(groups.comp_group), dtype=bool)
    removed[target.channels[:3]] = True
    out = fxprune.compact(gm, groups, removed, model)
    got = masked.module(x)
    torch.testing.assert_close(got[0], out.module.to(F64)(x)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], model(x)[1], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="per-sample"):
        masked.values()


class FeatureMap(nn.Module):
    """conv-BN-ReLU twice, then a 1x1 conv with a bias: the output keeps its spatial layout."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.c3(torch.relu(self.b2(self.c2(x))))


def test_prenorm_masks_carry_the_constant_into_consumers() -> None:
    model = randomize_bn(FeatureMap()).to(F64).eval()
    with torch.no_grad():  # constants a ReLU lets through
        model.b1.bias.add_(1.0)
        model.b2.bias.add_(1.0)
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    gm = fxprune.trace(model, (x,))
    groups = fxprune.analyze(gm)
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)), placement="prenorm")
    assert len(masked.masks) == 2
    for sites in masked.sites.values():  # before the BatchNorm, on the conv's output, folded into its rows
        assert [s.node for s in sites.activations][0].startswith("conv2d") and not sites.weights
    values = {gid: np.array([0.0, 0.5, 1.0, 0.0, 1.5, 1.0, 0.0, 0.8]) for gid in masked.masks}
    _set(masked, values)
    folded = fold(masked)
    assert folded.removed.sum() == 6
    assert not torch.equal(folded.weights["b2.running_mean"], model.b2.running_mean)  # c2 has no bias
    assert not torch.equal(folded.weights["c3.bias"], model.c3.bias)
    out = fxprune.compact(gm, groups, folded.removed, model, weights=folded.weights)
    want, got = masked.module.eval()(x), out.module.to(F64).eval()(x)
    torch.testing.assert_close(got[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2], rtol=1e-10, atol=1e-10)
    assert (got - want).abs().max() > 1e-6  # the documented border effect of zero padding


def test_masked_graph_trains_and_switches_batchnorm() -> None:
    model = randomize_bn(Residual()).eval()
    gm = fxprune.trace(model, IMG)
    groups = fxprune.analyze(gm)
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)))
    module = masked.module
    bn = module.get_submodule("stem.1")
    before = bn.running_mean.clone()
    module.eval()(IMG[0])
    assert torch.equal(bn.running_mean, before)
    gid = next(iter(masked.masks))
    with torch.no_grad():
        masked.masks[gid].weight.zero_()
    module.train()
    module(IMG[0]).square().sum().backward()
    assert not torch.equal(bn.running_mean, before)  # batch statistics in train mode
    assert masked.masks[gid].weight.grad.abs().sum() > 0  # a gate at zero still gets gradient in training
    assert torch.equal(model.stem[1].running_mean, groups.gm.get_buffer("stem.1.running_mean"))  # user's untouched


def _loader(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


class Counting:
    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


class Optimisers(Hook):
    def __init__(self):
        self.phases = []

    def loss(self, state, output, target):
        self.phases.append(state.phase)  # which step this forward serves
        return None

    def after_step(self, state):
        self.weights = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
        self.masks = {id(p) for g in state.mask_optimizer.param_groups for p in g["params"]}
        self.mask_lr = state.mask_optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("alternate", [False, True])
def test_engine_trains_masks_in_their_own_optimiser(alternate: bool) -> None:
    model = Residual()
    gm = fxprune.trace(model.eval(), IMG)
    masked = insert_masks(gm, fxprune.analyze(gm), lambda g: Scale(len(g)))
    masks, weights = masked.mask_parameters(), masked.weight_parameters()
    mask0, weight0 = [p.detach().clone() for p in masks], [p.detach().clone() for p in weights]
    other = Counting(_loader(2, seed=1))
    seen = Optimisers()
    train(masked.module, _loader(3, seed=0), epochs=1, lr=0.05, hooks=[seen],
          masks=MaskTraining(masks, lr=0.2, loader=other if alternate else None))
    assert seen.masks == {id(p) for p in masks} and not seen.masks & seen.weights
    assert seen.weights == {id(p) for p in weights} and seen.mask_lr == 0.2
    assert any(not torch.equal(a, p) for a, p in zip(mask0, masks))
    assert any(not torch.equal(a, p) for a, p in zip(weight0, weights))
    assert other.drawn == (3 if alternate else 0)  # one mask step per weight step, the loader cycled
    assert seen.phases == (["weights", "masks"] * 3 if alternate else ["joint"] * 3)


def test_engine_trains_masks_alone_and_refuses_mixing() -> None:
    model = Residual()
    gm = fxprune.trace(model.eval(), IMG)
    masked = insert_masks(gm, fxprune.analyze(gm), lambda g: Scale(len(g)))
    weights = [p.detach().clone() for p in masked.weight_parameters()]
    train(masked.module, _loader(2, seed=0), epochs=1, parameters=[], masks=MaskTraining(masked.mask_parameters()))
    assert all(torch.equal(a, p) for a, p in zip(weights, masked.weight_parameters()))
    assert any((p != 1).any() for p in masked.mask_parameters())
    with pytest.raises(ValueError, match="mask parameter"):
        train(masked.module, _loader(1, seed=0), parameters=list(masked.module.parameters()),
              masks=MaskTraining(masked.mask_parameters()))


def test_fixed_masks_fold_and_thresholds() -> None:
    model = randomize_bn(Residual()).to(F64).eval()
    gm = fxprune.trace(model, _cast(IMG, F64))
    groups = fxprune.analyze(gm)
    inner = next(g for g in groups.prunable if len(g.layers("producer")) == 1)
    values = torch.tensor([1e-4] * 4 + [1.0] * (len(inner) - 4), dtype=F64)
    masked = insert_masks(gm, groups, lambda g: Fixed(values), only=[inner.id])
    assert fold(masked).removed.sum() == 0
    folded = fold(masked, threshold=1e-3)
    assert folded.removed.sum() == 4 and (folded.values[inner.id][:4] == 0).all()
    with pytest.raises(ValueError, match="channels"):
        fold(masked, {inner.id: np.ones(3)})
    assert copy.deepcopy(masked.module) is not None  # the masked module is an ordinary module


class Depth(nn.Module):
    """A learned scalar per residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self) -> torch.Tensor:
        return self.weight


@pytest.mark.parametrize("name", ["resnet18", "llama"])
def test_depth_and_channel_masks_in_one_graph_fold_into_weights_and_block_removal(name: str) -> None:
    from fxprune.edits.blocks import residual_blocks

    if name == "resnet18":
        import torchvision as tv
        model, inputs = randomize_bn(tv.models.resnet18(num_classes=10)), (torch.randn(1, 3, 32, 32),)
    else:
        import test_transformers as hf
        import transformers  # noqa: F401  (the test extra)

        model, inputs, _ = hf._llama_gqa()
    model, inputs = model.to(F64).eval(), _cast(inputs, F64)
    gm = fxprune.trace(model, inputs)
    groups = fxprune.analyze(gm)
    blocks = residual_blocks(gm)
    assert len(blocks) >= 4
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)), blocks=blocks, depth=lambda b: Depth())
    assert len(masked.mask_parameters()) == len(masked.masks) + len(blocks)
    module = masked.module.eval()
    for got, want in zip(_flat(module, inputs), _flat(model, inputs)):
        assert torch.equal(got, want)
    rng = np.random.default_rng(1)
    _set(masked, _random_values(masked, rng, soft=True))
    with torch.no_grad():
        for i, m in enumerate(masked.depth.values()):
            m.weight.fill_([0.0, 1.0, 0.5][i % 3])
    folded = fold(masked)
    assert sum(v == 0 for v in folded.depth.values()) == (len(blocks) + 2) // 3
    out = fxprune.compact(gm, groups, folded.removed, model, weights=folded.weights, edits=folded.edits)
    _close(_flat(module, inputs), _flat(out.module.to(F64).eval(), inputs))
    removed_block = blocks[0]
    assert not any(p in dict(out.module.named_parameters()) for p in removed_block.params)
    assert not any("fxprune" in n for n, _ in out.module.named_modules())


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_rank_mask_on_a_factorised_layer_compacts_to_a_smaller_rank() -> None:
    """FLOP's mask: a diagonal between the two factors of U diag(z) V is a channel mask on the rank group."""
    from fxprune.edits.factorize import factorized_graph

    model = TwoLayer().to(F64).eval()
    x = torch.randn(5, 12, dtype=F64)
    gm, groups = factorized_graph(model, (x,), {"fc2": 6})
    rank = next(g for g in groups.prunable if any(p.name == "fc2.weight_v" and p.role == "producer" for p in g.params))
    masked = insert_masks(gm, groups, lambda g: Scale(len(g)), only=[rank.id])
    assert [f.node for s in masked.sites[rank.id].activations for f in s.folds] == ["fc2.weight_v"]
    z = np.array([1.0, 0.0, 0.75, 0.0, 1.25, 1.0])  # exact in the mask's float32
    _set(masked, {rank.id: z})
    folded = fold(masked)
    out = fxprune.compact(gm, groups, folded.removed, gm, weights=folded.weights)
    assert out.module.get_parameter("fc2.weight_v").shape == (4, 24)
    assert out.module.get_parameter("fc2.weight_u").shape == (6, 4)
    torch.testing.assert_close(out.module(x), masked.module.eval()(x), rtol=1e-10, atol=1e-10)
    u, v = gm.get_parameter("fc2.weight_u"), gm.get_parameter("fc2.weight_v")
    want = torch.nn.functional.linear(torch.relu(model.fc1(x)), u @ torch.diag(torch.as_tensor(z)) @ v, model.fc2.bias)
    torch.testing.assert_close(out.module(x), want, rtol=1e-10, atol=1e-10)


def test_prenorm_fold_works_with_buffer_masks() -> None:
    """A mask whose value is a buffer (Fixed) folds under the prenorm placement too (the constants are read
    on a copy whose masks are swapped for the values)."""
    model = randomize_bn(FeatureMap()).to(F64).eval()
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    gm = fxprune.trace(model, (x,))
    groups = fxprune.analyze(gm)
    values = torch.tensor([0.0, 0.5, 1.0, 0.0, 1.5, 1.0, 0.0, 0.8])
    masked = insert_masks(gm, groups, lambda g: Fixed(values), placement="prenorm")
    folded = fold(masked)
    assert folded.removed.sum() == 6
    out = fxprune.compact(gm, groups, folded.removed, model, weights=folded.weights)
    want, got = masked.module.eval()(x), out.module.to(F64).eval()(x)
    torch.testing.assert_close(got[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("whole", [True, False])
def test_transform_mask_keeps_the_activation_layout(whole: bool) -> None:
    """A transform mask's (C, C) map leaves a contiguous activation contiguous: a channels-last result would
    turn every later convolution channels-last, where oneDNN's 1x1 strided backward with few input channels
    writes past its workspace (hangs and wrong gradients on CPU; uxlfoundation/oneDNN#6035)."""
    from fxprune.masking.apply import ApplyTransform

    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    positions = torch.arange(6) if whole else torch.tensor([1, 3, 4])
    value = torch.randn(len(positions), len(positions), dtype=torch.float64)
    y = ApplyTransform(1, positions, 6)(x, value)
    assert y.is_contiguous()
    want = x.clone()
    want[:, positions] = torch.einsum("nchw,cd->ndhw", x[:, positions], value)
    torch.testing.assert_close(y, want)
