"""The one module that touches torch's private names.

The two quick front ends (``fxprune.tracing.record``, ``fxprune.tracing.makefx``) are built on torch
internals: proxy dispatch modes, fake tensors, symbolic shapes, export's codegen helpers. A torch
release may move any of them. Everything in fxprune reaches them through this module, which looks
each one up only when asked (importing fxprune never touches them) and caches the answer:

* ``recorder_support()`` / ``make_fx_support()``: a :class:`Support` holding the objects a front end
  needs, or naming what is missing (``Support.missing``). ``fxprune.tracing.tracer`` skips a front end whose
  support is missing and warns once per process (:class:`CompatWarning`); torch.export, public,
  remains.
* small helpers with a fallback of their own where one exists: ``lazy_graph_module_class``,
  ``is_op_overload``, ``op_schema``, ``tree_leaves`` / ``tree_map``, ``dispatch_mode_base``,
  ``batch_norm_types``, ``fan_in``;
* ``compiling_in_this_thread``: torch.compiler's "compiling" flags, true for one thread only.

``PRIVATE_NAMES`` lists every private name fxprune uses, as ``module:attribute``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fxprune.state import attribute

__all__ = ["CompatWarning", "MissingFeature", "Support", "recorder_support", "make_fx_support", "warn_missing",
           "lazy_graph_module_class", "is_op_overload", "op_schema", "tree_leaves", "tree_map", "dispatch_mode_base",
           "batch_norm_types", "fan_in", "compiling_in_this_thread", "reset", "PRIVATE_NAMES", "FEATURES"]


class CompatWarning(UserWarning):
    """This torch lacks a private name a quicker front end needs: tracing falls back to a slower one."""


class MissingFeature(RuntimeError):
    """A front end was asked for by name, but this torch lacks a private name it needs."""


# Every private torch name fxprune uses: key -> "module:attribute[.attribute]" ("module" alone: the
# module itself). Keys in ``_KEYWORDS`` are callables whose keyword parameters are checked too.
PRIVATE_NAMES: dict[str, str] = {
    # the recorder (fxprune.tracing.record)
    "ProxyTorchDispatchMode": "torch.fx.experimental.proxy_tensor:ProxyTorchDispatchMode",
    "TorchDispatchMode": "torch.utils._python_dispatch:TorchDispatchMode",
    "PreDispatchKey": "torch._C:DispatchKey.PreDispatch",
    "ProxyModeKey": "torch._C:_TorchDispatchModeKey.PROXY",
    "DisablePythonDispatcher": "torch._C:_DisablePythonDispatcher",
    "is_any_autocast_enabled": "torch._C:_is_any_autocast_enabled",
    "enable_python_dispatcher": "torch._dispatch.python:enable_python_dispatcher",
    "is_compiling_flag": "torch.compiler:_is_compiling_flag",
    "is_exporting_flag": "torch.compiler:_is_exporting_flag",
    "target_to_str": "torch.fx:Graph._target_to_str",
    # make_fx (fxprune.tracing.makefx)
    "FakeTensor": "torch._subclasses.fake_tensor:FakeTensor",
    "FakeTensorMode": "torch._subclasses.fake_tensor:FakeTensorMode",
    "make_fx": "torch.fx.experimental.proxy_tensor:make_fx",
    "get_proxy_mode": "torch.fx.experimental.proxy_tensor:get_proxy_mode",
    "DimDynamic": "torch.fx.experimental.symbolic_shapes:DimDynamic",
    "ShapeEnv": "torch.fx.experimental.symbolic_shapes:ShapeEnv",
    "StatelessSymbolicContext": "torch.fx.experimental.symbolic_shapes:StatelessSymbolicContext",
    "rename_node": "torch.fx:Node._rename",
    # both quick front ends
    "get_codegen": "torch.export._unlift:_get_codegen",
    "reparametrize_module": "torch.nn.utils.stateless:_reparametrize_module",
    "pytree": "torch.utils._pytree",
    "OpOverload": "torch._ops:OpOverload",
    # elsewhere, each with a fallback
    "LazyGraphModule": "torch.fx._lazy_graph_module:_LazyGraphModule",
    "BatchNormBase": "torch.nn.modules.batchnorm:_BatchNorm",
    "fan_in_and_fan_out": "torch.nn.init:_calculate_fan_in_and_fan_out",
    "free_unbacked_symbols": "torch.fx.experimental.symbolic_shapes:free_unbacked_symbols",
}

# Keyword parameters the front ends pass (private ones among them); checked by signature.
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "make_fx": ("tracing_mode", "pre_dispatch", "record_stack_traces", "_disable_torch_fn_metadata_mode"),
    "reparametrize_module": ("tie_weights", "strict"),
}

# Front end -> the keys of PRIVATE_NAMES it needs. Besides: ``OpOverload._schema`` (checked in ``_probe``).
FEATURES: dict[str, tuple[str, ...]] = {
    "record": ("ProxyTorchDispatchMode", "TorchDispatchMode", "PreDispatchKey", "ProxyModeKey",
               "DisablePythonDispatcher", "is_any_autocast_enabled", "enable_python_dispatcher", "is_compiling_flag",
               "is_exporting_flag", "target_to_str", "get_codegen", "reparametrize_module", "pytree", "OpOverload"),
    "make_fx": ("FakeTensor", "FakeTensorMode", "make_fx", "get_proxy_mode", "DimDynamic", "ShapeEnv",
                "StatelessSymbolicContext", "rename_node", "get_codegen", "reparametrize_module", "pytree",
                "OpOverload"),
}

_lock = threading.Lock()
_resolved: dict[str, Any] = {}      # key -> the object, or a _Missing
_supports: dict[str, Support] = {}
_warned: set[frozenset[str]] = set()


class _Missing:
    """A private name this torch lacks; ``text`` names it (with the keyword parameters wanted, when
    those are what is missing)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _lookup(key: str) -> Any:
    """The object named by ``PRIVATE_NAMES[key]``, or a ``_Missing``; any error while importing counts as missing."""
    module_name, _, attr = PRIVATE_NAMES[key].partition(":")
    text = f"{module_name}.{attr}" if attr else module_name
    try:
        obj = attribute(importlib.import_module(module_name), attr)
    except Exception:  # noqa: BLE001 - an ImportError, an AttributeError, or a module that fails to import
        return _Missing(text)
    wanted = _KEYWORDS.get(key, ())
    if wanted:
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        absent = [w for w in wanted if w not in params]
        if absent:
            return _Missing(f"{text}({', '.join(w + '=' for w in absent)})")
    return obj


def _get(key: str) -> Any:
    obj = _resolved.get(key)
    if obj is None:
        obj = _resolved[key] = _lookup(key)
    return obj


@dataclass(frozen=True, eq=False)
class Support:
    """What a front end needs from torch: ``objects`` by key (see ``PRIVATE_NAMES``), or the names missing."""

    feature: str
    missing: tuple[str, ...] = ()
    objects: dict[str, Any] = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return not self.missing

    def __getattr__(self, key: str) -> Any:
        objects = self.__dict__.get("objects", {})
        if key in objects:
            return objects[key]
        if key in PRIVATE_NAMES:
            raise MissingFeature(self.message())
        raise AttributeError(key)

    def message(self) -> str:
        return f"the {self.feature} front end needs {', '.join(self.missing)}, missing from this torch"

    def require(self) -> Support:
        """``self``, or :class:`MissingFeature` naming what is missing."""
        if self.missing:
            raise MissingFeature(self.message())
        return self


def _probe(feature: str) -> Support:
    with _lock:
        found = _supports.get(feature)
        if found is not None:
            return found
        keys = FEATURES[feature]
        objects = {key: _get(key) for key in keys}
        missing = [v.text for v in objects.values() if isinstance(v, _Missing)]
        if not isinstance(objects.get("OpOverload"), _Missing):
            import torch

            if not hasattr(torch.ops.aten.add.Tensor, "_schema"):
                missing.append("torch._ops.OpOverload._schema")
        support = Support(feature, tuple(missing), {} if missing else objects)
        _supports[feature] = support
        return support


def recorder_support() -> Support:
    """What ``fxprune.tracing.record`` needs (cached): its objects, or the private names missing."""
    return _probe("record")


def make_fx_support() -> Support:
    """What ``fxprune.tracing.makefx`` needs (cached): its objects, or the private names missing."""
    return _probe("make_fx")


SUPPORT: dict[str, Callable[[], Support]] = {"record": recorder_support, "make_fx": make_fx_support}


def warn_missing(skipped: Iterable[Support], fallback: str, stacklevel: int = 2) -> None:
    """One :class:`CompatWarning` for the front ends skipped (once per process for the same missing names),
    naming the missing names and the slower front end tracing falls back to."""
    skipped = [s for s in skipped if s.missing]
    if not skipped:
        return
    names = sorted({n for s in skipped for n in s.missing})
    key = frozenset(names)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    import torch

    which = " and ".join(s.feature for s in skipped)
    warnings.warn(f"fxprune: torch {torch.__version__} lacks {', '.join(names)}, which the quicker {which} front "
                  f"end{'s' * (len(skipped) > 1)} need{'s' * (len(skipped) == 1)}: tracing falls back to {fallback}, "
                  "several times slower", CompatWarning, stacklevel=stacklevel + 1)


class _ThisThreadCompiling:
    """Stands in for torch.compiler's ``_is_compiling_flag`` / ``_is_exporting_flag`` (module globals that
    ``is_compiling()`` / ``is_exporting()`` return): true in the threads inside
    ``compiling_in_this_thread``, else what the flag was before."""

    def __init__(self, before: Any) -> None:
        self.before = before

    def __bool__(self) -> bool:
        return threading.get_ident() in _compiling_threads or bool(self.before)

    # the flag's readers use it as the bool it replaces: ``flag |= other`` (transformers' is_tracing), ``==``
    def __or__(self, other: Any) -> Any:
        return bool(self) | other

    __ror__ = __or__

    def __and__(self, other: Any) -> Any:
        return bool(self) & other

    __rand__ = __and__

    def __eq__(self, other: object) -> bool:
        return bool(self) == other

    def __hash__(self) -> int:
        return hash(bool(self))

    def __index__(self) -> int:
        return int(bool(self))

    def __repr__(self) -> str:
        return repr(bool(self))


_compiling_threads: dict[int, int] = {}  # thread id -> depth
_COMPILING_FLAGS = ("_is_compiling_flag", "_is_exporting_flag")


@contextlib.contextmanager
def compiling_in_this_thread() -> Iterator[None]:
    """``torch.compiler.is_compiling()`` and ``is_exporting()`` true in this thread for the duration,
    as under torch.export, whose own switch (``torch._export.utils._compiling_state_context``) sets
    them for the whole process: another thread's libraries would take their export paths meanwhile."""
    import torch.compiler as tc

    me = threading.get_ident()
    with _lock:
        _compiling_threads[me] = _compiling_threads.get(me, 0) + 1
        for name in _COMPILING_FLAGS:
            now = getattr(tc, name)
            if not isinstance(now, _ThisThreadCompiling):
                setattr(tc, name, _ThisThreadCompiling(now))
    try:
        yield
    finally:
        with _lock:
            _compiling_threads[me] -= 1
            if not _compiling_threads[me]:
                del _compiling_threads[me]
            if not _compiling_threads:
                for name in _COMPILING_FLAGS:
                    now = getattr(tc, name)
                    if isinstance(now, _ThisThreadCompiling):
                        setattr(tc, name, now.before)


def reset() -> None:
    """Forget the cached look-ups and the warnings already given (for tests that change ``PRIVATE_NAMES``)."""
    with _lock:
        _resolved.clear()
        _supports.clear()
        _warned.clear()


# ---- helpers with a fallback of their own ---------------------------------------------------------

def lazy_graph_module_class() -> type | None:
    """torch's ``_LazyGraphModule`` (a GraphModule that compiles its code on first use), or None."""
    obj = _get("LazyGraphModule")
    return None if isinstance(obj, _Missing) else obj


def wrap_stack_summary(env: Any, wrap: Callable[[Any], Any]) -> None:
    """Pass the source location a ShapeEnv records for each guard and replacement (the first result of its
    private ``_get_stack_summary``) through ``wrap``, on this instance only; nothing on a torch without it (the
    locations stay torch's own)."""
    summary = getattr(env, "_get_stack_summary", None)
    if summary is None:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        sloc, *rest = summary(*args, **kwargs)
        return (wrap(sloc), *rest)

    env._get_stack_summary = wrapped


def is_op_overload(target: Any) -> bool:
    """Whether ``target`` is an ATen/custom operator overload (``torch.ops.aten.add.Tensor``)."""
    cls = _get("OpOverload")
    if not isinstance(cls, _Missing):
        return isinstance(target, cls)
    return type(target).__name__ == "OpOverload" and hasattr(target, "overloadpacket")


def op_schema(op: Any) -> Any:
    """An operator overload's ``torch.FunctionSchema``."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        raise MissingFeature(f"{op} has no schema (torch._ops.OpOverload._schema is missing from this torch)")
    return schema


def _pytree() -> Any:
    obj = _get("pytree")
    return None if isinstance(obj, _Missing) else obj


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples/lists/dicts (torch's pytree when present: its registered types too)."""
    pytree = _pytree()
    if pytree is not None:
        return pytree.tree_leaves(tree)
    if isinstance(tree, (tuple, list)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    return [tree]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` applied to every leaf, the structure kept (torch's pytree when present)."""
    pytree = _pytree()
    if pytree is not None:
        return pytree.tree_map(fn, tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    if isinstance(tree, dict):
        return type(tree)((k, tree_map(fn, v)) for k, v in tree.items())
    return fn(tree)


def dispatch_mode_base() -> type | None:
    """torch's ``TorchDispatchMode`` (intercepts every ATen call), or None."""
    obj = _get("TorchDispatchMode")
    return None if isinstance(obj, _Missing) else obj


def batch_norm_types() -> tuple[type, ...]:
    """The BatchNorm module classes, for ``isinstance`` (torch's private common base when present)."""
    base = _get("BatchNormBase")
    if not isinstance(base, _Missing):
        return (base,)
    from torch import nn

    return tuple(getattr(nn, n) for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                                          "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d") if hasattr(nn, n))


def fan_in(weight: Any) -> int:
    """A layer weight's fan-in as torch's initialisers compute it (input channels x receptive field)."""
    fn = _get("fan_in_and_fan_out")
    if not isinstance(fn, _Missing):
        return fn(weight)[0]
    if weight.dim() < 2:
        raise ValueError("fan in can not be computed for a tensor with fewer than 2 dimensions")
    return weight.shape[1] * (weight[0][0].numel() if weight.dim() > 2 else 1)


def has_unbacked_sizes(val: Any) -> bool:
    """Does a traced value's shape hold a size only a run knows (an unbacked symbol: ``x[mask]``)? False on a
    torch without symbolic shapes."""
    find = _get("free_unbacked_symbols")
    if isinstance(find, _Missing):
        return False
    try:
        return bool(find(val))
    except Exception:  # noqa: BLE001 - not a symbolic value
        return False
