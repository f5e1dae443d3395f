"""The verifier after every rewrite: run the compacted graph once on the example inputs (on the meta
device when the weights are there, or when the trace ran on meta because a real forward looked
expensive: shapes only) and check that each node has exactly the shape the plan predicts."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxprune.analysis.couple import TensorRef
from fxprune.analysis.slots import tensor_values
from fxprune.tracing.compat import batch_norm_types, has_unbacked_sizes, tree_leaves, tree_map
from fxprune.tracing.meta_norms import META_ON_META, norm_output, shaped_on_meta
from fxprune.tracing.tracer import META_INPUTS

from .resize import Reindexing

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
    args, kwargs = gm.meta[META_INPUTS]
    leaves = list(tree_leaves((args, kwargs)))
    if len(leaves) != sum(n.op == "placeholder" for n in gm.graph.nodes):
        return  # an input structure we cannot replay; the equivalence tests cover these
    tensors = [t for t in list(gm.parameters()) + list(gm.buffers())] + \
        [x for x in leaves if isinstance(x, torch.Tensor)]
    real = all(t.device.type != "meta" for t in tensors) and not gm.meta.get(META_ON_META)
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
        raise error(f"the compacted graph does not run at {node}: {exc}", node) from exc
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
            expected = reindexing.new_shape(TensorRef(src, k))
            if tuple(got[k]) != expected:
                node = next(n for n in gm.graph.nodes if n.name == src.name)
                raise error(f"{node.format_node()}: shape {tuple(got[k])} after compaction, plan expects {expected}",
                            src.name)
