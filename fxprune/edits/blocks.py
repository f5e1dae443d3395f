"""Residual blocks: find the regions ``x + f(x)`` of a traced graph, remove them, or scale them by a depth mask.

A block is a single-entry single-exit region of the activation graph whose exit is an add of its entry:
``a = x + b`` (``aten.add.Tensor`` or ``add_.Tensor``, ``alpha`` 1, either argument order) where

- ``x`` is an input of the add itself (the skip is the identity: a ResNet downsample block,
  ``bn(conv(x)) + f(x)``, is not a block);
- ``x`` dominates every node of the branch (every path from the graph inputs to it passes through ``x``);
- the add post-dominates every node of the branch (every path from it to the output passes through the
  add), and every branch node reads only branch nodes and ``x`` (single entry) and is read only by branch
  nodes and the add (single exit);
- ``x`` and ``b`` have the same shape (no broadcasting: removal keeps every shape);
- a branch node reads a learned parameter (a parameter-free ``x + f(x)`` is part of a function, such as
  GPT-2's GELU ``x + 0.044715 * x**3``).

Both dominator trees come from ``networkx.immediate_dominators`` on the activation graph: the tensor-valued
nodes that depend on a graph input, plus a virtual root before the inputs (post-dominators: the reversed graph
from the output). Parameters, buffers and anything computed only from them, from factories (``arange``) or
from sizes (a causal mask, rotary tables) are constants: they are not region entries, and a branch may read
them. Nested regions are found independently (a transformer layer holds two blocks in sequence).

What is exact: :func:`remove_blocks` replaces each add by its skip input, so the output equals the model with
that branch's output multiplied by 0 (up to ``x + 0 == x``: bit for bit for finite values); dead-code
elimination then drops :attr:`Block.nodes`. :func:`depth_masks` multiplies the branch output by a module's
scalar ``d`` before the add: ``d == 1`` reproduces the graph bit for bit, ``d == 0`` equals removal.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.couple import TensorRef
from fxprune.analysis.slots import size_hint, tensor_values
from fxprune.compaction.emit import GraphEdit
from fxprune.selection.cost import node_macs
from fxprune.state import named_tensors

__all__ = ["Block", "residual_blocks", "remove_blocks", "depth_masks", "remove_where", "stage_exits", "mix_exits",
           "leads_in", "DEPTH_PREFIX"]

aten = torch.ops.aten
ADDS = (aten.add.Tensor, aten.add_.Tensor)  # x + f(x); add_ mutates an input that only the add reads after it
DEPTH_PREFIX = "fxprune_depth"  # depth mask modules: fxprune_depth.<i>, i the block's index in the list given
_ROOT, _ACTIVATION = "fxprune.root", ("placeholder", "call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Block:
    """A removable residual block ``add = skip + branch`` of a traced graph (node names of that graph).

    ``name``: the deepest module path holding every branch node (``"layer1.0"``); when two blocks share it
    (a pre-norm transformer layer holds attention and MLP), the child of it that holds most of the branch's
    MACs (``"model.layers.0.self_attn"``, ``"model.layers.0.mlp"``); without module paths, the add's node
    name. ``stage``: the name up to its last numeric part (``"layer1"``, ``"model.layers"``,
    ``"encoder.layer"``), else its parent path ("" at the top). ``nodes``: every node dead once the add is
    replaced by ``skip`` (what removal drops: the branch, and the parameters and constants only it reads);
    ``params``: the parameter/buffer names read only by those nodes; ``macs``: the multiply-adds of those
    nodes on the example inputs (the op registry's costs, as ``fxprune.selection.cost`` counts them)."""

    name: str
    stage: str
    add: str
    skip: str
    branch: str
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    macs: int


# -- finding blocks ----------------------------------------------------------------------------------------


def _tensor_valued(node: fx.Node) -> bool:
    return node.op in _ACTIVATION and any(v is not None for v in tensor_values(node))


def _activation_graph(graph: fx.Graph) -> tuple[nx.DiGraph, fx.Node]:
    """Tensor-valued nodes reachable from the graph inputs, the output node, and the virtual root."""
    g = nx.DiGraph()
    out = next(n for n in graph.nodes if n.op == "output")
    for n in graph.nodes:
        if n.op == "placeholder" and _tensor_valued(n):
            g.add_edge(_ROOT, n)
        if _tensor_valued(n) or n is out:
            g.add_edges_from((i, n) for i in n.all_input_nodes if _tensor_valued(i))
    g.add_node(_ROOT)
    return g.subgraph(nx.descendants(g, _ROOT) | {_ROOT}).copy(), out


def _tree(idom: dict) -> nx.DiGraph:
    """A dominator tree (edges parent -> child) from ``nx.immediate_dominators``' answer."""
    tree = nx.DiGraph((d, n) for n, d in idom.items() if n is not d)
    tree.add_nodes_from(idom)
    return tree


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(sa, torch.Tensor) or not isinstance(sb, torch.Tensor) or sa.dim() != sb.dim():
        return False
    # static sizes compare as ints; a symbolic one (a dynamic batch axis) only equals the same symbol
    return all(p == q if isinstance(p, int) and isinstance(q, int) else str(p) == str(q)
               for p, q in zip(sa.shape, sb.shape))


def _candidates(add: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(skip, branch) pairs of an add ``x + b`` with alpha 1 and two equally shaped tensor inputs."""
    if add.target not in ADDS or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return []
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b or not _same_shape(a, b):
        return []
    return [(a, b), (b, a)]


def _region(act: nx.DiGraph, dom: nx.DiGraph, pdom: nx.DiGraph, x: fx.Node, b: fx.Node,
            add: fx.Node) -> set[fx.Node] | None:
    """The nodes ``x`` strictly dominates and ``add`` strictly post-dominates, if ``b`` is one of them and
    the set is entered only from ``x`` and left only into ``add``; else None."""
    if x not in dom or add not in pdom or b not in pdom:
        return None
    region = nx.descendants(dom, x) & nx.descendants(pdom, add)
    if b not in region:
        return None
    single_entry = all(i is x or i in region for n in region for i in act.predecessors(n))
    single_exit = all(u is add or u in region for n in region for u in act.successors(n))
    return region if single_entry and single_exit else None


def _reads(region: set[fx.Node], learned: set[str]) -> bool:
    """Whether a branch node reads a learned parameter (tied or not): a parameter-free region ``x + f(x)``
    is part of a function (GPT-2's GELU computes ``x + 0.044715 * x**3``), not a block."""
    return any(i.op == "get_attr" and i.target in learned for n in region for i in n.all_input_nodes)


def _dropped(full: nx.DiGraph, full_pdom: nx.DiGraph, x: fx.Node, add: fx.Node) -> set[fx.Node]:
    """Every node whose paths to the output all pass through ``add``, except ``x`` and what it reads:
    exactly what dead-code elimination drops once the add's users read ``x`` instead."""
    return (nx.descendants(full_pdom, add) | {add}) - nx.ancestors(full, x) - {x}


def _node_macs(node: fx.Node) -> int:
    return node_macs(node, _example_shape)


def _example_shape(ref: TensorRef) -> tuple[int, ...]:
    """A tensor's shape on the example inputs (a symbolic size at its traced value)."""
    return tuple(size_hint(s)[0] for s in ref.val.shape)


def _module_path(node: fx.Node) -> tuple[str, ...] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return tuple(path.split(".")) if path else ()


def _common(paths: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    paths = list(paths)
    if not paths:
        return None
    n = 0
    while all(len(p) > n and p[n] == paths[0][n] for p in paths):
        n += 1
    return paths[0][:n]


@dataclass
class _Found:
    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    region: set[fx.Node]
    dropped: set[fx.Node]

    def path(self) -> tuple[str, ...] | None:
        return _common(p for p in map(_module_path, self.region) if p is not None)

    def child(self, parent: tuple[str, ...]) -> str | None:
        """The child module of ``parent`` holding most of the branch's MACs (then most of its nodes)."""
        weight: dict[str, tuple[int, int]] = {}
        for n in self.region:
            p = _module_path(n)
            if p is not None and len(p) > len(parent) and p[:len(parent)] == parent:
                macs, count = weight.get(p[len(parent)], (0, 0))
                weight[p[len(parent)]] = (macs + _node_macs(n), count + 1)
        return max(weight, key=weight.__getitem__) if weight else None


def _names(found: Sequence[_Found]) -> list[tuple[str, str]]:
    """(name, stage) per block: see :class:`Block`."""
    paths = [f.path() for f in found]
    names: list[tuple[str, ...] | None] = list(paths)
    for i, p in enumerate(paths):
        if p and paths.count(p) > 1:
            child = found[i].child(p)
            names[i] = p + (child,) if child is not None else None
    out = []
    for f, p, name in zip(found, paths, names):
        if not name or names.count(name) > 1:
            out.append((f.add.name, ".".join(p or ())))
            continue
        numeric = [k for k, part in enumerate(name) if part.isdigit()]
        out.append((".".join(name), ".".join(name[:numeric[-1]] if numeric else name[:-1])))
    return out


def residual_blocks(gm: fx.GraphModule) -> list[Block]:
    """The removable residual blocks of a traced graph (``fxprune.trace``), in graph order: see the module
    docstring for what makes one."""
    graph = gm.graph
    act, out = _activation_graph(graph)
    dom = _tree(nx.immediate_dominators(act, _ROOT))
    pdom = _tree(nx.immediate_dominators(act.reverse(copy=False), out)) if out in act else nx.DiGraph()
    full = nx.DiGraph((i, n) for n in graph.nodes for i in n.all_input_nodes)
    full.add_nodes_from(graph.nodes)
    full_pdom = _tree(nx.immediate_dominators(full.reverse(copy=False), out))
    learned = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    found = []
    for add in graph.nodes:
        for x, b in _candidates(add) if add.op == "call_function" else ():
            region = _region(act, dom, pdom, x, b, add)
            if region is not None and _reads(region, learned):
                found.append(_Found(add, x, b, region, _dropped(full, full_pdom, x, add)))
                break
    state = named_tensors(gm)
    read: dict[str, set[fx.Node]] = {}  # parameter/buffer name -> the live get_attr nodes that read it
    for n in graph.nodes:
        if n.op == "get_attr" and n.users and n.target in state:
            read.setdefault(n.target, set()).add(n)
    return [_block(f, name, stage, graph, read) for f, (name, stage) in zip(found, _names(found))]


def _block(f: _Found, name: str, stage: str, graph: fx.Graph, read: dict[str, set[fx.Node]]) -> Block:
    params = sorted(t for t, readers in read.items() if readers <= f.dropped)
    order = [n.name for n in graph.nodes if n in f.dropped and n is not f.add]
    return Block(name=name, stage=stage, add=f.add.name, skip=f.skip.name, branch=f.branch.name,
                 nodes=tuple(order), params=tuple(params), macs=sum(_node_macs(n) for n in f.dropped))


# -- graph edits (compaction's edits= hook) ----------------------------------------------------------------


class _Nodes:
    """A graph's nodes by name while an edit erases some: a removed add resolves to the skip that replaced it
    (consecutive blocks: one's skip is the previous one's add); other names the edit dropped are remembered."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph, self.by_name = graph, {n.name: n for n in graph.nodes}
        self.replaced: dict[str, str] = {}
        self.erased: set[str] = set()

    def __getitem__(self, key: tuple[Block, str]) -> fx.Node:
        block, name = key
        while name in self.replaced:
            name = self.replaced[name]
        node = self.by_name.get(name)
        if node is None:
            raise KeyError(f"block {block.name}: node {name!r} is not in the graph (another edit removed it?)")
        return node

    def erase(self, node: fx.Node, replacement: fx.Node | None = None) -> None:
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            self.replaced[node.name] = replacement.name
        self.graph.erase_node(node)
        del self.by_name[node.name]
        self.erased.add(node.name)


def _remove(nodes: _Nodes, block: Block, tensors: dict[str, torch.Tensor]) -> None:
    """The add's users read the skip; the add and the branch's nodes are erased (a mutating op such as
    ``relu_`` would survive dead-code elimination), and the tensors only they read leave ``tensors``
    (with the ``num_batches_tracked`` counter of a removed batch norm)."""
    if block.add in nodes.erased and block.add not in nodes.replaced:
        return  # inside a block this edit removed already
    nodes.erase(nodes[block, block.add], nodes[block, block.skip])
    for name in reversed(block.nodes):
        node = nodes.by_name.get(name)
        if node is not None and not node.users:
            nodes.erase(node)
    read = {n.target for n in nodes.by_name.values() if n.op == "get_attr"}
    for name in block.params:
        if name not in read:
            tensors.pop(name, None)
            if name.endswith(".running_mean"):
                tensors.pop(name.removesuffix("running_mean") + "num_batches_tracked", None)


def _scale(nodes: _Nodes, block: Block, factor: fx.Node | float) -> None:
    """The add reads ``branch * factor`` (a node's value cast to the branch's dtype, or a number)."""
    add, branch = nodes[block, block.add], nodes[block, block.branch]
    with nodes.graph.inserting_before(add):
        if isinstance(factor, fx.Node):
            factor = nodes.graph.call_function(aten.type_as.default, (factor, branch))
        scaled = nodes.graph.call_function(aten.mul.Tensor, (branch, factor))
    add.replace_input_with(branch, scaled)


def remove_blocks(blocks: Iterable[Block]) -> GraphEdit:
    """An edit that replaces each block's add by its skip input: the output equals the model with each
    branch's output multiplied by 0; the branch's nodes and parameters are dropped as dead code."""
    blocks = list(blocks)

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        nodes = _Nodes(graph)
        for block in blocks:
            _remove(nodes, block, tensors)

    return edit


def depth_masks(blocks: Sequence[Block], factory: Callable[[Block], nn.Module]) -> GraphEdit:
    """An edit that multiplies each block's branch output by ``d = factory(block)()`` before the add.

    The module (``forward()`` without inputs returns a 0-dim or shape-(1,) tensor) is registered at
    ``fxprune_depth.<i>``, ``i`` the block's index in ``blocks``; ``d`` is cast to the branch's dtype. ``d == 1``
    gives the unmasked graph bit for bit, ``d == 0`` equals :func:`remove_blocks`, ``d == 0.3`` the branch
    times 0.3."""
    blocks = list(blocks)

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        nodes = _Nodes(graph)
        for i, block in enumerate(blocks):
            path = f"{DEPTH_PREFIX}.{i}"
            if path in modules:
                raise ValueError(f"{path} exists already: depth masks go in once per compaction")
            modules[path] = factory(block)
            with graph.inserting_before(nodes[block, block.add]):
                d = graph.call_module(path, ())
            _scale(nodes, block, d)

    return edit


_UNARY = frozenset({aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                    aten.gelu.default, aten.silu.default, aten.silu_.default})  # what may follow a block's add


def _output_of(add: fx.Node) -> fx.Node:
    """A block's output: its add, or the activation that alone reads it (a post-activation ResNet's ReLU)."""
    users = list(add.users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" and users[0].target in _UNARY else add


def leads_in(graph: fx.Graph, blocks: Sequence[Block]) -> bool:
    """Does the stage open with a layer of its own that is not a removable block (a ResNet stage's
    downsampling first block): is the first block's input computed under the stage's module path?"""
    skip = next((n for n in graph.nodes if n.name == blocks[0].skip), None)
    path = _module_path(skip) if skip is not None else None
    stage = tuple(blocks[0].stage.split(".")) if blocks[0].stage else ()
    return bool(path and stage and path[:len(stage)] == stage)


def stage_exits(graph: fx.Graph, blocks: Sequence[Block]) -> list[fx.Node] | None:
    """The exits of consecutive blocks: the stage's input (block 0's skip), then each block's output; None
    when a block does not start where the previous one ends (not a chain)."""
    nodes = {n.name: n for n in graph.nodes}
    exits = [nodes[blocks[0].skip]]
    for i, block in enumerate(blocks):
        out = _output_of(nodes[block.add])
        if i + 1 < len(blocks) and nodes[blocks[i + 1].skip] is not out:
            return None
        exits.append(out)
    return exits


def mix_exits(stages: Sequence[Sequence[Block]], factory: Callable[[Sequence[Block]], nn.Module]) -> GraphEdit:
    """An edit that replaces each stage's output by ``sum_k p[k] * exit[kept[k]]``: ``m = factory(blocks)``
    (registered at ``fxprune_depth.stage<i>``) has a ``kept`` list (how many of the blocks each weight
    keeps, 0..n) and ``m()`` returns ``p``, one weight per entry; ``exit[d]`` is the output of the stage's
    first ``d`` blocks (``stage_exits``; ``exit[0]`` its input). A one-hot ``p`` at choice ``d`` equals the stage
    with the blocks after ``d``
    removed when what follows a block's add is idempotent on its own output (ReLU) or nothing.
    TAS's depth search (Dong & Yang 2019)."""
    stages = [list(b) for b in stages]

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        for i, blocks in enumerate(stages):
            exits = stage_exits(graph, blocks)
            if exits is None:
                raise ValueError(f"stage {blocks[0].stage}: its blocks are not a chain; no exits to mix")
            path = f"{DEPTH_PREFIX}.stage{i}"
            module = modules[path] = factory(blocks)
            last = exits[-1]
            added: set[fx.Node] = set()
            with graph.inserting_after(last):
                call = graph.call_module(path, ())
            with graph.inserting_after(call):
                probs = graph.call_function(aten.type_as.default, (call, last))
            added |= {call, probs}
            anchor, total = probs, None
            for k, d in enumerate(module.kept):
                with graph.inserting_after(anchor):
                    weight = graph.call_function(aten.select.int, (probs, 0, k))
                with graph.inserting_after(weight):
                    term = graph.call_function(aten.mul.Tensor, (exits[d], weight))
                anchor = term
                added |= {weight, term}
                if total is not None:
                    with graph.inserting_after(term):
                        term = graph.call_function(aten.add.Tensor, (total, term))
                    anchor = term
                    added.add(term)
                total = term
            for user in list(last.users):
                if user not in added:
                    user.replace_input_with(last, total)
            total.meta = dict(last.meta)

    return edit


def remove_where(blocks: Iterable[Block], values: Mapping[str, float]) -> GraphEdit:
    """The fold of deterministic depth masks (``values``: block name -> its mask's value): a block whose
    value is 0 is removed (:func:`remove_blocks`), one whose value is 1 or missing is left as it is, any other
    value scales its branch by that number. Exact: the same output as the masks with those values."""
    blocks = list(blocks)
    unknown = set(values) - {b.name for b in blocks}
    if unknown:
        raise KeyError(f"no block named {sorted(unknown)}; blocks: {[b.name for b in blocks]}")

    def edit(graph: fx.Graph, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        nodes = _Nodes(graph)
        for block in blocks:
            value = float(values.get(block.name, 1.0))
            if value == 0.0:
                _remove(nodes, block, tensors)
            elif value != 1.0:
                _scale(nodes, block, value)

    return edit
