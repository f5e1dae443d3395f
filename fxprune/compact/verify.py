"""The verifier after every rewrite: propagate fake tensors through the compacted graph and check that
each node has exactly the shape the plan predicts."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from ..analyze.couple import TensorRef
from ..analyze.slots import tensor_values
from ..trace import META_INPUTS
from .resize import Resizer

__all__ = ["verify_shapes"]


def verify_shapes(gm: fx.GraphModule, resizer: Resizer, error: type[Exception]) -> None:
    args, kwargs = gm.meta[META_INPUTS]
    leaves = [x for x in pytree.tree_leaves((args, kwargs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(placeholders):
        return  # an input structure we cannot replay; the equivalence tests cover these
    old = {n.name: n for n in resizer.groups.gm.graph.nodes}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in leaves]
    saved = {n: n.meta.get("val") for n in gm.graph.nodes}
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise error(f"the compacted graph does not run: {exc}") from exc
    try:
        for node in gm.graph.nodes:
            src = old.get(node.name)
            if src is None or node.op in ("placeholder", "output"):
                continue
            for k, val in enumerate(tensor_values(node)):
                olds = tensor_values(src)
                if val is None or k >= len(olds) or olds[k] is None:
                    continue
                expected = resizer.new_shape(TensorRef(src, k))
                got = tuple(int(s) for s in val.shape)
                if got != expected:
                    raise error(f"{node.format_node()}: shape {got} after compaction, plan expects {expected}")
    finally:
        for n, v in saved.items():
            n.meta["val"] = v
