"""The verifier after every rewrite: run the compacted graph on the example inputs (on the meta device when
the weights are there, or when the trace ran on meta because a real forward looked expensive: shapes only)
and check that each node has exactly the shape the plan predicts; then again with each group of dynamic
input axes at its second size, so that a size turned into a constant cannot pass unseen."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from fxprune.analysis.couple import TensorRef
from fxprune.analysis.reindex import Reindexing
from fxprune.analysis.slots import tensor_values
from fxprune.tracing.compat import batch_norm_types, has_unbacked_sizes, tree_leaves, tree_map
from fxprune.tracing.dynamic import INPUT_SHAPES, Axis, InputShapes, at_probe, resized
from fxprune.tracing.meta_norms import META_ON_META, norm_output, shaped_on_meta
from fxprune.tracing.tracer import META_INPUTS

__all__ = ["verify_shapes"]


def _meta(x: Any) -> Any:
    if isinstance(x, torch.device):
        return torch.device("meta")
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


class _ShapeRun(fx.Interpreter):
    """Runs the graph on the example inputs and records every node's output shapes. With real
    weights a real forward is the cheapest check (meta kernels run Python reference code)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: dict[str, list[tuple[int, ...] | None]] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n.name
        out = super().run_node(n)
        vals = out if isinstance(out, (tuple, list)) else [out]
        self.shapes[n.name] = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]
        return out


class _MetaRun(_ShapeRun):
    """The same on the meta device: every tensor swapped for a meta tensor of the same shape and dtype
    (for models planned on meta, or larger than memory)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shaped = shaped_on_meta()

    def fetch_attr(self, target: str) -> Any:
        return _meta(super().fetch_attr(target))

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr_module(target)
        if isinstance(mod, batch_norm_types()) and not kwargs:
            return norm_output(torch.ops.aten.batch_norm.default,
                               (args[0], mod.weight, mod.bias, mod.running_mean, mod.running_var))
        state = {k: _meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        return torch.func.functional_call(mod, state, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Factories in the graph name a real device (arange(..., device="cpu")): keep everything on meta.
        args, kwargs = tree_map(_meta, (args, kwargs))
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("meta")}
        if target in self.shaped and not kwargs:
            return norm_output(target, args)
        return target(*args, **kwargs)

    def fetch_attr_module(self, target: str) -> torch.nn.Module:
        return self.module.get_submodule(target)


def _data_dependent(val: Any) -> bool:
    """A traced shape with a size only a run knows (``q[mask]``: an unbacked symbol): nothing to compare to."""
    return has_unbacked_sizes(val)


def verify_shapes(gm: fx.GraphModule, reindexing: Reindexing, error: type[Exception]) -> None:
    """Run the compacted graph ``gm`` on the example inputs and check every node's shape against the plan; then
    once more per group of dynamic input axes (``fxprune.tracing.dynamic``), with those axes at their second
    size, against the traced graph's own shapes there: a size the rewrite turned into a constant cannot pass.
    A dynamic axis the traced graph itself cannot take at its second size is moved to the fixed ones."""
    args, kwargs = gm.meta[META_INPUTS]
    leaves = list(tree_leaves((args, kwargs)))
    if len(leaves) != sum(n.op == "placeholder" for n in gm.graph.nodes):
        return  # an input structure we cannot replay; the equivalence tests cover these
    real = _runs_for_real(gm, leaves)
    _check(gm, leaves, real, reindexing, lambda src, k: reindexing.new_shape(TensorRef(src, k)), error, "")
    shapes: InputShapes = gm.meta.get(INPUT_SHAPES, InputShapes())
    unrunnable: dict[Axis, str] = {}
    for group in shapes.groups():
        sizes, at = at_probe(group)
        resized_leaves = list(tree_leaves(resized(args, kwargs, sizes)))
        try:
            full = _shapes(_MetaRun(reindexing.groups.gm), [_meta(x) for x in resized_leaves])
        except Exception as exc:  # noqa: BLE001 - the trace, not the rewrite: that axis is fixed after all
            unrunnable.update(dict.fromkeys(group, f"the traced graph does not run with {at} ({_first_line(exc)})"))
            continue
        _check(gm, resized_leaves, real, reindexing, _at_second_size(full, reindexing), error, f" with {at}")
    if unrunnable:  # recorded for the result (fxprune.prune warns about every fixed axis)
        gm.meta[INPUT_SHAPES] = shapes.with_fixed(unrunnable)


def _runs_for_real(gm: fx.GraphModule, leaves: list[Any]) -> bool:
    """A real run where the weights and inputs are real (meta kernels run Python reference code), else on meta."""
    tensors = [t for t in list(gm.parameters()) + list(gm.buffers())] + \
        [x for x in leaves if isinstance(x, torch.Tensor)]
    return all(t.device.type != "meta" for t in tensors) and not gm.meta.get(META_ON_META)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _shapes(run: _ShapeRun, leaves: list[Any]) -> dict[str, list[tuple[int, ...] | None]]:
    with torch.no_grad():
        run.run(*leaves)
    return run.shapes


def _at_second_size(full: dict[str, list[tuple[int, ...] | None]],
                    reindexing: Reindexing) -> Callable[[fx.Node, int], tuple[int, ...] | None]:
    """The compacted shape of output ``k`` of ``src`` at the second size: the traced graph's shape there, with
    each pruned axis at its kept count; an axis that folds channels into a dynamic one (``batch * heads``)
    keeps the same share of its positions."""
    table = reindexing.table

    def axis(src: fx.Node, k: int, a: int, size: int) -> int:
        kept = reindexing.kept_slot((src.name, k, a))
        if kept is None:
            return size
        example = table.size((src.name, k, a))
        return len(kept) if size == example else size * len(kept) // example

    def expected(src: fx.Node, k: int) -> tuple[int, ...] | None:
        shape = full.get(src.name, [])
        if k >= len(shape) or shape[k] is None:
            return None
        return tuple(axis(src, k, a, size) for a, size in enumerate(shape[k]))
    return expected


def _check(gm: fx.GraphModule, leaves: list[Any], real: bool, reindexing: Reindexing,
           expected_of: Callable[[fx.Node, int], tuple[int, ...] | None], error: type[Exception], where: str) -> None:
    """Run ``gm`` on ``leaves`` and compare each node's shape with ``expected_of(original node, output)``."""
    run = _ShapeRun(gm) if real else _MetaRun(gm)
    if not real:
        leaves = [_meta(x) for x in leaves]
    flags = [(m, m.training) for m in gm.modules()]
    gm.eval()  # a check must not update BatchNorm statistics (nor fail on a batch of one in train mode)
    try:
        with torch.no_grad():
            run.run(*leaves)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        node = getattr(run, "current", None)
        raise error(f"the compacted graph does not run at {node}{where}: {exc}", node) from exc
    finally:
        for m, flag in flags:
            m.training = flag
    for src in reindexing.groups.gm.graph.nodes:
        got = run.shapes.get(src.name)
        if got is None or src.op in ("placeholder", "output"):
            continue
        for k, val in enumerate(tensor_values(src)):
            if val is None or k >= len(got) or got[k] is None or _data_dependent(val):
                continue
            expected = expected_of(src, k)
            if expected is not None and tuple(got[k]) != expected:
                node = next(n for n in gm.graph.nodes if n.name == src.name)
                raise error(f"{node.format_node()}: shape {tuple(got[k])} after compaction{where}, plan expects "
                            f"{expected}", src.name)
