"""The fast front end: ``make_fx`` over the model's forward with fake parameters, pre-dispatch, no stack traces.

It produces the same graph contract as ``torch.export(...).module()`` (see ``fxprune.tracing.tracer``):
parameters and buffers as ``get_attr`` nodes named by their state-dict names, one placeholder per
flattened user input, a pytree codegen so the module is called like the user's model and returns
the same structure, ``meta["val"]`` on every node and ``meta["nn_module_stack"]`` on every op.
The op vocabulary is export's training IR (pre-dispatch ATen: ``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``, in-place ``aten.relu_``), because export's non-strict mode is built on the
same tracer; export adds dynamo-level bookkeeping, stack-trace recording and the unlifting of
``ep.module()`` on top.

Anything this path does not handle raises ``Unsupported`` (or whatever the tracer raised), and
``fxprune.tracing.tracer`` then falls back to ``torch.export``. The private torch names it uses come from
``fxprune.tracing.compat`` (``make_fx_support()``), looked up when a trace starts: importing this module
never touches them.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx

from fxprune.state import named_tensors

from .compat import Support, is_op_overload, make_fx_support, op_schema, tree_leaves
from .lazy_module import lazy_graph_module

__all__ = ["fast_trace", "Unsupported"]


class Unsupported(RuntimeError):
    """The fast path met something it does not reproduce like torch.export; use export instead."""


def _reader_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """For each state name, the name the graph reads the tensor under: the last name of a tied group
    (as torch.export does: a model with ``lm_head.weight = embed.weight`` reads ``lm_head.weight``)."""
    last: dict[int, str] = {}
    for name, t in state.items():
        last[id(t)] = name
    return {name: last[id(t)] for name, t in state.items()}


def _state_readers(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """What both quick front ends (this one and ``fxprune.tracing.record``) start from: every parameter
    and buffer by state-dict name (``fxprune.state.named_tensors``), the name the graph reads each under
    (``_reader_names``), and those reader names once each, in order."""
    state = named_tensors(model)
    reader_of = _reader_names(state)
    return state, reader_of, list(dict.fromkeys(reader_of.values()))


def _fake_inputs(tc: Support, mode: Any, leaves: list[Any], dynamic_batch: bool) -> list[Any]:
    """User input leaves as fake tensors (``mode``: a FakeTensorMode); with ``dynamic_batch`` axis 0 of
    each tensor is symbolic."""
    out = []
    for x in leaves:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif dynamic_batch and x.dim() > 0:
            dims = [tc.DimDynamic.DYNAMIC] + [tc.DimDynamic.STATIC] * (x.dim() - 1)
            out.append(mode.from_tensor(x, symbolic_context=tc.StatelessSymbolicContext(dynamic_sizes=dims)))
        else:
            out.append(mode.from_tensor(x, static_shapes=True))
    return out


@contextlib.contextmanager
def _module_stack(model: torch.nn.Module, graph_of: Callable[[], fx.Graph | None] | None = None) -> Iterator[None]:
    """Record ``meta["nn_module_stack"]`` ({path: (path, class name)}, outermost first, as export writes it)
    on every op node, via global module hooks that label the nodes created since the previous module
    entry or exit (the model itself gets no hooks). ``graph_of()``: the graph being recorded (default:
    make_fx's). Measured: 5-10% of the trace time on mobilenet_v3_small and resnet50. The hooks are
    torch's global ones, so they act in the tracing thread only: another thread running modules
    meanwhile (the same model included) is not recorded."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    graph_of = graph_of or _make_fx_graph
    names = {id(m): name for name, m in model.named_modules()}
    stack: dict[str, tuple[str, str]] = {}
    cursor: list[fx.Node | None] = [None]
    tracing_thread = threading.get_ident()

    def label() -> None:
        graph = graph_of()
        if graph is None:
            return
        node = cursor[0].next if cursor[0] is not None else next(iter(graph.nodes), None)
        value = dict(stack)
        while node is not None and node.op != "root":
            if stack and node.op != "placeholder":
                node.meta.setdefault("nn_module_stack", value)
            cursor[0] = node
            node = node.next

    def pre(mod: torch.nn.Module, args: Any) -> None:
        name = names.get(id(mod))
        if name is not None and threading.get_ident() == tracing_thread:
            label()
            key = name or "L__self__"
            while key in stack:  # a module called inside itself (recursion): keep keys unique
                key += "@"
            stack[key] = (name, f"{type(mod).__module__}.{type(mod).__qualname__}")

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        if names.get(id(mod)) is not None and stack and threading.get_ident() == tracing_thread:
            label()
            stack.popitem()

    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _make_fx_graph() -> fx.Graph | None:
    mode = make_fx_support().get_proxy_mode()
    return mode.tracer.graph if mode is not None else None


def _forward_arg_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Names for the generated ``forward``'s parameters: the model's own, ``*args`` numbered."""
    sig = inspect.signature(model.forward)
    names: list[str] = []
    for name, value in sig.bind_partial(*args).arguments.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL:
            names.extend(f"{name}_{i}" for i in range(len(value)))
        else:
            names.append(name)
    return names + list(kwargs)


def _traced(tc: Support, model: torch.nn.Module, readers: list[str], in_spec: Any, out_spec: list[Any]) -> Any:
    """The function make_fx traces: (state by name, flat user leaves) -> flat outputs. Two plain
    arguments, not ``*flat``: make_fx compiles a wrapper for varargs functions. ``in_spec``, ``out_spec``:
    pytree specs."""
    owners = _owners(model, readers)
    pytree = tc.pytree

    def fn(params: dict[str, torch.Tensor], leaves: list[Any]) -> tuple[Any, ...]:
        args, kwargs = pytree.tree_unflatten(leaves, in_spec)
        with tc.reparametrize_module(model, params, tie_weights=True, strict=False):
            out = model(*args, **kwargs)
            _check_state_kept(owners, params)
        flat, spec = pytree.tree_flatten(out)
        out_spec.append(spec)
        return tuple(flat)
    return fn


def _check_state_kept(owners: list[tuple[str, dict[str, Any], str]], params: dict[str, torch.Tensor]) -> None:
    """A forward that assigns a new tensor to a parameter or buffer (a state update) is export's job.
    ``owners``: (state name, the owning module's ``_parameters`` or ``_buffers``, leaf name)."""
    for name, table, leaf in owners:
        if table.get(leaf) is not params[name]:
            raise Unsupported(f"forward reassigns {name}")


def _owners(model: torch.nn.Module, names: list[str]) -> list[tuple[str, dict[str, Any], str]]:
    out = []
    for name in names:
        mod_path, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        out.append((name, mod._parameters if leaf in mod._parameters else mod._buffers, leaf))
    return out


def _check_no_state_mutation(graph: fx.Graph, state_nodes: set[fx.Node]) -> None:
    """An op that writes into a parameter or buffer in place (a state update) is export's job."""
    for node in graph.nodes:
        if node.op != "call_function" or not is_op_overload(node.target):
            continue
        schema = op_schema(node.target)
        if not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and value in state_nodes:
                raise Unsupported(f"{node.format_node()} writes a parameter or buffer in place")
        for arg in schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write and node.kwargs.get(arg.name) in state_nodes:
                raise Unsupported(f"{node.format_node()} writes a parameter or buffer in place")


def _lift_state(tc: Support, traced: fx.GraphModule, state: dict[str, torch.Tensor],
                readers: list[str]) -> dict[str, Any]:
    """Turn the state placeholders into get_attr nodes (first in the graph, one per state name, as in
    export's graph); return the attributes the GraphModule must own, by target."""
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_reader = dict(zip(readers, placeholders[:len(readers)]))
    reader_of = _reader_names(state)
    owned: dict[str, Any] = {}
    first = next(iter(graph.nodes))
    attrs: dict[str, fx.Node] = {}
    with graph.inserting_before(first), warnings.catch_warnings():  # the new GraphModule will own them:
        warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node with no underlying", UserWarning)
        for name in state:
            node = graph.get_attr(name)
            node.meta["val"] = by_reader[reader_of[name]].meta["val"]
            attrs[name] = node
            owned[name] = state[name]
    for name, ph in by_reader.items():
        ph.replace_all_uses_with(attrs[name])
        graph.erase_node(ph)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in owned:
            value = getattr(traced, node.target)
            if isinstance(value, tc.FakeTensor):
                raise Unsupported(f"a fake constant {node.target}")
            owned[node.target] = value
    _check_no_state_mutation(graph, set(attrs.values()))
    return owned


_SIZES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _dedupe_size_nodes(graph: fx.Graph) -> None:
    """One node per symbolic-size expression, as in export's graph: make_fx records ``sym_size(x, 0)``
    and ``s0 * 4`` again at every use (nn.MultiheadAttention: one ``mul`` per view), export once."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs or not isinstance(node.meta.get("val"), _SIZES):
            continue
        if not (node.target is torch.ops.aten.sym_size.int or getattr(node.target, "__module__", None) == "_operator"):
            continue
        key = (node.target, *node.args)
        try:
            twin = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument
            continue
        if twin is not node:
            node.replace_all_uses_with(twin)
            graph.erase_node(node)


def _name_inputs(tc: Support, graph: fx.Graph, names: list[str]) -> None:
    """Placeholders named after the forward's parameters (make_fx names them arg1_1, arg1_2...)."""
    for node, name in zip((n for n in graph.nodes if n.op == "placeholder"), names):
        tc.rename_node(node, name)
        node.target = node.name


def _input_names(forward_names: list[str], args: tuple, kwargs: dict) -> list[str]:
    """Placeholder names: the forward parameter's name, suffixed by the leaf's position when it holds several."""
    out: list[str] = []
    for name, value in zip(forward_names, list(args) + list(kwargs.values())):
        n = len(tree_leaves(value))
        out.extend([name] if n == 1 else [f"{name}_{i}" for i in range(n)])
    return out


def _backends_off_in_graph(graph: fx.Graph) -> None:
    """As in export's graph, normalisations record ``cudnn_enabled=False`` (export traces with the
    backends switched off; F.batch_norm & co. pass the global flag as an argument)."""
    for node in graph.nodes:
        if node.op != "call_function" or not is_op_overload(node.target):
            continue
        arguments = op_schema(node.target).arguments
        for i, arg in enumerate(arguments):
            if arg.name not in _BACKEND_FLAGS:
                continue
            if i < len(node.args):
                node.args = (*node.args[:i], False, *node.args[i + 1:])
            elif arg.name in node.kwargs or arg.kwarg_only or any(a.name in node.kwargs for a in arguments[:i]):
                node.kwargs = {**node.kwargs, arg.name: False}
            else:  # left out as a default (true) with the defaults before it: written out, as export's graph has it
                node.args = (*node.args, *(a.default_value for a in arguments[len(node.args):i]), False)


_BACKEND_FLAGS = ("cudnn_enabled", "cudnn_enable")


@contextlib.contextmanager
def _backends_off_on_accelerators(tensors: list[Any]) -> Iterator[None]:
    """mkldnn/nnpack/cudnn off while tracing tensors that live on an accelerator, as export does (a
    cuDNN LSTM would otherwise flatten its fake weights in place). These flags are process-wide, so
    on the CPU, where no backend choice reaches a pre-dispatch graph but the normalisations' flag
    (``_backends_off_in_graph``), they are left alone: another thread's kernels are unaffected."""
    if all(t.device.type in ("cpu", "meta") for t in tensors if isinstance(t, torch.Tensor)):
        yield
        return
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False), \
            torch.backends.cudnn.flags(enabled=False):
        yield


def fast_trace(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool) -> fx.GraphModule:
    """Trace ``model`` (already in eval mode) into an export-like GraphModule. Raises on anything
    unsupported, and ``compat.MissingFeature`` on a torch that lacks a private name it needs."""
    tc = make_fx_support().require()
    pytree = tc.pytree
    state, _, readers = _state_readers(model)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    mode = tc.FakeTensorMode(allow_non_fake_inputs=False, shape_env=tc.ShapeEnv(), static_shapes=not dynamic_batch)
    # Fakified here (static shapes); make_fx's own conversion of the real tensors then hits the mode's
    # memo, which holds the fakes weakly: keep them referenced until the trace is done.
    fake_state = [mode.from_tensor(state[name], static_shapes=True) for name in readers]
    fake_leaves = _fake_inputs(tc, mode, leaves, dynamic_batch)
    if not any(isinstance(x, tc.FakeTensor) for x in fake_leaves):
        raise Unsupported("no tensor among the inputs")
    out_spec: list[Any] = []
    fn = _traced(tc, model, readers, in_spec, out_spec)
    # As export: no grad, and no backend-specific choice baked in (_backends_off_in_graph,
    # _backends_off_on_accelerators). The torch-function metadata mode only records meta["torch_fn"]
    # (unused here) and maps aten.size to sym_size on symbolic sizes: off for a static trace, where it
    # cost 5-15% of the time (mobilenet_v3_small, efficientnet_b1).
    with _module_stack(model), torch.no_grad(), _backends_off_on_accelerators(list(state.values()) + leaves):
        traced = tc.make_fx(fn, tracing_mode="fake", pre_dispatch=True, record_stack_traces=False,
                            _disable_torch_fn_metadata_mode=not dynamic_batch)(
            {name: state[name] for name in readers}, fake_leaves)
    del fake_state
    owned = _lift_state(tc, traced, state, readers)
    _backends_off_in_graph(traced.graph)
    if dynamic_batch:
        _dedupe_size_nodes(traced.graph)
    forward_names = _forward_arg_names(model, args, kwargs)
    _name_inputs(tc, traced.graph, _input_names(forward_names, args, kwargs))
    traced.graph.set_codegen(tc.get_codegen(in_spec, out_spec[-1], forward_names))
    gm = lazy_graph_module(owned, traced.graph)
    gm._in_spec, gm._out_spec = in_spec, out_spec[-1]
    return gm
