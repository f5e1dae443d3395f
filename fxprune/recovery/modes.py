"""Recovery after pruning: fine-tune, or retrain from scratch (Scratch-E / Scratch-B), optionally
distilling from the unpruned model.

The modes follow Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019):

- ``finetune``: keep the inherited weights, train ``epochs`` epochs;
- ``scratch-e``: re-initialise every parameter, train the same ``epochs``;
- ``scratch-b``: re-initialise, train for the same compute as the full model:
  ``round(epochs * macs_full / macs_pruned)`` epochs, capped at ``max_budget_factor * epochs``
  when given (the paper caps ImageNet at 2x).

Knowledge distillation (Hinton et al.; the loss TAS trains with) replaces the objective by
``(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

The compacted module is trained in place at its compacted size: recovery never goes back to a
masked full-size model.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.rules import Role, ops_with_role
from fxprune.state import attribute, device_of_module
from fxprune.tracing.compat import fan_in

from .engine import Evaluate, Hook, LossFn, TrainState, train

__all__ = ["recover", "reinitialize", "scratch_b_epochs", "DistillHook", "distill_loss", "MODES"]

MODES = ("finetune", "scratch-e", "scratch-b")

# From the op registry (fxprune.analysis.rules): ops whose ``weight`` is a conv/linear kernel (kaiming init) and
# whose ``bias`` takes 1/sqrt(fan_in); normalisations (scale, shift, running statistics); PReLU slopes.
_KERNEL_OPS = ops_with_role(Role.KERNEL)
_NORM_OPS = ops_with_role(Role.NORM)
_PRELU_OPS = ops_with_role(Role.SLOPE)


def logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``output["logits"]`` / ``output.logits``,
    or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return logits(output[0])
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, classes on the last axis, averaged
    over every other position (the batch; for sequence outputs, every token). Computed in float32."""
    t = temperature
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


class DistillHook(Hook):
    """Distillation from a frozen teacher, as a training hook.

    The engine's objective is ``task_loss + sum of hook terms``; this hook's term is
    ``alpha * T^2 * KL - alpha * task_loss``, so the total is exactly
    ``(1 - alpha) * task_loss + alpha * T^2 * KL``. The teacher runs in eval mode without gradients
    on the same batch (``state.inputs``), on the training device. Used as a context manager around the
    training, it puts the teacher back where it was, in the mode it was in, when the training ends.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self._restore: tuple[torch.device, bool] | None = None

    def __enter__(self) -> DistillHook:
        self._restore = (device_of_module(self.teacher), self.teacher.training)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None:
            device, training = self._restore
            self.teacher.to(device).train(training)
            self._restore = None

    def before_epoch(self, state: TrainState) -> None:
        self.teacher.to(state.device).eval()  # the engine picks the device (cuda:LOCAL_RANK under torchrun)

    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(inputs, dict):
                return logits(self.teacher(**inputs))
            if isinstance(inputs, (tuple, list)):
                return logits(self.teacher(*inputs))
            return logits(self.teacher(inputs))

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor:
        kd = distill_loss(logits(output), self.teacher_logits(state.inputs), self.temperature)
        task = state.task_loss if state.task_loss is not None else torch.zeros((), device=kd.device)
        return self.alpha * kd - self.alpha * task


def _sharded_teacher(original: nn.Module, device: str | torch.device) -> nn.Module:
    """Under ``torchrun`` with ``shard=True``: the teacher sharded like the student (FSDP2), in eval mode; else
    the teacher itself."""
    from . import distributed

    ctx, dev = distributed.context(torch.device(device))
    if not ctx.enabled:
        return original
    teacher = distributed.fully_sharded(original, dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def scratch_b_epochs(epochs: int, macs_full: float, macs_pruned: float, max_budget_factor: float | None = None) -> int:
    """Scratch-B's epochs: the full model's compute budget spent on the pruned model,
    ``round(epochs * macs_full / macs_pruned)``, at most ``round(max_budget_factor * epochs)``,
    at least 1."""
    if macs_full <= 0 or macs_pruned <= 0:
        raise ValueError(f"scratch-b needs positive MACs, got macs_full={macs_full}, macs_pruned={macs_pruned}")
    n = round(epochs * macs_full / macs_pruned)
    if max_budget_factor is not None:
        n = min(n, round(max_budget_factor * epochs))
    return max(n, 1)


def _graph_roles(module: nn.Module) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Parameter/buffer name -> (role, kernel) from the ops that read it in an FX graph.

    Roles: ``kernel`` (weight of a conv/linear), ``bias`` (its bias; ``kernel`` is the weight it
    belongs to, for the fan-in), ``norm_weight``, ``norm_bias``, ``running_mean``, ``running_var``,
    ``embedding``, ``prelu``.
    """
    roles: dict[str, tuple[str, torch.Tensor | None]] = {}
    if not isinstance(module, fx.GraphModule):
        return roles
    from fxprune.analysis.schema import bind

    def attr(node: Any) -> str | None:
        return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None

    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _KERNEL_OPS or node.target in _NORM_OPS:
            b = bind(node)
            w, bias = attr(b.get("weight")), attr(b.get("bias"))
            if node.target in _KERNEL_OPS:
                if w is not None:
                    roles[w] = ("kernel", None)
                if bias is not None:
                    roles[bias] = ("bias", attribute(module, w) if w is not None else None)
            else:
                if w is not None:
                    roles[w] = ("norm_weight", None)
                if bias is not None:
                    roles[bias] = ("norm_bias", None)
                for key, role in (("running_mean", "running_mean"), ("running_var", "running_var")):
                    if attr(b.get(key)) is not None:
                        roles[attr(b.get(key))] = (role, None)
        elif node.target is torch.ops.aten.embedding.default:
            w = attr(node.args[0])
            if w is not None:
                roles[w] = ("embedding", None)
        elif node.target in _PRELU_OPS:
            w = attr(node.args[1])
            if w is not None:
                roles[w] = ("prelu", None)
    return roles


def _bias_init(bias: torch.Tensor, kernel: torch.Tensor) -> None:
    fans = fan_in(kernel)
    bound = 1 / math.sqrt(fans) if fans > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)


def reinitialize(module: nn.Module, seed: int | None = None) -> list[str]:
    """Re-initialise every parameter of ``module`` in place, as PyTorch's layers initialise
    themselves; returns the names of parameters it could not place (left unchanged, with a warning).
    With ``seed``, deterministically: the draws come from ``torch.manual_seed(seed)`` and the caller's
    (CPU) random state is left as it was.

    1. Every submodule with ``reset_parameters()`` uses it (BatchNorm: weight 1, bias 0, running
       statistics reset; an ordinary nn.Conv2d/nn.Linear: its own default).
    2. The remaining parameters are raw tensors of a compacted GraphModule; their role comes from
       the op that reads them: a conv/linear weight gets ``kaiming_uniform_(a=sqrt(5))`` and its bias
       ``uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with the fan-in of that weight (the nn.Conv*d /
       nn.Linear defaults); a norm weight 1 and bias 0 (running mean 0, variance 1); an embedding
       N(0, 1); PReLU slopes 0.25.
    3. Parameters no op names: ``dim >= 2`` get kaiming_uniform_(a=sqrt(5)); a 1-D ``X.bias`` next to a
       ``X.weight`` with ``dim >= 2`` takes that weight's fan-in; anything else is left unchanged.
    """
    if seed is None:
        return _reinitialize(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _reinitialize(module)


def _reinitialize(module: nn.Module) -> list[str]:
    done: set[int] = set()
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            done.update(id(p) for p in sub.parameters(recurse=False))
            done.update(id(b) for b in sub.buffers(recurse=False))
    roles = _graph_roles(module)
    params = dict(module.named_parameters())
    skipped: list[str] = []
    with torch.no_grad():
        for name, t in [*params.items(), *module.named_buffers()]:
            if id(t) in done:
                continue
            done.add(id(t))
            role, kernel = roles.get(name, (None, None))
            if name not in params and role not in ("running_mean", "running_var"):
                continue  # other buffers (masks, position ids, constants) are not learned: keep them
            owner, _, leaf = name.rpartition(".")
            sibling = params.get(f"{owner}.weight" if owner else "weight")
            if role == "kernel" or (role is None and name in params and t.dim() >= 2):
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            elif role == "bias" and kernel is not None:
                _bias_init(t, kernel)
            elif role is None and leaf == "bias" and t.dim() == 1 and sibling is not None and sibling.dim() >= 2:
                _bias_init(t, sibling)
            elif role in ("norm_weight", "running_var"):
                t.fill_(1.0)
            elif role in ("norm_bias", "running_mean"):
                t.zero_()
            elif role == "embedding":
                nn.init.normal_(t)
            elif role == "prelu":
                t.fill_(0.25)
            elif name in params:
                skipped.append(name)
    if skipped:
        warnings.warn(f"reinitialize: no initialiser known for {skipped} (left unchanged)", stacklevel=3)
    return skipped


def recover(module: nn.Module, *, mode: str, original: nn.Module | None = None, train_loader: Iterable[Any],
            loss: LossFn | None = None, epochs: int, evaluate: Evaluate | None = None, distill: bool = False,
            temperature: float = 4.0, alpha: float = 0.9, macs_full: float | None = None,
            macs_pruned: float | None = None, max_budget_factor: float | None = None,
            **train_options: Any) -> list[dict[str, Any]]:
    """Recover a pruned (compacted) module in place; returns the per-epoch training log.

    ``mode``: ``"finetune"`` | ``"scratch-e"`` | ``"scratch-b"`` (see the module docstring;
    scratch-b needs ``macs_full`` and ``macs_pruned``). ``distill=True`` distils from ``original``
    (the unpruned model: frozen, in eval mode, moved to the training device for the run and back
    afterwards, its train/eval mode restored). Everything else (``lr``, ``device``, ``optimizer``,
    ``schedule``, ``checkpoint_dir``, ``resume``, ``hooks``, ``progress``, ``shard``...) goes to
    :func:`fxprune.recovery.engine.train`; with ``shard`` (FSDP2 under ``torchrun``) the teacher is sharded too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if distill and original is None:
        raise ValueError("distill=True needs original= (the unpruned teacher model)")
    if mode == "scratch-b":
        if macs_full is None or macs_pruned is None:
            raise ValueError("mode='scratch-b' needs macs_full= and macs_pruned= (its epoch budget is "
                             "epochs x macs_full / macs_pruned)")
        epochs = scratch_b_epochs(epochs, macs_full, macs_pruned, max_budget_factor)
    if mode != "finetune":
        reinitialize(module)  # (a resumed run then loads its checkpoint's weights over these)
    hooks = list(train_options.pop("hooks", ()))
    if distill and original is not None and train_options.get("shard"):
        original = _sharded_teacher(original, train_options.get("device", "cpu"))
    kd = DistillHook(original, temperature, alpha) if distill and original is not None else None
    with kd or contextlib.nullcontext():
        return train(module, train_loader, loss, epochs, evaluate=evaluate, hooks=[*hooks, *([kd] if kd else [])],
                     **train_options)
