"""The compacted module is GPU-ready: other devices, half precision, channels_last, torch.compile.

On this CPU-only CI the meta device stands in for "another device" (any device literal left in the
graph fails there); the CUDA checks run where a GPU is present.
"""
import copy

import pytest
import torch
import torchvision

import fxprune
import fxprune.testing

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, fxprune.prune(model, (x,), "l1", 0.5)


@pytest.fixture(scope="module")
def llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 100, (2, 8))
    return model, x, fxprune.prune(model, (x,), "l1", 0.5)


def test_no_device_literals_left(llama):
    _, x, res = llama
    for node in res.module.graph.nodes:
        values = list(node.args) + list(node.kwargs.values())
        assert not any(isinstance(v, torch.device) for v in values), node.format_node()
    moved = copy.deepcopy(res.module).to("meta")
    out = moved(x.to("meta"))
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 8, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(resnet, dtype):
    """The pruned model in half precision computes the masked ORIGINAL (float32), to half precision's accuracy."""
    model, x, res = resnet
    half = copy.deepcopy(res.module).to(dtype)
    with torch.no_grad():
        ref, got = fxprune.testing.masked_model(model, res.plan, res.groups)(x), half(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


class WeightDtypeCast(torch.nn.Module):
    """``pos.to(self.pos_proj.weight.dtype)`` (timm's PositionalEncodingFourier) is traced as a float32
    literal; the float32 position math before it is deliberate."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.pos_proj = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(1, 8, 1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.pre(x))
        grid = torch.linspace(0, 1, x.shape[-1], dtype=torch.float32, device=x.device)
        pos = grid.expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return self.head(torch.relu(h + self.pos_proj(pos.to(self.pos_proj.weight.dtype))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_weight_dtype_literals_follow_the_module(dtype):
    torch.manual_seed(0)
    model = WeightDtypeCast().eval()
    x = torch.randn(2, 3, 6, 6)
    res = fxprune.prune(model, (x,), "l1", 0.5, target="graph")  # linspace(x.shape[-1]) fixes the width there
    assert res.removed.any()
    cast = copy.deepcopy(res.module).to(dtype)
    with torch.no_grad():
        got = cast(x.to(dtype))
    assert got.dtype == dtype
    if dtype == torch.float64:
        fxprune.testing.assert_equivalent(model, res, (x,))  # casts both to float64
    # the deliberate float32 literal of the position math is kept
    assert any(v is torch.float32 for n in res.module.graph.nodes for v in n.kwargs.values())


def test_channels_last(resnet):
    _, x, res = resnet
    cl = copy.deepcopy(res.module).to(memory_format=torch.channels_last)
    assert cl.get_parameter("conv1.weight").is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), res.module(x), rtol=1e-4, atol=1e-4)


def test_torch_compile():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.prune(model, (x,), "l1", 0.5)
    compiled = torch.compile(res.module)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), res.module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_cuda_half_channels_last_compile(resnet, llama):
    _, x, res = resnet
    gpu = copy.deepcopy(res.module).cuda().half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = gpu(x.cuda().half().to(memory_format=torch.channels_last)).float().cpu()
        ref = res.module(x)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    _, ids, lres = llama
    lgpu = copy.deepcopy(lres.module).cuda()
    with torch.no_grad():
        torch.testing.assert_close(lgpu(ids.cuda()).logits.cpu(), lres.module(ids).logits, rtol=1e-3, atol=1e-3)
        compiled = torch.compile(copy.deepcopy(res.module).cuda())
        torch.testing.assert_close(compiled(x.cuda()).cpu(), ref, rtol=1e-3, atol=1e-3)
