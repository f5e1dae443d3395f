"""Cost of a model on its example inputs: MACs, parameters, latency, peak memory.

MACs come from torch's own ``FlopCounterMode`` (FLOPs / 2), so the numbers in a report are the ones
anybody can reproduce with plain PyTorch.
"""
from __future__ import annotations

import functools
import gc
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxprune.state import device_of_module
from fxprune.tracing.compat import CompatWarning, dispatch_mode_base, tree_leaves
from fxprune.tracing.tracer import normalize_inputs

__all__ = ["count_macs", "count_params", "latency_ms", "interleaved_latency", "peak_memory_bytes", "to_device"]


def to_device(x: Any, device: str | torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``x`` (tensor / tuple / list / dict) to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    return x


def _call(module: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        return module(*args, **kwargs)


def count_macs(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, as counted by ``FlopCounterMode`` (FLOPs / 2).

    The counter's module tracker hooks every module argument that requires grad, which fails without
    grad mode for a parameter handed to a submodule as an argument (timm's CaiT passes its class token):
    such a model is counted again with grad mode on."""
    try:
        return _count_macs(module, example_inputs, grad=False)
    except AssertionError as exc:
        if "gradient function" not in str(exc):
            raise
        return _count_macs(module, example_inputs, grad=True)


def _count_macs(module: nn.Module, example_inputs: Any, grad: bool) -> int:
    counter = FlopCounterMode(display=False)
    args, kwargs = normalize_inputs(example_inputs)
    with counter, torch.set_grad_enabled(grad):
        module(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module) -> int:
    """Parameters, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(module: nn.Module, example_inputs: Any, *, repeats: int = 20, warmup: int = 3,
               budget_s: float = 2.0) -> float:
    """Median wall time of one forward pass in milliseconds (stops early after ``budget_s``)."""
    device = device_of_module(module)
    for _ in range(warmup):
        _call(module, example_inputs)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        _sync(device)
        start = time.perf_counter()
        _call(module, example_inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_latency(models: dict[str, tuple[nn.Module, Any]], *, rounds: int, repeats: int, warmup_first: int = 3,
                        warmup_each: int = 0, budget_s: float = float("inf")) -> dict[str, list[float]]:
    """Milliseconds per forward of each ``name: (module, inputs)``, one median per round, the models taking
    turns in every round, so that a change of load on the machine hits them alike. ``warmup_first`` untimed
    forwards per model before the first round, ``warmup_each`` before each model's turn."""
    for module, inputs in models.values():
        for _ in range(warmup_first):
            _call(module, inputs)
    out: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (module, inputs) in models.items():
            out[name].append(latency_ms(module, inputs, repeats=repeats, warmup=warmup_each, budget_s=budget_s))
    return out


class _LiveBytes:
    """Tracks bytes of the storages produced during a forward pass, and their peak.

    CPU has no allocator statistics, so we count the storages ops return and drop them when the last
    tensor viewing them is freed (weakref finalizers); views share a storage and add nothing. A mixin:
    ``_live_bytes_mode()`` puts it on torch's (private) ``TorchDispatchMode``.
    """

    def __init__(self) -> None:
        super().__init__()  # the dispatch mode's
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@functools.cache
def _live_bytes_mode() -> type | None:
    base = dispatch_mode_base()
    return None if base is None else type("_LiveBytesMode", (_LiveBytes, base), {})


def peak_memory_bytes(module: nn.Module, example_inputs: Any) -> int:
    """Weights plus the peak of memory allocated during one forward pass (CUDA: allocator statistics)."""
    device = device_of_module(module)
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _call(module, example_inputs)
        _sync(device)
        return weights + torch.cuda.max_memory_allocated(device) - base
    cls = _live_bytes_mode()
    if cls is None:
        warnings.warn("fxprune: this torch lacks torch.utils._python_dispatch.TorchDispatchMode: the CPU peak "
                      "memory counts the weights only", CompatWarning, stacklevel=2)
        return weights
    mode = cls()
    with mode:
        _call(module, example_inputs)
    return weights + mode.peak


def batch1_ms(model: Callable[[torch.Tensor], Any], samples: list[torch.Tensor], rounds: int = 3) -> float:
    """Median over ``rounds`` of the mean time of one forward at batch 1 over ``samples``, in ms."""
    times = []
    with torch.no_grad():
        for x in samples[:4]:
            model(x)
        for _ in range(rounds):
            start = time.perf_counter()
            for x in samples:
                model(x)
            times.append((time.perf_counter() - start) / len(samples) * 1e3)
    return float(statistics.median(times))
