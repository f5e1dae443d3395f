"""Robustness evaluation (fxprune.robustness, `fxprune eval`): PGD finds worse points than random noise of the
same size, stays in its ball and the input range, leaves the model as it was; the original and a compacted
model take the same code path; the command evaluates an output folder."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import fxprune
from fxprune.cli import app
from fxprune.robustness import PGD, robust_metrics


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def _trained() -> Net:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(20):
        for x, y in _data():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval()


def test_pgd_beats_random_noise_of_the_same_size_and_stays_in_its_ball() -> None:
    net = _trained()
    x, y = _data()[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attack = PGD(eps=0.1, steps=10, bounds=(0.0, 1.0))
    adv = attack(net, x, y, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0.0 and adv.max() <= 1.0
    noise = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    with torch.no_grad():
        assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(noise), y) + 0.1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and not net.training
    with pytest.raises(ValueError, match="eps > 0"):
        PGD(eps=0.0)


def test_original_and_compacted_models_take_the_same_path() -> None:
    net = _trained()
    res = fxprune.prune(net, (torch.rand(2, 1, 8, 8),), "l1", 0.0)  # nothing removed: the same function
    attack = PGD(eps=0.05, steps=5, bounds=(0.0, 1.0))
    a = robust_metrics(net, _data(), attack)
    b = robust_metrics(res.module.eval(), _data(), attack)
    assert a["pgd_accuracy"] < a["clean_accuracy"] and a["vulnerability"] > 0
    assert a["clean_accuracy"] == b["clean_accuracy"] and a["pgd_accuracy"] == b["pgd_accuracy"]
    assert a["vulnerability"] == pytest.approx(b["vulnerability"], rel=1e-5)
    stronger = robust_metrics(net, _data(), PGD(eps=0.2, steps=5, bounds=(0.0, 1.0)))
    assert stronger["pgd_accuracy"] <= a["pgd_accuracy"] and stronger["vulnerability"] > a["vulnerability"]


MODEL_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]

def model():
    torch.manual_seed(0)
    return Net().eval()

def example_inputs():
    return (torch.rand(2, 1, 8, 8),)

def val_loader():
    return _data(1)
'''


def test_cli_eval_reports_both_models_of_an_output_folder(tmp_path) -> None:
    model_file = tmp_path / "net.py"
    model_file.write_text(textwrap.dedent(MODEL_FILE))
    out = tmp_path / "run"
    runner = CliRunner()
    done = runner.invoke(app, ["run", str(model_file), "--pass", "l1", "--ratio", "0.5", "--no-recover",
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    result = runner.invoke(app, ["eval", str(model_file), str(out), "--eps", "0.1", "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["original", "pruned"]
    for row in rows:
        assert 0 <= row["pgd_accuracy"] <= row["clean_accuracy"] <= 1 and row["vulnerability"] >= 0
        assert row["eps"] == 0.1 and row["steps"] == 3
    table = runner.invoke(app, ["eval", str(model_file), str(out), "--eps", "0.1", "--steps", "2"])
    assert table.exit_code == 0 and "PGD accuracy" in table.output
    bad = runner.invoke(app, ["eval", str(model_file), str(out), "--attack", "fgsm"])
    assert bad.exit_code == 2 and "--attack must be one of pgd" in bad.output
    missing = runner.invoke(app, ["eval", str(model_file), str(tmp_path)])
    assert missing.exit_code == 2 and "original.pt2 not found" in missing.output


def test_cli_run_with_attack_reports_robustness_before_and_after(tmp_path) -> None:
    model_file = tmp_path / "net.py"
    model_file.write_text(textwrap.dedent(MODEL_FILE))
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(model_file), "--pass", "l1", "--ratio", "0.5", "--no-recover",
                                 "--attack", "pgd", "--eps", "0.1", "--attack-steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "PGD accuracy (eps 0.1, 3 steps)" in result.output and "vulnerability" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["attack"] == {"name": "pgd", "eps": 0.1, "steps": 3, "step": pytest.approx(2.5 * 0.1 / 3),
                                "from": "--attack"}
    for side in ("before", "after"):
        r = report[side]["robustness"]
        assert 0 <= r["pgd_accuracy"] <= r["clean_accuracy"] <= 1 and r["vulnerability"] >= 0
    assert "PGD accuracy" in (out / "report.md").read_text()
    bad = runner.invoke(app, ["run", str(model_file), "--attack", "fgsm", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--attack must be one of pgd" in bad.output
    no_data = tmp_path / "nodata.py"
    no_data.write_text(textwrap.dedent(MODEL_FILE).replace("def val_loader", "def _unused"))
    missing = runner.invoke(app, ["run", str(no_data), "--attack", "pgd", "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "val_loader" in missing.output and not (tmp_path / "y").exists()
