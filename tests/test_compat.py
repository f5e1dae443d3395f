"""Torch-version resilience: every private torch name behind ``fxprune.tracing.compat``; each front end works end
to end; a missing private name costs speed (one warning), never a failure; a trace changes nothing
for another thread."""
import ast
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
import fxprune.api
import fxprune.testing
from fxprune.tracing import compat
from fxprune.tracing.tracer import FRONTEND_ENV, META_FRONTEND

ROOT = pathlib.Path(__file__).resolve().parent.parent
trace_module = importlib.import_module("fxprune.tracing.tracer")  # (the attribute fxprune.trace is the function)


class Attention(nn.Module):
    """A small transformer block: self-attention (nn.MultiheadAttention), LayerNorm, an MLP."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.mlp(h))
        return self.head(h.mean(1))


class ResidualConcat(nn.Module):
    """Two branches concatenated, a residual add around a block, BatchNorm and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Conv2d(8, 6, 3, padding=1)
        self.right = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.block = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([self.left(h), self.right(h)], dim=1)
        h = h + self.block(h)
        return self.fc(h.mean((2, 3)))


MODELS = {
    "resnet18": lambda b: (torchvision.models.resnet18(num_classes=10), torch.randn(b, 3, 32, 32)),
    "attention": lambda b: (Attention(), torch.randn(b, 6, 8)),
    "residual_concat": lambda b: (ResidualConcat(), torch.randn(b, 3, 16, 16)),
}


@pytest.fixture
def fresh_compat(monkeypatch):
    """Look-ups, warnings given and front-end self-tests forgotten before and after the test."""
    compat.reset()
    monkeypatch.setattr(trace_module, "_SELF_TEST", {})
    yield
    compat.reset()


@pytest.fixture
def frontends_used(monkeypatch):
    """The front end of every trace ``fxprune.prune`` makes, in order."""
    import fxprune.compaction.targets as targets

    used = []
    real = targets.trace

    def spy(*args, **kwargs):
        gm = real(*args, **kwargs)
        used.append(gm.meta[META_FRONTEND])
        return gm

    monkeypatch.setattr(targets, "trace", spy)
    return used


def _compat_warnings(caught):
    return [w for w in caught if issubclass(w.category, compat.CompatWarning)]


# ---- (a) every front end, forced, end to end --------------------------------------------------------

@pytest.mark.parametrize("frontend", ["record", "make_fx", "export"])
@pytest.mark.parametrize("case", list(MODELS))
def test_each_front_end_prunes_end_to_end(case, frontend, monkeypatch, frontends_used, one_thread):
    """``FXPRUNE_FRONTEND`` forces one front end; each prunes exactly. The recorder traces static graphs
    (a batch of 1); make_fx and export trace a batch of 2 with a symbolic batch axis."""
    torch.manual_seed(0)
    model, x = MODELS[case](1 if frontend == "record" else 2)
    model.eval()
    monkeypatch.setenv(FRONTEND_ENV, frontend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.prune(model, x, "l1", 0.5)
    assert frontends_used == [frontend]
    assert not _compat_warnings(caught)
    fxprune.testing.assert_equivalent(model, result, x)
    if case != "attention":  # convolution channels: something was removed
        assert result.removed.any()


def test_an_unknown_front_end_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(FRONTEND_ENV, "dynamo")
    with pytest.raises(ValueError, match=f"dynamo.*{FRONTEND_ENV}"):
        fxprune.trace(nn.Linear(2, 2), torch.randn(1, 2))


# ---- (b) a missing private name: the next front end, one warning, the same exact result --------------

def _move(monkeypatch, key):
    """Simulate a torch that moved ``PRIVATE_NAMES[key]``: compat looks where it used to be and finds nothing."""
    module, _, attr = compat.PRIVATE_NAMES[key].partition(":")
    moved = f"{module}:{attr}_moved" if attr else f"{module}_moved"
    monkeypatch.setitem(compat.PRIVATE_NAMES, key, moved)
    compat.reset()
    return moved.replace(":", ".")


@pytest.mark.parametrize("key, expected", [("ProxyTorchDispatchMode", "make_fx"),  # the recorder's only
                                           ("FakeTensorMode", "record"),           # make_fx's only
                                           ("get_codegen", "export")])             # both need it
def test_a_missing_private_name_falls_back_with_one_warning(key, expected, monkeypatch, fresh_compat,
                                                            frontends_used, one_thread):
    torch.manual_seed(0)
    model, x = MODELS["residual_concat"](1)
    model.eval()
    missing = _move(monkeypatch, key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # static graphs: the recorder's to trace
        result = fxprune.prune(model, x, "l1", 0.5, dynamic_shapes=False)
        again = fxprune.prune(model, x, "l1", 0.3, dynamic_shapes=False)  # once per process: no second warning
    assert frontends_used == [expected, expected]
    found = _compat_warnings(caught)
    assert len(found) == (0 if expected == "record" else 1), [str(w.message) for w in found]
    if found:
        text = str(found[0].message)
        assert missing in text and ("torch.export" if expected == "export" else "make_fx") in text
        assert "slower" in text
    fxprune.testing.assert_equivalent(model, result, x)
    fxprune.testing.assert_equivalent(model, again, x)


def test_make_fx_missing_warns_where_it_would_have_traced(monkeypatch, fresh_compat, frontends_used):
    """A dynamic batch is make_fx's to trace: without it, export takes over, with one warning."""
    model, x = MODELS["residual_concat"](2)
    model.eval()
    missing = _move(monkeypatch, "StatelessSymbolicContext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.prune(model, x, "l1", 0.5)
    assert frontends_used == ["export"]
    found = _compat_warnings(caught)
    assert len(found) == 1 and missing in str(found[0].message) and "torch.export" in str(found[0].message)
    fxprune.testing.assert_equivalent(model, result, x)


def test_a_missing_keyword_parameter_counts_as_missing(monkeypatch, fresh_compat):
    """make_fx without a keyword the front end passes: reported as missing, with the keyword named."""
    monkeypatch.setitem(compat._KEYWORDS, "make_fx", compat._KEYWORDS["make_fx"] + ("_no_such_keyword",))
    support = compat.make_fx_support()
    assert not support and any("make_fx(_no_such_keyword=)" in m for m in support.missing)
    assert compat.recorder_support(), "the recorder does not need make_fx"


def test_a_forced_front_end_that_is_missing_says_what_is_missing(monkeypatch, fresh_compat):
    missing = _move(monkeypatch, "enable_python_dispatcher")
    with pytest.raises(compat.MissingFeature, match=missing.replace(".", r"\.")):
        fxprune.trace(nn.Linear(2, 2), torch.randn(1, 2), frontend="record")


def test_a_front_end_broken_by_torch_is_found_and_warned_about_once(monkeypatch, fresh_compat, frontends_used):
    """Every name present, but the recorder fails on a trivial model too (torch changed its
    internals): one warning naming the error, then it is skipped."""
    import fxprune.tracing.record

    def broken(*args, **kwargs):
        raise AttributeError("'_Mode' object has no attribute '_mode_key'")

    monkeypatch.setattr(fxprune.tracing.record, "record_trace", broken)
    model, x = MODELS["residual_concat"](1)
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # static graphs: the recorder's to trace
        fxprune.prune(model, x, "l1", 0.5, dynamic_shapes=False)
        fxprune.prune(model, x, "l1", 0.5, dynamic_shapes=False)
    assert frontends_used == ["make_fx", "make_fx"]
    found = _compat_warnings(caught)
    assert len(found) == 1 and "_mode_key" in str(found[0].message) and "record" in str(found[0].message)


def test_a_model_one_front_end_refuses_falls_back_quietly(fresh_compat, frontends_used):
    """A per-model fallback (the recorder cannot follow a no_grad region) is no torch problem: no warning."""

    class NoGradInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.frozen = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            with torch.no_grad():
                t = self.frozen(x)
            return self.out(torch.relu(self.fc(x) + t))

    model, x = NoGradInside().eval(), torch.randn(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.prune(model, x, "l1", 0.5)
    assert frontends_used == ["make_fx"]
    assert not _compat_warnings(caught)
    fxprune.testing.assert_equivalent(model, result, x)


# ---- (c) a trace changes nothing for another thread -------------------------------------------------

class _Meeting:
    """Shared by a model and its copies (prune and the checks copy the model)."""

    def __init__(self):
        self.armed = False
        self.inside = threading.Event()
        self.checked = threading.Event()

    def __deepcopy__(self, memo):
        return self


class _Rendezvous(nn.Module):
    """Identity; while armed, its forward (run by the trace, in the pruning thread) waits until the
    other thread has done a round of checks, so that those run while the trace is inside the model."""

    def __init__(self):
        super().__init__()
        self.meeting = _Meeting()

    def forward(self, x):
        m = self.meeting
        if m.armed:
            m.armed = False
            m.checked.clear()
            m.inside.set()
            m.checked.wait(timeout=30)
            m.inside.clear()
        return x


@pytest.mark.parametrize("frontend", ["record", "make_fx"])
def test_another_thread_is_unaffected_while_prune_traces(frontend, monkeypatch, frontends_used):
    torch.manual_seed(0)
    meet = _Rendezvous()
    meeting = meet.meeting
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), meet,
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1 if frontend == "record" else 2, 3, 16, 16)

    # the other thread's work, and its results computed before any pruning
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    t = torch.randn(5)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q = torch.randn(2, 4, 16)
    conv = nn.Conv2d(3, 4, 3)
    img = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = {"matmul": a @ b, "tolist": t.tolist(), "numpy": t.numpy().copy(), "mha": mha(q, q, q)[0],
               "conv": conv(img)}
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy
    state = lambda: {"tolist": torch.Tensor.tolist, "numpy": torch.Tensor.numpy,  # noqa: E731
                     "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
                     "compiling": bool(torch.compiler.is_compiling()), "exporting": bool(torch.compiler.is_exporting()),
                     "mkldnn": torch.backends.mkldnn.enabled, "cudnn": torch.backends.cudnn.enabled,
                     "grad": torch.is_grad_enabled()}
    expected = state()
    assert expected["tolist"] is tolist and expected["numpy"] is numpy and expected["mha_fastpath"]

    errors, rounds, during = [], [0], [0]
    stop = threading.Event()

    def work():
        while not stop.is_set():
            try:
                inside = meeting.inside.is_set()
                seen = state()
                assert seen == expected, {k: v for k, v in seen.items() if expected[k] != v}
                with torch.no_grad():
                    assert torch.equal(a @ b, ref["matmul"])
                    assert t.tolist() == ref["tolist"]
                    assert np.array_equal(t.numpy(), ref["numpy"]) and np.array_equal(np.asarray(t), ref["numpy"])
                    assert torch.equal(mha(q, q, q)[0], ref["mha"])
                    assert torch.equal(conv(img), ref["conv"])
                rounds[0] += 1
                if inside:
                    during[0] += 1
                    meeting.checked.set()
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                meeting.checked.set()
                return

    monkeypatch.setenv(FRONTEND_ENV, frontend)
    worker = threading.Thread(target=work)
    worker.start()
    try:
        meeting.armed = True
        result = fxprune.prune(model, x, "l1", 0.5)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors, errors[0]
    assert frontends_used == [frontend]
    assert during[0] >= 1, "the other thread ran its checks while the trace was inside the model"
    assert rounds[0] > during[0]
    assert state() == expected, "everything put back"
    fxprune.testing.assert_equivalent(model, result, x)


def test_the_recorder_still_refuses_value_reads_and_the_fused_attention_kernel():
    """What the recorder changes for its own thread only still takes effect there."""
    from fxprune.tracing.makefx import Unsupported

    class ReadsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y[:, :max(int(np.asarray((y > 0).sum())), 1)]

    with pytest.raises(Unsupported, match="__array__"):
        fxprune.trace(ReadsValues().eval(), torch.randn(1, 4), frontend="record")
    mha = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    gm = fxprune.trace(mha, torch.randn(1, 5, 16), frontend="record")
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("_native_multi_head_attention" in t or "_transformer_encoder_layer_fwd" in t for t in targets)
    assert "aten.linear.default" in targets


def test_stderr_is_held_back_for_the_tracing_thread_only():
    import io

    from fxprune.cli.notes import stderr_only_on_success

    real, sink = sys.stderr, io.StringIO()
    sys.stderr = sink
    try:
        def other():
            print("from another thread", file=sys.stderr)

        with stderr_only_on_success():
            print("held", file=sys.stderr)
            worker = threading.Thread(target=other)
            worker.start()
            worker.join()
            assert sink.getvalue() == "from another thread\n"
        assert sink.getvalue() == "from another thread\nheld\n" and sys.stderr is sink
        with pytest.raises(ValueError), stderr_only_on_success():
            print("dropped on failure", file=sys.stderr)
            raise ValueError
        assert "dropped" not in sink.getvalue() and sys.stderr is sink
    finally:
        sys.stderr = real


def test_gc_freeze_covers_the_trace_and_analysis_not_the_pass(monkeypatch):
    """The pass (which may train, reading the user's loaders) runs with garbage collection as usual."""
    import gc

    if gc.get_freeze_count() or not gc.isenabled():
        pytest.skip("the test process froze objects itself")
    frozen_at = {}

    def progress(stage):
        frozen_at[stage] = gc.get_freeze_count() > 0

    fxprune.prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(1, 4), "l1", 0.5,
                  progress=progress)
    assert frozen_at["trace"] and frozen_at["analyze"]
    assert not frozen_at["score"] and not frozen_at["select"] and not frozen_at["compact"]
    assert gc.get_freeze_count() == 0


# ---- (d) nothing else touches private names; importing never needs them --------------------------

_SCANNED = ("fxprune",)


def _private_uses(path: pathlib.Path) -> set[str]:
    """Private torch names a source file imports or reads (``torch._C``, ``from torch.utils._pytree``,
    ``torch.fx.experimental``...), through its aliases of torch modules (``nn``, ``fx``)."""
    tree = ast.parse(path.read_text())
    aliases = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def private(dotted: str) -> bool:
        parts = dotted.split(".")[1:]
        return "experimental" in parts or any(p.startswith("_") and not p.endswith("__") for p in parts)

    found = {v for v in aliases.values() if private(v)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torch.") and private(a.name)}
        elif isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                dotted = ".".join([aliases[cur.id], *reversed(chain)])
                if private(dotted):
                    found.add(dotted)
    return found


def test_only_compat_touches_private_torch_names():
    found = set()
    for root in _SCANNED:
        for path in (ROOT / root).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel != "fxprune/tracing/compat.py":
                found |= {(rel, name) for name in _private_uses(path)}
    assert not found, sorted(found)
    assert _private_uses(ROOT / "fxprune/tracing/compat.py") == set(), "compat names them as strings, looked up on use"


def test_every_private_name_exists_on_this_torch(fresh_compat):
    """The inventory is current: on the torch the project is tested with, both quick front ends are supported."""
    assert compat.recorder_support(), compat.recorder_support().missing
    assert compat.make_fx_support(), compat.make_fx_support().missing
    assert compat.lazy_graph_module_class() is not None
    for key in compat.PRIVATE_NAMES:
        assert not isinstance(compat._get(key), compat._Missing), key


_WITHOUT_PRIVATE_NAMES = textwrap.dedent("""
    import importlib, pkgutil, sys, types, warnings
    import torch, torch.export, torch.fx, torch.utils.flop_counter, torch.nn.utils.stateless
    import torch.fx.experimental.proxy_tensor, torch.fx.experimental.symbolic_shapes, torch._subclasses.fake_tensor
    import torch._dispatch.python, torch.export._unlift, torch.utils._python_dispatch, torch.fx._lazy_graph_module

    sys.path.insert(0, {root!r})
    SPECS = {specs!r}


    class Without:
        # Stands in for a torch module or class: everything but the names removed. Torch's own code keeps
        # its references to the real objects; whoever looks the names up (an import, an attribute) fails.
        def __init__(self, real, name):
            self._real, self._name, self._gone = real, name, {{}}

        def __getattr__(self, key):
            if key in self._gone:
                if self._gone[key] is None:
                    raise AttributeError(f"{{self._name}} has no attribute {{key}}")
                return self._gone[key]
            return getattr(self._real, key)


    def remove(owner_path, path):
        # the object at owner_path (a module name) . path[0] . path[1] ... without the last one
        real = importlib.import_module(owner_path)
        stub = sys.modules[owner_path]
        if not isinstance(stub, Without):
            stub = Without(real, owner_path)
            sys.modules[owner_path] = stub
            parent, _, leaf = owner_path.rpartition(".")
            setattr(sys.modules[parent] if not isinstance(sys.modules[parent], Without) else sys.modules[parent]._real,
                    leaf, stub)
        for i, part in enumerate(path[:-1]):
            inner = stub._gone.get(part)
            if inner is None:
                inner = stub._gone[part] = Without(getattr(stub._real, part), part)
            stub = inner
        stub._gone[path[-1]] = None


    for spec in SPECS:  # every private name fxprune uses: gone
        module, _, attr = spec.partition(":")
        if attr:
            remove(module, attr.split("."))
        else:  # a whole module: unimportable
            parent, _, leaf = module.rpartition(".")
            sys.modules[module] = None
            delattr(sys.modules[parent], leaf)

    import fxprune
    names = ["fxprune"] + [m.name for m in pkgutil.walk_packages(fxprune.__path__, "fxprune.")
                           if not m.name.endswith("__main__")]  # (runs the command line)
    for name in names:
        importlib.import_module(name)
    from fxprune.tracing import compat
    rec, mfx = compat.recorder_support(), compat.make_fx_support()
    assert not rec and not mfx
    assert "torch.fx.experimental.proxy_tensor.ProxyTorchDispatchMode" in rec.missing, rec.missing
    assert "torch._subclasses.fake_tensor.FakeTensorMode" in mfx.missing, mfx.missing
    assert compat.lazy_graph_module_class() is None and compat.dispatch_mode_base() is None
    assert compat.is_op_overload(torch.ops.aten.add.Tensor) and not compat.is_op_overload(torch.add)
    assert compat.tree_leaves(((1, [2]), {{"a": 3}})) == [1, 2, 3]
    assert compat.tree_map(lambda v: v + 1, ((1, [2]), {{"a": 3}})) == ((2, [3]), {{"a": 4}})
    assert compat.fan_in(torch.empty(8, 3, 5, 5)) == 75
    assert len(compat.batch_norm_types()) >= 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_missing([rec, mfx], "torch.export")
        compat.warn_missing([rec, mfx], "torch.export")
    assert len(caught) == 1 and "ProxyTorchDispatchMode" in str(caught[0].message)
    print("imported", len(names), "modules without", len(SPECS), "private names")
""")


def test_importing_fxprune_needs_no_private_torch_name():
    """In a fresh process, every private name fxprune uses is removed from torch (for whoever looks it up
    from then on: torch's own code keeps its references), then every module of fxprune and passes is
    imported, and compat's helpers fall back to their own implementations."""
    code = _WITHOUT_PRIVATE_NAMES.format(root=str(ROOT), specs=list(compat.PRIVATE_NAMES.values()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "imported" in done.stdout


def test_the_recorder_traces_hugging_face_llama():
    """transformers reads ``torch.compiler.is_compiling()`` as a bool (``flag |= ...``): the thread-scoped
    flag must behave as one, or the recorder fails on every Llama and tracing quietly falls back (3x slower)."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=32, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 6))}
    gm = fxprune.trace(model, x, frontend="record")
    assert gm.meta[META_FRONTEND] == "record"
    with compat.compiling_in_this_thread():
        flag = torch.compiler.is_compiling()
        flag |= False
        assert flag is True and torch.compiler.is_compiling() == True  # noqa: E712 - the comparison readers make
