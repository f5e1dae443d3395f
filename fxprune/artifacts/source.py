"""A graph module as a folder that loads without fxprune: ``model.py`` (the graph's forward as plain Python
source in a small module class) and ``weights.safetensors``. For graphs torch.export cannot express, such as
sanp's dynamic module, whose channel counts depend on each input: no pickle, plain PyTorch to load.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch.fx as fx
from torch import nn

from fxprune.state import attribute

__all__ = ["write_dynamic", "load_dynamic"]


def _plain_code(gm: fx.GraphModule) -> tuple[str, list[str]]:
    """The graph's forward as plain Python (positional inputs, a single output unwrapped) and its attribute
    names, flattened (``a.b.c`` -> ``a__b__c``) so that they are plain buffers of one module."""
    graph = copy.deepcopy(gm.graph)
    graph._codegen = fx.graph.CodeGen()
    names = []
    for n in graph.nodes:
        if n.op == "get_attr":
            flat = n.target.replace(".", "__")
            names.append((n.target, flat))
            n.target = flat
        if n.op == "output" and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) == 1:
            n.args = (n.args[0][0],)
    graph.lint()
    code = graph.python_code("self").src
    return code, [flat for _, flat in names]


_TEMPLATE = '''"""A dynamic model written by fxprune's sanp pass: each sample's saliency modules decide which channels
run, and every gated layer computes only those. Plain PyTorch; load it with

    from model import load
    model = load(".")          # this folder

Inputs and outputs as the original model's; ``batch="split"`` runs a batch sample by sample (each at its
own channels), ``"union"`` (the default) runs it at once on the channels any of its samples keeps.
"""
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import device, inf, nan  # noqa: F401  (names the graph's code may use)


class DynamicModel(torch.nn.Module):
    def __init__(self, weights: dict, batch: str = "union") -> None:
        super().__init__()
        self.batch = batch
        for name in NAMES:
            self.register_buffer(name, weights[name])

    def forward(self, x):
        if self.batch == "split" and x.shape[0] > 1:
            return torch.cat([self.graph(x[i:i + 1]) for i in range(x.shape[0])])
        return self.graph(x)

{code}

NAMES = {names!r}


def load(folder=".", batch="union"):
    return DynamicModel(load_file(str(Path(folder) / "weights.safetensors")), batch).eval()
'''


def write_dynamic(gm: fx.GraphModule, folder: Path) -> None:
    """``folder/model.py`` (the module's code) and ``folder/weights.safetensors``: see the module docstring."""
    from safetensors.torch import save_file

    code, names = _plain_code(gm)
    code = code.replace("def forward(self", "def graph(self", 1)
    body = "\n".join("    " + line if line.strip() else "" for line in code.strip("\n").splitlines())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(_TEMPLATE.format(code=body, names=sorted(set(names))))
    flat = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            flat[n.target.replace(".", "__")] = attribute(gm, n.target).detach().contiguous().cpu()
    save_file(flat, str(folder / "weights.safetensors"))


def load_dynamic(folder: Path, batch: str = "union") -> nn.Module:
    """The module ``write_dynamic`` wrote (its own loader, imported from the folder)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fxprune_dynamic_{abs(hash(str(folder)))}",
                                                  Path(folder) / "model.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.load(folder, batch)
