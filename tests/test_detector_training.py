"""Training models that compute their own loss (fxprune.recovery.own_loss): a detector's forward takes the targets
and returns a dict of losses in training mode; the engine sums it and logs each term. Through the command line,
slimming trains and recovers a detector compacted by resizing its modules, and `fxprune eval` reports the model
file's metrics of both models of its folder."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_modules_target import DetNet
from torch import nn
from typer.testing import CliRunner

from fxprune.cli import app
from fxprune.recovery.engine import train
from fxprune.recovery.own_loss import reduce_loss, target_parameter


class LossDetNet(DetNet):
    """DetNet whose forward, given targets (training), returns its losses: a class term on its pooled features and
    a box term on its first detection."""

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None):  # type: ignore[override]
        out = super().forward(x)
        if targets is None:
            return out
        labels = torch.stack([t["labels"][0] for t in targets])
        return {"loss_classifier": F.cross_entropy(out["features"][:, :3] * 4, labels),
                "loss_box": (out["features"][:, 3:7] - targets[0]["boxes"][0] / 32).pow(2).mean()}


def _batches(n: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 3, 32, 32, generator=g),
             [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]), "labels": torch.randint(0, 3, (1,), generator=g)}])
            for _ in range(n)]


def test_the_loss_a_model_returns() -> None:
    a, b = torch.tensor(1.5, requires_grad=True), torch.tensor([0.5])
    loss, terms = reduce_loss({"cls": a, "box": b})
    assert float(loss) == 2.0 and terms == {"cls": 1.5, "box": 0.5} and loss.requires_grad
    assert reduce_loss(SimpleNamespace(loss=a))[0] is not None and reduce_loss(a)[1] == {}
    with pytest.raises(ValueError, match="non-scalar"):
        reduce_loss({"cls": torch.ones(3)})
    with pytest.raises(ValueError, match="not a loss.*define loss"):
        reduce_loss([torch.ones(2)])
    assert target_parameter(LossDetNet()) == "targets" and target_parameter(DetNet()) is None
    assert target_parameter(nn.Linear(2, 2)) is None


def test_the_engine_trains_on_the_models_own_loss_and_logs_its_terms() -> None:
    torch.manual_seed(0)
    model = LossDetNet()
    before = [p.detach().clone() for p in model.parameters()]
    log = train(model, _batches(), epochs=2, lr=0.01)
    assert [set(r["terms"]) for r in log] == [{"loss_classifier", "loss_box"}] * 2
    assert all(r["loss"] == pytest.approx(sum(r["terms"].values()), rel=1e-5) for r in log)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


MODEL_FILE = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_detector_training import LossDetNet, _batches

train_epochs = 2

def model():
    torch.manual_seed(0)
    return LossDetNet().eval()

def example_inputs():
    return (torch.rand(1, 3, 32, 32),)

def train_loader():
    return _batches(3, seed=0)

def evaluate(m):
    m.eval()
    with torch.no_grad():
        hits = [int(m(x)["features"][:, :3].argmax(1)[0] == t[0]["labels"][0]) for x, t in _batches(4, seed=1)]
    return {{"hit_rate": sum(hits) / len(hits)}}
'''


def test_cli_slims_a_detector_recovers_it_and_eval_measures_its_folder(tmp_path) -> None:
    path = tmp_path / "det.py"
    path.write_text(textwrap.dedent(MODEL_FILE.format(tests=str(Path(__file__).parent))))
    out = tmp_path / "out"
    runner = CliRunner()
    done = runner.invoke(app, ["run", str(path), "--pass", "slimming", "--ratio", "0.5", "--opt", "epochs=1",
                               "--epochs", "1", "--out", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads((out / "report.json").read_text())
    assert report["compaction"]["target"] == "modules" and report["after"]["macs"] < report["before"]["macs"]
    assert report["finetune"]["log"][0]["terms"].keys() == {"loss_classifier", "loss_box"}
    assert "metrics" in report["before"] and "metrics" in report["after"] and "trained_metrics" in report["pass_report"]
    assert not (out / "model.pt2").exists()
    # an example batch of one: the resized modules keep the model's code, so the batch stays free (checked at two)
    assert {"input": "x", "axis": 0, "example": 1, "checked_at": 2} in report["input_axes"]["dynamic"]
    assert not any("fixed at 1" in note for note in report["notes"])
    rows = runner.invoke(app, ["eval", str(path), str(out), "--attack", "none", "--json"])
    assert rows.exit_code == 0, rows.output
    got = json.loads(rows.stdout)
    assert [r["model"] for r in got] == ["original", "pruned"] and all("hit_rate" in r["metrics"] for r in got)
    table = runner.invoke(app, ["eval", str(path), str(out), "--attack", "none"])
    assert table.exit_code == 0 and "hit_rate" in table.output
    attacked = runner.invoke(app, ["eval", str(path), str(out)])
    assert attacked.exit_code == 2 and "val_loader" in attacked.output and "--attack none" in attacked.output
    sys.modules.pop("test_detector_training", None)


def test_slimming_trains_and_prunes_a_torchvision_detector_exactly() -> None:
    """Faster R-CNN (MobileNetV3-FPN, random weights): no static graph; slimming trains its sparsity on a masked copy
    of its modules through its own dict of losses, and the resized detector equals the masked original."""
    import warnings

    import torchvision

    import fxprune
    from fxprune.testing import assert_equivalent

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128).eval()
    g = torch.Generator().manual_seed(0)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])}]
    loader = [(torch.rand(2, 3, 128, 128, generator=g), targets)]
    x = ([torch.rand(3, 128, 128, generator=g)],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxprune.prune(model, x, "slimming", 0.5, train_loader=loader, options={"epochs": 1})
    assert result.compaction["target"] == "modules" and result.weights
    assert result.cost_after.macs < 0.6 * result.cost_before.macs
    assert_equivalent(model, result, x, dtype=None)
