"""Whether torch.export can follow a forward, told from one real run: the first Python decision the forward makes on
a value the example's data decides, seen as it happens.

A symbolic tracer (torch.export, make_fx) gives a tensor whose size depends on values (what NMS keeps, a boolean
mask's rows) an unbacked size, and the result of ``.item()`` an unbacked number. It follows arithmetic on them, but
not a Python decision: ``if boxes.numel() == 0``, ``len(keep)``, ``bool(scores.max() > t)`` raise
``GuardOnDataDependentSymNode`` (torchvision's detectors meet the first, in ``batched_nms``). A real run shows those
decisions as they happen: the sizes and numbers are plain ints and floats, which this module hands back as
``Watched`` ints and floats that note the first comparison (``Watch.decision``). The watch rides on the analysis
recording (``record_trace(watch=)``), which the modules target needs anyway; ``fxprune.tracing.tracer`` asks for
it only after a quick front end has failed, and only where the modules target can take over (``target="auto"``):
a traceable model pays nothing.

What counts as data-dependent (``Watch``): the inputs' values; every op's result on such values; the size of a
result of an op whose output size depends on values (``torch.Tag.dynamic_output_shape``: nonzero, boolean
indexing, unique, ...; and the custom ops in ``DYNAMIC_SIZE_OPS``, which carry no tag). What counts as a decision:
a comparison or truth test of such a number (except what a size is known to satisfy: ``>= 0``), ``bool()`` of such
a tensor, and ``len()``, iteration or ``.tolist()`` of a tensor whose size depends on values. The recording runs
with ``torch.compiler.is_compiling()`` true in its thread, as export does, so libraries take their export paths
(Hugging Face skips its data-dependent mask checks, and routes experts without ``nonzero``): what is watched is the
path export would trace.
"""
from __future__ import annotations

import functools
import operator
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .compat import dispatch_mode_base, tree_leaves
from .frames import last_user_line

__all__ = ["Decision", "Watch", "SizesSeen", "DYNAMIC_SIZE_OPS"]

# Ops whose output size depends on the values but carry no tag saying so (custom ops: their fake kernels allocate a
# dynamic size; a composite that pre-dispatch keeps whole).
DYNAMIC_SIZE_OPS = frozenset({"torchvision::nms", "aten::nonzero_numpy"})

# What a size (>= 0) is known to satisfy: comparisons torch decides without a guard, by operator and constant.
_KNOWN_FOR_SIZES = {operator.ge: lambda c: c <= 0, operator.gt: lambda c: c < 0,
                    operator.lt: lambda c: c <= 0, operator.le: lambda c: c < 0,
                    operator.eq: lambda c: c < 0, operator.ne: lambda c: c < 0}


@dataclass(frozen=True)
class Decision:
    """A Python decision on a data-dependent value: what was decided, and the user's line that decided it."""

    what: str
    where: str

    def __str__(self) -> str:
        return f"{self.what}" + (f" at {self.where}" if self.where else "")


def _watched_number(kind: type) -> type:
    """An int or float subclass that notes a decision (``Watch.decide``) when Python compares it or tests its truth,
    and otherwise behaves as the plain number; arithmetic keeps it watched. ``size``: a tensor's size (>= 0), whose
    trivial comparisons torch decides without a guard."""

    def compare(op: Any) -> Any:
        def method(self: Any, other: Any) -> Any:
            known = isinstance(other, Watched) or (self.size and isinstance(other, (int, float))
                                                   and not isinstance(other, bool) and _KNOWN_FOR_SIZES[op](other))
            if not known:  # (two watched numbers: a tracer may know them equal, as sizes of one mask's rows)
                self.watch.decide(f"compares {self.what} ({op.__name__} {other!r})")
            return op(kind(self), kind(other) if isinstance(other, Watched) else other)
        return method

    def arith(op: Any, keeps_size: bool) -> Any:
        def method(self: Any, other: Any = None) -> Any:
            result = op(kind(self), other) if other is not None else op(kind(self))
            if isinstance(result, (int, float)) and not isinstance(result, bool):
                size = self.size and keeps_size and (other is None or (isinstance(other, int) and other >= 0)
                                                     or isinstance(other, Watched) and other.size)
                return _watch_number(result, self.watch, self.what, size)
            return result
        return method

    def truth(self: Any) -> bool:
        self.watch.decide(f"tests the truth of {self.what}")
        return kind(self) != 0

    namespace: dict[str, Any] = {"__bool__": truth,
                                 "__hash__": kind.__hash__}
    for name, op in (("__eq__", operator.eq), ("__ne__", operator.ne), ("__lt__", operator.lt),
                     ("__le__", operator.le), ("__gt__", operator.gt), ("__ge__", operator.ge)):
        namespace[name] = compare(op)
    for name, op, keeps in (("__add__", operator.add, True), ("__radd__", operator.add, True),
                            ("__mul__", operator.mul, True), ("__rmul__", operator.mul, True),
                            ("__floordiv__", operator.floordiv, True), ("__sub__", operator.sub, False),
                            ("__rsub__", lambda a, b: b - a, False), ("__truediv__", operator.truediv, False),
                            ("__mod__", operator.mod, False), ("__neg__", operator.neg, False)):
        namespace[name] = arith(op, keeps)
    return type(f"Watched{kind.__name__.capitalize()}", (kind, Watched), namespace)


class Watched:
    """Marks the watched numbers (``isinstance(x, Watched)``)."""

    __slots__ = ()


def _watch_number(value: int | float, watch: Watch, what: str, size: bool) -> Any:
    number = (WatchedInt if isinstance(value, int) else WatchedFloat)(value)
    number.watch, number.what, number.size = watch, what, size
    return number


WatchedInt = _watched_number(int)
WatchedFloat = _watched_number(float)


class _Tensors:
    """A set of tensors by identity, not keeping them alive."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class Watch:
    """Which tensors of a run hold data-dependent values (``valued``) and which have data-dependent sizes
    (``sized``), and the first decision on either (``decision``). The recorder drives it (``record_trace(watch=)``):
    ``seed`` with the run's inputs, ``after_op`` on every ATen call, ``on_function`` on every torch function. Watched
    numbers decide only while the run is ``armed``: afterwards they are plain ints and floats to whoever reads the
    recording."""

    def __init__(self) -> None:
        self.valued, self.sized = _Tensors(), _Tensors()
        self.decision: Decision | None = None
        self.armed = False

    def seed(self, inputs: list[Any]) -> None:
        for x in inputs:
            if isinstance(x, torch.Tensor):
                self.valued.add(x)

    def decide(self, what: str) -> None:
        if self.armed and self.decision is None:
            self.decision = Decision(what, last_user_line(traceback.extract_stack()[:-1]))

    def after_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        valued = any(t in self.valued for t in ins)
        sized = any(t in self.sized for t in ins) or _dynamic_size(func, args)
        if not (valued or sized):
            return
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.valued.add(t)
                if sized and t.dim() > 0:
                    self.sized.add(t)

    def on_function(self, func: Any, args: tuple, out: Any) -> Any:
        """``out``, or a watched number in its place (a size or value read of a watched tensor); notes decisions."""
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is None or self.decision is not None:
            return out
        if func is torch.Tensor.__bool__ and (t in self.valued or t in self.sized):
            self.decide("tests the truth of a tensor whose value depends on the data")
        elif func in _SIZE_DECISIONS and t in self.sized:
            self.decide(f"{_SIZE_DECISIONS[func]} a tensor whose size depends on the data")
        elif func in _SIZE_READERS and t in self.sized and isinstance(out, int):
            return _watch_number(out, self, f"{_SIZE_READERS[func]} of a tensor whose size depends on the data", True)
        elif func in _VALUE_READERS and t in self.valued and isinstance(out, (int, float)) \
                and not isinstance(out, bool):
            return _watch_number(out, self, f"{_VALUE_READERS[func]} of a tensor that depends on the data", False)
        return out


def _dynamic_size(func: Any, args: tuple) -> bool:
    """Whether ``func``'s output size depends on its inputs' values: tagged so (integer indexing aside), or a
    custom op known to (``DYNAMIC_SIZE_OPS``)."""
    if getattr(func, "name", lambda: "")() in DYNAMIC_SIZE_OPS:
        return True
    if torch.Tag.dynamic_output_shape not in getattr(func, "tags", ()):
        return False
    return not integer_index(func, args)


def integer_index(func: Any, args: tuple) -> bool:
    """``aten.index.Tensor`` with integer indices: tagged ``dynamic_output_shape``, yet its output size is static
    (boolean indices are what make it data-dependent)."""
    if func is not torch.ops.aten.index.Tensor:
        return False
    return all(i is None or i.dtype not in (torch.bool, torch.uint8) for i in args[1])


_SIZE_READERS = {torch.Tensor.numel: "the number of elements", torch.Tensor.size: "a size"}
_SIZE_DECISIONS = {torch.Tensor.__len__: "len()", torch.Tensor.__iter__: "iterates over",
                   torch.Tensor.tolist: ".tolist()"}
_VALUE_READERS = {torch.Tensor.item: "the value (.item())", torch.Tensor.__int__: "int()",
                  torch.Tensor.__float__: "float()", torch.Tensor.__index__: "the value as an index"}


class SizesSeen:
    """Whether a run called an op whose output size depends on values (``seen``): the hint, from the input-size
    probe's real runs (``fxprune.tracing.dynamic.find_axes``), that a model may decide on such sizes, so that the
    watched recording is worth making before any symbolic front end (``trace(fallback=True)``). Use as a context
    manager around a run; a torch without the dispatch mode leaves ``seen`` False."""

    def __init__(self) -> None:
        self.seen = False
        self._mode: Any = None

    def __enter__(self) -> SizesSeen:
        base = dispatch_mode_base()
        if base is not None and not self.seen:
            self._mode = _sizes_mode(base)(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(*exc)


@functools.cache
def _sizes_mode(base: type) -> type:
    class _SizesMode(base):  # type: ignore[misc, valid-type]
        def __init__(self, sizes: SizesSeen) -> None:
            super().__init__()
            self.sizes = sizes

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if not self.sizes.seen and _dynamic_size(func, args):
                self.sizes.seen = True
            return func(*args, **(kwargs or {}))

    return _SizesMode
