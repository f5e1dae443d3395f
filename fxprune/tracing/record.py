"""The quickest front end: run the model once on its example inputs and record every ATen call at
torch's pre-dispatch level, the level ``make_fx(pre_dispatch=True)`` and ``torch.export`` trace at.

Same graph contract and op vocabulary as ``fxprune.tracing.makefx`` (and so as ``torch.export``): state
as ``get_attr`` nodes named by state-dict names, one placeholder per flattened input, a pytree
codegen, ``meta["val"]`` and ``meta["nn_module_stack"]`` on every op. What it leaves out is what
costs make_fx about a millisecond per op: fake tensors, proxies, symbolic shapes. The ops run on
the real tensors (torch's own C++ kernels; small example inputs cost little), or on meta tensors:
when the model's weights are on meta, and on the CPU when a real forward looks expensive (``_heavy``:
a rough multiply-add estimate over ``HEAVY_MACS``: large models record several times quicker on
meta, while BatchNorm-heavy small nets record quicker for real). On meta copies of real weights, device literals
are written
with the real device, and normalisations are shaped, not run (their meta kernels are Python).
``meta["val"]`` always holds meta tensors of the same shape and dtype.

It only records a static graph, and it refuses (raises ``Unsupported``; ``fxprune.tracing.tracer`` then
uses make_fx, then torch.export) whatever a real run would silently specialise or change:
  * values read out of tensors (``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``, ``nonzero``,
    boolean masks): data-dependent;
  * writes into a parameter or buffer, or a forward that reassigns one: a state update;
  * a tensor no recorded op produced (a plain tensor attribute, a cached tensor): a constant;
  * a forward that switches gradients or autocast off or on inside: make_fx records those switches.
The model's own tensors are never written: example inputs are copied, state writes are refused
before they run, and parameters are traced with ``requires_grad`` off (put back afterwards), so
that a ``torch.no_grad()`` region inside the forward shows up as grad mode turning off.

Nothing here changes torch for other threads: the value readers are refused and the fused
attention kernels avoided by a torch-function mode, which torch keeps per thread
(``_TracingThreadOnly``), and the "compiling" flags read true in the tracing thread only
(``compat.compiling_in_this_thread``). The private torch names it uses come from ``fxprune.tracing.compat``
(``recorder_support()``), looked up when a recording starts.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from .compat import Support, compiling_in_this_thread, op_schema, recorder_support
from .decisions import Watch, integer_index
from .lazy_module import lazy_graph_module
from .makefx import (
    Unsupported,
    _check_state_kept,
    _forward_arg_names,
    _input_names,
    _module_stack,
    _owners,
    _state_readers,
)
from .meta_norms import META_ON_META, norm_output, shaped_on_meta

__all__ = ["record_trace", "norm_output", "META_ON_META"]

aten = torch.ops.aten
_LIFT = (aten.lift_fresh.default, aten.lift_fresh_copy.default)
# The flag and the statistics of an op with the STATE_UPDATE role (it writes the statistics when the flag is set).
_STATS_FLAG, _STATS = ("training", "use_input_stats"), ("running_mean", "running_var")


def state_updaters() -> frozenset[Any]:
    """The registry's ``STATE_UPDATE`` ops: functional ops that still update running statistics when
    their training flag is set. Read once per recording (the registry is imported on first use)."""
    from fxprune.analysis.rules import Role, ops_with_role

    return ops_with_role(Role.STATE_UPDATE)


# Real compute above this many estimated multiply-adds (CPU): record on meta copies instead (see _heavy).
HEAVY_MACS = 1e10


def _is_meta_device(x: Any) -> bool:
    return isinstance(x, torch.device) and x.type == "meta"


@functools.cache
def _mode_class(rs: Support) -> type:
    """The dispatch mode the recording runs under (made on first use: its base class is private)."""

    class _Mode(rs.ProxyTorchDispatchMode):
        """Torch admits only its own mode classes onto the pre-dispatch stack; none of the parent's
        tracing machinery runs (its ``__init__`` is skipped), every op goes to the recorder."""

        def __init__(self, recorder: _Recorder) -> None:
            rs.TorchDispatchMode.__init__(self, rs.PreDispatchKey)
            self._mode_key = rs.ProxyModeKey
            self.enter_stack: list[Any] = []
            self.recorder = recorder

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            return self.recorder.call(func, args, kwargs or {})

    return _Mode


def _meta_val(t: torch.Tensor) -> torch.Tensor:
    """A new meta tensor of the same shape, strides and dtype (what the analysis reads). Never ``t``
    itself, even on meta: a factory's Python binding reuses the tensor it gets back only when nothing
    else holds it (autograd's make_variable), and the recording must see that same tensor again."""
    return _from_layout(_layout_of(t))


def _layout_of(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    if t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise Unsupported(f"a {type(t).__name__} with layout {t.layout}")
    return tuple(t.shape), t.stride(), t.dtype


def _from_layout(layout: tuple[tuple[int, ...], tuple[int, ...], torch.dtype]) -> torch.Tensor:
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


class _OpCheck:
    """Per-op facts, computed once per overload: which arguments it writes, whether its result
    depends on tensor values."""

    def __init__(self, func: Any, updates_state: bool) -> None:
        schema = op_schema(func)
        self.writes = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        self.names = [a.name for a in schema.arguments]
        returns_values = any("Tensor" not in str(r.type) for r in schema.returns)
        tags = func.tags
        self.data_dependent = returns_values or torch.Tag.data_dependent_output in tags
        self.dynamic_shape = torch.Tag.dynamic_output_shape in tags
        # (index of the flag, indices of the statistics) when the op updates them
        self.stats = (next(i for i, n in enumerate(self.names) if n in _STATS_FLAG),
                      tuple(i for i, n in enumerate(self.names) if n in _STATS)) if updates_state else None
        # export traces with cudnn off, so F.batch_norm & co. pass cudnn_enabled=False; the real run keeps
        # the backends on (a depthwise conv without mkldnn is several times slower) and records False
        self.backend_flag = next((i for i, a in enumerate(schema.arguments)
                                  if a.name in ("cudnn_enabled", "cudnn_enable")), None)


class _Recorder:
    def __init__(self, rs: Support, graph: fx.Graph, meta: bool, state_storages: set[int], state_ids: set[int],
                 device: torch.device | None = None, analysis: bool = False, watch: Watch | None = None) -> None:
        self.rs = rs
        self.watch = watch
        self.analysis = analysis  # record what a real run does, data-dependent parts included (see record_trace)
        self.graph = graph
        self.meta = meta
        self.device = device  # the model's real device when it runs on meta copies: what device literals say
        self.state_storages = state_storages
        self.state_ids = state_ids
        self.nodes: dict[int, tuple[weakref.ref, fx.Node]] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.checks: dict[Any, _OpCheck] = {}
        # the registry's sets, read before the forward runs under the recording's modes
        self.shaped = shaped_on_meta() if meta else frozenset()
        self.state_updaters = state_updaters()
        # meta["val"] of the recorded ops, made after the forward (``finish``): meta tensors made between the
        # forward's real allocations are small long-lived C++ blocks that fragment the heap (measured:
        # xcit_nano at 224 peaked at +25 MB resident while recording, +6 MB with the values deferred)
        self.pending: list[tuple[fx.Node, Any]] = []

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = (weakref.ref(t), node)

    def node_of(self, t: torch.Tensor) -> fx.Node:
        entry = self.nodes.get(id(t))
        if entry is None or entry[0]() is not t:
            if self.analysis:  # a cached tensor (anchors, a constant attribute): a constant of the recording
                self._constant(t)
                return self.nodes[id(t)][1]
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
        if self.device is not None:
            node_args = tuple(self.device if _is_meta_device(a) else a for a in node_args)
            node_kwargs = {k: self.device if _is_meta_device(v) else v for k, v in node_kwargs.items()}
        graph = self.graph
        node = graph.create_node("call_function", func, node_args, node_kwargs,
                                 name=self.rs.target_to_str(graph, func.overloadpacket.__name__))
        if func in self.shaped:
            out = norm_output(func, args)
        elif self.meta:
            out = func(*args, **kwargs)
        else:  # a real kernel: torch's own C++ dispatch, not the Python dispatcher the recording needs
            with self.rs.DisablePythonDispatcher():
                out = func(*args, **kwargs)
        if self.watch is not None:
            self.watch.after_op(func, args, kwargs, out)
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
            self.pending.append((node, _layout_of(out)))
            self.bind(out, node)
            return
        if isinstance(out, (tuple, list)):
            parts: list[Any] = []
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.create_node("call_function", operator.getitem, (node, i), name="getitem")
                    self.pending.append((item, _layout_of(t)))
                    self.bind(t, item)
                    parts.append(item)
                else:
                    parts.append(t)
            self.pending.append((node, (type(out), parts)))
            return
        node.meta["val"] = out

    def finish(self) -> None:
        """Every recorded op's ``meta["val"]``: a meta tensor, or the tuple of its items' values."""
        for node, made in self.pending:
            if isinstance(made[0], type):
                kind, parts = made
                node.meta["val"] = kind(p.meta["val"] if isinstance(p, fx.Node) else p for p in parts)
            else:
                node.meta["val"] = _from_layout(made)
        self.pending.clear()

    def _check(self, func: Any, args: tuple, kwargs: dict) -> _OpCheck:
        if not self.analysis and not torch.is_grad_enabled():
            raise Unsupported("the forward turns gradients off (torch.no_grad)")
        if not self.analysis and self.rs.is_any_autocast_enabled():
            raise Unsupported("the forward enables autocast")
        check = self.checks.get(func)
        if check is None:
            check = self.checks[func] = _OpCheck(func, func in self.state_updaters)
        if check.data_dependent and not self.analysis:  # (on meta these would fail anyway: the same message)
            raise Unsupported(f"{func} reads tensor values (data-dependent)")
        if check.dynamic_shape and not self.analysis and not integer_index(func, args):
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


# Tensor methods that read values without going through the dispatcher (``np.asarray(t)`` calls ``__array__``)
_VALUE_READERS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.__array__: "__array__"}


class _TracingThreadOnly(TorchFunctionMode):
    """What the recording must change in torch, for the tracing thread only (torch keeps its
    torch-function mode stack per thread; another thread using torch meanwhile is unaffected):

    * ``Tensor.tolist()``, ``Tensor.numpy()`` and ``np.asarray(t)`` read a tensor's values in C++, past
      the dispatcher, where the recording cannot see them: they raise ``Unsupported``. (Torch routes
      these methods through the active torch-function mode, which the recorder's dispatch mode is not.)
    * nn.MultiheadAttention and nn.TransformerEncoder(Layer) take a fused kernel when nothing needs
      gradients and no tensor is traced (``_native_multi_head_attention``, which no rule knows): with
      a torch-function mode active, ``has_torch_function`` holds for every tensor, and their fast paths
      step aside, as under make_fx's proxies and export's fakes. (The alternative,
      ``torch.backends.mha.set_fastpath_enabled(False)``, is one process-wide flag: it would switch
      the fast path off for every thread while the trace runs.)"""

    def __init__(self, analysis: bool = False, watch: Watch | None = None) -> None:
        super().__init__()
        self.analysis = analysis
        self.watch = watch

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = _VALUE_READERS.get(func)
        if name is not None and not self.analysis:
            raise Unsupported(f"Tensor.{name}() reads tensor values (data-dependent)")
        out = func(*args, **(kwargs or {}))
        return out if self.watch is None else self.watch.on_function(func, args, out)


@contextlib.contextmanager
def _armed(watch: Watch | None) -> Iterator[None]:
    """The watch notes decisions while the forward runs, and not after (its numbers are plain ones then)."""
    if watch is not None:
        watch.armed = True
    try:
        yield
    finally:
        if watch is not None:
            watch.armed = False


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


def _heavy(state: dict[str, torch.Tensor], leaves: list[Any]) -> bool:
    """Whether a real forward would cost more than recording on meta: a rough multiply-add count,
    (weights of 2+ dims) x (positions), positions being token ids for integer inputs and a 16x16-patch
    count for float ones (ViT-like; a CNN's MACs/params ratio is of the same order). Only on the CPU:
    on an accelerator the real forward is cheap."""
    unique = {id(t): t for t in state.values()}.values()
    if not unique or any(t.device.type != "cpu" for t in unique):
        return False
    weights = sum(t.numel() for t in unique if t.dim() >= 2)
    positions = max((x.numel() // (1 if not x.is_floating_point() else 256)
                     for x in leaves if isinstance(x, torch.Tensor)), default=1)
    return weights * max(positions, 1) >= HEAVY_MACS


def record_trace(model: torch.nn.Module, args: tuple, kwargs: dict, *, on_meta: bool | None = None,
                 analysis: bool = False, watch: Watch | None = None) -> fx.GraphModule:
    """Trace ``model`` (already in eval mode) into an export-like static GraphModule. Raises on anything
    unsupported. ``on_meta``: run the ops on meta copies of the weights and inputs (default: when the
    weights are on meta, or a real forward looks expensive, ``_heavy``); device literals then name the
    model's real device. Raises ``compat.MissingFeature`` on a torch that lacks a private name it needs.

    ``analysis=True``: the record of one real run, for the channel analysis only, of a model no static
    graph can express (a detector's NMS, top-k, boolean masks, loops over a variable number of boxes):
    value reads, data-dependent shapes, cached tensors (as constants), gradient and autocast switches are
    recorded as what they are instead of refused; the ops run on the real tensors. The graph describes
    this run (its Python branches and loop counts taken); it is not a program for other inputs. Writes to
    the model's state are still refused. ``watch`` (with ``analysis``): notes the first Python decision the run
    makes on a data-dependent value (``fxprune.tracing.decisions``), which torch.export could not follow."""
    rs = recorder_support().require()
    pytree = rs.pytree
    state, reader_of, readers = _state_readers(model)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise Unsupported("no tensor among the inputs")
    weights_on_meta = any(t.device.type == "meta" for t in state.values())
    if weights_on_meta and not all(t.device.type == "meta" for t in state.values()):
        raise Unsupported("some weights on the meta device, some not")
    if analysis and weights_on_meta:
        raise Unsupported("an analysis recording runs the real model: its weights are on the meta device")
    meta = False if analysis else on_meta if on_meta is not None else weights_on_meta or _heavy(state, leaves)
    copies = meta and not weights_on_meta  # a real model recorded on meta copies of its weights
    run_state = {n: torch.empty_like(state[n], device="meta") if copies else state[n] for n in readers}
    device = next((t.device for t in list(state.values()) + leaves if isinstance(t, torch.Tensor)), None) \
        if copies else None
    graph = fx.Graph()
    recorder = _Recorder(rs, graph, meta, {t.untyped_storage().data_ptr() for t in run_state.values()
                                       if not meta and t.untyped_storage().nbytes()},
                         {id(t) for t in run_state.values()}, device, analysis, watch if analysis else None)
    for name, t in state.items():  # one get_attr per state name; a tied tensor is read under its last name
        node = graph.get_attr(name)
        node.meta["val"] = _meta_val(t)
        if reader_of[name] == name:
            recorder.bind(run_state[name], node)
    forward_names = _forward_arg_names(model, args, kwargs)
    run_leaves = _inputs(leaves, meta)
    for name, x in zip(_input_names(forward_names, args, kwargs), run_leaves):
        node = graph.placeholder(name)
        node.meta["val"] = _meta_val(x) if isinstance(x, torch.Tensor) else x
        if isinstance(x, torch.Tensor):
            recorder.bind(x, node)
    run_args, run_kwargs = pytree.tree_unflatten(run_leaves, in_spec)
    watch = watch if analysis else None
    if watch is not None:
        watch.seed(run_leaves)
    owners = _owners(model, readers)
    weights = rs.reparametrize_module(model, run_state, tie_weights=True, strict=False) if copies \
        else _no_param_grads(state)
    # torch.compiler.is_compiling()/is_exporting() say True in this thread, as under torch.export:
    # libraries then take their traceable paths (Hugging Face skips its data-dependent mask shortcuts)
    with _module_stack(model, lambda: graph), weights, torch.enable_grad(), compiling_in_this_thread():
        with _TracingThreadOnly(analysis, watch), rs.enable_python_dispatcher(), _mode_class(rs)(recorder), \
                _armed(watch):
            out = model(*run_args, **run_kwargs)
        _check_state_kept(owners, run_state)
    recorder.finish()
    flat, out_spec = pytree.tree_flatten(out)
    graph.output(tuple(recorder.node_of(x) if isinstance(x, torch.Tensor) else x for x in flat))
    graph.set_codegen(rs.get_codegen(in_spec, out_spec, forward_names))
    gm = lazy_graph_module({**state, **recorder.constants}, graph)
    gm._in_spec, gm._out_spec = in_spec, out_spec
    gm.meta[META_ON_META] = copies
    return gm
