"""examples/charlm.py: the stdlib corpus, its windows and split, the model, its metric, and what fxprune finds in it."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fxprune

PATH = Path(__file__).resolve().parent.parent / "examples" / "charlm.py"


def _load(name: str = "charlm_example"):
    spec = importlib.util.spec_from_file_location(name, PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def charlm():
    return _load()


@pytest.fixture
def quick_val(charlm, monkeypatch):
    """evaluate() over 2 validation batches, not 16: the metric is the same, only the sample is smaller."""
    monkeypatch.setattr(charlm, "VAL_BATCHES", 2)
    return charlm


def test_corpus_is_deterministic_and_follows_the_rule(charlm):
    files = charlm.corpus_files()
    assert files == charlm.corpus_files()
    root = Path(charlm.sysconfig.get_paths()["stdlib"])
    rels = [p.relative_to(root).as_posix() for p in files]
    assert rels == sorted(rels) and rels[0] == "__future__.py"
    assert all(p.suffix == ".py" and p.stat().st_size >= 1024 for p in files)
    assert not any(set(Path(r).parts[:-1]) & {"test", "tests", "idlelib", "site-packages"} for r in rels)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    assert total >= 2 * 2 ** 20 > total - sizes[-1]  # files taken until the total reaches 2 MiB

    train, val = charlm._data()
    assert len(train) + len(val) == total > 2 ** 20
    assert len(train) == int(0.9 * total)
    assert train.dtype == torch.long and 0 <= int(torch.cat([train, val]).min()) and int(train.max()) < 256
    raw = b"".join(p.read_bytes() for p in files)
    assert bytes(torch.cat([train, val]).to(torch.uint8).tolist()) == raw
    charlm._data.cache_clear()
    train2, val2 = charlm._data()
    assert train2 is not train and torch.equal(train2, train) and torch.equal(val2, val)


def test_windows_shift_by_one_and_split_is_disjoint(charlm):
    train, val = charlm._data()
    seq = charlm.SEQ
    starts = charlm._train_starts(charlm.TRAIN_BATCHES * charlm.BATCH, charlm.SEED)
    assert int(starts.min()) >= 0 and int(starts.max()) + seq + 1 <= len(train)  # targets stay in train
    vstarts = charlm._val_starts()
    assert len(vstarts) == charlm.VAL_BATCHES * charlm.BATCH
    assert int(vstarts.min()) >= 0 and int(vstarts.max()) + seq + 1 <= len(val)

    batches = list(charlm.train_loader())
    assert len(batches) == 50
    for x, y in batches:
        assert x.shape == y.shape == (32, seq) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
    again = list(charlm.train_loader())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    x, y = charlm.Windows(train, starts)[0]
    s = int(starts[0])
    assert torch.equal(x, train[s:s + seq]) and torch.equal(y, train[s + 1:s + seq + 1])

    vbatches = list(charlm.val_loader())
    assert len(vbatches) == 16
    x, y = vbatches[0]
    assert torch.equal(x[0], val[:seq]) and torch.equal(y[0], val[1:seq + 1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vbatches, charlm.val_loader()))


def test_model_shapes_and_example_inputs(charlm):
    (ids,) = charlm.example_inputs()
    assert ids.shape == (2, 128) and ids.dtype == torch.long
    net = charlm.CharLM().eval()
    with torch.no_grad():
        assert net(ids).shape == (2, 128, 256)
        assert net(ids[:, :17]).shape == (2, 17, 256)  # shorter sequences work too
    out = net(ids)
    assert charlm.loss(out, ids).ndim == 0
    assert sum(p.numel() for p in net.parameters()) == 478_976


def test_evaluate_untrained_near_uniform_then_lower(quick_val):
    charlm = quick_val
    torch.manual_seed(0)
    net = charlm.CharLM().train()
    before = charlm.evaluate(net)
    assert list(before) == ["neg_bpc", "bpc"] and before["neg_bpc"] == -before["bpc"]
    assert abs(before["bpc"] - 8) < 0.5
    assert net.training  # mode restored
    charlm.pretrain(net, 4)
    after = charlm.evaluate(net)["bpc"]
    assert after < before["bpc"] - 1.0
    assert math.isfinite(after)


def test_model_is_trained_deterministic_and_in_eval_mode(monkeypatch):
    monkeypatch.setenv("CHARLM_STEPS", "1")
    charlm = _load("charlm_example_env")
    assert charlm.PRETRAIN_STEPS == 1
    a, b = charlm.model(), charlm.model()
    assert not a.training
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    torch.manual_seed(0)
    assert not torch.equal(a.head.weight, charlm.CharLM().head.weight)  # it did train


def test_fxprune_finds_heads_and_mlp_channels(charlm):
    torch.manual_seed(0)
    net = charlm.CharLM().eval()
    gm = fxprune.trace(net, charlm.example_inputs())
    groups = fxprune.analyze(gm)
    prunable = list(groups.prunable)
    heads = [g for g in prunable if len(g) == 4 and g.block == 32]
    mlp = [g for g in prunable if len(g) == 512]
    assert len(heads) == 2 and len(mlp) == 2, str(groups)
    assert {tuple(g.layers("producer")) for g in heads} == {
        (f"blocks.{i}.k", f"blocks.{i}.q", f"blocks.{i}.v") for i in range(2)}
    assert {tuple(g.layers("consumer")) for g in mlp} == {(f"blocks.{i}.fc2",) for i in range(2)}
