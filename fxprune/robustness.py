"""Robustness of a classifier: PGD (L-inf, random start) accuracy and layer vulnerability.

- :class:`PGD`: ``steps`` steps of size ``step`` inside the L-inf ball of radius ``eps`` around the input,
  from a uniform random start, each step ``x + step * sign(grad)`` projected back into the ball and
  clipped to the input range (``bounds``; default: the batch's own min and max). White-box: the
  gradient is the model's own. The model's parameters, gradients and mode are left as they were.
- :func:`robust_metrics`: clean accuracy, PGD accuracy and mean vulnerability over a loader of
  ``(inputs, labels)``. The vulnerability of a layer is ``mean |f(x) - f(x_adv)|`` of its post-activation
  features (Madaan et al. 2020); reported is its mean over every activation of the graph (ReLU, ReLU6 /
  hardtanh, GELU, SiLU, sigmoid, tanh, ...), read by running the traced graph with
  ``torch.fx.Interpreter``, so an original model (traced here) and a compacted one take the same path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.rules import ops

__all__ = ["PGD", "robust_metrics", "ACTIVATIONS"]

ACTIVATIONS = frozenset(ops(
    "aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.gelu.default", "aten.silu.default", "aten.silu_.default", "aten.sigmoid.default", "aten.tanh.default",
    "aten.leaky_relu.default", "aten.leaky_relu_.default", "aten.elu.default", "aten.hardswish.default",
    "aten.hardswish_.default", "aten.mish.default"))


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent in the L-inf ball (see the module docstring)."""

    eps: float
    step: float | None = None            # default: 2.5 eps / steps (Madry et al.)
    steps: int = 10
    random_start: bool = True
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.eps > 0 or self.steps < 1 or (self.step is not None and not self.step > 0):
            raise ValueError(f"PGD needs eps > 0, steps >= 1 and step > 0; got eps={self.eps}, "
                             f"steps={self.steps}, step={self.step}")

    @property
    def step_length(self) -> float:
        """The step used: ``step``, or 2.5 eps / steps."""
        return self.step if self.step is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        loss_fn = loss_fn or F.cross_entropy
        lo, hi = self.bounds if self.bounds is not None else (float(x.min()), float(x.max()))
        step = self.step_length
        x = x.detach()
        adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            adv = adv + (2 * noise - 1) * self.eps
        adv = adv.clamp(lo, hi)
        with torch.enable_grad():
            for _ in range(self.steps):
                adv.requires_grad_(True)
                grad, = torch.autograd.grad(loss_fn(model(adv), y), adv)
                adv = adv.detach() + step * grad.sign()
                adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(lo, hi)
        return adv.detach()


class _Features(fx.Interpreter):
    """Runs a graph and keeps every activation node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.features: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in ACTIVATIONS and isinstance(out, torch.Tensor):
            self.features[n.name] = out.detach()
        return out


def _features(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    run = _Features(gm)
    with torch.no_grad():
        run.run(x)
    return run.features


def robust_metrics(model: nn.Module, loader: Iterable[Any], attack: PGD, *,
                   loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, batches: int | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Clean accuracy, PGD accuracy and mean vulnerability of ``model`` (a classifier taking one tensor)
    over ``batches`` batches of ``loader`` (all by default). The model's mode is restored afterwards."""
    from fxprune.tracing.tracer import trace

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    graph: fx.GraphModule | None = model if isinstance(model, fx.GraphModule) else None
    clean = robust = total = 0
    vulnerability: list[float] = []
    try:
        for i, (x, y) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            x, y = x.to(device), y.to(device)
            adv = attack(model, x, y, loss_fn, generator)
            with torch.no_grad():
                clean += int((model(x).argmax(1) == y).sum())
                robust += int((model(adv).argmax(1) == y).sum())
            total += len(y)
            if graph is None:
                graph = trace(model, (x,))
            a, b = _features(graph, x), _features(graph, adv)
            if a:
                vulnerability.append(float(torch.stack([(a[k] - b[k]).abs().mean() for k in a]).mean()))
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("robust_metrics: the loader yielded no batches")
    return {"clean_accuracy": clean / total, "pgd_accuracy": robust / total,
            "vulnerability": sum(vulnerability) / len(vulnerability) if vulnerability else float("nan")}
