"""Residual blocks (fxprune.edits.blocks): which regions x + f(x) are found, and that removing them, masking them
by depth and folding those masks equal the eager model with each branch's output scaled (forward hooks on an
eager float64 copy: an independent reference), alone and together with channel pruning."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import fxprune
from fxprune.cli import app
from fxprune.edits.blocks import Block, depth_masks, remove_blocks, remove_where, residual_blocks
from fxprune.measure import count_macs
from fxprune.testing import masked_model
from fxprune.tracing.tracer import normalize_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

# -- helpers ---------------------------------------------------------------------------------------------------


class Const(nn.Module):
    """A depth mask with a fixed value (float64, so that 0.3 means the same number as in the reference)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.tensor(value, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.d


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


def _out(y: Any) -> torch.Tensor:
    """The model's main output tensor (logits / last hidden state)."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "keys"):
        return y[next(iter(y.keys()))]
    return y[0]


def _run(module: nn.Module, inputs: Any) -> torch.Tensor:
    args, kwargs = normalize_inputs(_double(inputs))
    with torch.no_grad():
        return _out(copy.deepcopy(module).double().eval()(*args, **kwargs))


def _scaled(out: Any, factor: float) -> Any:
    if isinstance(out, tuple):  # attention modules return (output, weights)
        return (out[0] * factor,) + tuple(out[1:])
    return out * factor


def _reference(model: nn.Module, inputs: Any, hooked: Mapping[str, str], factors: Mapping[str, float]) -> torch.Tensor:
    """The eager model in float64 with the output of each branch's last module scaled: ``hooked`` maps a block
    name to that module's path, ``factors`` a block name to its factor."""
    eager = copy.deepcopy(model).double().eval()
    for name, factor in factors.items():
        eager.get_submodule(hooked[name]).register_forward_hook(lambda m, i, o, f=factor: _scaled(o, f))
    return _run(eager, inputs)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float64 round-off (relative to the largest output; LLaMA's RMSNorm casts to float32 in eager
    mode, where the graph follows the module's dtype)."""
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(ref.abs().max())))


def _changed(ref: torch.Tensor, full: torch.Tensor) -> bool:
    """The reference moved well beyond round-off: a check against it is not vacuous."""
    return float((ref - full).abs().max()) > 1e-3 * max(1.0, float(full.abs().max()))


def _compacted(gm: torch.fx.GraphModule, model: nn.Module, edits: Sequence[Callable] = (),
               removed: np.ndarray | None = None) -> fxprune.api.Compacted:
    groups = fxprune.analyze(gm)
    removed = np.zeros(len(groups.comp_group), bool) if removed is None else removed
    return fxprune.compact(gm, groups, removed, model, edits=list(edits), verify=True)


def _check_removal(model: nn.Module, inputs: Any, gm: torch.fx.GraphModule, blocks: list[Block],
                   hooked: Mapping[str, str]) -> None:
    """Removing every block equals zeroing every branch; removing one equals zeroing that one; the
    reference is not trivially the original; the removed blocks' parameters and nodes are gone."""
    full = _reference(model, inputs, hooked, {})
    for chosen in (blocks, blocks[:1]):
        res = _compacted(gm, model, [remove_blocks(chosen)])
        ref = _reference(model, inputs, hooked, {b.name: 0.0 for b in chosen})
        got = _run(res.module, inputs)
        _close(got, ref)
        assert _changed(ref, full), "zeroing the branches changed nothing: a vacuous check"
        state = dict(res.module.named_parameters())
        for b in chosen:
            assert b.params and not set(b.params) & set(state), b.params
        alive = {n.name for n in res.module.graph.nodes}
        assert not alive & {n for b in chosen for n in b.nodes + (b.add,)}


def _check_depth(model: nn.Module, inputs: Any, gm: torch.fx.GraphModule, blocks: list[Block],
                 hooked: Mapping[str, str]) -> None:
    """d = 1: the unmasked graph bit for bit; d = 0: removal bit for bit; d = 0.3: the branch times 0.3."""
    plain = _run(_compacted(gm, model).module, inputs)
    ones = _compacted(gm, model, [depth_masks(blocks, lambda b: Const(1.0))]).module
    assert torch.equal(_run(ones, inputs), plain)
    zeros = _run(_compacted(gm, model, [depth_masks(blocks, lambda b: Const(0.0))]).module, inputs)
    assert torch.equal(zeros, _run(_compacted(gm, model, [remove_blocks(blocks)]).module, inputs))
    res = _compacted(gm, model, [depth_masks(blocks, lambda b: Const(0.3))])
    ref = _reference(model, inputs, hooked, {b.name: 0.3 for b in blocks})
    _close(_run(res.module, inputs), ref)
    assert isinstance(res.module.get_submodule("fxprune_depth.0"), Const)


# -- torchvision resnet18: 8 BasicBlocks, 3 of them with a downsample skip ------------------------------------

RESNET_BLOCKS = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


@pytest.fixture(scope="module")
def resnet():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # BatchNorm at its init is the identity: random statistics make every branch count
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    inputs = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    gm = fxprune.trace(model, inputs)
    return model, inputs, gm, residual_blocks(gm)


def test_resnet18_blocks_are_the_identity_skip_basic_blocks(resnet):
    model, inputs, gm, blocks = resnet
    assert [b.name for b in blocks] == RESNET_BLOCKS  # graph order; layer2.0, layer3.0, layer4.0 downsample
    assert [b.stage for b in blocks] == ["layer1", "layer1", "layer2", "layer3", "layer4"]
    nodes = {n.name: n for n in gm.graph.nodes}
    for b in blocks:
        add = nodes[b.add]
        assert {nodes[b.skip], nodes[b.branch]} == set(add.args)
        assert set(b.params) == {n for n, _ in model.get_submodule(b.name).named_parameters(prefix=b.name)} | \
            {n for n, _ in model.get_submodule(b.name).named_buffers(prefix=b.name) if "num_batches" not in n}
        # the branch's MACs are the block's as FlopCounterMode counts them, on the block's own input
        seen: list[torch.Tensor] = []
        handle = model.get_submodule(b.name).register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0]))
        with torch.no_grad():
            model(*inputs)
        handle.remove()
        assert b.macs == count_macs(model.get_submodule(b.name), (seen[0],)) > 0


RESNET_HOOKS = {name: f"{name}.bn2" for name in RESNET_BLOCKS}


def test_resnet18_removal_equals_zeroed_branch(resnet):
    model, inputs, gm, blocks = resnet
    _check_removal(model, inputs, gm, blocks, RESNET_HOOKS)
    res = _compacted(gm, model, [remove_blocks(blocks)])
    removed = sum(model.get_submodule(b.name).get_parameter(p.removeprefix(b.name + ".")).numel()
                  for b in blocks for p in b.params if p.endswith(("weight", "bias")))
    assert sum(p.numel() for p in res.module.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    assert not [k for k in res.module.state_dict() if k.startswith(tuple(f"{b.name}." for b in blocks))]


def test_resnet18_depth_masks(resnet):
    model, inputs, gm, blocks = resnet
    _check_depth(model, inputs, gm, blocks, RESNET_HOOKS)
    # a depth mask is a trainable scalar like a channel mask: the loss reaches it
    res = _compacted(gm, model, [depth_masks(blocks, lambda b: Const(1.0))])
    res.module.double()(*_double(inputs)).sum().backward()
    assert all(res.module.get_submodule(f"fxprune_depth.{i}").d.grad is not None for i in range(len(blocks)))


def test_resnet18_fold_of_depth_values(resnet):
    model, inputs, gm, blocks = resnet
    values = {"layer1.0": 0.0, "layer1.1": 1.0, "layer2.1": 0.5, "layer4.1": 0.0}  # layer3.1 missing: kept
    res = _compacted(gm, model, [remove_where(blocks, values)])
    masked = _compacted(gm, model, [depth_masks(blocks, lambda b: Const(values.get(b.name, 1.0)))])
    torch.testing.assert_close(_run(res.module, inputs), _run(masked.module, inputs), rtol=1e-12, atol=1e-12)
    state = dict(res.module.named_parameters())
    assert "layer1.0.conv1.weight" not in state and "layer4.1.conv2.weight" not in state
    assert "layer2.1.conv1.weight" in state and "layer3.1.conv1.weight" in state
    with pytest.raises(KeyError, match="no block named"):
        remove_where(blocks, {"layer9.9": 0.0})


def test_resnet18_removal_with_channel_pruning(resnet):
    model, inputs, gm, blocks = resnet
    groups = fxprune.analyze(gm)
    removed = np.zeros(len(groups.comp_group), bool)
    for g in groups.prunable:  # the first quarter of every prunable group, the residual stream included
        removed[g.channels[: len(g) // 4]] = True
    assert removed.any()
    chosen = [blocks[0], blocks[3]]
    res = fxprune.compact(gm, groups, removed, model, edits=[remove_blocks(chosen)], verify=True)
    assert (res.removed == removed).all()
    assert res.module.get_parameter("layer2.1.conv1.weight").shape[0] < 128  # channels went too
    reference = masked_model(model, res.plan, groups)
    ref = _reference(reference, inputs, RESNET_HOOKS, {b.name: 0.0 for b in chosen})
    _close(_run(res.module, inputs), ref)
    assert _changed(ref, _reference(reference, inputs, RESNET_HOOKS, {}))


# -- regions that are not blocks -------------------------------------------------------------------------------


class NotBlocks(nn.Module):
    """A downsample skip, a broadcasting add, a branch output or a branch node read after the add (two exits),
    and a parameter-free x + f(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.down = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 1, 1)
        self.d, self.e1, self.e2 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x) + torch.relu(self.a(x))       # skip is not the identity
        x = x + self.c(x)                                # broadcasts (4 channels + 1)
        h = self.d(x)
        y = x + h                                        # h escapes: it is read again below
        m = torch.relu(self.e1(y))
        z = y + self.e2(m)                               # m, inside the branch, escapes too
        z = z + z.pow(3) * 0.5                           # no parameter: a function, not a block
        return z + h.mean() + m.mean()


def test_regions_that_are_not_blocks():
    gm = fxprune.trace(NotBlocks().eval(), (torch.randn(2, 4, 8, 8),))
    assert residual_blocks(gm) == []


# -- a hand-written pre-norm transformer: two blocks per layer -------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, 4)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return self.mlp(self.norm2(x)) + x  # the other argument order


class PreNorm(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


PRENORM_BLOCKS = ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
PRENORM_HOOKS = {name: name for name in PRENORM_BLOCKS}


@pytest.fixture(scope="module")
def prenorm():
    torch.manual_seed(0)
    model = PreNorm().eval()
    inputs = (torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1)),)
    gm = fxprune.trace(model, inputs)
    return model, inputs, gm, residual_blocks(gm)


def test_prenorm_transformer(prenorm):
    model, inputs, gm, blocks = prenorm
    assert [b.name for b in blocks] == PRENORM_BLOCKS and {b.stage for b in blocks} == {"layers"}
    assert set(blocks[0].params) == {f"layers.0.{p}" for p in ("norm1.weight", "norm1.bias", "attn.qkv.weight",
                                                               "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias")}
    assert blocks[1].macs == 2 * 6 * (32 * 64 + 64 * 32)  # batch 2, 6 tokens, two linears
    _check_removal(model, inputs, gm, blocks, PRENORM_HOOKS)
    _check_depth(model, inputs, gm, blocks, PRENORM_HOOKS)
    groups = fxprune.analyze(gm)
    removed = np.zeros(len(groups.comp_group), bool)
    for g in groups.prunable:
        removed[g.channels[: len(g) // 2]] = True
    res = fxprune.compact(gm, groups, removed, model, edits=[remove_blocks(blocks[1::2])], verify=True)
    assert res.module.get_parameter("layers.0.attn.qkv.weight").shape[0] < 96
    ref = _reference(masked_model(model, res.plan, groups), inputs, PRENORM_HOOKS, {b.name: 0.0 for b in blocks[1::2]})
    _close(_run(res.module, inputs), ref)


# -- Hugging Face models from tiny configs ---------------------------------------------------------------------

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, use_cache=False)
    names = [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn", "mlp")]
    return transformers.LlamaForCausalLM(cfg), (IDS,), names, {n: n for n in names}


def _bert():
    import transformers
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    names = [n for i in range(2) for n in (f"encoder.layer.{i}.attention", f"encoder.layer.{i}")]
    hooks = {n: f"{n}.output.dense" for n in names}  # post-norm: LayerNorm(dropout(dense(h)) + x)
    return transformers.BertModel(cfg), (IDS,), names, hooks


@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_hugging_face_blocks(build):
    torch.manual_seed(0)
    model, inputs, names, hooks = build()
    model.eval()
    gm = fxprune.trace(model, inputs)
    blocks = residual_blocks(gm)
    assert [b.name for b in blocks] == names
    stage = names[0].split(".0.")[0].split(".0")[0]
    assert {b.stage for b in blocks} == {stage}
    _check_removal(model, inputs, gm, blocks, hooks)
    res = _compacted(gm, model, [depth_masks(blocks, lambda b: Const(0.3))])
    ref = _reference(model, inputs, hooks, {b.name: 0.3 for b in blocks})
    _close(_run(res.module, inputs), ref)


def test_branch_reading_another_input_is_not_a_block():
    """A limitation, pinned: BERT's attention reads the mask made from an ``attention_mask`` input, so its
    branch has a second entry; the MLP blocks are still found."""
    model, _, names, _ = _bert()
    gm = fxprune.trace(model.eval(), {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})
    assert [b.name for b in residual_blocks(gm)] == names[1::2]


def test_timm_vit_blocks():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5).eval()
    size = model.pretrained_cfg["input_size"][-1]
    inputs = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)
    gm = fxprune.trace(model, inputs)
    blocks = residual_blocks(gm)
    depth = len(model.blocks)
    names = [f"blocks.{i}.{part}" for i in range(depth) for part in ("attn", "mlp")]
    assert [b.name for b in blocks] == names and {b.stage for b in blocks} == {"blocks"}
    _check_removal(model, inputs, gm, blocks[::3], {n: n for n in names})


# -- fxprune inspect -------------------------------------------------------------------------------------------

MODEL_FILE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(self.down(x).mean((2, 3)))


def model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
'''


def test_inspect_reports_blocks(tmp_path: Path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert [(b["name"], b["stage"]) for b in info["blocks"]] == [("blocks.0", "blocks"), ("blocks.1", "blocks")]
    block = info["blocks"][0]
    assert block["params"] == 2 * (8 * 8 * 9 + 8) and block["macs"] == 2 * 2 * 8 * 8 * 8 * 8 * 9
    assert block["macs_share"] == pytest.approx(block["macs"] / info["macs"]) and 0 < block["macs_share"] < 0.5
    assert {"groups", "macs", "params", "unsupported_ops"} <= info.keys()
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "removable residual blocks" in result.stdout and "channel groups" in result.stdout
    table = result.stdout[result.stdout.index("removable residual blocks"):]
    row = next(line for line in table.splitlines() if line.startswith("│ blocks "))
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[:3] == ["blocks", "2", "0, 1"] and cells[3].endswith("%")
