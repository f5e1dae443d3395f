"""Every input axis the original model takes at other sizes stays free in the pruned model (batch, sequence
length, image size), whichever way its forward reads a size; where no front end can keep one free, the result
says which and why. Each case is pruned once and run at three batch sizes and two sequence lengths or image
sizes against the masked original."""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import assert_equivalent, masked_model

D, HEADS, VOCAB = 16, 4, 50


class Tokens(nn.Module):
    """Images -> patch tokens with a class token -> attention over heads -> MLP -> the class token's logits.
    ``read(x)`` is how the forward gets the batch size, ``seq(t)`` the number of tokens: the constructs under
    test."""

    def __init__(self, batch: Callable[[torch.Tensor], int], seq: Callable[[torch.Tensor], int]) -> None:
        super().__init__()
        self.batch, self.seq = batch, seq
        self.patch = nn.Conv2d(1, D, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 32), nn.Linear(32, D)
        self.head = nn.Linear(D, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        b = self.batch(t)
        t = torch.cat([self.cls.expand(b, -1, -1), t], 1)
        n = self.seq(t)
        q, k, v = self.qkv(t).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        t = t + self.proj(a)
        t = t + self.down(torch.relu(self.up(t)))
        return self.head(t[:, 0])


class Language(nn.Module):
    """Token ids -> embeddings + learned positions for ``arange(seq)`` -> MLP -> logits per position, with the
    sequence length read through ``seq(ids)`` and a scale through ``scale(ids)``."""

    def __init__(self, seq: Callable[[torch.Tensor], int], scale: Callable[[torch.Tensor], float]) -> None:
        super().__init__()
        self.seq, self.scale = seq, scale
        self.embed, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(64, D)
        self.up, self.down = nn.Linear(D, 48), nn.Linear(48, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.seq(ids)
        h = self.embed(ids) + self.pos(torch.arange(n, device=ids.device)) + ids.new_zeros(ids.shape[0], n, 1)
        flat = self.up(h).reshape(ids.shape[0] * n, -1)  # x.shape[0] * k
        h = h + self.down(torch.relu(flat)).view(ids.shape[0], n, D) * self.scale(ids)
        return self.out(h)


class Dense(nn.Module):
    """A small segmentation-style CNN: its output is resized back to the input's own height and width, which
    the forward reads as ``size(x)``."""

    def __init__(self, size: Callable[[torch.Tensor], tuple[int, int]]) -> None:
        super().__init__()
        self.size = size
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.classify = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.classify(self.enc(x))
        y = F.interpolate(y, size=self.size(x), mode="bilinear", align_corners=False)
        return y.reshape(b, 5, -1).mean(-1) + y.mean((2, 3))


# How a forward reads a size: each is a construct users write (the ones a non-strict tracer turns into constants
# marked so). Every one must keep the axis free.
BATCH_READS = {
    "len(x)": lambda t: len(t),
    "x.size(0)": lambda t: t.size(0),
    "x.shape[0]": lambda t: t.shape[0],
    "int(x.shape[0])": lambda t: int(t.shape[0]),
}
SEQ_READS = {
    "x.shape[1]": lambda t: t.shape[1],
    "int(x.shape[1])": lambda t: int(t.shape[1]),
    "unpacked": lambda t: tuple(t.shape)[1],
}
SCALES = {
    "x.shape[1] ** -0.5": lambda ids: ids.shape[1] ** -0.5,
    "1 / math.sqrt(x.shape[1])": lambda ids: 1 / math.sqrt(ids.shape[1]),
    "x.new_ones(n).sum()": lambda ids: ids.new_ones(ids.shape[1]).sum().float().reciprocal(),
}
SIZES = {
    "x.shape[-2:]": lambda x: x.shape[-2:],
    "(int(h), int(w))": lambda x: (int(x.shape[2]), int(x.shape[3])),
}


def _prune(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fxprune.PruneResult:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fixed axis is a warning: none may be fixed here
        warnings.filterwarnings("ignore", "fxprune: no coupling rule")
        return fxprune.prune(model.eval(), inputs, "l1", 0.5)


def _same(model: nn.Module, res: fxprune.PruneResult, x: torch.Tensor) -> None:
    masked = masked_model(model, res.plan)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), masked(x), rtol=1e-4, atol=1e-4)


def _free(res: fxprune.PruneResult) -> set[tuple[str, int]]:
    return {(a.input, a.dim) for a in res.shapes.dynamic}


@pytest.mark.parametrize("batch", sorted(BATCH_READS))
@pytest.mark.parametrize("seq", ["x.shape[1]", "int(x.shape[1])"])
def test_a_vit_keeps_batch_and_image_size_free(batch, seq):
    torch.manual_seed(0)
    model = Tokens(BATCH_READS[batch], SEQ_READS[seq]).eval()
    res = _prune(model, (torch.randn(8, 1, 16, 16),))
    assert _free(res) == {("x", 0), ("x", 2), ("x", 3)} and not res.shapes.fixed
    assert res.cost_after.macs < res.cost_before.macs
    for shape in [(2, 1, 16, 16), (3, 1, 16, 16), (8, 1, 16, 16), (3, 1, 24, 20), (5, 1, 8, 12)]:
        _same(model, res, torch.randn(shape))


@pytest.mark.parametrize("seq", sorted(SEQ_READS))
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_a_language_model_keeps_batch_and_sequence_length_free(seq, scale):
    torch.manual_seed(0)
    model = Language(SEQ_READS[seq], SCALES[scale]).eval()
    res = _prune(model, (torch.randint(0, VOCAB, (2, 12)),))
    assert _free(res) == {("ids", 0), ("ids", 1)} and not res.shapes.fixed
    for b, n in [(1, 12), (3, 12), (8, 5), (3, 30)]:
        _same(model, res, torch.randint(0, VOCAB, (b, n)))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_a_segmentation_model_keeps_its_image_size_free(size):
    torch.manual_seed(0)
    model = Dense(SIZES[size]).eval()
    res = _prune(model, (torch.randn(2, 3, 32, 32),))
    assert _free(res) == {("x", 0), ("x", 2), ("x", 3)}
    for shape in [(1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 48, 64), (4, 3, 40, 24)]:
        _same(model, res, torch.randn(shape))
    assert_equivalent(model, res, (torch.randn(2, 3, 32, 32),))  # also at the recorded second sizes


def test_a_hugging_face_language_model_runs_at_any_sequence_length():
    """The issue's case: LLaMA pruned on ids of 2 x 16 ran at batch 3 but at no other sequence length."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    res = _prune(model, (torch.randint(0, 100, (2, 16)),))
    assert _free(res) == {("input_ids", 0), ("input_ids", 1)}
    masked = masked_model(model, res.plan)
    for b, n in [(3, 16), (2, 7), (1, 40)]:
        ids = torch.randint(0, 100, (b, n))
        with torch.no_grad():
            torch.testing.assert_close(res.module(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_torchvision_segmentation_model_runs_at_any_image_size():
    """The issue's case: LRASPP MobileNetV3 pruned at 64 x 64 failed at 96 and 128."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    res = _prune(model, (torch.randn(2, 3, 64, 64),))
    assert _free(res) == {("input", 0), ("input", 2), ("input", 3)}
    masked = masked_model(model, res.plan)
    for shape in [(1, 3, 96, 96), (3, 3, 128, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, ref = res.module(x)["out"], masked(x)["out"]
        assert got.shape == (shape[0], 21, *shape[2:])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class PerSample(nn.Module):
    """A forward that loops over the batch in Python: any batch runs eagerly, no graph can hold the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.fc(x[i]) for i in range(x.shape[0])]  # the line a fixed batch is traced to
        return self.out(torch.relu(torch.stack(rows)))


def test_an_axis_no_graph_keeps_free_is_reported_with_the_users_line():
    model = PerSample().eval()
    with pytest.warns(UserWarning, match=r"x axis 0 fixed at 4: .*test_dynamic_shapes\.py:\d+"):
        res = fxprune.prune(model, (torch.randn(4, 6),), "l1", 0.5, target="graph")
    (fixed,) = res.shapes.fixed
    assert (fixed.axis.input, fixed.axis.dim, fixed.axis.size) == ("x", 0, 4)
    assert "rows = [self.fc(x[i]) for i in range(x.shape[0])]" in fixed.why
    assert res.shapes.report()["fixed"] == [{"input": "x", "axis": 0, "size": 4, "why": fixed.why}]
    _same(model, res, torch.randn(4, 6))  # exact at the size it keeps


def test_the_modules_target_takes_over_an_axis_no_graph_keeps_free():
    """A pass that reads weights only prunes such a model through its own modules, whose code takes any batch."""
    model = PerSample().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = fxprune.prune(model, (torch.randn(4, 6),), "l1", 0.5)
    assert res.compaction["target"] == "modules" and "x axis 0" in res.compaction["why"]
    assert _free(res) == {("x", 0)} and not res.shapes.fixed
    for batch in (1, 3, 9):
        _same(model, res, torch.randn(batch, 6))


def test_a_batch_of_one_is_reported_as_fixed():
    torch.manual_seed(0)
    model = Dense(SIZES["x.shape[-2:]"]).eval()
    with pytest.warns(UserWarning, match="x axis 0 fixed at 1: the example inputs have size 1 there"):
        res = fxprune.prune(model, (torch.randn(1, 3, 32, 32),), "l1", 0.5)
    assert _free(res) == {("x", 2), ("x", 3)}


def test_dynamic_shapes_names_the_free_axes_instead_of_the_probe():
    from torch.export import Dim

    torch.manual_seed(0)
    model = Dense(SIZES["x.shape[-2:]"]).eval()
    res = fxprune.prune(model, (torch.randn(2, 3, 32, 32),), "l1", 0.5, dynamic_shapes=({0: Dim("batch", max=16)},))
    assert _free(res) == {("x", 0)}
    assert [a.probe for a in res.shapes.dynamic] == [4]
    static = fxprune.prune(model, (torch.randn(2, 3, 32, 32),), "l1", 0.5, dynamic_shapes=False)
    assert _free(static) == set()


def test_the_verifier_checks_a_second_size():
    """A compacted graph that computes with the example's size where the traced one reads it is refused: the
    verifier runs each group of dynamic axes at its second size."""
    from fxprune.compaction import Reindexing
    from fxprune.compaction.emit import CompactionError
    from fxprune.compaction.verify import verify_shapes

    torch.manual_seed(0)
    model = Tokens(BATCH_READS["x.shape[0]"], SEQ_READS["x.shape[1]"]).eval()
    res = fxprune.prune(model, (torch.randn(8, 1, 16, 16),), "l1", 0.5)
    broken = res.module
    for node in broken.graph.nodes:  # the class token's expand, made to use the example's batch
        if node.target is torch.ops.aten.expand.default:
            node.args = (node.args[0], [8, *node.args[1][1:]])
    broken.recompile()
    with pytest.raises(CompactionError, match="with x axis 0 at 16"):
        verify_shapes(broken, Reindexing(res.groups, res.removed), CompactionError)


def test_the_saved_program_and_the_report_keep_the_axes(tmp_path, cli):
    """Through the command line: model.pt2 runs at other batch sizes and image sizes, report.json lists the
    free axes, and fxprune inspect shows them."""
    source = tmp_path / "vit.py"
    source.write_text(VIT_FILE)
    result = cli("run", source, "--pass", "l1", "--ratio", "0.5", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {(a["input"], a["axis"]) for a in report["input_axes"]["dynamic"]} == {("x", 0), ("x", 2), ("x", 3)}
    assert report["input_axes"]["fixed"] == []
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    original = torch.export.load(str(tmp_path / "out" / "original.pt2")).module()
    for shape in [(3, 1, 16, 16), (5, 1, 24, 20)]:
        x = torch.randn(shape)
        assert program(x).shape == original(x).shape == (shape[0], 10)
    shown = cli("inspect", source)
    assert shown.exit_code == 0 and "input axes kept free (checked at a second size): x axis 0, x axis 2, x axis 3" \
        in shown.output


VIT_FILE = '''import torch
from torch import nn


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.block = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.block(t)[:, 0])


def model():
    torch.manual_seed(0)
    return ViT()


def example_inputs():
    return (torch.randn(8, 1, 16, 16),)
'''


def test_a_saved_program_that_export_fixes_is_a_note(tmp_path, cli, monkeypatch):
    """Where torch.export cannot keep an axis of the saved program free that the pruned module keeps, the run
    says so: a note on the console and in report.json (model.pt2 is then fixed there)."""
    import fxprune.artifacts as artifacts

    real = artifacts._export

    def fixing(module, args, kwargs, axes, strict=False):
        ep, _ = real(module, args, kwargs, [], strict=strict)
        return ep, {a: "torch.export holds it at a constant" for a in axes if a.dim == 0}

    monkeypatch.setattr(artifacts, "_export", fixing)
    source = tmp_path / "vit.py"
    source.write_text(VIT_FILE)
    result = cli("run", source, "--pass", "l1", "--ratio", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "out" / "report.json").read_text())["notes"]
    assert any("saved program of" in n and "x axis 0 (8: torch.export holds it at a constant)" in n for n in notes)
