"""Models that cannot be exported whole (fxprune.compaction.modules): the analysis reads the record of one
real run (NMS, top-k, boolean masks, a loop over a variable number of boxes kept as what they are), and
compaction resizes the user's own modules in a copy; the result equals the masked original on the example
inputs and on inputs of another size, keeps the user's classes, and sizes in Python code freeze their groups."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_coupling import randomize_bn
from torch import nn

import fxprune
from fxprune.analysis import analyze
from fxprune.compaction.modules import ResizeError, freeze_code_sizes, resize_modules
from fxprune.compaction.targets import trace_for
from fxprune.testing import assert_equivalent
from fxprune.tracing.record import record_trace
from fxprune.tracing.tracer import INPUT_SHAPES, input_shapes


class DetNet(nn.Module):
    """Backbone + FPN + a shared head (GroupNorm) + decoding: top-k, a score threshold (a boolean mask),
    NMS and a Python loop over the kept boxes."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.lat2, self.lat3 = nn.Conv2d(32, 24, 1), nn.Conv2d(64, 24, 1)
        self.head = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.GroupNorm(4, 24), nn.ReLU())
        self.cls, self.box = nn.Conv2d(24, classes, 1), nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f2 = self.c2(self.c1(x))
        p3 = self.lat3(self.c3(f2))
        p2 = self.lat2(f2) + F.interpolate(p3, size=f2.shape[-2:], mode="nearest")
        boxes, scores = [], []
        for p in (p2, p3):
            h = self.head(p)
            s = self.cls(h).sigmoid().flatten(2).transpose(1, 2).amax(-1)[0]
            b = self.box(h).flatten(2).transpose(1, 2)[0]
            v, i = s.topk(min(20, s.shape[0]))
            keep = v > 0.3  # a data-dependent number of candidates
            bb = b[i[keep]]
            boxes.append(torch.cat([bb[:, :2], bb[:, :2] + bb[:, 2:].abs() + 0.1], 1))
            scores.append(v[keep])
        boxes, scores = torch.cat(boxes), torch.cat(scores)
        out = [torch.cat([boxes[j], scores[j:j + 1]]) for j in torchvision.ops.nms(boxes, scores, 0.5).tolist()]
        return {"detections": torch.stack(out) if out else boxes.new_zeros(0, 5), "features": p2.mean((2, 3))}


class Reshaping(nn.Module):
    """A width written in the model's Python code: ``view(b, 32, -1)`` names conv2's 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        y = y.view(y.shape[0], 32, -1).mean(-1)
        return self.fc(y)[torch.nonzero(x.mean((1, 2, 3)) > -10).squeeze(1)]  # data-dependent rows


def _detnet() -> DetNet:
    torch.manual_seed(0)
    return randomize_bn(DetNet()).eval()


def test_analysis_recording_keeps_data_dependent_ops() -> None:
    model = _detnet()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(fxprune.TraceError):
        fxprune.trace(model, (x,))
    gm = record_trace(model, (x,), {}, analysis=True)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "torchvision.nms.default" in targets and "aten.topk.default" in targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = analyze(gm)
    producers = {g.layers("producer")[0] for g in groups.prunable}
    assert {"c1.0", "c2.0", "c3.0", "head.0"} <= producers  # the FPN stream is an output: frozen
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_prune_resizes_the_modules_exactly_on_inputs_of_two_sizes() -> None:
    model = _detnet()
    x = torch.rand(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, (x,), "l1", 0.5)
    assert result.compaction["target"] == "modules" and "no static graph" in result.compaction["why"]
    small = result.module
    assert type(small) is DetNet and small.c2[0].out_channels == 16 and small.c3[0].in_channels == 16
    assert small.head[1].num_groups == 2 and small.head[1].num_channels == 12  # whole GroupNorm groups
    assert small.lat3.in_channels == 32 and small.lat3.out_channels == 24  # the FPN stream kept whole
    assert_equivalent(model, result, (x,))
    assert_equivalent(model, result, (torch.rand(1, 3, 48, 40),))  # another size: its own boxes, its own loop
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.cost_after.macs < 0.5 * result.cost_before.macs


def test_the_fallback_reuses_the_input_axes_the_failed_trace_found() -> None:
    """A model torch.export cannot take is probed at other input sizes once: the modules target's recording takes
    the axes the failed trace found (the probe is real runs of the model: a second one cost a ResNet-50 detector
    two forwards at twice the example's size)."""
    model, x = _detnet(), torch.rand(2, 3, 32, 32)
    seen: list[tuple[int, ...]] = []
    hook = model.c1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm, used = trace_for(model, (x,), "auto")
            probes = [s for s in seen if s != tuple(x.shape)]
            seen.clear()
            alone = input_shapes(model, (x,), {})
    finally:
        hook.remove()
    assert used["target"] == "modules"
    assert probes and len(probes) == len([s for s in seen if s != tuple(x.shape)])  # one probe's runs, not two
    assert gm.meta[INPUT_SHAPES] == alone.ones_free()  # the axes the recording would have found itself


def test_sizes_in_python_code_freeze_their_groups() -> None:
    torch.manual_seed(0)
    model = Reshaping().eval()
    x = torch.rand(2, 3, 8, 8)
    gm = record_trace(model, (x,), {}, analysis=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = analyze(gm)
    frozen = freeze_code_sizes(gm, groups)
    assert any("Python code" in r and "view" in r for r in frozen.values())
    assert {g.layers("producer")[0] for g in groups.prunable} == {"conv1"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, (x,), "l1", 0.5, target="modules")
    assert result.module.conv1.out_channels == 8 and result.module.conv2.out_channels == 32
    assert_equivalent(model, result, (x,))


def test_forced_targets_and_passes_that_need_a_graph() -> None:
    from fxprune.passes.registry import PassError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    graph = fxprune.prune(model, (x,), "l1", 0.5)
    assert graph.compaction["target"] == "graph" and isinstance(graph.module, torch.fx.GraphModule)
    modules = fxprune.prune(model, (x,), "l1", 0.5, target="modules")
    assert modules.compaction == {"target": "modules", "why": "asked for (target='modules')"}
    assert type(modules.module) is nn.Sequential and modules.module[0].out_channels == 4
    torch.testing.assert_close(modules.module(x), graph.module(x))
    with pytest.raises(PassError, match="compacted by resizing its modules.*per sample"):
        fxprune.prune(_detnet(), (torch.rand(1, 3, 32, 32),), "anp", 0.5,
                      train_loader=[(torch.rand(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))])


def test_unknown_module_with_sizes_is_named() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_dim = 8
            self.weight = nn.Parameter(torch.randn(8, 3))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.custom = Custom()

    net = Net()
    with pytest.raises(ResizeError, match="SIZE_ATTRIBUTES"):
        resize_modules(net, {"custom.weight": {0: [0, 1, 2, 3]}})


def test_a_torchvision_detector() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5).eval()
    x = [torch.rand(3, 96, 112)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, (x,), "l1", 0.3)
    assert result.compaction["target"] == "modules" and result.removed.any()
    assert_equivalent(model, result, (x,), tol=1e-5)
    assert_equivalent(model, result, ([torch.rand(3, 80, 80)],), tol=1e-5)


def test_cli_prunes_a_detector_and_load_rebuilds_it(tmp_path) -> None:
    import json
    import textwrap

    from typer.testing import CliRunner

    from fxprune.cli import app

    (tmp_path / "det.py").write_text(textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_modules_target import DetNet

        def model():
            torch.manual_seed(0)
            return DetNet().eval()

        def example_inputs():
            return (torch.rand(1, 3, 32, 32),)
    '''))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "det.py"), "--pass", "l1", "--ratio", "0.5",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resizing the model's own modules" in result.output
    assert not (out / "model.pt2").exists() and (out / "model.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["compaction"]["target"] == "modules"
    with pytest.raises(FileNotFoundError, match="give model="):
        fxprune.load(out)
    torch.manual_seed(0)
    model = DetNet().eval()  # what the model file builds
    rebuilt = fxprune.load(out, model=DetNet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = fxprune.prune(model, (torch.rand(1, 3, 32, 32),), "l1", 0.5)
    x = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(rebuilt(x)["features"], direct.module(x)["features"])
    no_pt2 = CliRunner().invoke(app, ["bench", str(out)])
    assert no_pt2.exit_code == 2 and "give --model" in no_pt2.output + str(no_pt2.stderr_bytes or b"")
    bench = CliRunner().invoke(app, ["bench", str(out), "--model", str(tmp_path / "det.py"), "--repeats", "4",
                                     "--rounds", "2", "--json"])
    assert bench.exit_code == 0, bench.output
    rows = json.loads(bench.stdout)
    pruned = next(r for r in rows if r["model"] == "pruned" and r["device"] == "cpu")
    assert pruned["macs_reduction"] > 2 and pruned["speedup"] > 0
    bad = CliRunner().invoke(app, ["run", str(tmp_path / "det.py"), "--pass", "l1", "--target", "nope",
                                   "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--target must be" in bad.output + str(bad.stderr_bytes or b"")


def test_the_yolo_example_end_to_end(tmp_path, monkeypatch) -> None:
    """examples/yolo.py, trained briefly: l1 resizes it exactly; slimming trains its sparsity on the modules,
    through the CLI, and the report carries the example's mAP before, after pruning and after recovery."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from fxprune.cli import app
    from fxprune.cli.modelfile import load_model_file

    monkeypatch.setenv("YOLO_EPOCHS", "1")
    monkeypatch.setenv("YOLO_IMAGES", "64")
    path = Path(__file__).resolve().parents[1] / "examples" / "yolo.py"
    yolo = load_model_file(path)
    model, x = yolo.model(), yolo.example_inputs()
    out = model(*x)
    assert len(out) == 2 and all(0 <= len(o["boxes"]) <= 100 and set(o) == {"boxes", "scores", "labels"} for o in out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, x, "l1", 0.5)
    assert result.compaction["target"] == "modules"
    assert_equivalent(model, result, x)
    assert_equivalent(model, result, (torch.rand(2, 3, 96, 160),))  # two images, another size
    run = CliRunner().invoke(app, ["run", str(path), "--pass", "slimming", "--ratio", "0.5", "--opt", "epochs=1",
                                   "--epochs", "1", "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["compaction"]["target"] == "modules" and report["after"]["macs"] < 0.5 * report["before"]["macs"]
    for stage in ("before", "pruned", "after"):
        assert {"map_50", "map"} <= set(report[stage]["metrics"])
    assert set(report["finetune"]["log"][0]["terms"]) == {"loss_cls", "loss_box"}


def test_the_fasterrcnn_example_end_to_end(tmp_path, monkeypatch) -> None:
    """examples/fasterrcnn.py (torchvision's Faster R-CNN, MobileNetV3-Large FPN), trained on a few images: the
    auto target decides from the recording that export cannot follow it (no export attempt) and l1 resizes it
    exactly; through the CLI slimming trains its sparsity on torchvision's dict of losses, the report carries the mAP
    and each of the four losses, and eval rebuilds the folder from the model file."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from fxprune.cli import app
    from fxprune.cli.modelfile import load_model_file
    from fxprune.tracing import tracer

    monkeypatch.setenv("FRCNN_IMAGES", "32")
    path = Path(__file__).resolve().parents[1] / "examples" / "fasterrcnn.py"
    frcnn = load_model_file(path)
    model, x = frcnn.model(), frcnn.example_inputs()
    exports = []
    original = tracer.FRONTENDS["export"]
    monkeypatch.setitem(tracer.FRONTENDS, "export", lambda *a, **k: exports.append(1) or original(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, x, "l1", 0.5)
    assert result.compaction["target"] == "modules" and "depends on the data" in result.compaction["why"]
    assert not exports
    assert_equivalent(model, result, x, tol=1e-5)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["run", str(path), "--pass", "slimming", "--ratio", "0.5", "--opt", "epochs=1",
                                   "--epochs", "1", "--out", str(out)])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    assert report["compaction"]["target"] == "modules" and report["after"]["macs"] < 0.6 * report["before"]["macs"]
    for stage in ("before", "pruned", "after"):
        assert {"map_50", "map"} <= set(report[stage]["metrics"])
    assert set(report["finetune"]["log"][0]["terms"]) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                                                          "loss_rpn_box_reg"}
    evaluated = CliRunner().invoke(app, ["eval", str(path), str(out), "--attack", "none"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "map_50" in evaluated.output


class Decoder(nn.Module):
    """A DETR-like head: conv features as tokens, nn.MultiheadAttention with learned queries, then a
    data-dependent selection of the confident queries."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.queries = nn.Parameter(torch.randn(5, 1, 16))
        self.attn = nn.MultiheadAttention(16, 4)
        self.ffn = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
        self.score = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x).flatten(2).permute(2, 0, 1)  # (HW, B, 16)
        q, _ = self.attn(self.queries.expand(-1, x.shape[0], -1), tokens, tokens)
        q = q + self.ffn(q)
        s = self.score(q).squeeze(-1)
        return q[s > s.mean()]  # a data-dependent number of queries


def test_multihead_attention_keeps_its_heads_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    x = torch.rand(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = fxprune.prune(model, (x,), "l1", 0.5)  # torch.export handles this boolean mask itself
        result = fxprune.prune(model, (x,), "l1", 0.5, target="modules")
    assert exported.compaction["target"] == "graph" and result.compaction["target"] == "modules"
    assert_equivalent(model, exported, (x,))  # (a data-dependent shape is skipped by the shape verifier)
    small = result.module
    assert small.backbone[0].out_channels == 16 and small.ffn[0].out_features == 12
    assert small.attn.embed_dim == 16 and small.attn.num_heads == 4
    assert_equivalent(model, result, (x,))
    assert_equivalent(model, result, (torch.rand(3, 3, 10, 6),))


def test_grouped_and_depthwise_convolutions_resize_like_the_graph_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=8), nn.BatchNorm2d(32), nn.ReLU(),  # 8 groups of 4
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),                  # depthwise
                          nn.Conv2d(32, 6, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    graph = fxprune.prune(model, (x,), "l1", 0.5,
                          budget=fxprune.Budget(group_width_to=1))  # widths as the ratio says: 4 -> 2
    modules = fxprune.prune(model, (x,), "l1", 0.5, target="modules", budget=fxprune.Budget(group_width_to=1))
    grouped, depthwise = modules.module[3], modules.module[6]
    assert grouped.groups == 8 and grouped.out_channels == grouped.in_channels == 16  # every group shrinks alike
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 16
    assert_equivalent(model, modules, (x,))
    torch.testing.assert_close(modules.module(x), graph.module(x))
