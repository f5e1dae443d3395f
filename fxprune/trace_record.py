"""The quickest front end: run the model once on its example inputs and record every ATen call at
torch's pre-dispatch level, the level ``make_fx(pre_dispatch=True)`` and ``torch.export`` trace at.

Same graph contract and op vocabulary as ``fxprune.trace_fast`` (and so as ``torch.export``): state
as ``get_attr`` nodes named by state-dict names, one placeholder per flattened input, a pytree
codegen, ``meta["val"]`` and ``meta["nn_module_stack"]`` on every op. What it leaves out is what
costs make_fx about a millisecond per op: fake tensors, proxies, symbolic shapes. The ops run on
the real tensors (torch's own C++ kernels; small example inputs cost little), or on the meta device
when the model's weights are there; ``meta["val"]`` holds meta tensors of the same shape and dtype.

It only records a static graph, and it refuses (raises ``Unsupported``; ``fxprune.trace`` then
uses make_fx, then torch.export) whatever a real run would silently specialise or change:
  * values read out of tensors (``.item()``, ``bool(t)``, ``nonzero``, boolean masks): data-dependent;
  * writes into a parameter or buffer, or a forward that reassigns one: a state update;
  * a tensor no recorded op produced (a plain tensor attribute, a cached tensor): a constant;
  * a forward that switches gradients or autocast off or on inside: make_fx records those switches.
The model's own tensors are never written: example inputs are copied, state writes are refused
before they run, and parameters are traced with ``requires_grad`` off (put back afterwards), so
that a ``torch.no_grad()`` region inside the forward shows up as grad mode turning off.
"""
from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .trace_fast import (Unsupported, _forward_arg_names, _input_names, _module_stack, _owners, _reader_names,
                         _state, graph_module)

__all__ = ["record_trace"]

aten = torch.ops.aten
_LIFT = (aten.lift_fresh.default, aten.lift_fresh_copy.default)
# Functional ops that still update running statistics when their training flag is set:
# op -> (index of the flag, indices of the statistics).
_UPDATES_STATS = {aten.batch_norm.default: (5, (3, 4)), aten.instance_norm.default: (5, (3, 4))}


class _Mode(ProxyTorchDispatchMode):
    """Torch admits only its own mode classes onto the pre-dispatch stack; none of the parent's
    tracing machinery runs (its ``__init__`` is skipped), every op goes to the recorder."""

    def __init__(self, recorder: _Recorder) -> None:
        TorchDispatchMode.__init__(self, torch._C.DispatchKey.PreDispatch)
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.enter_stack: list[Any] = []
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.recorder.call(func, args, kwargs or {})


def _meta_val(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of the same shape, strides and dtype (what the analysis reads)."""
    if t.device.type == "meta":
        return t
    if t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise Unsupported(f"a {type(t).__name__} with layout {t.layout}")
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class _OpCheck:
    """Per-op facts, computed once per overload: which arguments it writes, whether its result
    depends on tensor values."""

    def __init__(self, func: Any) -> None:
        schema = func._schema
        self.writes = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        self.names = [a.name for a in schema.arguments]
        returns_values = any("Tensor" not in str(r.type) for r in schema.returns)
        tags = func.tags
        self.data_dependent = returns_values or torch.Tag.data_dependent_output in tags
        self.dynamic_shape = torch.Tag.dynamic_output_shape in tags
        self.stats = _UPDATES_STATS.get(func)
        # export traces with cudnn off, so F.batch_norm & co. pass cudnn_enabled=False; the real run keeps
        # the backends on (a depthwise conv without mkldnn is several times slower) and records False
        self.backend_flag = next((i for i, a in enumerate(schema.arguments) if a.name in ("cudnn_enabled", "cudnn_enable")), None)


class _Recorder:
    def __init__(self, graph: fx.Graph, meta: bool, state_storages: set[int], state_ids: set[int]) -> None:
        self.graph = graph
        self.meta = meta
        self.state_storages = state_storages
        self.state_ids = state_ids
        self.nodes: dict[int, tuple[weakref.ref, fx.Node]] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.checks: dict[Any, _OpCheck] = {}

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = (weakref.ref(t), node)

    def node_of(self, t: torch.Tensor) -> fx.Node:
        entry = self.nodes.get(id(t))
        if entry is None or entry[0]() is not t:
            raise Unsupported("a tensor no recorded op produced (a constant tensor attribute or a cached tensor)")
        return entry[1]

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        check = self._check(func, args, kwargs)
        if func in _LIFT:  # torch.tensor(...) in forward: a constant, copied at run time (as make_fx does)
            func, args = aten.lift_fresh_copy.default, (self._constant(args[0]),) + tuple(args[1:])
        node_args = tuple(self._as_arg(a) for a in args)
        node_kwargs = {k: self._as_arg(v) for k, v in kwargs.items()}
        if check.backend_flag is not None and check.backend_flag < len(node_args):
            node_args = (*node_args[:check.backend_flag], False, *node_args[check.backend_flag + 1:])
        graph = self.graph
        node = graph.create_node("call_function", func, node_args, node_kwargs,
                                 name=graph._target_to_str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        self._track(out, node)
        return out

    def _as_arg(self, x: Any) -> Any:
        """An op argument as the graph writes it: tensors (also inside lists) as their nodes."""
        if isinstance(x, torch.Tensor):
            return self.node_of(x)
        if type(x) in (list, tuple):
            return type(x)(self._as_arg(v) for v in x)
        return x

    def _constant(self, t: torch.Tensor) -> torch.Tensor:
        name = f"_tensor_constant{len(self.constants)}"
        self.constants[name] = t
        node = self.graph.get_attr(name)
        node.meta["val"] = _meta_val(t)
        self.bind(t, node)
        return t

    def _track(self, out: Any, node: fx.Node) -> None:
        if isinstance(out, torch.Tensor):
            node.meta["val"] = _meta_val(out)
            self.bind(out, node)
            return
        if isinstance(out, (tuple, list)):
            vals = []
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.create_node("call_function", operator.getitem, (node, i), name="getitem")
                    item.meta["val"] = _meta_val(t)
                    self.bind(t, item)
                    vals.append(item.meta["val"])
                else:
                    vals.append(t)
            node.meta["val"] = type(out)(vals)
            return
        node.meta["val"] = out

    def _check(self, func: Any, args: tuple, kwargs: dict) -> _OpCheck:
        if not torch.is_grad_enabled():
            raise Unsupported("the forward turns gradients off (torch.no_grad)")
        if torch._C._is_any_autocast_enabled():
            raise Unsupported("the forward enables autocast")
        check = self.checks.get(func)
        if check is None:
            check = self.checks[func] = _OpCheck(func)
        if not self.meta:
            if check.data_dependent:
                raise Unsupported(f"{func} reads tensor values (data-dependent)")
            if check.dynamic_shape and not _integer_index(func, args):
                raise Unsupported(f"{func} has a data-dependent output shape")
        for i in check.writes:
            value = args[i] if i < len(args) else kwargs.get(check.names[i])
            if self._is_state(value):
                raise Unsupported(f"{func} writes a parameter or buffer in place")
        if check.stats is not None:
            flag, stats = check.stats
            if len(args) > flag and args[flag] and any(args[i] is not None for i in stats):
                raise Unsupported(f"{func} updates running statistics")
        return check

    def _is_state(self, value: Any) -> bool:
        for t in (value if isinstance(value, (list, tuple)) else [value]):
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) in self.state_ids or (t._base is not None and id(t._base) in self.state_ids):
                return True
            if not self.meta and t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() in self.state_storages:
                return True
        return False


def _integer_index(func: Any, args: tuple) -> bool:
    """``aten.index.Tensor`` with integer indices has a static output shape; with boolean ones it does not."""
    if func is not aten.index.Tensor:
        return False
    return all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused kernel when nothing needs
    gradients and no tensor is traced (``_native_multi_head_attention``, which no rule knows); make_fx's
    proxies and export's fakes never take it, nor does the recording."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _no_param_grads(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` off on the model's tensors for the trace (so that it can run with gradients on
    and build no autograd graph), and back on after."""
    flipped = [t for t in {id(t): t for t in state.values()}.values() if t.requires_grad]
    for t in flipped:
        t.requires_grad_(False)
    try:
        yield
    finally:
        for t in flipped:
            t.requires_grad_(True)


def _inputs(leaves: list[Any], meta: bool) -> list[Any]:
    """The example inputs the trace runs on: copies (a forward may write into its input), on meta in meta mode."""
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            x = torch.empty_like(x, device="meta") if meta else x.detach().clone()
        out.append(x)
    return out


def _check_state_kept(owners: list[tuple[str, dict[str, Any], str]], state: dict[str, torch.Tensor]) -> None:
    for name, table, leaf in owners:
        if table.get(leaf) is not state[name]:
            raise Unsupported(f"forward reassigns {name}")


def record_trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``model`` (already in eval mode) into an export-like static GraphModule. Raises on anything unsupported."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._export.utils import _compiling_state_context
    from torch.export._unlift import _get_codegen

    state = _state(model)
    reader_of = _reader_names(state)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    tensors = list(state.values()) + [x for x in leaves if isinstance(x, torch.Tensor)]
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise Unsupported("no tensor among the inputs")
    meta = any(t.device.type == "meta" for t in tensors)
    if meta and not all(t.device.type == "meta" for t in state.values()):
        raise Unsupported("some weights on the meta device, some not")
    graph = fx.Graph()
    recorder = _Recorder(graph, meta, {t.untyped_storage().data_ptr() for t in state.values()
                                       if not meta and t.untyped_storage().nbytes()},
                         {id(t) for t in state.values()})
    for name, t in state.items():  # one get_attr per state name; a tied tensor is read under its last name
        node = graph.get_attr(name)
        node.meta["val"] = _meta_val(t)
        if reader_of[name] == name:
            recorder.bind(t, node)
    forward_names = _forward_arg_names(model, args, kwargs)
    run_leaves = _inputs(leaves, meta)
    for name, x in zip(_input_names(forward_names, args, kwargs), run_leaves):
        node = graph.placeholder(name)
        node.meta["val"] = _meta_val(x) if isinstance(x, torch.Tensor) else x
        if isinstance(x, torch.Tensor):
            recorder.bind(x, node)
    run_args, run_kwargs = pytree.tree_unflatten(run_leaves, in_spec)
    owners = _owners(model, list(dict.fromkeys(reader_of.values())))
    # torch.compiler.is_compiling()/is_exporting() say True, as under torch.export: libraries then take
    # their traceable paths (Hugging Face skips its data-dependent mask shortcuts)
    with _module_stack(model, lambda: graph), _no_param_grads(state), _mha_fastpath_off(), torch.enable_grad(), \
            _compiling_state_context(), enable_python_dispatcher(), _Mode(recorder):
        out = model(*run_args, **run_kwargs)
    _check_state_kept(owners, state)
    flat, out_spec = pytree.tree_flatten(out)
    graph.output(tuple(recorder.node_of(x) if isinstance(x, torch.Tensor) else x for x in flat))
    graph._codegen = _get_codegen(in_spec, out_spec, forward_names)
    gm = graph_module({**state, **recorder.constants}, graph)
    gm._in_spec, gm._out_spec = in_spec, out_spec
    return gm
