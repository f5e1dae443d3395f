"""The training engine and recovery: options, checkpoints and resume, distillation, re-initialisation,
the compacted module training at its compacted size, and data-parallel training under torchrun."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxprune
from fxprune.recovery import Hook, TrainState, plot_log, read_log, recover, reinitialize, scratch_b_epochs, train
from fxprune.recovery.distributed import DistContext, shard_loader
from fxprune.recovery.modes import DistillHook, distill_loss

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def _dataset(n: int = 192) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    patterns = torch.randn(CLASSES, 1, 8, 8, generator=g)
    x = patterns[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, y)


def _loader(shuffle: bool = True) -> DataLoader:
    return DataLoader(_dataset(), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _accuracy(model: nn.Module) -> dict[str, float]:
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in _loader(shuffle=False))
    model.train(was)
    return {"accuracy": correct / len(_dataset())}


@pytest.fixture(scope="module")
def trained() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    train(model, _loader(), epochs=3, lr=3e-3, optimizer="adamw")
    return model.eval()


@pytest.fixture(scope="module")
def pruned(trained: Tiny) -> fxprune.PruneResult:
    return fxprune.prune(trained, (torch.randn(4, 1, 8, 8),), "l1", 0.5)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- engine options -------------------------------------------------------------------------------

class _Record(Hook):
    def __init__(self) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.norms: list[float] = []
        self.clipped: list[float] = []

    def after_step(self, state: TrainState) -> None:
        self.optimizers.append(state.optimizer)
        self.norms.append(state.grad_norm)
        grads = [p.grad for p in state.module.parameters() if p.grad is not None]
        self.clipped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def test_adamw_step_schedule_and_clipping() -> None:
    torch.manual_seed(0)
    model, hook = Tiny(), _Record()
    log = train(model, _loader(), epochs=3, lr=0.1, optimizer="adamw", schedule="step", step_size=1, gamma=0.5,
                max_grad_norm=1e-3, hooks=[hook])
    assert [r["lr"] for r in log] == pytest.approx([0.1, 0.05, 0.025])
    assert isinstance(hook.optimizers[0], torch.optim.AdamW)
    assert hook.optimizers[0].param_groups[0]["weight_decay"] == 1e-2  # AdamW's default decay
    assert min(hook.norms) > 1e-3, "the recorded norm is the one before clipping"
    assert max(hook.clipped) <= 1e-3 * 1.001, "gradients were clipped before the step"


def test_sgd_cosine_and_none_schedules() -> None:
    model = Tiny()
    cosine = train(model, _loader(), epochs=2, lr=0.1)
    assert [r["lr"] for r in cosine] == pytest.approx([0.1, 0.05])
    flat = train(model, _loader(), epochs=2, lr=0.1, schedule="none")
    assert [r["lr"] for r in flat] == [0.1, 0.1]


@pytest.mark.parametrize("bad,match", [({"optimizer": "lamb"}, "optimizer must be one of"),
                                       ({"schedule": "linear"}, "schedule must be one of"),
                                       ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
                                       ({"resume": True}, "resume=True needs checkpoint_dir")])
def test_bad_options(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(Tiny(), _loader(), epochs=1, **bad)


def test_amp_is_off_on_cpu() -> None:
    model = Tiny()
    with pytest.warns(UserWarning, match="only used on CUDA"):
        train(model, _loader(), epochs=1, amp=True)
    assert model.conv1.weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, hook = Tiny(), _Record()
    train(model, _loader(), epochs=2, lr=3e-3, optimizer="adamw", device="cuda", hooks=[hook],
          checkpoint_dir=tmp_path)
    assert model.conv1.weight.dtype == torch.float32 and model.conv1.weight.is_cuda
    assert torch.isfinite(model.fc.weight).all()
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["scaler"]["scale"] > 0, "the GradScaler's state is checkpointed"
    resumed = Tiny()
    train(resumed, _loader(), epochs=2, lr=3e-3, optimizer="adamw", device="cuda", checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# --- evaluation, log, checkpoints, resume --------------------------------------------------------

class _Scripted:
    """evaluate() returning a fixed sequence, to know which epoch is best."""

    def __init__(self, values: list[float]) -> None:
        self.values = iter(values)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        model.eval()  # the engine must switch back to train mode
        return {"loss": 0.0, "score": next(self.values)}


class _Snapshot(Hook):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.modes: list[bool] = []

    def after_step(self, state: TrainState) -> None:
        self.modes.append(state.module.training)

    def after_epoch(self, state: TrainState) -> None:
        self.states.append(_state(state.module))


def test_best_checkpoint_log_and_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, snap = Tiny(), _Snapshot()
    log = train(model, _loader(), epochs=4, lr=0.05, evaluate=_Scripted([0.2, 0.9, 0.5, 0.7]), metric="score",
                checkpoint_dir=tmp_path, hooks=[snap])
    assert all(snap.modes), "evaluate() switched to eval mode; training resumed in train mode"
    assert [r["metrics"]["score"] for r in log] == [0.2, 0.9, 0.5, 0.7]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["epoch"] == 2 and best["metric"] == "score" and best["metrics"]["score"] == 0.9
    weights = load_file(str(tmp_path / "best.safetensors"))
    for k, v in snap.states[1].items():
        assert torch.equal(weights[f"model.{k}"], v), k
    lines = read_log(tmp_path / "training.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"epoch", "loss", "lr", "seconds", "metrics"} <= set(lines[0])
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_log(log, tmp_path / "again.png").stat().st_size > 1000
    # without metric=: the first key ("loss", constant) is tracked, so the first epoch stays best
    train(Tiny(), _loader(), epochs=2, evaluate=_Scripted([0.1, 0.2]), checkpoint_dir=tmp_path / "b")
    assert json.loads((tmp_path / "b" / "best.json").read_text())["metric"] == "loss"


def test_checkpoint_files_load_without_pickle(tmp_path: Path) -> None:
    model = Tiny()
    train(model, _loader(), epochs=1, optimizer="adamw", checkpoint_dir=tmp_path)
    tensors = load_file(str(tmp_path / "last.safetensors"))
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["epoch"] == 1 and meta["format"] == "fxprune.checkpoint/1"
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[f"model.{k}"], v)
    assert tensors["rng.torch"].dtype == torch.uint8
    assert any(k.startswith("optimizer.state.") and k.endswith(".exp_avg") for k in tensors)
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)  # cosine over 1 epoch
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in tmp_path.iterdir())


class _Interrupt(Hook):
    def __init__(self, at: int) -> None:
        self.at = at

    def before_epoch(self, state: TrainState) -> None:
        if state.epoch == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    options = {"epochs": 4, "lr": 0.05 if optimizer == "sgd" else 3e-3, "optimizer": optimizer,
               "evaluate": _accuracy}
    torch.manual_seed(0)
    straight = Tiny()
    log = train(straight, _loader(), checkpoint_dir=tmp_path / "a", **options)

    torch.manual_seed(0)
    interrupted = Tiny()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, _loader(), checkpoint_dir=tmp_path / "b", hooks=[_Interrupt(2)], **options)
    assert json.loads((tmp_path / "b" / "last.json").read_text())["epoch"] == 2

    torch.manual_seed(123)  # a new process: other weights, other random state, a fresh loader
    resumed = Tiny()
    log2 = train(resumed, _loader(), checkpoint_dir=tmp_path / "b", resume=True, **options)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in log2] == [r["loss"] for r in log]
    assert [r["epoch"] for r in read_log(tmp_path / "b" / "training.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="epochs"):
        train(Tiny(), _loader(), checkpoint_dir=tmp_path / "b", resume=True, **{**options, "epochs": 6})


def test_resume_without_checkpoint_starts_afresh(tmp_path: Path) -> None:
    log = train(Tiny(), _loader(), epochs=1, checkpoint_dir=tmp_path, resume=True)
    assert len(log) == 1 and (tmp_path / "last.json").is_file()


def test_hook_state_is_checkpointed(tmp_path: Path) -> None:
    class Counter(Hook):
        def __init__(self) -> None:
            self.count = torch.zeros(())
            self.lam = 0.0

        def after_step(self, state: TrainState) -> None:
            self.count += 1
            self.lam += 0.5

        def state_dict(self) -> dict:
            return {"count": self.count, "lam": self.lam}

        def load_state_dict(self, state: dict) -> None:
            self.count, self.lam = state["count"].clone(), state["lam"]

    with pytest.raises(KeyboardInterrupt):
        train(Tiny(), _loader(), epochs=2, checkpoint_dir=tmp_path, hooks=[Counter(), _Interrupt(1)])
    hook = Counter()
    train(Tiny(), _loader(), epochs=2, checkpoint_dir=tmp_path, resume=True, hooks=[hook, _Interrupt(5)])
    assert int(hook.count) == 2 * len(_loader()) and hook.lam == 0.5 * 2 * len(_loader())


# --- recovery -------------------------------------------------------------------------------------

def test_scratch_b_epochs() -> None:
    assert scratch_b_epochs(10, 4e6, 1e6) == 40
    assert scratch_b_epochs(10, 4e6, 1e6, max_budget_factor=2) == 20
    assert scratch_b_epochs(10, 3e6, 2e6) == 15
    assert scratch_b_epochs(3, 1.7e6, 1e6) == 5  # 5.1 rounds to 5
    assert scratch_b_epochs(1, 1e6, 1e6) == 1
    with pytest.raises(ValueError, match="scratch-b needs positive MACs"):
        scratch_b_epochs(10, 0, 1e6)


def test_distill_hook_against_hand_computation() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    student = torch.randn(6, 3, dtype=torch.float64)
    T, alpha = 4.0, 0.9
    task = F.cross_entropy(student, y)
    state = TrainState(Tiny(), None, 1, None, inputs=x, task_loss=task)  # type: ignore[arg-type]
    total = task + DistillHook(teacher, T, alpha).loss(state, student, y)
    with torch.no_grad():
        t = teacher(x).double()
    kl = 0.0
    for i in range(6):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in student[i].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = (1 - alpha) * float(task) + alpha * T * T * kl / 6
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_reinitialize_compacted_module(pruned: fxprune.PruneResult) -> None:
    module = copy.deepcopy(pruned.module)
    before = _state(module)
    with torch.no_grad():
        module.bn1.weight.fill_(3.0)
    assert reinitialize(module) == []
    after = dict(module.named_parameters())
    for name, p in after.items():
        assert p.shape == before[name].shape
        if p.dim() >= 2:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            fan_in = p[0].numel()
            assert p.abs().max() <= 1 / math.sqrt(fan_in) + 1e-6 and not torch.equal(p, before[name]), name
    assert torch.equal(module.bn1.weight, torch.ones_like(module.bn1.weight))
    assert torch.equal(module.bn2.bias, torch.zeros_like(module.bn2.bias))
    assert torch.equal(module.bn1.running_var, torch.ones_like(module.bn1.running_var))
    assert int(module.bn1.num_batches_tracked) == 0
    fan_in = module.conv2.weight[0].numel()  # conv2's bias follows its own weight's fan-in
    assert module.conv2.bias.abs().max() <= 1 / math.sqrt(fan_in) and not torch.equal(module.conv2.bias,
                                                                                       before["conv2.bias"])
    assert module.fc.bias.abs().max() <= 1 / math.sqrt(module.fc.weight.shape[1])


def test_reinitialize_plain_module_uses_reset_parameters() -> None:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    assert reinitialize(model) == []
    assert all(not torch.all(p == 7.0) for p in model.parameters())


@pytest.mark.parametrize("mode", ["finetune", "scratch-e", "scratch-b"])
def test_recovery_modes(pruned: fxprune.PruneResult, mode: str) -> None:
    module = copy.deepcopy(pruned.module)
    inherited = _state(module)
    # lr = 0 isolates what the mode itself does to the weights (training then changes only BN statistics)
    log = recover(module, mode=mode, train_loader=_loader(), epochs=2, lr=0.0, schedule="none",
                  macs_full=3e6, macs_pruned=1e6, max_budget_factor=2.5)
    assert len(log) == {"finetune": 2, "scratch-e": 2, "scratch-b": 5}[mode]  # scratch-b: min(2 x 3, 2 x 2.5)
    for name, p in module.named_parameters():
        assert p.shape == inherited[name].shape
        if mode == "finetune":
            assert torch.equal(p, inherited[name]), name
        elif p.dim() >= 2:
            assert not torch.equal(p, inherited[name]), f"{mode} re-initialises {name}"


def test_recover_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        recover(Tiny(), mode="scratch", train_loader=_loader(), epochs=1)
    with pytest.raises(ValueError, match="macs_full"):
        recover(Tiny(), mode="scratch-b", train_loader=_loader(), epochs=1)
    with pytest.raises(ValueError, match="original"):
        recover(Tiny(), mode="finetune", train_loader=_loader(), epochs=1, distill=True)


def test_compacted_module_trains_at_compacted_size(pruned: fxprune.PruneResult, trained: Tiny, tmp_path: Path) -> None:
    module = copy.deepcopy(pruned.module).eval()
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    stats = module.bn1.running_mean.clone()
    teacher_state = _state(trained)
    before = _accuracy(module)["accuracy"]
    log = recover(module, mode="finetune", original=trained, distill=True, train_loader=_loader(), epochs=3,
                  lr=1e-3, optimizer="adamw", evaluate=_accuracy, checkpoint_dir=tmp_path)
    assert {k: v.shape for k, v in module.state_dict().items()} == shapes
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in trained.parameters())
    assert not torch.equal(module.bn1.running_mean, stats), "BatchNorm statistics were updated (train mode)"
    assert not module.training, "the module ends in the mode it started in"
    assert not trained.training and all(torch.equal(v, teacher_state[k]) for k, v in trained.state_dict().items()), \
        "the teacher stays frozen, in eval mode"
    assert log[-1]["metrics"]["accuracy"] >= before
    assert isinstance(pruned.module, torch.fx.GraphModule)


# --- data parallel --------------------------------------------------------------------------------

def test_shard_loader_keeps_batch_size_and_collate() -> None:
    def collate(batch):  # noqa: ANN001, ANN202
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])

    loader = DataLoader(_dataset(), batch_size=16, shuffle=True, collate_fn=collate)
    shard = shard_loader(loader, DistContext(world=2, rank=1))
    assert isinstance(shard.sampler, DistributedSampler) and shard.sampler.rank == 1 and shard.sampler.shuffle
    assert shard.batch_size == 16 and shard.collate_fn is collate and len(shard) == len(loader) // 2
    assert shard_loader(loader, DistContext()) is loader
    with pytest.warns(UserWarning, match="cannot be sharded"):
        assert shard_loader([1, 2], DistContext(world=2)) == [1, 2]


DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {examples!r})
import digits
from fxprune.recovery import train
from fxprune.recovery.distributed import cleanup

torch.manual_seed(0)
net = digits.DigitsNet(width=8)
log = train(net, digits.train_loader(), digits.loss, {epochs}, 3e-3, optimizer="adamw",
            evaluate=digits.evaluate, checkpoint_dir=sys.argv[1])
weights = float(sum(p.double().sum() for p in net.parameters()))
with open(os.path.join(sys.argv[2], f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump({{"accuracy": log[-1]["metrics"]["accuracy"], "weights": weights,
               "world": int(os.environ["WORLD_SIZE"])}}, f)
cleanup()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_two_cpu_processes_match_single_process(tmp_path: Path) -> None:
    epochs = 4
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import digits
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(0)
    net = digits.DigitsNet(width=8)
    single = train(net, digits.train_loader(), digits.loss, epochs, 3e-3, optimizer="adamw",
                   evaluate=digits.evaluate)[-1]["metrics"]["accuracy"]

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(examples=str(ROOT / "examples"), epochs=epochs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(tmp_path / "ckpt"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the replicas identical"
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    # Each process keeps the loader's batch size (global batch doubles, half the steps per epoch), so
    # the curves differ; the band: within 5 accuracy points of the single-process run.
    assert abs(ranks[0]["accuracy"] - single) <= 0.05, (ranks[0]["accuracy"], single)
    assert len(read_log(tmp_path / "ckpt" / "training.jsonl")) == epochs, "one writer: rank 0"


FSDP_SCRIPT = """
import json, os, sys
import torch
import transformers as T
from fxprune.recovery.modes import recover
from fxprune.recovery.distributed import cleanup

torch.manual_seed(0)
cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, num_hidden_layers=2)
student = T.LlamaForCausalLM(cfg)
torch.manual_seed(1)
teacher = T.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(2))
world = int(os.environ.get("WORLD_SIZE", "1"))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=8 // world)
teacher_before = {{k: v.clone() for k, v in teacher.state_dict().items()}}
log = recover(student, mode="finetune", original=teacher, train_loader=loader, epochs=2, distill=True, lr=1e-2,
              optimizer="adamw", max_grad_norm=1.0, shard={shard})
with open(os.path.join(sys.argv[1], os.environ.get("RANK", "single") + ".json"), "w") as f:
    json.dump({{"losses": [r["loss"] for r in log],
               "weights": {{k: v.double().sum().item() for k, v in student.state_dict().items()}},
               "teacher_kept": all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()),
               "plain": all(type(p) is torch.nn.Parameter for p in student.parameters())}}, f)
cleanup()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp2_distillation_on_two_cpu_processes_equals_one_process(tmp_path: Path) -> None:
    """A language model distilled from its teacher with both sharded by FSDP2 across two processes (gloo): the
    same global batches as one process give the same losses and the same trained weights, written back into the
    caller's plain module on every rank; the teacher is untouched."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT.format(shard=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    single = tmp_path / "single.py"
    single.write_text(FSDP_SCRIPT.format(shard=False))
    one = subprocess.run([sys.executable, str(single), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in ("0", "1", "single")]
    for r in ranks[:2]:
        assert r["losses"] == pytest.approx(ranks[2]["losses"], rel=1e-5)
        assert r["weights"] == pytest.approx(ranks[2]["weights"], rel=1e-4, abs=1e-5)
        assert r["teacher_kept"] and r["plain"]
    assert ranks[0]["weights"] == ranks[1]["weights"], "every rank holds the same gathered weights"
