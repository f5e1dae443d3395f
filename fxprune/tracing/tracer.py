"""Front end: a user's model + example inputs -> a torch.fx GraphModule with shapes on every node.

The graph is export's training IR: ATen-level ops before decomposition (``aten.conv2d``,
``aten.linear``, ``aten.batch_norm``...), so the coupling rules speak one op vocabulary. Every node
carries ``meta["val"]`` (a FakeTensor or a meta tensor), which is all the analysis needs: tracing works on models
whose parameters live on the meta device.

Three front ends produce it, tried in this order (``FRONTENDS``):

* ``fxprune.tracing.record``: runs the model once on its example inputs and records every ATen call
  at the pre-dispatch level; static graphs only (a batch of 1, or ``dynamic_batch=False``). It
  refuses whatever a real run would silently specialise (values read out of tensors), state
  updates and constants it did not see made. Several times quicker than make_fx (no fake tensors,
  proxies or symbolic shapes).
* ``fxprune.tracing.makefx``: ``make_fx`` over the forward with fake parameters, with a symbolic batch
  axis from a batch of 2. Quicker than torch.export, which it shares its graph format with.
* ``torch.export.export(strict=False)`` + ``ep.module()``: whenever the others raise or meet
  something they do not reproduce (state updates in forward, plain tensor attributes). It traces
  every torchvision classifier, 30 timm families and the Hugging Face models that
  ``symbolic_trace`` cannot, and its error is the one reported when none can trace.

``tests/test_trace.py`` checks that all three give the same ops, outputs and channel groups.

The two quick front ends are built on private torch names, all looked up through ``fxprune.tracing.compat``.
On a torch that lacks one (or where a quick front end fails even on a trivial model: torch changed
underneath it), it is skipped with one ``compat.CompatWarning`` per process naming what is missing;
tracing then takes the next front end, which is slower. A front end that
cannot trace one particular model is not a warning: the next one takes over quietly (logged at DEBUG).

``FXPRUNE_FRONTEND=record|make_fx|export`` in the environment forces one front end wherever
``trace`` is called without ``frontend=`` (``fxprune.prune`` included), as ``frontend=`` does: used
by the tests that run every front end end to end.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx

from fxprune.annotations import EXAMPLE_INPUTS, FRONTEND
from fxprune.state import callers_rng_kept

from . import compat
from .decisions import SizesSeen
from .dynamic import (
    INPUT_SHAPES,
    Axis,
    InputShapes,
    export_spec,
    find_axes,
    from_spec,
    leaf_names,
    read_sizes_from_inputs,
    static_axes,
)
from .frames import user_line
from .lazy_module import compiled
from .makefx import Unsupported
from .quiet import torch_trace_noise_ignored

__all__ = ["trace", "TraceError", "normalize_inputs", "export_program", "META_INPUTS", "META_FRONTEND",
           "INPUT_SHAPES", "input_shapes",
           "FRONTEND_ENV"]

# GraphModule.meta keys written here (one writer: this module).
META_INPUTS, META_FRONTEND = EXAMPLE_INPUTS, FRONTEND  # gm.meta keys (fxprune.annotations)
FRONTEND_ENV = "FXPRUNE_FRONTEND"  # forces one front end (see the module docstring)

log = logging.getLogger(__name__)


class TraceError(RuntimeError):
    """The model could not be traced; the message names the failing op and the user's source line.
    ``input_shapes``: the input axes found before the front ends failed (``dynamic.InputShapes``; None when
    the probe did not run), so a fallback (the modules target's recording) need not run the model there again.
    ``recorded``: that recording already made (``trace(fallback=True)``), or None."""

    input_shapes: InputShapes | None = None
    recorded: fx.GraphModule | None = None


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Export in eval mode, then restore every submodule's own training flag (the user's model is untouched)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")  # nn.Module's own tables: restored by their entries


@contextlib.contextmanager
def _python_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Put every module's plain Python state back after tracing. A forward may write it: timm's
    EfficientFormer caches its attention bias per device in a dict in eval mode, which a fake trace
    would leave holding a FakeTensor (the user's model then fails on its next real forward); a forward
    may append to a list or set a flag; and the fast front end's re-parametrisation can leave a module
    that is reachable under two paths (timm CoaT's shared conv_list) holding its FakeTensors.
    Attributes are restored by identity, the contents of plain dict/list/set attributes and of the
    parameter/buffer/submodule tables by value, and attributes the forward added are removed."""
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_TABLES}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        tables = {k: dict(getattr(m, k)) for k in _MODULE_TABLES}
        saved.append((m, attrs, contents, tables))
    try:
        yield
    finally:
        for m, attrs, contents, tables in saved:
            state = vars(m)
            for k in [k for k in state if k not in attrs and k not in _MODULE_TABLES]:
                del state[k]
            state.update(attrs)
            for k, before in contents.items():
                now = attrs[k]
                now.clear()
                now.extend(before) if isinstance(now, list) else now.update(before)
            for k, before in tables.items():  # a module shared under two paths can come back re-parametrised
                getattr(m, k).update(before)


def export_program(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis], *,
                   strict: bool = False) -> tuple[torch.export.ExportedProgram, dict[Axis, str]]:
    """``torch.export.export`` with ``Dim.AUTO`` on each of ``axes`` (non-strict unless ``strict``), and the axes
    it held at a constant anyway, each with why. Where export refuses the dynamic axes outright, a static
    program (every axis fixed, why: export's message). Used by the export front ends and for the saved
    ``model.pt2`` (``fxprune.artifacts``)."""
    if axes:
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=export_spec(model, args, kwargs, axes),
                                     strict=strict)
        except Exception as exc:  # noqa: BLE001 - a model that pins a size: a static program, saying why
            if _on_data(exc):  # a static program meets the same values: no second try
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = f"torch.export refused it dynamic ({first[:200]})"
            return torch.export.export(model, args, kwargs, strict=strict), dict.fromkeys(axes, why)
        values = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"][-len(_leaves(args, kwargs)):]
        fixed = static_axes(values, axes)
        return ep, dict.fromkeys(fixed, "torch.export holds it at a constant (a size read as a Python number)")
    return torch.export.export(model, args, kwargs, strict=strict), {}


# torch's errors for a trace that depends on values (a guard on an unbacked size, an op of data-dependent output)
_ON_DATA = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException")


def _on_data(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is torch's refusal to trace past a data-dependent value: static sizes
    would not change that."""
    seen = 0
    while exc is not None and seen < 8:
        if any(c.__name__ in _ON_DATA for c in type(exc).__mro__):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    return compat.tree_leaves((args, kwargs))


Traced = tuple[fx.GraphModule, dict[Axis, str]]  # a front end's graph, and the asked-for axes it fixed (why)


def _record(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis],
            insist: bool = False) -> Traced:
    """Static graphs only: asked for by name on a model with free axes, it fixes them (the chain skips it then)."""
    from .record import record_trace

    return record_trace(model, args, kwargs), dict.fromkeys(axes, "the recorder traces static graphs only")


def _make_fx(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis],
             insist: bool = False) -> Traced:
    from .makefx import GUARD_BUDGET, fast_trace

    return fast_trace(model, args, kwargs, axes, None if insist else GUARD_BUDGET), {}


def _torch_export(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis],
                  insist: bool = False, *, strict: bool = False) -> Traced:
    """torch.export; ``strict``: through TorchDynamo, which follows ``len(x)``, ``int(x.shape[0])`` and
    ``math.sqrt`` of a size symbolically where the non-strict tracers fix them (tried only when an earlier
    front end fixed an axis)."""
    ep, fixed = export_program(model, args, kwargs, axes, strict=strict)
    return ep.module(), fixed


# The front ends, quickest first; each raises on what it cannot trace and the next one takes over. The
# first two use private torch helpers (``compat.SUPPORT`` probes them): on a torch where those moved,
# they are skipped with a warning, export remains.
FRONTENDS = {"record": _record, "make_fx": _make_fx, "export": _torch_export,
             "export-strict": functools.partial(_torch_export, strict=True)}
_FALLBACK_NAMES = {"record": "the recorder", "make_fx": "make_fx", "export": "torch.export",
                   "export-strict": "torch.export (strict)"}
# tried only to keep input axes free that the front ends before it fixed (never alone, never for a failure)
_ONLY_FOR_AXES = ("export-strict",)

# Front end -> None when it traced a trivial model in this process, else the exception it raised then
# (torch changed underneath it: skipped from then on). Filled on a front end's first failure only.
_SELF_TEST: dict[str, BaseException | None] = {}


def _self_test_failure(name: str) -> BaseException | None:
    """Whether the quick front end ``name`` fails on a trivial model too (checked once per process, on
    its first failure other than its own refusal, ``Unsupported``): then it is broken on this torch, not
    refusing the user's model. Run in a new thread, clear of the caller's grad mode, autocast and modes."""
    if name not in _SELF_TEST:
        nn = torch.nn
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 2)).eval()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                FRONTENDS[name](model, (torch.randn(1, 3, 8, 8),), {}, [])
            except Exception as exc:  # noqa: BLE001 - whatever it is, the front end does not work here
                failure.append(exc)

        worker = threading.Thread(target=run, name=f"fxprune-{name}-self-test")
        worker.start()
        worker.join()
        _SELF_TEST[name] = failure[0] if failure else None
    return _SELF_TEST[name]


def _runnable(name: str, forced: bool, dynamic: bool) -> compat.Support | bool:
    """Whether to try front end ``name``: True; False to pass over it quietly (the recorder on a dynamic
    batch, which it cannot trace; a front end found broken on this torch, already warned about); or the
    ``compat.Support`` of a front end this torch lacks private names for (``compat.MissingFeature`` if
    ``forced``)."""
    if forced:
        probe = compat.SUPPORT.get(name)
        if probe is not None:
            probe().require()
        return True
    if name == "record" and dynamic:
        return False
    probe = compat.SUPPORT.get(name)
    support = probe() if probe is not None else None
    if support is not None and not support:
        return support
    return _SELF_TEST.get(name) is None


def _warn_broken(name: str, exc: BaseException, fallback: str) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    warnings.warn(f"fxprune: the quicker {name} front end fails even on a trivial model with torch "
                  f"{torch.__version__} ({type(exc).__name__}: {first}): tracing falls back to "
                  f"{_FALLBACK_NAMES[fallback]}, several times slower", compat.CompatWarning, stacklevel=3)


def trace(model: torch.nn.Module, example_inputs: Any, *, dynamic_batch: bool = True,
          fast: bool = True, frontend: str | None = None, dynamic_shapes: Any = None,
          fallback: bool = False) -> fx.GraphModule:
    """Trace ``model`` on ``example_inputs`` into a GraphModule whose nodes all carry ``meta["val"]``.

    The returned module shares parameters with ``model`` (it is an analysis view); ``fxprune.prune``
    never hands it to the user. ``gm.meta[META_INPUTS]`` keeps the (args, kwargs) it was traced on,
    ``gm.meta[META_FRONTEND]`` says which front end traced it (see ``FRONTENDS``): ``"record"``
    for a static graph, else ``"make_fx"``, else ``"export"``, the first that succeeds;
    ``fast=False`` uses export only, ``frontend=`` (or ``$FXPRUNE_FRONTEND`` when ``frontend`` is None
    and ``fast`` is True) that one front end only (its own error if it fails; the recorder traces
    static graphs only). A quick front end this torch cannot run is skipped with one
    ``compat.CompatWarning`` per process (``compat.MissingFeature`` if forced).

    Input sizes: every axis the model accepts at another size stays symbolic (``fxprune.tracing.dynamic``
    finds them by running the model there); ``dynamic_shapes`` (torch.export's format) names them instead;
    ``dynamic_batch=False`` keeps every size static. Where a front end fixes an axis the model accepts
    (``len(x)``), the next one tries (torch.export through TorchDynamo follows such reads); where none keeps
    it, the graph is fixed there. ``gm.meta[INPUT_SHAPES]`` records the outcome (``dynamic.InputShapes``:
    the free axes, and the fixed ones with the line that fixed them); ``fxprune.prune`` warns about those.

    ``fallback``: the caller compacts a model no graph expresses another way (the modules target, from the record of
    one real run). Then that recording is made, watching the forward for a Python decision on a data-dependent value
    (``fxprune.tracing.decisions``): before any front end where the probe's runs met an op whose output size
    depends on values (NMS, a boolean mask), else once a quick front end has failed. Where it finds one, torch.export
    would fail on it, and the ``TraceError`` comes at once, carrying the recording (``TraceError.recorded``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if frontend is None and fast:
        frontend = os.environ.get(FRONTEND_ENV) or None
    if frontend is not None and frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {sorted(FRONTENDS)}, got {frontend!r}"
                         + (f" (from ${FRONTEND_ENV})" if os.environ.get(FRONTEND_ENV) == frontend else ""))
    compiled(model)  # a compacted module traced again: the front ends read its forward's signature
    args, kwargs = normalize_inputs(example_inputs)
    chain = [frontend] if frontend else [n for n in FRONTENDS if n not in _ONLY_FOR_AXES] if fast else ["export"]
    skipped: list[compat.Support] = []             # front ends this torch lacks private names for
    broken: list[tuple[str, BaseException]] = []   # front ends that fail even on a trivial model
    name = chain[-1]
    try:
        with _eval_mode(model), torch_trace_noise_ignored():
            sizes = SizesSeen() if fallback else None
            shapes = _input_shapes(model, args, kwargs, dynamic_batch, dynamic_shapes, sizes)
            insist = dynamic_shapes is not None and dynamic_shapes is not False  # axes the caller named
            try:
                name, gm, fixed = _first_trace(model, args, kwargs, list(shapes.dynamic), chain,
                                               frontend is not None, skipped, broken, insist,
                                               fallback, sizes is not None and sizes.seen)
            except TraceError as exc:
                exc.input_shapes = shapes
                raise
    finally:  # outside the block that ignores torch's noise; ``name``: the front end that traced (or failed last)
        compat.warn_missing(skipped, _FALLBACK_NAMES[name], stacklevel=2)
        for failed, failure in broken:
            _warn_broken(failed, failure, name)
    shapes = shapes.with_fixed(fixed)
    if shapes.dynamic:
        read_sizes_from_inputs(gm)
    gm.meta[META_FRONTEND] = name
    gm.meta[META_INPUTS] = (args, kwargs)
    gm.meta[INPUT_SHAPES] = shapes
    gm.training = model.training  # traced in eval mode; the view reports the model's own mode (the flag
    return gm                     # only: an exported module refuses .train())


def _first_trace(model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis], chain: list[str],
                 forced: bool, skipped: list[compat.Support], broken: list[tuple[str, BaseException]],
                 insist: bool = False, fallback: bool = False,
                 sizes_seen: bool = False) -> tuple[str, fx.GraphModule, dict[Axis, str]]:
    """The first front end of ``chain`` that traces the model with every one of ``axes`` symbolic; where each
    fixes some, the one that fixes fewest (TorchDynamo's export tried last, for that). Returns its name, its
    graph and the axes it fixed (why: where the quick front end saw the size read, else export's reason).
    ``fallback``: see ``trace``; ``sizes_seen``: the probe met an op whose output size depends on values, so the
    watched recording is made first, before any front end."""
    passed: set[str] = set()  # front ends not worth trying after what an earlier one met
    best: tuple[str, fx.GraphModule, dict[Axis, str]] | None = None
    whys: dict[Axis, str] = {}
    slow: set[Axis] = set()  # axes no other front end keeps free: too slow to trace symbolically, an inner size of 1
    recorded: fx.GraphModule | None = None  # the watched recording, made after the first quick front end fails
    chain = list(chain)
    if fallback and sizes_seen and not forced:
        recorded = _recorded_unless_decided(model, args, kwargs, None)
    for i, name in enumerate(chain):
        last = i == len(chain) - 1
        if name in passed and not last:
            continue
        runnable = _runnable(name, forced, bool(axes))
        if runnable is not True:
            if isinstance(runnable, compat.Support):  # naming what is missing
                skipped.append(runnable)
            continue
        try:
            with _python_state_kept(model):  # put back after each try: the next one starts clean
                gm, fixed = _trace_keeping(name, model, args, kwargs, axes, whys, slow, insist)
        except Exception as exc:  # noqa: BLE001 - the next front end takes over; the last one explains
            if not last:
                log.debug("fxprune: %s could not trace (%s: %s)", name, type(exc).__name__, exc)
                if name == "record" and _data_dependent(exc):
                    passed.add("make_fx")  # static too: only export (unbacked sizes) may follow
                if not isinstance(exc, Unsupported) and name not in _SELF_TEST:
                    failure = _self_test_failure(name)
                    if failure is not None:
                        broken.append((name, failure))
                if fallback and not forced and recorded is None and best is None:
                    recorded = _recorded_unless_decided(model, args, kwargs, exc)
                continue
            if best is not None:  # an earlier graph that fixes some axes beats none
                return best
            if forced:
                raise
            error = _trace_error(model, exc)
            error.recorded = recorded
            raise error from exc
        if not fixed:
            return name, gm, {}
        fixed = {a: whys.get(a, why) for a, why in fixed.items()}
        if best is None or len(fixed) < len(best[2]):
            best = (name, gm, fixed)
        if set(fixed) <= slow:  # no other front end would keep these free (or it would take longer still)
            return best
        if not forced:
            if name == "make_fx":  # export's non-strict tracer fixes what make_fx fixes: straight to Dynamo
                passed.add("export")
            if "export-strict" not in chain:
                chain.append("export-strict")
    assert best is not None
    return best


def _recorded_unless_decided(model: torch.nn.Module, args: tuple, kwargs: dict,
                             cause: BaseException | None) -> fx.GraphModule | None:
    """The watched recording (``_watched_recording``); where the forward decided on a data-dependent value,
    the ``TraceError`` that says so, carrying the recording: torch.export would stop at that same line."""
    recorded, decision = _watched_recording(model, args, kwargs)
    if decision is None:
        return recorded
    error = TraceError(f"torch.export could not trace {type(model).__name__}: its forward {decision.what}"
                       + (f"\n  at {decision.where}" if decision.where else ""))
    error.recorded = recorded
    raise error from cause


def _watched_recording(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule | None, Any]:
    """The record of one real run for the analysis (``record_trace(analysis=True)``), watched for a Python decision
    on a data-dependent value; (None, None) where the model does not run under the recording."""
    from .decisions import Watch
    from .record import record_trace

    watch = Watch()
    try:
        with _python_state_kept(model):
            return record_trace(model, args, kwargs, analysis=True, watch=watch), watch.decision
    except Exception:  # noqa: BLE001 - the chain goes on; the modules target records again and says why it failed
        return None, None


def _trace_keeping(name: str, model: torch.nn.Module, args: tuple, kwargs: dict, axes: list[Axis],
                   whys: dict[Axis, str], slow: set[Axis], insist: bool) -> tuple[fx.GraphModule, dict[Axis, str]]:
    """One front end's graph with ``axes`` symbolic where it can keep them. make_fx, on finding that the
    forward fixes some (``Specialised``), traces again with those static (its first graph would compute
    with the example's size there); where it found them is kept in ``whys`` for the report. Past its budget of
    shape guards (``TooManyGuards``), it traces again with only the batch's axes free (``slow``: the rest),
    unless the caller ``insist``s on the axes it named."""
    from .makefx import Specialised, TooManyGuards

    try:
        return FRONTENDS[name](model, args, kwargs, axes, insist)
    except Specialised as exc:
        whys.update(exc.fixed)
        slow.update(exc.final)  # an inner size of 1: no tracer does better
        gm, more = _trace_keeping(name, model, args, kwargs, [a for a in axes if a not in exc.fixed], whys, slow,
                                  insist)
        return gm, {**exc.fixed, **more}
    except TooManyGuards as exc:  # the axes other than the batch's cost the guards (window padding): those go
        batch = {a.group for a in axes if a.dim == 0}
        keep = [a for a in axes if a.group in batch] if any(a.group not in batch for a in axes) else []
        too_slow = {a: f"keeping it free takes minutes of torch's shape reasoning ({exc}); give dynamic_shapes() "
                       "to insist" for a in axes if a not in keep}
        whys.update(too_slow)
        slow.update(too_slow)
        gm, more = _trace_keeping(name, model, args, kwargs, keep, whys, slow, insist)
        return gm, {**too_slow, **more}


def input_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, spec: Any = None) -> InputShapes:
    """The input axes ``model`` (in eval mode) takes at other sizes: ``spec``'s (torch.export's
    ``dynamic_shapes``), or those it runs at with a second size (``fxprune.tracing.dynamic.find_axes``)."""
    return _input_shapes(model, args, kwargs, True, spec)


def _input_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, spec: Any,
                  sizes: SizesSeen | None = None) -> InputShapes:
    """The input axes to keep symbolic: ``spec``'s, or those the model accepts at a second size (the probe).
    ``sizes``: notes whether the probe's runs met an op whose output size depends on values."""
    if not dynamic or spec is False:
        return InputShapes()
    if isinstance(spec, InputShapes):  # a re-trace of a model derived from a traced one: the same axes
        return spec
    names = leaf_names(model, args, kwargs)
    if spec is not None:
        return InputShapes(tuple(from_spec(spec, names, args, kwargs)))
    axes, fixed = find_axes(lambda a, k: _runs(model, a, k, sizes), names, args, kwargs)
    return InputShapes(tuple(axes), tuple(fixed))


def _runs(model: torch.nn.Module, args: tuple, kwargs: dict, sizes: SizesSeen | None = None) -> bool:
    """Whether ``model`` runs on these inputs, leaving its Python state and the caller's random stream as they
    were. A real run (on the meta device for a model there: shapes only): measured cheaper than fake tensors on
    torchvision's CNNs, and only a real run sees what values decide (an index past an embedding's rows).
    ``sizes``: notes an op whose output size depends on values."""
    try:
        with _python_state_kept(model), callers_rng_kept(), torch.no_grad(), sizes or contextlib.nullcontext():
            model(*args, **kwargs)
        return True
    except Exception:  # noqa: BLE001 - any refusal means: not at these sizes
        return False


def _data_dependent(exc: BaseException) -> bool:
    """The recorder refused a value read or a data-dependent shape: make_fx's static graph cannot follow
    either, so only torch.export (unbacked sizes) is worth trying next."""
    return isinstance(exc, Unsupported) and "data-dependent" in str(exc)


def _trace_error(model: torch.nn.Module, exc: BaseException) -> TraceError:
    where = user_line(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(
        f"torch.export could not trace {type(model).__name__}: {first}"
        + (f"\n  at {where}" if where else "")
        + "\n  fix: make that line traceable (no data-dependent Python control flow on tensor values), "
        "or pass example inputs the model accepts"
    )
