"""The front ends: the recorder and make_fx give export's graph contract, and the next one takes over where one
cannot."""
import collections

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils import _pytree as pytree

import fxprune
import fxprune.testing
from fxprune.tracing.makefx import Unsupported
from fxprune.tracing.tracer import META_FRONTEND, META_INPUTS


def _ops(gm):
    """call_function targets as a multiset; symbolic-size bookkeeping (sym_size) aside."""
    return collections.Counter(str(n.target) for n in gm.graph.nodes
                               if n.op == "call_function" and "sym_size" not in str(n.target))


def _same_values(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, "same output structure"
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        else:
            assert x == y


class Block(nn.Module):
    """In-place ReLU, BatchNorm, dropout, a dict + tuple output with a size in it, a keyword input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        y = self.act(self.bn(self.conv(x)))
        if scale is not None:
            y = y * scale
        return {"logits": self.fc(self.drop(y.mean((2, 3)))), "extra": (y, x.shape[0])}


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(F.relu(self.fc(self.embed(ids))))


CASES = {
    "block": lambda: (Block(), {"x": torch.randn(2, 3, 8, 8), "scale": torch.randn(1, 8, 1, 1)}),
    "tied": lambda: (TiedLM(), (torch.randint(0, 50, (2, 7)),)),
    "resnet18": lambda: (torchvision.models.resnet18(), (torch.randn(2, 3, 32, 32),)),
    "mobilenet_v3_small": lambda: (torchvision.models.mobilenet_v3_small(), (torch.randn(1, 3, 32, 32),)),
}


@pytest.mark.parametrize("frontend", ["record", "make_fx"])
@pytest.mark.parametrize("case", list(CASES))
def test_quick_front_ends_match_export(case, frontend, one_thread):
    """Same ops, same get_attr names, same outputs (structure and values), same channel groups. The
    recorder traces static graphs: compared with export's static graph."""
    model, inputs = CASES[case]()
    model.eval()
    dynamic = frontend != "record"
    fast = fxprune.trace(model, inputs, frontend=frontend, dynamic_batch=dynamic)
    ref = fxprune.trace(model, inputs, fast=False, dynamic_batch=dynamic)
    assert fast.meta[META_FRONTEND] == frontend and ref.meta[META_FRONTEND] == "export"
    assert _ops(fast) == _ops(ref)
    attrs = lambda gm: sorted(n.target for n in gm.graph.nodes if n.op == "get_attr")  # noqa: E731
    assert attrs(fast) == attrs(ref)
    used = lambda gm: sorted(n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users)  # noqa: E731
    assert used(fast) == used(ref), "tied weights are read under the same name as export reads them"
    args, kwargs = fast.meta[META_INPUTS]
    with torch.no_grad():
        _same_values(fast(*args, **kwargs), ref(*args, **kwargs))
        _same_values(fast(*args, **kwargs), model(*args, **kwargs))
    assert all("val" in n.meta for n in fast.graph.nodes if n.op != "output")
    assert fxprune.analyze(fast).rows() == fxprune.analyze(ref).rows()


def test_fast_path_records_module_paths_and_leaves_the_model_alone():
    model = Block().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.trace(model, (torch.randn(2, 3, 8, 8),))
    assert gm.meta[META_FRONTEND] == "make_fx"
    stacks = {n.name: n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"
              and "sym_size" not in str(n.target)}
    assert all(stacks.values()), "every op knows its module"
    assert [p for p, _ in stacks["dropout"].values()] == ["", "drop"]
    assert "BatchNorm2d" in list(stacks["batch_norm"].values())[-1][1]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    res = fxprune.prune(model, (torch.randn(2, 3, 8, 8),), "l1", 0.5)
    assert isinstance(res.module.get_submodule("drop"), nn.Dropout), "dropout keeps its name after compaction"


class PlainTensorAttribute(nn.Module):
    """A tensor that is neither a parameter nor a buffer: export lifts it as a constant, the fast path
    refuses (it would be a real tensor among fake ones)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.offset = torch.ones(4)

    def forward(self, x):
        return self.fc(x) + self.offset


class CountsCalls(nn.Module):
    """A buffer updated in place in forward: a state update, left to export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


class ReassignsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.last = x.detach().mean(0)
        return self.fc(x)


@pytest.mark.parametrize(("cls", "refusal"), [(PlainTensorAttribute, "convert all Tensors to FakeTensors"),
                                              (CountsCalls, "writes a parameter or buffer in place"),
                                              (ReassignsBuffer, "forward reassigns last")])
def test_falls_back_to_export_where_the_fast_path_cannot_follow(cls, refusal):
    from fxprune.tracing.makefx import fast_trace

    model = cls().eval()
    x = torch.randn(3, 4)
    with pytest.raises((AssertionError, Unsupported), match=refusal):
        fast_trace(model, (x,), {}, [])
    gm = fxprune.trace(model, (x,))
    assert gm.meta[META_FRONTEND] == "export"
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert res.module(x).shape == (3, 4)


def test_batch_axis_symbolic_only_from_batch_two():
    model = torchvision.models.resnet18().eval()
    sym = lambda gm: [n for n in gm.graph.nodes if n.op == "placeholder"][0].meta["val"].shape[0]  # noqa: E731
    assert isinstance(sym(fxprune.trace(model, (torch.randn(2, 3, 32, 32),))), torch.SymInt)
    assert sym(fxprune.trace(model, (torch.randn(1, 3, 32, 32),))) == 1
    assert sym(fxprune.trace(model, (torch.randn(2, 3, 32, 32),), dynamic_batch=False)) == 2


class CachesInEval(nn.Module):
    """Like timm's EfficientFormer: in eval mode the forward caches a derived tensor per device in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bias_table = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}
        self.calls: list[int] = []

    def forward(self, x):
        key = str(x.device)
        if not self.training and key not in self.cache:
            self.cache[key] = self.bias_table * 2
        self.calls.append(1)
        self.seen = True  # an attribute the forward adds
        return torch.relu(self.conv(x)) + self.cache[key].view(1, -1, 1, 1)


@pytest.mark.parametrize("warm", [False, True])
def test_python_state_written_by_the_forward_is_put_back(warm):
    """A trace must not leave FakeTensors (or anything else) in the user's module: the eager model still
    runs afterwards and its Python state is what it was."""
    model = CachesInEval().eval()
    x = torch.randn(2, 3, 8, 8)
    if warm:
        with torch.no_grad():
            model(x)
    before = ({k: v.clone() for k, v in model.cache.items()}, list(model.calls), hasattr(model, "seen"))
    for fast in (True, False):
        gm = fxprune.trace(model, (x,), fast=fast)
        # warm: the cached real tensor is a constant the fast path leaves to export
        assert gm.meta[META_FRONTEND] == ("make_fx" if fast and not warm else "export")
        assert set(model.cache) == set(before[0]) and all(torch.equal(model.cache[k], v) for k, v in before[0].items())
        assert model.calls == before[1] and hasattr(model, "seen") == before[2]
    res = fxprune.prune(model, (x,), "l1", 0.5)
    assert not any(isinstance(v, torch._subclasses.FakeTensor) for v in model.cache.values())
    with torch.no_grad():
        model(x)  # the eager model still runs
    fxprune.testing.assert_equivalent(model, res, (x,))


class SharedUnderTwoPaths(nn.Module):
    """One module reachable under two names (timm CoaT shares its conv position encodings)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(self.enc, nn.ReLU()), nn.Conv2d(8, 4, 1)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def test_module_shared_under_two_paths_keeps_its_real_parameters():
    model = SharedUnderTwoPaths().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = {n: p.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    res = fxprune.prune(model, (x,), "l1", 0.5)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert type(p) is nn.Parameter and not isinstance(p.data, torch._subclasses.FakeTensor), name
        assert torch.equal(p, ref[name])
    with torch.no_grad():
        model(x)
    fxprune.testing.assert_equivalent(model, res, (x,))


# ----------------------------------------------------------------------------------------------------
# The recorder runs the real model: what a real run would silently specialise or change, it refuses.
# ----------------------------------------------------------------------------------------------------
class BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y  # data-dependent control flow


class MasksByValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y[y > 0]  # a data-dependent output shape


class ForcesBatchStats(nn.Module):
    """Normalises with batch statistics even in eval mode, updating its running statistics."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.batch_norm(self.fc(x), self.bn.running_mean, self.bn.running_var, training=True)


class NoGradInside(nn.Module):
    """A frozen branch inside the forward: make_fx records the grad-mode switch, the recorder cannot."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            t = self.frozen(x)
        return self.fc(x) + t


class ReadsValuesPastTheDispatcher(nn.Module):
    """``tolist()`` / ``numpy()`` read values in C++ without an ATen call the recording could see."""

    def __init__(self, read=lambda v: v.tolist()):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.read = read

    def forward(self, x):
        y = self.fc(x)
        return y[:, :max(int(self.read((y > 0).sum())), 1)]


class ReadsValuesThroughNumpy(ReadsValuesPastTheDispatcher):
    def __init__(self):
        super().__init__(read=lambda v: np.asarray(v))


@pytest.mark.parametrize("cls", [BranchesOnValues, MasksByValue, ForcesBatchStats, NoGradInside, PlainTensorAttribute,
                                 CountsCalls, ReassignsBuffer, ReadsValuesPastTheDispatcher, ReadsValuesThroughNumpy])
def test_recorder_refuses_what_a_real_run_would_specialise_or_change(cls):
    from fxprune.tracing.makefx import Unsupported

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(3, 4)
    x_before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    tensor_methods = torch.Tensor.__dict__.get("tolist")
    with pytest.raises(Unsupported):
        fxprune.trace(model, (x,), frontend="record", dynamic_batch=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the model's tensors are untouched"
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert torch.equal(x, x_before)
    assert torch.Tensor.__dict__.get("tolist") is tensor_methods and torch.randn(2).tolist(), "Tensor methods put back"
    try:
        gm = fxprune.trace(model, (x,))
    except fxprune.TraceError:
        assert cls in (BranchesOnValues, MasksByValue, ReadsValuesPastTheDispatcher, ReadsValuesThroughNumpy), \
            "only the data-dependent ones are untraceable"
        return
    assert gm.meta[META_FRONTEND] in ("make_fx", "export")


class WritesIntoItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("idx", torch.tensor([3, 0, 1]))

    def forward(self, x):
        x.relu_()
        return self.fc(x)[:, self.idx] * torch.tensor(2.0)  # an integer index and a literal tensor


def test_recorder_copies_the_inputs_and_records_literals_and_integer_indexing():
    model = WritesIntoItsInput().eval()
    x = torch.randn(1, 4)
    x_before = x.clone()
    gm = fxprune.trace(model, (x,))
    assert gm.meta[META_FRONTEND] == "record"
    assert torch.equal(x, x_before), "the user's input is not written"
    targets = {str(n.target) for n in gm.graph.nodes}
    assert {"aten.relu_.default", "aten.index.Tensor", "aten.lift_fresh_copy.default"} <= targets
    with torch.no_grad():
        _same_values(gm(x.clone()), model(x.clone()))


def test_recorder_traces_a_model_on_the_meta_device():
    """Weights on meta: the recording runs meta kernels, and plans the same groups as the real model."""
    real = torchvision.models.resnet18().eval()
    with torch.device("meta"):
        meta = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxprune.trace(meta, (x,), frontend="record")
    assert all(n.meta["val"].device.type == "meta" for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor))
    assert fxprune.analyze(gm).rows() == fxprune.analyze(fxprune.trace(real, (x,))).rows()


class MakesTensorsOnItsDevice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        pos = torch.arange(8, device=x.device, dtype=x.dtype).view(1, 8, 1, 1)
        y = self.norm(torch.relu(self.conv(x)) + pos)
        return self.fc(F.layer_norm(y.mean((2, 3)), (8,)))


@pytest.mark.parametrize("make", [lambda: (torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)),
                                  lambda: (MakesTensorsOnItsDevice(), torch.randn(1, 3, 8, 8))])
def test_recording_on_meta_copies_of_real_weights(make, monkeypatch):
    """A heavy model is recorded on meta copies: same ops and groups as the real recording, device
    literals name the real device, the user's weights stay real and untouched, and pruning through
    that path (verified on meta) is still exactly the masked model."""
    import fxprune.tracing.record as rec

    model, x = make()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = rec.record_trace(model, (x,), {}, on_meta=False)
    meta = rec.record_trace(model, (x,), {}, on_meta=True)
    assert meta.meta[rec.META_ON_META] and not real.meta[rec.META_ON_META]
    assert _ops(meta) == _ops(real)
    assert fxprune.analyze(meta).rows() == fxprune.analyze(real).rows()
    devices = {v for n in meta.graph.nodes for v in list(n.args) + list(n.kwargs.values())
               if isinstance(v, torch.device)}
    assert devices <= {torch.device("cpu")}
    with torch.no_grad():
        _same_values(meta(x), model(x))
    assert all(v.device.type == "cpu" and torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(rec, "HEAVY_MACS", 0)  # every model is heavy now: prune records and verifies on meta
    res = fxprune.prune(model, (x,), "l1", 0.5, dynamic_shapes=False)  # static: the recorder's to trace
    assert res.groups.gm.meta[rec.META_ON_META]
    fxprune.testing.assert_equivalent(model, res, (x,))


def test_meta_normalisations_check_their_shapes():
    from fxprune.tracing.record import norm_output

    x = torch.empty(2, 8, 4, 4, device="meta")
    w = torch.empty(8, device="meta")
    assert norm_output(torch.ops.aten.batch_norm.default, (x, w, w, w, w)).shape == x.shape
    assert norm_output(torch.ops.aten.layer_norm.default, (x, [4], torch.empty(4, device="meta"))).shape == x.shape
    with pytest.raises(RuntimeError, match=r"per-channel tensor of shape \(6,\) for \(8,\)"):
        norm_output(torch.ops.aten.batch_norm.default, (x, torch.empty(6, device="meta"), None, None, None))
    with pytest.raises(RuntimeError, match="8 channels in 3 groups"):
        norm_output(torch.ops.aten.group_norm.default, (x, 3, w, w))
    with pytest.raises(RuntimeError, match=r"layer_norm over \(8,\) of an input of shape \(2, 8, 4, 4\)"):
        norm_output(torch.ops.aten.layer_norm.default, (x, [8]))


@pytest.mark.parametrize("training", [True, False])
def test_traced_view_reports_the_models_mode_and_compaction_keeps_it(training: bool) -> None:
    """Traced in eval mode, the view says the model's own mode, so compacting against the traced graph
    itself (a factorised model, fxprune.edits.factorize) returns a module in the user's mode."""
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).train(training)
    gm = fxprune.trace(model, (torch.randn(2, 4),))
    assert gm.training == training and model.training == training
    groups = fxprune.analyze(gm)
    assert fxprune.compact(gm, groups, np.zeros(len(groups.comp_group), bool), gm).module.training == training
