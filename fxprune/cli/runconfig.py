"""What ``fxprune run`` is asked to do (``RunConfig``), checked before any work: the pass and its options, the
budget, the device, the model file (bad input stops here with a clear message); and ``Feedback``, the progress
interface the run reports through (so the run never imports a UI library)."""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxprune import artifacts
from fxprune.compaction.targets import TARGETS
from fxprune.passes.registry import PassError, load_pass, make_pass
from fxprune.pipeline.spec import BUDGET_KEYWORDS, Budget, Recovery
from fxprune.recovery import Hook
from fxprune.recovery.modes import MODES
from fxprune.selection.budget import SelectionError, check_ratio

from .deploy import require_onnx
from .modelfile import ModelFile, load_model_file

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class OptionError(ValueError):
    """An ``--opt`` value that does not parse, or a device that is not available."""


@dataclass
class RunConfig:
    model_file: Path
    method: str
    ratio: float
    out: Path
    finetune_epochs: int | None = None  # None: the default recovery when the file defines train_loader()
    lr: float = 0.01
    options: dict[str, str] = field(default_factory=dict)  # raw key=value strings from --opt
    device: str = "cpu"
    force: bool = False
    # the budget flags (scope, target_macs..., fxprune.Budget's fields, and "target": what compaction rewrites);
    # budget_of(ratio, budget) is the run's fxprune.Budget
    budget: dict[str, Any] = field(default_factory=dict)
    recover: str | None = None  # what --epochs runs: finetune, scratch-e, scratch-b; None: the pass's
    #                             own_recovery(), else finetune
    distill: bool | None = None  # knowledge distillation from the unpruned model during recovery; None: the
    #                              pass's default
    no_recover: bool = False    # --no-recover: no recovery even when the model file can train
    allow_inexact: bool = False  # --allow-inexact: also prune groups where removal is not exactly the masked model
    onnx: bool = False  # --onnx: also write model.onnx, checked with onnxruntime (fxprune.cli.deploy)
    attack: str | None = None  # --attack pgd: robustness before and after (fxprune.robustness), on val_loader()
    eps: float = 0.03
    attack_steps: int = 40
    resume: bool = True  # continue a killed run of the same description from OUT.resume (fxprune.cli.workfolder)
    scratch_lr: float | None = None  # --scratch-lr: scratch-e / scratch-b's own rate (None: --lr)
    scratch_b_cap: float | None = None  # --scratch-b-cap: Scratch-B's epochs at most this factor x --epochs
    kd_alpha: float = 0.9  # --kd-alpha, --kd-temperature: distillation's weight and temperature
    kd_temperature: float = 4.0
    max_grad_norm: float | None = None  # --max-grad-norm: recovery's gradient clipping (0: none; None: the mode's)
    fsdp: bool = False  # --fsdp: under torchrun, recovery shards the model (FSDP2) instead of replicating it (DDP)


def recovery_of(cfg: RunConfig, epochs: int) -> Recovery:
    """The run's ``fxprune.Recovery`` for ``epochs``: an OptionError naming the flag when a value makes no sense."""
    try:
        return Recovery(epochs, cfg.recover, cfg.distill, cfg.lr, cfg.scratch_lr, cfg.scratch_b_cap, cfg.kd_alpha,
                        cfg.kd_temperature, cfg.max_grad_norm, cfg.fsdp)
    except SelectionError as exc:
        raise OptionError(f"{exc} (--lr, --scratch-lr, --scratch-b-cap, --kd-alpha, --kd-temperature, "
                          f"--max-grad-norm)") from None


class Feedback:
    """Progress reporting; the default reports nothing (``--quiet``, or use from Python)."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        yield

    def training(self, epochs: int, batches: int | None) -> Hook | None:
        return None

    def note(self, text: str) -> None:
        """One line the user should read (a default the run chose, a result far from what was asked)."""


def _convert(text: str, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or type(kind).__name__ == "UnionType":
        if text.lower() == "none" and type(None) in args:
            return None
        return _convert(text, next(a for a in args if a is not type(None)), key)
    if origin is typing.Literal:
        match = [a for a in args if str(a) == text]
        if not match:
            raise OptionError(f"option {key!r} must be one of {', '.join(map(str, args))}, got {text!r}")
        return match[0]
    if kind is bool:
        if text.lower() not in _TRUE | _FALSE:
            raise OptionError(f"option {key!r} is a bool: use true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise OptionError(f"option {key!r} must be {kind.__name__}, got {text!r}") from None
    return text


def parse_options(pass_cls: type, pairs: dict[str, str], name: str) -> dict[str, Any]:
    """Typed options for ``pass_cls`` from raw strings; an unknown key is a PassError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(pass_cls)} if dataclasses.is_dataclass(pass_cls) else {}
    unknown = sorted(set(pairs) - set(fields))
    if unknown:
        raise PassError(f"pass {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(pass_cls)
    return {k: _convert(v, hints.get(k, str), k) for k, v in pairs.items()}


TARGET_KEYS = ("target_macs", "target_params", "target_latency")  # the resource targets (one at most)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: CUDA is not available on this machine")


def budget_of(ratio: float, flags: dict[str, Any]) -> Budget:
    """The run's ``fxprune.Budget`` from ``--ratio`` and the budget flags (``RunConfig.budget``), checked before
    any work: a flag's bad value names the flag."""
    targets = {k: flags[k] for k in TARGET_KEYS if flags.get(k) is not None}
    if len(targets) > 1:
        raise OptionError(f"give one of --target-macs, --target-params and --target-latency, not "
                          f"{' and '.join('--' + k.replace('_', '-') for k in targets)}")
    for key, value in targets.items():
        if not 0.0 < value <= 1.0:
            raise OptionError(f"--{key.replace('_', '-')} is the fraction to keep, in (0, 1]; got {value}")
    if flags.get("target", "auto") not in TARGETS:
        raise OptionError(f"--target must be {', '.join(TARGETS[:-1])} or {TARGETS[-1]}, got {flags['target']!r}")
    given = {k: v for k, v in flags.items() if k in BUDGET_KEYWORDS and v is not None}
    try:
        return Budget(ratio=ratio, **given)
    except SelectionError as exc:
        raise OptionError(str(exc)) from None


def check(cfg: RunConfig) -> tuple[ModelFile, Any]:
    """Everything that can be checked before any work: returns the model file and the configured pass."""
    check_ratio(cfg.ratio)
    budget_of(cfg.ratio, cfg.budget)
    artifacts.check_target(cfg.out, cfg.force)
    if cfg.finetune_epochs is not None and cfg.finetune_epochs < 0:
        raise OptionError(f"--finetune-epochs must be >= 0, got {cfg.finetune_epochs}")
    if cfg.no_recover and cfg.finetune_epochs:
        raise OptionError("--no-recover and --finetune-epochs/--epochs contradict each other: give one")
    if cfg.recover is not None and cfg.recover not in MODES:
        raise OptionError(f"--recover must be one of {', '.join(MODES)}, got {cfg.recover!r}")
    recovery_of(cfg, 0)
    _check_device(cfg.device)
    if cfg.onnx:
        require_onnx()  # before any work: the export runs last
    attack = attack_of(cfg)
    pass_cls = load_pass(cfg.method)
    the_pass = make_pass(cfg.method, parse_options(pass_cls, cfg.options, cfg.method))
    mf = load_model_file(cfg.model_file)
    mf.require("model", "example_inputs", why="pruning")
    _ = mf.train_epochs  # a declared training length that is not a whole number >= 1 stops here
    if cfg.finetune_epochs:
        mf.require("train_loader", why=f"--finetune-epochs {cfg.finetune_epochs}")
    needs = tuple(getattr(pass_cls, "needs", ()))  # the model-file functions the pass reads (Pass.needs)
    if getattr(pass_cls, "calibrates", False) and mf.has("calib_loader"):  # it calibrates on calib_loader() instead
        needs = tuple(n for n in needs if n != "train_loader")
    if needs:
        mf.require(*needs, why=f"pass {cfg.method!r}")
    if attack is not None:
        mf.require("val_loader", why=f"--attack {cfg.attack} (the data to attack)")
    return mf, the_pass


def attack_of(cfg: RunConfig) -> Any:
    """The attack --attack asks for (None without it); an OptionError naming what is wrong."""
    if cfg.attack is None:
        return None
    from fxprune.robustness import PGD

    from .robust import ATTACKS

    if cfg.attack not in ATTACKS:
        raise OptionError(f"--attack must be one of {', '.join(ATTACKS)}, got {cfg.attack!r}")
    try:
        return PGD(eps=cfg.eps, steps=cfg.attack_steps)
    except ValueError as exc:
        raise OptionError(f"--attack {cfg.attack}: {exc}") from None
