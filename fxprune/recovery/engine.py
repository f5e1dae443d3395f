"""The training engine: one loop for recovery (fine-tuning or retraining the compacted model) and
for every pass that trains.

What the loop does, per batch: forward (under ``torch.autocast`` on CUDA), ``loss_fn(output,
target)`` plus every hook's extra loss term, backward (through a ``GradScaler`` on CUDA), unscale,
the hooks' ``after_backward`` (edit gradients, step a pass's own optimiser), optional gradient-norm
clipping, the optimiser step, the hooks' ``after_step`` (clamping, multiplier ascent). Per epoch:
the schedule steps, ``evaluate(module)`` runs, a JSON line is logged, the best checkpoint (by one
metric, higher is better) and the last checkpoint are written. ``resume=True`` continues from the
last checkpoint and ends on exactly the weights an uninterrupted run ends on (same data order,
same random numbers: every generator's state is in the checkpoint).

Optimisers: SGD (momentum, Nesterov, weight decay), AdamW and Adam. Schedules, stepped once per epoch: cosine
(to zero at the last epoch), step (``lr * gamma`` every ``step_size`` epochs), none.

Under ``torchrun`` the same call trains data-parallel (see :mod:`fxprune.recovery.distributed`).

Everything method-specific plugs in through :class:`Hook` objects; the command line's progress bar
is itself a hook, so the engine never imports a UI library.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.measure import to_device

from . import distributed
from .checkpoint import (
    checkpoint_exists,
    flatten_state,
    load_checkpoint,
    module_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)
from .curves import append_log, plot_log, write_log
from .own_loss import reduce_loss, target_parameter
from .resume import next_checkpoint_dir

__all__ = ["train", "finetune", "batches_per_epoch", "Hook", "TrainState", "LossFn", "Evaluate", "OPTIMIZERS",
           "SCHEDULES", "load_weights", "MaskTraining"]

LossFn = Callable[[Any, Any], torch.Tensor]
Evaluate = Callable[[nn.Module], dict[str, Any]]
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "step", "none")
_DEFAULT_DECAY = {"sgd": 5e-4, "adamw": 1e-2, "adam": 0.0}


@dataclass
class TrainState:
    """What hooks see: updated before every hook call."""

    module: nn.Module                    # the module being trained (never the DDP wrapper)
    optimizer: torch.optim.Optimizer
    epochs: int
    batches: int | None                  # batches per epoch (this process's share), when the loader has a length
    epoch: int = 0                       # 0-based
    batch: int = 0                       # 0-based index within the epoch
    step: int = 0                        # optimiser steps taken so far
    loss: float = math.nan               # the last batch's total loss
    log: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    inputs: Any = None                   # the current batch's inputs, on the device (a teacher needs them)
    task_loss: torch.Tensor | None = None  # loss_fn(output, target) of the current batch, before hook terms
    scaler: torch.amp.GradScaler | None = None  # under mixed precision: scale/unscale a hook's own optimiser
    grad_norm: float = math.nan          # total gradient norm before clipping (when clipping)
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    best: float | None = None            # best value of the tracked metric so far
    best_epoch: int | None = None        # 1-based epoch of that value
    device: torch.device = torch.device("cpu")
    rank: int = 0                        # this process's rank (0 outside torchrun)
    world: int = 1
    mask_optimizer: torch.optim.Optimizer | None = None  # MaskTraining's optimiser, when masks train
    # which step the current forward serves: "weights" (the weights' optimiser alone, or no masks), "masks"
    # (the alternating scheme's mask step, weights held) or "joint" (one step updates both): a hook whose
    # loss term differs per step (ANP: weights and masks minimise different losses) reads it
    phase: str = "weights"


@dataclass
class MaskTraining:
    """Masks (``fxprune.masking``) trained beside the weights, in a parameter group of their own: their
    own optimiser (``optimizer``, ``lr``, ``weight_decay``; no schedule: a constant rate) and, with
    ``loader``, their own data. Without ``loader`` every batch updates weights and masks together; with
    it the updates alternate (TAS's and ANP's bi-level scheme): each weight step on a batch of the
    training loader is followed by a mask step on the next batch of ``loader`` (cycled), weights held.
    The weights' optimiser never sees the mask parameters; ``parameters=[]`` of :func:`train` (weights
    frozen) trains only the masks."""

    parameters: list[nn.Parameter]
    lr: float = 0.01
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    loader: Iterable[Any] | None = None
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw


class Hook:
    """Override only what you need; every method is a no-op here.

    A hook that holds state of its own (multipliers, its own optimiser) returns it from
    :meth:`state_dict` as tensors and JSON-able values so that checkpoints and ``resume`` cover it.
    """

    def before_epoch(self, state: TrainState) -> None:
        pass

    def before_forward(self, state: TrainState) -> None:
        """A batch is on the device (``state.inputs``) and ``state.phase`` says which step its forward
        serves: set up what the forward needs (e.g. what a wrapped model computes in this phase)."""

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        """An extra term added to the objective for this batch (None: nothing)."""
        return None

    def after_backward(self, state: TrainState) -> None:
        """Gradients are ready (and unscaled under mixed precision), the optimiser has not stepped:
        edit gradients (e.g. a sparsity subgradient) or step an optimiser of your own here."""

    def after_step(self, state: TrainState) -> None:
        pass

    def after_epoch(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _forward(module: nn.Module, inputs: Any, **more: Any) -> Any:
    """A batch's inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (``more``: keyword
    inputs beside them, the target of a model that computes its own loss)."""
    if isinstance(inputs, dict):
        return module(**inputs, **more)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs, **more)
    return module(inputs, **more)


def batches_per_epoch(loader: Iterable[Any]) -> int | None:
    """len(loader) when the loader has a length (a plain iterable may not)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def epochs_for_steps(loader: Iterable[Any], steps: int, *, most: int | None = None) -> int:
    """Whole epochs of ``loader`` that give about ``steps`` optimiser steps: ``ceil(steps / len(loader))``,
    at least 1 and at most ``most``; 1 for a loader without a length."""
    batches = batches_per_epoch(loader)
    epochs = 1 if not batches else max(1, math.ceil(steps / batches))
    return epochs if most is None else min(most, epochs)


def _optimizer(kind: str, params: list[nn.Parameter], lr: float, momentum: float,
               weight_decay: float | None, nesterov: bool = False,
               betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    decay = _DEFAULT_DECAY[kind] if weight_decay is None else weight_decay
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay, nesterov=nesterov)
    if kind == "adam":  # L2 weight decay in the gradient (TAS's architecture optimiser)
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=decay)


def _mask_optimizer(masks: MaskTraining) -> torch.optim.Optimizer:
    if masks.optimizer not in OPTIMIZERS:
        raise ValueError(f"the masks' optimizer must be one of {OPTIMIZERS}, got {masks.optimizer!r}")
    if not masks.parameters:
        raise ValueError("MaskTraining has no parameters (insert masks first, or leave masks=None)")
    return _optimizer(masks.optimizer, list(masks.parameters), masks.lr, masks.momentum, masks.weight_decay,
                      betas=masks.betas)


def _schedule(kind: str, optimizer: torch.optim.Optimizer, epochs: int, step_size: int,
              gamma: float) -> torch.optim.lr_scheduler.LRScheduler | None:
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    return None


def _check(optimizer: str, schedule: str, epochs: int, step_size: int, max_grad_norm: float | None,
           resume: bool, checkpoint_dir: Any) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if schedule == "step" and step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder the checkpoints were written to)")


def _generators(loader: Iterable[Any]) -> dict[str, torch.Generator]:
    """A DataLoader's own generators (shuffling), whose states a resumed run must continue from."""
    out: dict[str, torch.Generator] = {}
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not o for o in out.values()):
            out[name] = g
    return out


def _metrics(evaluate: Evaluate, module: nn.Module) -> dict[str, float]:
    result = evaluate(module)
    if not isinstance(result, dict) or not result:
        raise TypeError(f"evaluate() must return a non-empty dict of metrics, got {result!r}")
    return {str(k): float(v.item() if isinstance(v, (torch.Tensor, np.generic, np.ndarray)) else v)
            for k, v in result.items()}


@dataclass
class _Run:
    """Per-call settings the epoch loop needs (kept out of TrainState, which hooks see)."""

    runner: nn.Module                    # what the loop calls: the module or its DDP wrapper
    loader: Iterable[Any]
    loss_fn: LossFn
    hooks: list[Hook]
    params: list[nn.Parameter]
    scaler: torch.amp.GradScaler
    amp: bool
    max_grad_norm: float | None
    masks: MaskTraining | None = None
    mask_batches: Any = None             # the alternating loader's iterator (cycled)
    target_parameter: str | None = None  # the model computes its own loss: the forward parameter taking the target
    terms: dict[str, list[float]] = field(default_factory=dict)  # its loss terms this epoch, by name

    def next_mask_batch(self) -> Any:
        assert self.masks is not None and self.masks.loader is not None
        for _ in range(2):
            if self.mask_batches is None:
                self.mask_batches = iter(self.masks.loader)
            try:
                return next(self.mask_batches)
            except StopIteration:
                self.mask_batches = None
        raise ValueError("the masks' loader yielded no batches")


def _objective(state: TrainState, run: _Run, batch: Any) -> torch.Tensor:
    """Forward one batch: the task loss plus every hook's term."""
    inputs, target = to_device(batch, state.device, non_blocking=True)
    state.inputs = inputs
    for hook in run.hooks:
        hook.before_forward(state)
    with torch.autocast(state.device.type, enabled=run.amp):
        if run.target_parameter is not None:  # the model computes its own loss (fxprune.recovery.own_loss)
            output = _forward(run.runner, inputs, **{run.target_parameter: target})
            loss, terms = reduce_loss(output)
            for name, value in terms.items():
                run.terms.setdefault(name, []).append(value)
        else:
            output = _forward(run.runner, inputs)
            loss = run.loss_fn(output, target)
        state.task_loss = loss
        for hook in run.hooks:
            extra = hook.loss(state, output, target)
            if extra is not None:
                loss = loss + extra
    return loss


def _backward(state: TrainState, run: _Run, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
    for opt in (state.optimizer, state.mask_optimizer):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.amp:
        for opt in optimizers:
            run.scaler.unscale_(opt)
    for hook in run.hooks:
        hook.after_backward(state)


def _step(run: _Run, optimizers: list[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        run.scaler.step(opt)
    run.scaler.update()


def _epoch(state: TrainState, run: _Run) -> float:
    """One pass over the loader; returns the mean batch loss of this process."""
    total, count = 0.0, 0
    joint = run.masks is not None and run.masks.loader is None
    first = ([state.optimizer] if run.params else []) + ([state.mask_optimizer] if joint else [])
    for state.batch, batch in enumerate(run.loader):
        state.phase = "joint" if joint else "weights"
        loss = _objective(state, run, batch)
        _backward(state, run, loss, first)
        if run.max_grad_norm is not None:
            state.grad_norm = float(nn.utils.clip_grad_norm_(run.params, run.max_grad_norm))
        if first:
            _step(run, first)
        if run.masks is not None and not joint:  # the alternating scheme: a mask step on the other split
            state.phase = "masks"
            mask_loss = _objective(state, run, run.next_mask_batch())
            _backward(state, run, mask_loss, [state.mask_optimizer])
            _step(run, [state.mask_optimizer])
        state.step += 1
        state.loss = float(loss.detach())
        total, count = total + state.loss, count + 1
        for hook in run.hooks:
            hook.after_step(state)
    state.inputs = state.task_loss = None
    if count == 0:
        raise ValueError("the training loader yielded no batches")
    return total / count


def _save_last(folder: Path, state: TrainState, schedule: Any, scaler: torch.amp.GradScaler, hooks: list[Hook],
               generators: dict[str, torch.Generator], options: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in module_tensors(state.module).items()}
    meta: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, "options": options, "log": state.log,
                            "best": {"value": state.best, "epoch": state.best_epoch}}
    parts = {"optimizer": state.optimizer.state_dict(), "scaler": scaler.state_dict(),
             "mask_optimizer": state.mask_optimizer.state_dict() if state.mask_optimizer is not None else {},
             "scheduler": schedule.state_dict() if schedule is not None else {},
             "hooks": {str(i): h.state_dict() for i, h in enumerate(hooks)}}
    for name, part in parts.items():
        t, meta[name] = flatten_state(part, name)
        tensors.update(t)
    t, meta["rng"] = rng_state(generators)
    tensors.update(t)
    save_checkpoint(folder, "last", tensors, meta)


def _resume(folder: Path, state: TrainState, schedule: Any, scaler: torch.amp.GradScaler, hooks: list[Hook],
            generators: dict[str, torch.Generator], options: dict[str, Any]) -> int:
    """Load ``folder/last``; returns the number of epochs it had finished."""
    tensors, meta = load_checkpoint(folder, "last")
    saved = meta["options"]
    for key in ("epochs", "optimizer", "schedule"):
        if saved.get(key) != options[key]:
            raise ValueError(f"resume: the checkpoint in {folder} was written with {key}={saved.get(key)!r}, "
                             f"this run has {key}={options[key]!r}")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state.module.load_state_dict(model)
    state.optimizer.load_state_dict(unflatten_state(meta["optimizer"], tensors))
    if state.mask_optimizer is not None and meta.get("mask_optimizer"):
        state.mask_optimizer.load_state_dict(unflatten_state(meta["mask_optimizer"], tensors))
    scaler.load_state_dict(unflatten_state(meta["scaler"], tensors))
    if schedule is not None:
        schedule.load_state_dict(unflatten_state(meta["scheduler"], tensors))
    hook_states = unflatten_state(meta["hooks"], tensors)
    for i, hook in enumerate(hooks):
        hook.load_state_dict(hook_states.get(i, {}))
    set_rng_state(tensors, meta["rng"], generators)
    state.step, state.log = meta["step"], list(meta["log"])
    state.best, state.best_epoch = meta["best"]["value"], meta["best"]["epoch"]
    state.metrics = dict(state.log[-1].get("metrics") or {}) if state.log else {}
    return int(meta["epoch"])


def load_weights(module: nn.Module, checkpoint_dir: str | Path, name: str = "best") -> dict[str, Any]:
    """Load a checkpoint's model weights (``best`` or ``last``) into ``module``; returns its JSON."""
    tensors, meta = load_checkpoint(checkpoint_dir, name)
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return meta


def train(module: nn.Module, train_loader: Iterable[Any], loss_fn: LossFn | None = None, epochs: int = 1,
          lr: float = 0.01, device: str | torch.device = "cpu", progress: Hook | None = None, *,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float | None = None, nesterov: bool = False,
          schedule: str = "cosine", step_size: int = 30, gamma: float = 0.1,
          max_grad_norm: float | None = None, amp: bool | None = None,
          evaluate: Evaluate | None = None, metric: str | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, log_file: str | Path | None = None,
          parameters: Iterable[nn.Parameter] | None = None,
          hooks: Sequence[Hook] = (), masks: MaskTraining | None = None, shard: bool = False) -> list[dict[str, Any]]:
    """Train ``module`` in place for ``epochs`` epochs; returns one log record per epoch.

    ``train_loader`` yields ``(inputs, target)`` batches; ``loss_fn(output, target)`` defaults to
    cross-entropy, or, for a model whose forward takes the target (a parameter named ``targets``, ``target`` or
    ``labels``: a torchvision detector, a Hugging Face model), to the loss the model returns given it
    (:mod:`fxprune.recovery.own_loss`; a dict of losses is summed, its terms logged per epoch under ``terms``).
    The module ends on ``device`` in the train/eval mode it started in.

    - ``optimizer``: ``"sgd"`` (``momentum``, ``nesterov``), ``"adamw"`` or ``"adam"`` (L2 decay in the
      gradient); ``weight_decay`` defaults to 5e-4 for SGD, 1e-2 for AdamW and 0 for Adam. ``parameters``: what
      the optimiser updates (default: every parameter
      of ``module`` that requires grad).
    - ``schedule``: ``"cosine"``, ``"step"`` (``gamma`` every ``step_size`` epochs) or ``"none"``.
    - ``max_grad_norm``: clip the total gradient norm before each step.
    - ``amp``: mixed precision (autocast + GradScaler); default on for CUDA, never on CPU.
    - ``evaluate(module) -> {name: value}`` after every epoch, logged; ``metric`` (default: the
      first key) picks the best epoch, higher is better.
    - ``checkpoint_dir``: ``last.safetensors/json`` every epoch, ``best.*`` when it improves, and
      the log ``training.jsonl`` plus ``training.png`` (or ``log_file``, its PNG beside it).
      ``resume=True`` continues from ``last`` (starting afresh when there is none yet). Under
      ``fxprune.recovery.checkpoints_in(folder)`` a call without ``checkpoint_dir`` gets ``folder/train-N`` and
      ``resume=True`` (``fxprune run``'s crash-safe runs).
    - ``hooks``: :class:`Hook` objects; ``progress`` is one more hook (the progress bar).
    - ``masks``: :class:`MaskTraining`: mask parameters in their own optimiser, trained jointly or
      alternating on their own loader; they are left out of ``parameters``' default.
    - ``shard``: under ``torchrun``, train a copy sharded with FSDP2 instead of DDP replicas
      (:func:`fxprune.recovery.distributed.fully_sharded`): each process holds 1/world of the weights and the
      optimiser state; the trained weights are gathered back into ``module`` after every epoch (what
      ``evaluate`` and the ``best`` checkpoint read) and at the end. Its optimiser state is sharded and not
      checkpointed: such a run is not resumable (``fxprune run``'s crash-safe folder is skipped; an explicit
      ``checkpoint_dir`` keeps ``best`` and the log). Outside ``torchrun`` it changes nothing.
    """
    ctx, device = distributed.context(torch.device(device))
    sharded = shard and ctx.enabled
    if checkpoint_dir is None and not sharded and (run_folder := next_checkpoint_dir()) is not None:
        checkpoint_dir, resume = run_folder, True  # under checkpoints_in: this call's own folder of the run
    _check(optimizer, schedule, epochs, step_size, max_grad_norm, resume, checkpoint_dir)
    if sharded and (masks is not None or parameters is not None or resume):
        raise ValueError("shard=True (FSDP2) trains every parameter of the module and does not resume: no masks=, "
                         "parameters= or resume=")
    hooks = [*hooks, *([progress] if progress is not None else [])]
    use_amp = device.type == "cuda" if amp is None else bool(amp)
    if use_amp and device.type != "cuda":
        warnings.warn("fxprune.recovery: mixed precision is only used on CUDA; training in float32", stacklevel=2)
        use_amp = False
    was_training = module.training
    module.to(device).train()
    loader = distributed.shard_loader(train_loader, ctx)
    mask_ids = {id(p) for p in masks.parameters} if masks is not None else set()
    runner = distributed.fully_sharded(module, device) if sharded else distributed.wrap(module, ctx, device)
    params = list(parameters) if parameters is not None else \
        [p for p in (runner if sharded else module).parameters() if p.requires_grad and id(p) not in mask_ids]
    if any(id(p) in mask_ids for p in params):
        raise ValueError("a mask parameter is among the weights' parameters: give it to MaskTraining only")
    mask_opt = _mask_optimizer(masks) if masks is not None else None
    if not params and mask_opt is None:
        raise ValueError("nothing to train: no parameter requires grad and no masks were given")
    opt = _optimizer(optimizer, params, lr, momentum, weight_decay, nesterov) if params else mask_opt
    sched = _schedule(schedule, opt, epochs, step_size, gamma) if params else None
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    run = _Run(runner, loader, loss_fn or F.cross_entropy, hooks, params, scaler,
               use_amp, max_grad_norm, masks=masks,
               target_parameter=target_parameter(module) if loss_fn is None else None)
    state = TrainState(module, opt, epochs, batches_per_epoch(loader), scaler=scaler if use_amp else None,
                       device=device, rank=ctx.rank, world=ctx.world, mask_optimizer=mask_opt)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    log_path = Path(log_file) if log_file is not None else (folder / "training.jsonl" if folder else None)
    options = {"epochs": epochs, "optimizer": optimizer, "schedule": schedule, "lr": lr, "world": ctx.world}
    generators = _generators(loader)
    first = 0
    if resume and folder is not None and checkpoint_exists(folder, "last"):
        first = _resume(folder, state, sched, scaler, hooks, generators, options)
    if ctx.main and log_path is not None:
        write_log(log_path, state.log)  # a fresh run starts an empty log; a resumed one keeps its epochs
    try:
        for state.epoch in range(first, epochs):
            distributed.set_epoch(loader, state.epoch)
            for hook in hooks:
                hook.before_epoch(state)
            start, rate = time.perf_counter(), opt.param_groups[0]["lr"]
            mean = distributed.all_mean(_epoch(state, run), ctx, device)
            if sched is not None:
                sched.step()
            if sharded:  # what evaluate() and the checkpoints read: the caller's module, now trained
                distributed.gather_into(runner, module)
            distributed.sync_buffers(module, ctx)
            record: dict[str, Any] = {"epoch": state.epoch + 1, "loss": mean, "lr": rate,
                                      "seconds": time.perf_counter() - start}
            if run.terms:  # a model's own loss terms, each its epoch mean (this process's)
                record["terms"] = {k: float(np.mean(v)) for k, v in run.terms.items()}
                run.terms = {}
            improved = False
            if evaluate is not None:
                state.metrics = _metrics(evaluate, module)
                module.train()  # evaluate() may have switched to eval mode
                record["metrics"] = state.metrics
                name = metric or next(iter(state.metrics))
                if name not in state.metrics:
                    raise KeyError(f"metric {name!r} is not among evaluate()'s metrics {sorted(state.metrics)}")
                value = state.metrics[name]
                if state.best is None or value > state.best:
                    state.best, state.best_epoch, improved = value, state.epoch + 1, True
            state.log.append(record)
            for hook in hooks:
                hook.after_epoch(state)
            if ctx.main and log_path is not None:
                append_log(log_path, record)
            if ctx.main and folder is not None:
                if improved:
                    save_checkpoint(folder, "best", {f"model.{k}": v for k, v in module_tensors(module).items()},
                                    {"epoch": state.epoch + 1, "metric": metric or next(iter(state.metrics)),
                                     "metrics": state.metrics})
                if not sharded:  # a sharded optimiser state is not checkpointed (see shard)
                    _save_last(folder, state, sched, scaler, hooks, generators, options)
    finally:
        module.train(was_training)
    if ctx.main and log_path is not None and state.log:
        plot_log(log_path, log_path.with_suffix(".png"))
    return state.log


def finetune(module: nn.Module, train_loader: Iterable[Any], loss_fn: LossFn | None = None, epochs: int = 1,
             lr: float = 0.01, device: str | torch.device = "cpu", progress: Hook | None = None,
             **options: Any) -> list[dict[str, Any]]:
    """Recovery with inherited weights: train the compacted module itself, at its compacted size
    (never a masked full-size copy, which would cost the speed-up). Same options as :func:`train`."""
    return train(module, train_loader, loss_fn, epochs, lr, device, progress, **options)
