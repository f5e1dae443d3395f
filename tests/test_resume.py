"""A run survives a crash: ``fxprune run`` killed (SIGKILL) in the pass's training or in recovery, then run again
with the same command, continues from its work folder and ends on the weights an uninterrupted run ends on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli.runconfig import RunConfig
from fxprune.cli.workfolder import RUN_JSON, description, resumable, work_folder
from fxprune.recovery import checkpoints_in, train
from fxprune.recovery.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]

# The bundled example, whose loss kills its own process (SIGKILL: no cleanup runs) at the Nth call after the
# model is built (its pretraining calls the loss too) when FXPRUNE_TEST_KILL_AT=N: a kill in the middle of an
# epoch, wherever the run is then.
KILLER = '''

import os as _os
import signal as _signal

_KILL_AT = int(_os.environ.get("FXPRUNE_TEST_KILL_AT", "0"))
_calls = None  # counted once the model is built
_plain_loss = loss


def loss(output, target):
    global _calls
    if _calls is not None:
        _calls += 1
    if _calls == _KILL_AT:
        _os.kill(_os.getpid(), _signal.SIGKILL)
    return _plain_loss(output, target)


_plain_model = model


def model():
    global _calls
    net = _plain_model()
    _calls = 0
    return net
'''
PASS_EPOCHS, RECOVERY_EPOCHS = 3, 2


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "digits_killed.py"
    path.write_text((REPO / "examples" / "digits.py").read_text() + KILLER)
    return path


def _run(model_file: Path, out: Path, kill_at: int = 0, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FXPRUNE_TEST_KILL_AT": str(kill_at), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fxprune", "run", str(model_file), "--pass", "slimming", "--ratio", "0.5",
           "--opt", f"epochs={PASS_EPOCHS}", "--epochs", str(RECOVERY_EPOCHS), "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _batches(model_file: Path) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_killed", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return len(module.train_loader())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return fxprune.load(out).state_dict()


@pytest.fixture(scope="module")
def uninterrupted(model_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole") / "out"
    done = _run(model_file, out)
    assert done.returncode == 0, done.stderr
    assert not work_folder(out).exists()  # removed once the output is written
    return _weights(out)


@pytest.mark.parametrize("where, epochs_before", [("the pass's training", 1.5),
                                                  ("recovery", PASS_EPOCHS + 1.5)])
def test_a_killed_run_resumes_to_the_same_weights(model_file, uninterrupted, tmp_path, where, epochs_before):
    out = tmp_path / "out"
    killed = _run(model_file, out, int(epochs_before * _batches(model_file)))
    assert killed.returncode == -9, killed.stderr
    work = work_folder(out)
    assert not out.exists() and (work / RUN_JSON).is_file()
    trainings = sorted(p.name for p in work.glob("train-*") if checkpoint_exists(p, "last"))
    expected = ["train-0"] if where == "the pass's training" else ["train-0", "train-1"]
    assert trainings == expected, (where, trainings)
    last = load_checkpoint(work / expected[-1], "last")[1]
    assert last["epoch"] == 1  # killed half-way through the second epoch of that training

    resumed = _run(model_file, out)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert any(note.startswith(f"resumed from {work}") for note in report["notes"]), report["notes"]
    assert len(report["finetune"]["log"]) == RECOVERY_EPOCHS
    assert not work.exists()
    weights = _weights(out)
    assert weights.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(weights[name], value), name


def test_no_resume_and_another_description_start_over(model_file, tmp_path):
    out = tmp_path / "out"
    killed = _run(model_file, out, int(1.5 * _batches(model_file)))
    assert killed.returncode == -9
    other = _run(model_file, out, 0, "--lr", "0.02")  # another description: its own run, from the start
    assert other.returncode == 0, other.stderr
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("held the state of another run" in note for note in notes), notes
    assert not work_folder(out).exists()


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    model_file = tmp_path / "m.py"
    if not model_file.exists():
        model_file.write_text("# a model file\n")
    return RunConfig(model_file, "l1", 0.5, tmp_path / "out", **kw)


def _net_and_data() -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    return net, data


def test_each_training_of_a_run_gets_its_own_folder_and_replays_from_it(tmp_path):
    """Two trainings under checkpoints_in: train-0 and train-1; the same run again replays both from their
    last checkpoints (no epoch trained again) and ends on the same weights."""
    first, data = _net_and_data()
    with checkpoints_in(tmp_path):
        train(first, data, epochs=2)
        log = train(first, data, epochs=1, lr=0.05)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["train-0", "train-1"] and len(log) == 1
    again, _ = _net_and_data()
    with checkpoints_in(tmp_path):
        assert len(train(again, data, epochs=2)) == 2  # the log comes back from the checkpoint
        train(again, data, epochs=1, lr=0.05)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "train-1", "last")[1]["epoch"] == 1


def test_a_checkpoint_torn_between_its_two_files_is_not_resumed(tmp_path):
    save_checkpoint(tmp_path, "last", {"w": torch.zeros(2)}, {"epoch": 1})
    old_json = (tmp_path / "last.json").read_text()
    save_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, {"epoch": 2})
    (tmp_path / "last.json").write_text(old_json)  # killed between the tensor file's rename and the JSON's
    assert not checkpoint_exists(tmp_path, "last")
    with pytest.raises(ValueError, match="two different saves"):
        load_checkpoint(tmp_path, "last")


def test_the_description_names_what_makes_a_run_the_same(tmp_path):
    base = description(_cfg(tmp_path))
    assert description(_cfg(tmp_path, force=True, resume=False)) == base  # not part of the run
    assert description(_cfg(tmp_path, lr=0.02)) != base
    (tmp_path / "m.py").write_text("# edited\n")
    assert description(_cfg(tmp_path)) != base
    assert base["fxprune"] == fxprune.__version__ and base["torch"] == torch.__version__


def test_a_run_that_fails_before_training_leaves_no_work_folder(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError), resumable(cfg, print):
        raise RuntimeError("the model file's evaluate() failed")
    assert not work_folder(cfg.out).exists()
    net, data = _net_and_data()
    with pytest.raises(RuntimeError), resumable(cfg, print):
        train(net, data, epochs=1)
        raise RuntimeError("failed after a training: its checkpoint is kept for the rerun")
    assert checkpoint_exists(work_folder(cfg.out) / "train-0", "last")
    notes: list[str] = []
    with resumable(_cfg(tmp_path, resume=False), notes.append):  # --no-resume: the old state goes
        assert not work_folder(cfg.out).exists()
    assert notes == []
