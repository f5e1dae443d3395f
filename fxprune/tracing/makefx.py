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

from .compat import Support, is_op_overload, make_fx_support, op_schema, tree_leaves, wrap_stack_summary
from .dynamic import Axis
from .frames import user_frames
from .lazy_module import lazy_graph_module

__all__ = ["fast_trace", "Unsupported", "Specialised", "TooManyGuards", "GUARD_BUDGET"]


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


def _fake_inputs(tc: Support, mode: Any, leaves: list[Any], dims: dict[int, set[int]]) -> list[Any]:
    """User input leaves as fake tensors (``mode``: a FakeTensorMode); axis ``d`` of leaf ``i`` is symbolic for
    each ``d`` in ``dims[i]``, every other axis static."""
    out = []
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif dims.get(i):
            sizes = [tc.DimDynamic.DYNAMIC if d in dims[i] else tc.DimDynamic.STATIC for d in range(x.dim())]
            out.append(mode.from_tensor(x, symbolic_context=tc.StatelessSymbolicContext(dynamic_sizes=sizes)))
        else:
            out.append(mode.from_tensor(x, static_shapes=True))
    return out


def _symbols(fake_leaves: list[Any], axes: list[Axis]) -> dict[Axis, Any]:
    """The symbol of each asked-for axis, read before the trace (after it, a fixed one reads as its constant)."""
    return {a: fake_leaves[a.leaf].shape[a.dim].node.expr for a in axes
            if isinstance(fake_leaves[a.leaf].shape[a.dim], torch.SymInt)}


def _specialised(env: Any, symbols: dict[Axis, Any]) -> tuple[dict[Axis, str], set[Axis]]:
    """The asked-for axes the trace holds at their example size, each with where torch saw it happen: its symbol
    replaced by a constant (the forward read the size as a Python number: ``len(x)``, ``int(x.shape[0])``), or,
    for a group of axes that change together, an equality guard the graph relies on that fails at their second size (an
    expression of several sizes read as a number: ``int(x.shape[1])`` after a patch embedding). Second, the
    axes no front end keeps free: an inner size of 0 or 1 at the example's size (every tracer fixes those)."""
    import sympy

    replacements = getattr(env, "replacements", {})
    slocs = getattr(env, "replacements_slocs", {})
    out = {a: _where(slocs.get(symbol)) for a, symbol in symbols.items()
           if getattr(replacements.get(symbol, symbol), "is_number", False)}
    hints = dict(getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", {}))
    final: set[Axis] = set()
    groups: dict[int, list[Axis]] = {}
    for a in symbols:
        if a not in out:
            groups.setdefault(a.group, []).append(a)
    for group in groups.values():  # equalities only: an inequality is a kernel's choice (batch < 16), not a size
        at_probe = {**hints, **{symbols[a]: a.probe for a in group}}
        broken = next((g for g in getattr(env, "guards", [])
                       if getattr(g.expr, "func", None) is sympy.Eq and _fails(g.expr, at_probe)), None)
        if broken is not None:
            one = _inner_size_of_one(broken.expr)
            out.update(dict.fromkeys(group, ONE_INNER.format(one) if one is not None
                                     else _where(getattr(broken, "sloc", None))))
            final.update(group if one is not None else ())
    return out, final


# why an axis stays fixed when the example makes an inner size 0 or 1 (ResNet at 32x32: layer4 is 1x1)
ONE_INNER = ("at the example's size an inner size is {}, which torch fixes (it specialises sizes 0 and 1): give "
             "example inputs that keep inner sizes at 2 or more (a larger image) to keep it free")


def _inner_size_of_one(expr: Any) -> int | None:
    """0 or 1 for a guard ``Eq(size expression, 0 or 1)``: torch's specialisation of a size of 0 or 1, which no
    front end follows past (every tracer specialises them)."""
    for side in getattr(expr, "args", ())[:2]:
        if getattr(side, "is_number", False) and side in (0, 1) and \
                any(not getattr(o, "is_number", True) for o in expr.args):
            return int(side)
    return None


def _fails(expr: Any, values: dict[Any, Any]) -> bool:
    """Whether a guard (a sympy condition on sizes) is false with these sizes (unknown: not false)."""
    try:
        return bool(expr.xreplace(values) == False)  # noqa: E712 - sympy's false, not Python's identity
    except Exception:  # noqa: BLE001 - a guard that does not evaluate to a truth value
        return False


def _locate_in_user_code(env: Any) -> None:
    """Make the source locations this ShapeEnv records for its guards and replacements name the user's line: by
    itself it names the first frame outside torch's tracing, often another torch file (``torch.linspace``'s
    handler). Only this instance is touched (``compat.wrap_stack_summary``)."""
    import dataclasses
    import traceback

    def located(sloc: Any) -> Any:
        mine = user_frames(traceback.extract_stack()[:-1])
        if mine and dataclasses.is_dataclass(sloc) and hasattr(sloc, "framework_loc"):
            return dataclasses.replace(sloc, framework_loc=mine[-1])
        return sloc

    wrap_stack_summary(env, located)


def _where(sloc: Any) -> str:
    """A replacement's source location as ``file:line: code`` (torch records the frame that fixed the size)."""
    frame = getattr(sloc, "framework_loc", None)
    if frame is None:
        return "the trace fixed its size"
    if isinstance(frame, str):
        return f"its size is read as a Python number at {frame}"
    code = (getattr(frame, "line", "") or "").strip()
    return f"its size is read as a Python number at {frame.filename}:{frame.lineno}" + (f": {code}" if code else "")


# Shape guards a symbolic trace may collect before fxprune gives up keeping its non-batch axes free: torch's
# sympy reasoning grows with them (measured: ResNet-50 and EfficientNet-B0 15 at free image sizes, ConvNeXt-T
# 30, ViT-B/16 2, BERT 1, LLaMA 0; Swin-T's window padding 116 after 9 s, 302 after 40 s, 561 after 56 s: its
# whole trace took three minutes, and Dynamo's export four more).
GUARD_BUDGET = 100


class TooManyGuards(Unsupported):
    """The symbolic trace collected more than its budget of shape guards (it would take minutes)."""


class Specialised(Unsupported):
    """The trace fixed input axes the model accepts at other sizes (``fixed``: axis -> where; ``final``: those
    no other front end would keep free)."""

    def __init__(self, fixed: dict[Axis, str], final: set[Axis] | None = None) -> None:
        super().__init__("; ".join(f"{a}: {why}" for a, why in fixed.items()))
        self.fixed = fixed
        self.final = final or set()


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


@contextlib.contextmanager
def _guards_within(env: Any, budget: int | None) -> Iterator[None]:
    """Stop the trace (``TooManyGuards``) at the next module call once ``env`` holds more than ``budget`` guards;
    checked in the tracing thread only."""
    if budget is None:
        yield
        return
    from torch.nn.modules.module import register_module_forward_pre_hook

    tracing_thread = threading.get_ident()

    def check(mod: torch.nn.Module, args: Any) -> None:
        count = len(getattr(env, "guards", ()))
        if count > budget and threading.get_ident() == tracing_thread:
            raise TooManyGuards(f"symbolic sizes needed over {budget} shape guards ({count} by "
                                f"{type(mod).__name__})")

    handle = register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


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


def fast_trace(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis],
               guard_budget: int | None = GUARD_BUDGET) -> fx.GraphModule:
    """Trace ``model`` (already in eval mode) into an export-like GraphModule, each of ``axes`` symbolic.
    Raises ``Specialised`` when the forward fixes one of them, ``TooManyGuards`` past ``guard_budget`` shape
    guards (None: no limit), ``Unsupported`` (or the tracer's error) on anything else it does not follow, and
    ``compat.MissingFeature`` on a torch that lacks a private name it needs."""
    tc = make_fx_support().require()
    pytree = tc.pytree
    state, _, readers = _state_readers(model)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    dynamic = bool(axes)
    dims: dict[int, set[int]] = {}
    for a in axes:
        dims.setdefault(a.leaf, set()).add(a.dim)
    # duck_shape=False: two axes of equal example size (height and width) get symbols of their own
    try:
        env = tc.ShapeEnv(duck_shape=False)
    except TypeError:  # a torch without the option: equal sizes share a symbol (a square image stays square)
        env = tc.ShapeEnv()
    _locate_in_user_code(env)
    mode = tc.FakeTensorMode(allow_non_fake_inputs=False, shape_env=env, static_shapes=not dynamic)
    # Fakified here (static shapes); make_fx's own conversion of the real tensors then hits the mode's
    # memo, which holds the fakes weakly: keep them referenced until the trace is done.
    fake_state = [mode.from_tensor(state[name], static_shapes=True) for name in readers]
    fake_leaves = _fake_inputs(tc, mode, leaves, dims)
    symbols = _symbols(fake_leaves, axes)
    if not any(isinstance(x, tc.FakeTensor) for x in fake_leaves):
        raise Unsupported("no tensor among the inputs")
    out_spec: list[Any] = []
    fn = _traced(tc, model, readers, in_spec, out_spec)
    # As export: no grad, and no backend-specific choice baked in (_backends_off_in_graph,
    # _backends_off_on_accelerators). The torch-function metadata mode only records meta["torch_fn"]
    # (unused here) and maps aten.size to sym_size on symbolic sizes: off for a static trace, where it
    # cost 5-15% of the time (mobilenet_v3_small, efficientnet_b1).
    with _module_stack(model), _guards_within(env, guard_budget if dynamic else None), torch.no_grad(), \
            _backends_off_on_accelerators(list(state.values()) + leaves):
        traced = tc.make_fx(fn, tracing_mode="fake", pre_dispatch=True, record_stack_traces=False,
                            _disable_torch_fn_metadata_mode=not dynamic)(
            {name: state[name] for name in readers}, fake_leaves)
    del fake_state
    fixed, final = _specialised(env, symbols)
    if fixed:
        raise Specialised(fixed, final)
    owned = _lift_state(tc, traced, state, readers)
    _backends_off_in_graph(traced.graph)
    if dynamic:
        _dedupe_size_nodes(traced.graph)
    forward_names = _forward_arg_names(model, args, kwargs)
    _name_inputs(tc, traced.graph, _input_names(forward_names, args, kwargs))
    traced.graph.set_codegen(tc.get_codegen(in_spec, out_spec[-1], forward_names))
    gm = lazy_graph_module(owned, traced.graph)
    gm._in_spec, gm._out_spec = in_spec, out_spec[-1]
    return gm
