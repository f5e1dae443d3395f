"""The command line end to end: the output folder, the reload, the bundled example, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fxprune
from fxprune.artifacts import staging_folder
from fxprune.cli import app
from fxprune.cli.pipeline import run
from fxprune.cli.runconfig import OptionError, RunConfig, parse_options
from fxprune.passes.registry import PassError

REPO = Path(__file__).resolve().parents[1]
FILES = ["model.pt2", "original.pt2", "model.safetensors", "plan.json", "report.json", "report.md", "channels.png"]

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        return self.fc(self.drop(x.flatten(1)))


def model():
    torch.manual_seed(0)
    return Tiny()


def example_inputs():
    return (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)),)


def train_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 4, (32,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def evaluate(m):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    m.eval()
    with torch.no_grad():
        return {"accuracy": (m(x).argmax(1) == y).float().mean().item()}
'''

UNTRACEABLE = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def model():
    return Branchy()


def example_inputs():
    return (torch.randn(2, 3),)
'''

CUSTOM_PASS = '''
from dataclasses import dataclass

import numpy as np

from fxprune.passes.base import Pass


@dataclass(frozen=True)
class Reverse(Pass):
    name = "reverse"
    description = "keeps the last channels (a test pass)"
    power: float = 1.0
    flip: bool = True

    def score(self, ctx):
        sign = -1.0 if self.flip else 1.0
        return {g.id: sign * np.arange(len(g), dtype=float) ** self.power for g in self.prunable(ctx)}
'''

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One fxprune run on the tiny model, through the Python pipeline the CLI calls (keeps the module)."""
    folder = tmp_path_factory.mktemp("tiny")
    model_file = _write(folder, "tiny.py", TINY)
    out = folder / "out"
    report, result = run(RunConfig(model_file, "l1", 0.5, out, finetune_epochs=1))
    return model_file, out, report, result


# ---- the output folder -------------------------------------------------------------------------------
def test_every_file_of_the_output_folder(tiny_run):
    _, out, report, result = tiny_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + ["train_log.jsonl", "training.png"])  # it trained
    assert (out / "channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert "MACs" in (out / "report.md").read_text() and "accuracy" in (out / "report.md").read_text()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["before"]["macs"] > on_disk["after"]["macs"] > 0
    assert on_disk["before"]["params"] > on_disk["after"]["params"] > 0
    assert set(on_disk["before"]["metrics"]) == set(on_disk["after"]["metrics"]) == {"accuracy"}
    assert [g["kept"] for g in on_disk["groups"]] == [4] and [g["total"] for g in on_disk["groups"]] == [8]
    assert len(on_disk["finetune"]["log"]) == 1


def test_weights_and_plan_match_the_compacted_module(tiny_run):
    _, out, _, result = tiny_run
    weights = load_file(str(out / "model.safetensors"))
    state = result.module.state_dict()
    assert weights.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(weights[name], tensor.cpu())
    plan = json.loads((out / "plan.json").read_text())
    assert plan == {k: {str(d): list(v) for d, v in e.items()} for k, e in result.plan.items()}
    for name, entry in plan.items():  # every planned tensor has exactly its kept indices left
        for dim, kept in entry.items():
            assert weights[name].shape[int(dim)] == len(kept)


def _tiny_macs(c1: int, c2: int, batch: int = 2, hw: int = 16) -> int:
    """Tiny's multiply-adds counted by hand: two 3x3 convolutions over 4x4 maps and the classifier."""
    return batch * (hw * c1 * 3 * 9 + hw * c2 * c1 * 9 + c1 * hw * 4)


def test_report_macs_are_counted_by_hand(tiny_run):
    model_file, out, report, _ = tiny_run
    weights = load_file(out / "model.safetensors")
    c1, c2 = weights["c1.weight"].shape[0], weights["c2.weight"].shape[0]
    assert c1 < 8 and c2 == c1  # the residual couples c1 and c2
    assert report["before"]["macs"] == _tiny_macs(8, 8)
    assert report["after"]["macs"] == _tiny_macs(c1, c2)


def test_reload_equals_the_in_memory_module_and_trains(tiny_run):
    _, out, _, result = tiny_run
    loaded = fxprune.load(out)
    x = torch.randn(5, 3, 4, 4)  # another batch size than the example inputs: the batch axis is dynamic
    expected = result.module.eval()(x)
    torch.testing.assert_close(loaded(x), expected)
    loaded.train()
    assert all(m.training for m in loaded.modules())
    bn = next(m for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loaded(x).sum().backward()
    assert not torch.equal(bn.running_mean, before)  # BatchNorm really switched to training
    assert all(p.grad is not None for p in loaded.parameters())
    torch.testing.assert_close(loaded.eval()(x).shape, expected.shape)


def test_plain_pytorch_loads_the_model_without_fxprune(tiny_run, tmp_path):
    _, out, _, result = tiny_run
    x = torch.randn(3, 3, 4, 4)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = (f"import json, sys, torch\nfrom safetensors.torch import load_file, save_file\n"
              f"ep = torch.export.load({str(out / 'model.pt2')!r})\n"
              f"x = load_file({str(tmp_path / 'x.safetensors')!r})['x']\n"
              "print(json.dumps(ep.module()(x).tolist()))\nassert 'fxprune' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout)), result.module.eval()(x))


def test_help_is_fast_and_python_m_works():
    done = subprocess.run([sys.executable, "-c", "import sys, fxprune.cli; assert 'torch' not in sys.modules"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "fxprune", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "inspect" in done.stdout and "bench" in done.stdout


# ---- the commands --------------------------------------------------------------------------------
def test_run_json_and_force(tmp_path):
    model_file = _write(tmp_path, "tiny.py", TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    result = _invoke("run", model_file, "--pass", "l1", "--ratio", "0.25", "--out", out, "--force", "--json",
                     "--no-recover")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ratio"] == 0.25 and report["out"] == str(out)
    assert report["finetune"]["epochs"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_recovers_by_default_when_the_file_can_train(tmp_path):
    model_file = _write(tmp_path, "tiny.py", TINY)  # 4 batches per epoch: the default is 10 epochs (~250 steps)
    result = _invoke("run", model_file, "--ratio", "0.5", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["finetune"]["mode"] == "finetune" and report["finetune"]["epochs"] == 10
    assert any("recovering with finetune for 10 epochs" in n and "--no-recover" in n for n in report["notes"])
    assert {"train_log.jsonl", "training.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    given = json.loads(_invoke("run", model_file, "--out", tmp_path / "out2", "--json", "--epochs", "2").stdout)
    assert given["finetune"]["epochs"] == 2 and not any("recovering" in n for n in given["notes"])
    both = _invoke("run", model_file, "--out", tmp_path / "out3", "--epochs", "2", "--no-recover")
    assert both.exit_code == 2 and "contradict" in both.output and not (tmp_path / "out3").exists()


def test_scratch_recoveries_retrain_for_the_declared_training_length(tmp_path):
    """Scratch-E retrains as long as the model file says model() was trained, Scratch-B that long x the MACs
    removed; without the declaration the default recovery's epochs stand in for it, and a note says which."""
    declared = _write(tmp_path, "declared.py", TINY + "\n\ntrain_epochs = 3\n")
    e = json.loads(_invoke("run", declared, "--ratio", "0.5", "--recover", "scratch-e", "--out", tmp_path / "e",
                           "--json").stdout)
    assert e["finetune"]["mode"] == "scratch-e" and e["finetune"]["epochs"] == 3
    assert any("train_epochs = 3 in the model file" in n for n in e["notes"])
    b = json.loads(_invoke("run", declared, "--ratio", "0.5", "--recover", "scratch-b", "--out", tmp_path / "b",
                           "--json").stdout)
    assert b["finetune"]["epochs"] == round(3 * b["before"]["macs"] / b["after"]["macs"]) > 3
    plain = _write(tmp_path, "plain.py", TINY)
    p = json.loads(_invoke("run", plain, "--ratio", "0.5", "--recover", "scratch-e", "--out", tmp_path / "p",
                           "--json").stdout)
    assert p["finetune"]["epochs"] == 10
    assert any("does not say how long model() was trained" in n for n in p["notes"])


def test_a_large_drop_without_recovery_says_how_to_recover(tmp_path):
    no_train = _write(tmp_path, "no_train.py", TINY.replace("def train_loader", "def _train_loader")
                      + "\n\ndef evaluate(m):\n    return {'accuracy': 0.9 if dict(m.named_parameters())"
                        "['fc.weight'].shape[1] == 128 else 0.5}\n")
    report = json.loads(_invoke("run", no_train, "--ratio", "0.5", "--out", tmp_path / "out", "--json").stdout)
    assert report["finetune"]["epochs"] == 0
    assert any("accuracy changed from 0.9 to 0.5" in n and "train_loader()" in n and "--epochs N" in n
               for n in report["notes"])


NORMED = """
import torch
from torch import nn


class Normed(nn.Module):  # every channel of the stream sits behind a LayerNorm: frozen as inexact
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.mix, self.head = (nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32),
                                                    nn.Linear(32, 4))
        self.up, self.down = nn.Linear(32, WIDTH), nn.Linear(WIDTH, 32)

    def forward(self, x):
        x = self.norm(self.inp(x))
        x = x + self.mix(x)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


def model():
    torch.manual_seed(0)
    return Normed()


def example_inputs():
    return (torch.randn(3, 16, generator=torch.Generator().manual_seed(0)),)
"""


def test_nothing_prunable_exits_2_unless_forced_and_allow_inexact_prunes_it(tmp_path):
    path = _write(tmp_path, "normed.py", NORMED.replace("self.up, self.down = nn.Linear(32, WIDTH), "
                                                        "nn.Linear(WIDTH, 32)", "").replace(
        "        x = x + self.down(torch.relu(self.up(x)))\n", ""))
    refused = _invoke("run", path, "--out", tmp_path / "out")
    assert refused.exit_code == 2 and not (tmp_path / "out").exists()
    assert "nothing can be pruned" in refused.output and "32 channels of inp, mix" in refused.output
    assert "layer_norm" in refused.output and "--allow-inexact" in refused.output and "--force" in refused.output
    forced = _invoke("run", path, "--out", tmp_path / "forced", "--force", "--json")
    assert forced.exit_code == 0 and (json.loads(forced.stdout)["after"]["macs"]
                                      == json.loads(forced.stdout)["before"]["macs"])
    inexact = _invoke("run", path, "--out", tmp_path / "inexact", "--allow-inexact", "--json")
    assert inexact.exit_code == 0, inexact.output
    report = json.loads(inexact.stdout)
    assert report["allow_inexact"] and report["after"]["params"] < report["before"]["params"]
    assert any("--allow-inexact pruned groups" in n and "--epochs N" in n for n in report["notes"])


def test_a_run_far_below_its_request_says_why(tmp_path):
    path = _write(tmp_path, "normed.py", NORMED.replace("WIDTH", "8"))  # 8 prunable MLP units, a frozen stream of 32
    report = json.loads(_invoke("run", path, "--ratio", "0.5", "--out", tmp_path / "out", "--json").stdout)
    assert report["after"]["params"] < report["before"]["params"]
    line = next(n for n in report["notes"] if n.startswith("removed"))
    assert "removed 10% of the channels where 50% was asked" in line
    assert "32 channels of down, inp, mix: inexact" in line and "--allow-inexact" in line
    target = json.loads(_invoke("run", path, "--target-macs", "0.3", "--out", tmp_path / "target", "--json").stdout)
    line = next(n for n in target["notes"] if n.startswith("removed"))
    assert "of the MACs where 70% was asked" in line and "32 channels of down, inp, mix: inexact" in line
    wide = _write(tmp_path, "wide.py", NORMED.replace("WIDTH", "256"))  # most channels prunable: no line
    report = json.loads(_invoke("run", wide, "--ratio", "0.5", "--out", tmp_path / "wide", "--json").stdout)
    assert not any(n.startswith("removed") for n in report["notes"])
    protected = json.loads(_invoke("run", wide, "--ratio", "0.5", "--protect", "up", "--out", tmp_path / "protected",
                                   "--json").stdout)  # the only prunable group protected: the line names it
    line = next(n for n in protected["notes"] if n.startswith("removed"))
    assert "removed 0% of the channels" in line and "--protect up keeps whole" in line and "Protecting fewer" in line


def test_fxprune_warnings_while_pruning_become_notes(tmp_path):
    model_file = _write(tmp_path, "tiny.py", TINY)  # 4 batches: one epoch of sparsity training cannot zero them
    result = _invoke("run", model_file, "--pass", "slimming", "--opt", "epochs=1", "--out", tmp_path / "out",
                     "--json", "--no-recover")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pass_report"]["sparsity"]["selected_below_threshold"] is False
    assert any(n.startswith("slimming: the training budget ended") and "--opt epochs=" in n for n in report["notes"])


def test_run_prints_a_summary_table(tmp_path):
    model_file = _write(tmp_path, "tiny.py", TINY)
    result = _invoke("run", model_file, "--ratio", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "MACs" in result.stdout and "accuracy" in result.stdout and "params" in result.stdout
    quiet = _invoke("run", model_file, "--out", tmp_path / "out2", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_opt_values_are_typed_for_a_plugin_pass(tmp_path, monkeypatch):
    _write(tmp_path, "reverse_pass.py", CUSTOM_PASS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model_file = _write(tmp_path, "tiny.py", TINY)
    result = _invoke("run", model_file, "--pass", "reverse_pass:Reverse", "--opt", "power=2", "--opt", "flip=false",
                     "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"] == {"power": 2.0, "flip": False}
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["c1.weight"]["0"] == [4, 5, 6, 7]  # flip=false: the first channels score lowest and go


def test_parse_options_converts_by_field_type():
    @dataclass(frozen=True)
    class Opts:
        a: bool = False
        b: int = 1
        c: float = 0.5
        d: str = "x"
        e: Optional[int] = None
        f: Literal["global", "group"] = "group"

    got = parse_options(Opts, {"a": "true", "b": "3", "c": "1e-3", "d": "y", "e": "none", "f": "global"}, "t")
    assert got == {"a": True, "b": 3, "c": 1e-3, "d": "y", "e": None, "f": "global"}
    with pytest.raises(OptionError, match="'b' must be int"):
        parse_options(Opts, {"b": "x"}, "t")
    with pytest.raises(OptionError, match="bool"):
        parse_options(Opts, {"a": "maybe"}, "t")
    with pytest.raises(PassError, match="no option 'zz'"):
        parse_options(Opts, {"zz": "1"}, "t")


def test_inspect_shows_groups(tmp_path):
    model_file = _write(tmp_path, "tiny.py", TINY)
    result = _invoke("inspect", model_file)
    assert result.exit_code == 0, result.output
    assert "prunable" in result.stdout and "frozen" in result.stdout and "model input" in result.stdout
    info = json.loads(_invoke("inspect", model_file, "--json").stdout)
    assert [g["status"] for g in info["groups"]].count("prunable") == 1 and info["macs"] > 0


def test_passes_lists_l1():
    result = _invoke("passes")
    assert result.exit_code == 0 and "l1" in result.stdout and "Li et al" in result.stdout
    rows = json.loads(_invoke("passes", "--json").stdout)
    l1 = next(r for r in rows if r["name"] == "l1")
    assert {"name": "l1", "scope": "group"}.items() <= l1.items()
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows)


def test_bench_compares_original_and_pruned(tiny_run):
    _, out, _, _ = tiny_run
    result = _invoke("bench", out, "--repeats", "3", "--rounds", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    cpu = {r["model"]: r for r in rows if r["device"] == "cpu"}
    assert cpu["original"]["latency_ms"] > 0 and cpu["pruned"]["latency_ms"] > 0
    assert 0 < cpu["pruned"]["peak_memory_bytes"] < cpu["original"]["peak_memory_bytes"]
    # interleaved rounds give a spread; the speed-up sits next to the MACs reduction it promised
    pruned = cpu["pruned"]
    assert pruned["rounds"] == 3 and pruned["threads"] == torch.get_num_threads()
    assert pruned["latency_ms_min"] <= pruned["latency_ms"] <= pruned["latency_ms_max"]
    assert pruned["speedup_min"] <= pruned["speedup"] <= pruned["speedup_max"]
    assert pruned["macs_reduction"] == cpu["original"]["macs"] / pruned["macs"] > 1
    assert pruned["promise_kept"] == pytest.approx(pruned["speedup"] / pruned["macs_reduction"])
    table = _invoke("bench", out, "--repeats", "3", "--rounds", "3")
    assert table.exit_code == 0 and "of MACs" in table.stdout and "interleaved rounds" in table.stdout


# ---- bad input: exit code 2, a clear message, no traceback, no output folder --------------------------
def _bad_input_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    tiny = _write(tmp, "tiny.py", TINY)
    no_model = _write(tmp, "no_model.py", "import torch\n\ndef example_inputs():\n    return (torch.randn(2, 3),)\n")
    untraceable = _write(tmp, "branchy.py", UNTRACEABLE)
    no_train = _write(tmp, "no_train.py", TINY.replace("def train_loader", "def _train_loader"))
    raises = _write(tmp, "raises.py", TINY.replace("    torch.manual_seed(0)\n",
                                                   "    raise ValueError('no weights')\n"))
    bad_metrics = _write(tmp, "bad_metrics.py", TINY + "\n\ndef evaluate(m):\n    return 'good'\n")
    bad_epochs = _write(tmp, "bad_epochs.py", TINY + "\n\ntrain_epochs = 0\n")
    existing = tmp / "existing"
    existing.mkdir()
    hf_folder = tmp / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    return {
        "missing file": (["run", tmp / "missing.py"], "model file not found"),
        "no model()": (["run", no_model], "does not define model"),
        # not exportable: analysed from one real run instead, where nothing is left to prune; the message says
        # both (a model with prunable channels is pruned: tests/test_modules_target.py)
        "untraceable": (["run", untraceable], "branchy.py:12: if x.sum() > 0:"),
        "untraceable, graph target": (["run", untraceable, "--target", "graph"], "branchy.py:12: if x.sum() > 0:"),
        "ratio 1": (["run", tiny, "--ratio", "1.0"], "ratio must be in [0, 1)"),
        "ratio < 0": (["run", tiny, "--ratio", "-0.1"], "ratio must be in [0, 1)"),
        "unknown pass": (["run", tiny, "--pass", "nope"],
                         "unknown pass 'nope'; available: act, anp, depth, experts, flop"),
        "unknown option": (["run", tiny, "--opt", "foo=1"], "pass 'l1' has no option 'foo'"),
        "malformed option": (["run", tiny, "--opt", "foo"], "--opt expects key=value"),
        "no train_loader": (["run", no_train, "--finetune-epochs", "1"], "does not define train_loader"),
        "existing out": (["run", tiny, "--out", existing], "already exists; pass --force"),
        "model() raises": (["run", raises], "model() in " + str(raises) + " raised ValueError: no weights"),
        "evaluate() wrong type": (["run", bad_metrics], "evaluate() in " + str(bad_metrics) + " returned 'good'"),
        "train_epochs < 1": (["run", bad_epochs], "train_epochs in " + str(bad_epochs) + " is 0; expected"),
        "bench elsewhere": (["bench", tmp / "nowhere"], "not an fxprune output folder"),
        "latency target > 1": (["run", tiny, "--target-latency", "1.5"], "--target-latency is the fraction to keep"),
        "two targets": (["run", tiny, "--target-latency", "0.5", "--target-macs", "0.5"],
                        "give one of --target-macs, --target-params and --target-latency"),
        "latency target, folder": (["run", hf_folder, "--target-latency", "0.5", "--out", tmp / "o"],
                                   "--target-latency (its latency model times the model)"),
    }


BAD_INPUT = ["missing file", "no model()", "untraceable", "untraceable, graph target", "ratio 1", "ratio < 0",
             "unknown pass", "unknown option", "malformed option", "no train_loader", "existing out", "model() raises",
             "evaluate() wrong type", "train_epochs < 1", "bench elsewhere", "latency target > 1", "two targets",
             "latency target, folder"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder would land here
    args, message = _bad_input_cases(tmp_path)[case]
    if "--out" not in args and args[0] == "run":
        args = [*args, "--out", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no temporary leftovers


def test_inspect_analyses_a_model_that_does_not_export(tmp_path):
    result = _invoke("inspect", _write(tmp_path, "branchy.py", UNTRACEABLE))
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # (the console wraps long lines)
    assert "analysed from one real run" in text and "if x.sum() > 0:" in text


def test_a_failure_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staging_folder(out) as tmp:
        (tmp / "model.pt2").write_text("half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# ---- the bundled example -------------------------------------------------------------------------
def test_the_headline_command_keeps_accuracy(tmp_path):
    """`fxprune run examples/digits.py --pass slimming --ratio 0.5` with no other flag."""
    out = tmp_path / "headline"
    result = _invoke("run", REPO / "examples" / "digits.py", "--pass", "slimming", "--ratio", "0.5", "--out", out,
                     "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    before, after = report["before"]["metrics"]["accuracy"], report["after"]["metrics"]["accuracy"]
    assert before > 0.95 and after >= before - 0.02 and report["finetune"]["epochs"] > 0  # recovered by default
    assert report["after"]["macs"] < 0.3 * report["before"]["macs"]
    # before any recovery, pruning cost (almost) nothing against the sparsity-trained network
    trained = report["pass_report"]["trained_metrics"]["accuracy"]
    assert report["pruned"]["metrics"]["accuracy"] >= trained - 0.05
    sparsity = report["pass_report"]["sparsity"]
    assert sparsity["selected_below_threshold"] and sparsity["fraction_below_after"] > 0.4
    assert (out / "gamma_histogram.png").stat().st_size > 0
    hist = report["pass_report"]["histograms"]["gamma"]  # binned in report.json: 224 BatchNorm scales
    assert sum(hist["before"]) == sum(hist["after"]) == 32 + 32 + 32 + 64 + 64
    assert hist["before"][0] == 0 and hist["after"][0] >= 0.4 * 224 and len(hist["edges"]) == len(hist["after"]) + 1
    layers = {r["layer"]: r for r in report["layers"]}  # MACs per layer add up to torch's own count
    assert set(layers) == {"stem.0", "conv1", "conv2", "conv3", "conv4", "fc"}
    assert sum(r["macs_before"] for r in layers.values()) == report["before"]["macs"]
    assert sum(r["macs_after"] for r in layers.values()) == report["after"]["macs"]


def test_digits_example_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITS_EPOCHS", "3")  # a shorter pre-training than the README run
    out = tmp_path / "digits"
    result = _invoke("run", REPO / "examples" / "digits.py", "--pass", "l1", "--ratio", "0.5",
                     "--finetune-epochs", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["before"]["metrics"]["accuracy"] > 0.9
    assert report["after"]["metrics"]["accuracy"] > 0.85
    assert report["after"]["macs"] < 0.4 * report["before"]["macs"]
    x = torch.randn(4, 1, 8, 8)
    loaded = fxprune.load(out)
    assert loaded(x).shape == (4, 10)


# ---- torchrun -----------------------------------------------------------------------------------------
DIGITS_MLP = '''
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.datasets import load_digits

_d = load_digits()
_x = torch.tensor(_d.data, dtype=torch.float32) / 16.0
_y = torch.tensor(_d.target)
_perm = torch.randperm(len(_y), generator=torch.Generator().manual_seed(0))
_train, _val = _perm[:1400], _perm[1400:]


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(3):
        for batch in train_loader():
            opt.zero_grad()
            F.cross_entropy(net(batch[0]), batch[1]).backward()
            opt.step()
    return net.eval()


def example_inputs():
    return (_x[_val[:8]],)


def train_loader():
    data = torch.utils.data.TensorDataset(_x[_train], _y[_train])
    return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def evaluate(m):
    with torch.no_grad():
        return {"accuracy": (m(_x[_val]).argmax(1) == _y[_val]).float().mean().item()}
'''


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "fxprune", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_run_writes_and_prints_once_and_matches_one_process(tmp_path):
    """Two processes (gloo): one output folder, one table, an accuracy within 5 points of one process's;
    a bad input ends both with one message."""
    model_file = _write(tmp_path, "mlp.py", DIGITS_MLP)
    args = ("run", model_file, "--pass", "l1", "--ratio", "0.5", "--epochs", "2", "--lr", "0.05")
    two = _torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.py", "two"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(FILES + ["train_log.jsonl", "training.png"])
    assert two.stdout.count("MACs") == 1, two.stdout  # one summary table
    single, _ = run(RunConfig(model_file, "l1", 0.5, tmp_path / "one", finetune_epochs=2, lr=0.05))
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert abs(report["after"]["metrics"]["accuracy"] - single["after"]["metrics"]["accuracy"]) <= 0.05
    assert len((tmp_path / "two" / "train_log.jsonl").read_text().splitlines()) == 2  # one writer

    again = _torchrun(*args, "--out", tmp_path / "two")  # the folder exists: bad input on every rank
    assert again.returncode != 0
    assert again.stderr.count("error: ") == 1, again.stderr[-3000:]


LM_FILE = """
import os
import torch
import transformers as T

FOLDER = {folder!r}
_ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(2))


def model():
    return T.LlamaForCausalLM.from_pretrained(FOLDER).eval()


def example_inputs():
    return (_ids[:2],)


def train_loader():  # the same global batch of 8 whatever the number of processes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_ids, _ids), batch_size=8 // world)
"""


def test_torchrun_fsdp_recovers_a_from_pretrained_model_file_like_one_process(tmp_path):
    """--fsdp: the pruned language model (a model file returning from_pretrained) and its teacher sharded across
    two processes; one output folder, and the distillation's losses those of one process on the same batches."""
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=48, num_hidden_layers=2)).save_pretrained(tmp_path / "hf")
    model_file = _write(tmp_path, "lm.py", LM_FILE.format(folder=str(tmp_path / "hf")))
    args = ("run", model_file, "--pass", "l1", "--ratio", "0.5", "--epochs", "2", "--distill", "--lr", "0.01")
    two = _torchrun(*args, "--fsdp", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lm.py", "two"]
    one = subprocess.run([sys.executable, "-m", "fxprune", *map(str, args), "--out", str(tmp_path / "one"),
                          "--quiet"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert one.returncode == 0, one.stderr[-3000:]
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("two", "one")]
    assert len(logs[0]) == 2 and logs[0] == pytest.approx(logs[1], rel=1e-4)


# ---- deployment formats ---------------------------------------------------------------------------------
@pytest.fixture
def folder_copy(tiny_run, tmp_path):
    import shutil
    return Path(shutil.copytree(tiny_run[1], tmp_path / "out"))


def test_export_onnx_is_checked_with_onnxruntime_and_keeps_a_dynamic_batch(folder_copy):
    import onnxruntime  # noqa: F401  (the test extra)

    from fxprune.cli.deploy import onnx_feed, onnx_session

    done = _invoke("export", folder_copy, "--format", "onnx", "--json")
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["max_rel_err"] <= 1e-4 and isinstance(info["input_shapes"][0][0], str)  # a symbolic batch
    assert sorted(p.name for p in folder_copy.iterdir()) == sorted(FILES + ["model.onnx", "original.onnx",
                                                                             "train_log.jsonl", "training.png"])
    assert info["original"]["max_rel_err"] <= 1e-4
    x = torch.randn(5, 3, 4, 4)  # another batch size than the example inputs
    session = onnx_session(folder_copy / "model.onnx")
    got = session.run(None, onnx_feed(session, (x,), {}))[0]
    with torch.no_grad():
        ref = fxprune.load(folder_copy).eval()(x)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
    bench = json.loads(_invoke("bench", folder_copy, "--repeats", "3", "--rounds", "3", "--json").stdout)
    rows = {r["model"]: r for r in bench}
    onnx_row = rows["pruned (onnxruntime)"]
    assert onnx_row["speedup"] > 0 and onnx_row["macs"] == rows["pruned"]["macs"]
    # like for like: the onnxruntime row is timed against the original in onnxruntime, the program against the program
    assert onnx_row["baseline"] == "original (onnxruntime)" and rows["pruned"]["baseline"] == "original"
    assert rows["original (onnxruntime)"]["macs"] == rows["original"]["macs"]


def test_export_bad_input_and_missing_dependencies(folder_copy, monkeypatch, tmp_path):
    wrong = _invoke("export", folder_copy, "--format", "tflite")
    assert wrong.exit_code == 2 and "--format must be one of onnx" in wrong.output
    nowhere = _invoke("export", tmp_path / "nowhere")
    assert nowhere.exit_code == 2 and "not an fxprune output folder" in nowhere.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    missing = _invoke("export", folder_copy)
    assert missing.exit_code == 2 and 'pip install "fxprune[onnx]"' in missing.output and "onnxscript" in missing.output
    assert not (folder_copy / "model.onnx").exists()


def test_run_with_onnx_writes_and_reports_it(tmp_path):
    import onnxruntime  # noqa: F401  (the test extra)
    model_file = _write(tmp_path, "tiny.py", TINY)
    out = tmp_path / "out"
    done = _invoke("run", model_file, "--no-recover", "--onnx", "--out", out, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").is_file() and report["onnx"]["path"] == "model.onnx"
    assert (out / "original.onnx").is_file() and report["onnx"]["original"]["path"] == "original.onnx"
    assert report["onnx"]["max_rel_err"] <= 1e-4


def test_readme_aotinductor_recipe_compiles_model_pt2_on_cpu(folder_copy):
    """The README's AOTInductor path, on CPU: the compiled package equals the pruned model, at another batch."""
    ep = torch.export.load(str(folder_copy / "model.pt2"))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(folder_copy / "model_aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fxprune.load(folder_copy).eval()(x), rtol=1e-4, atol=1e-5)


def test_a_run_that_ends_more_than_two_points_below_the_original_says_so_and_what_would_help(tmp_path):
    """evaluate() that rewards the full width: after recovery the pruned model is 40 points below, and one note
    names more epochs, a smaller ratio and distillation; a run that ends level has no such note."""
    for full_only, expected in ((True, True), (False, False)):
        full = "sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in Tiny().parameters())"
        score = f"0.9 if {full} else 0.5" if full_only else "0.9"
        model_file = _write(tmp_path, f"widths_{full_only}.py", TINY.replace(
            "def evaluate(m):", f"def evaluate(m):\n    return {{'accuracy': {score}}}\n\n\ndef _unused(m):"))
        out = tmp_path / f"out_{full_only}"
        result = _invoke("run", model_file, "--pass", "l1", "--ratio", "0.5", "--epochs", "1", "--out", out,
                         "--json")
        assert result.exit_code == 0, result.output
        notes = json.loads(result.stdout)["notes"]
        said = [n for n in notes if n.startswith("accuracy ended at")]
        assert bool(said) == expected, notes
        if expected:
            assert "0.5 after 1 epoch of finetune" in said[0] and "--epochs 2" in said[0]
            assert "a smaller --ratio" in said[0] and "--distill" in said[0]


@pytest.mark.parametrize("before, after, fell", [
    (0.9, 0.87, True), (0.9, 0.89, False), (0.9, 0.95, False),     # a metric in [0, 1]: points
    (-3.648, -3.472, False), (-3.0, -3.1, True), (40.0, 39.5, False), (40.0, 44.0, False), (40.0, 38.0, True)])
def test_a_metric_only_falls_downwards(before: float, after: float, fell: bool) -> None:
    """The notes read evaluate()'s first metric as higher-is-better: a character LM's neg_bpc that improves from
    -3.648 to -3.472 is no drop (it was reported as one), a fall of 2% of |before| or more is."""
    from fxprune.cli.notes import _fell

    got = _fell({"m": before}, {"m": after}, 0.02)
    assert (got is not None) == fell and (got is None or got == ("m", before, after))
